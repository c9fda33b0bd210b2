# Two entry points for a fresh machine: `make demo` (render the example) and `make test`.
# torch/torchvision are installed first as a pinned pair so no other package pulls a different
# torch build (see README "Install").
VENV ?= .venv
PY := $(VENV)/bin/python

POSE_VENV ?= .venv-pose

.PHONY: install demo test lint pose-env

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/avatar render examples/dance.yaml --out out/demo

# mediapipe 0.10.21 (Pose MSE's offline estimator, model inside the wheel) pins numpy<2, so it
# lives in its own environment, called through a pipe (engine/metrics/mediapipe_worker.py).
# A failed install only skips the pose-estimation tests (they say why).
pose-env: $(POSE_VENV)/.installed

$(POSE_VENV)/.installed:
	-python3 -m venv $(POSE_VENV) && $(POSE_VENV)/bin/python -m pip install -q mediapipe==0.10.21 && touch $@

test: install pose-env
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check engine actors cluster benchmarks tests examples
	$(VENV)/bin/mypy

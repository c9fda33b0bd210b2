# Two entry points for a fresh machine: `make demo` (render the example) and `make test`.
# torch/torchvision are installed first as a pinned pair so no other package pulls a different
# torch build (see README "Install").
VENV ?= .venv
PY := $(VENV)/bin/python

POSE_VENV ?= .venv-pose

.PHONY: install demo test lint pose-env

# The pose environment is part of the default install (RGB driving videos and Pose MSE need it);
# building it is tolerant: a failure prints the fix and leaves the rest working.
install: $(VENV)/.installed pose-env

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/avatar render examples/dance.yaml --out out/demo

# mediapipe 0.10.21 (the offline pose estimator, model inside the wheel: poses from RGB driving
# videos and Pose MSE) pins numpy<2, so it lives in its own environment, called through a pipe
# (engine/metrics/mediapipe_worker.py). A failed build prints why and how to retry; then only RGB
# pose extraction and Pose MSE are unavailable (their errors name `make pose-env`, their tests
# skip with that reason).
pose-env: $(POSE_VENV)/.installed

$(POSE_VENV)/.installed:
	@python3 -m venv $(POSE_VENV) \
	  && $(POSE_VENV)/bin/python -m pip install -q mediapipe==0.10.21 \
	  && $(POSE_VENV)/bin/python -c "import mediapipe as mp; mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1).close()" \
	  && touch $@ \
	  || echo "warning: building $(POSE_VENV) (mediapipe==0.10.21) failed: RGB driving videos and Pose MSE are unavailable; everything else works. Retry with: make pose-env"

test: install pose-env
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check engine actors cluster benchmarks tests examples
	$(VENV)/bin/mypy

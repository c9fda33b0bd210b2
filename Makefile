# Two entry points for a fresh machine: `make demo` (render the example) and `make test`.
# torch/torchvision are installed first as a pinned pair so no other package pulls a different
# torch build (see README "Install").
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/avatar render examples/dance.yaml --out out/demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check engine actors cluster benchmarks tests examples
	$(VENV)/bin/mypy

# Two entry points for a fresh machine: `make demo` (render the example) and `make test`.
# torch/torchvision are installed first as a pinned pair so no other package pulls a different
# torch build (see README "Install").
VENV ?= .venv
PY := $(VENV)/bin/python

POSE_VENV ?= .venv-pose

.PHONY: install demo test lint pose-env gpu-wheels

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

# The wheels benchmarks/gpu.py needs on the GPU device image (Python 3.12, torch 2.11, transformers,
# peft, accelerate, safetensors, opencv, pyyaml, typer, huggingface_hub already there; no registry
# reachable): diffusers and pydantic with the dependencies that image lacks, nothing it has (a
# carried wheel shadows the image's own copy). Left out: PyAV (36 MB) and imageio-ffmpeg (68 MB;
# the benchmark's core run skips video encoding without them, and says so), Ray, xformers and
# TensorRT (hundreds of MB; the benchmark does not import them). See README "GPU numbers".
GPU_WHEELS := diffusers==0.42.1 importlib-metadata==8.7.0 pydantic==2.14.4 pydantic-core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
GPU_WHEELS_MAX_MIB := 50

gpu-wheels:
	@grep -qxF '/.whl/' "$$(git rev-parse --git-path info/exclude)" \
	  || echo '/.whl/' >> "$$(git rev-parse --git-path info/exclude)"
	rm -rf .whl && mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp $(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	@test "$$(ls .whl/*.whl | wc -l)" -eq "$(words $(GPU_WHEELS))" \
	  || { echo "error: expected $(words $(GPU_WHEELS)) wheels in .whl/"; exit 1; }
	@bytes=$$(cat .whl/*.whl | wc -c); mib=$$((bytes / 1048576)); \
	  echo "$(words $(GPU_WHEELS)) wheels, $$mib MiB (limit $(GPU_WHEELS_MAX_MIB) MiB):"; ls -1 .whl; \
	  test $$bytes -le $$(($(GPU_WHEELS_MAX_MIB) * 1048576)) \
	  || { echo "error: .whl/ is $$mib MiB, over $(GPU_WHEELS_MAX_MIB) MiB"; exit 1; }
	@echo "carry: [\".whl\"]"
	@echo "command: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
	--upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \
	|| exit; set -o pipefail; python3 -m benchmarks.gpu --out \$$OUT --budget-s 300 2>&1 \
	| tee \$$OUT/log.txt"

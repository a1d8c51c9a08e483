# genreflow: `make help` lists the targets and the settings you can override (make X VAR=...).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
WORKSPACE ?= workspace
## the recipe `make run` uses: demo (synthetic set, minutes on a CPU) or seed (GPU, real GTZAN)
PROFILE ?= demo
## repetitions of the fault-filtered split `make run` trains (seed + r - 1); the demo's head
## (convex, zero-initialised, full batch) is the same for every seed, so one says all
FILTERED_REPETITIONS ?= [1]
UI_PORT ?= 5000
## pytest arguments, e.g. make test PYTEST_ARGS="-k pack -x"
PYTEST_ARGS ?=
## processes make test runs the tests in (pytest-xdist; 0: in pytest's own process)
TEST_WORKERS ?= 2
# torch is installed first, so that the project's torch range is already met: this release,
# from this index. A bare `torch` from PyPI is a multi-GB CUDA build on Linux, so the default
# is PyTorch's CPU wheel index; the CPU image (make images) and CI take it from here too.
# Empty: pip's own index (a GPU machine, a private mirror). An index that does not answer
# within 5 s is left out with a line saying so (docker/torch_index.py).
TORCH_PIN ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

BIN := $(VENV)/bin
GF := $(BIN)/genreflow

.PHONY: help install test lint run compile ui clean

help: ## show this help
	@echo "Targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'
	@echo "Settings (override with make TARGET NAME=value):"
	@grep -E '^[A-Z_]+ \?= ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = " \\?= "}; {printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python ## create .venv and install genreflow with its test extras
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),$$($(BIN)/python docker/torch_index.py --pip-option '$(TORCH_INDEX)') )"$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e '.[test]'

lint: install ## ruff: lint and format check
	$(BIN)/ruff check genreflow components pipelines tests bench docker
	$(BIN)/ruff format --check genreflow components pipelines tests bench docker

test: lint ## install, lint, then run the whole test suite
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

run: install ## the whole pipeline through kfp.local on the embedded default (PROFILE): cv10, then the filtered split
	$(GF) run --profile $(PROFILE) --workspace $(WORKSPACE) --protocol cv10
	$(GF) run --profile $(PROFILE) --workspace $(WORKSPACE) --protocol filtered \
	    --set folds='$(FILTERED_REPETITIONS)'

compile: install ## compile the KFP pipeline, with the images make images pushed, to $(WORKSPACE)/pipeline.yaml
	$(GF) compile --images $(WORKSPACE)/images.json --out $(WORKSPACE)/pipeline.yaml

ui: install ## the MLflow UI on the workspace's runs (http://127.0.0.1:$(UI_PORT)); prints where the latest run is
	$(GF) ui --tracking-uri sqlite:///$(abspath $(WORKSPACE))/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

clean: ## remove the workspace (outputs of make run)
	rm -rf $(WORKSPACE)

## extra arguments for docker/build.sh, e.g. IMAGE_BUILD_ARGS=--push (then the digests are the registry's)
IMAGE_BUILD_ARGS ?=
.PHONY: images image-test dag-test

images: ## build and tag the CPU and CUDA images (docker or podman); ids and digests -> $(WORKSPACE)/images.json
	TORCH_INDEX="$(TORCH_INDEX)" docker/build.sh --out $(WORKSPACE)/images.json $(IMAGE_BUILD_ARGS)

image-test: install ## as root: build both images with podman, run pack and a fold in the CPU one, compare with outside
	TORCH_INDEX="$(TORCH_INDEX)" VENV=$(VENV) docker/image-test.sh

dag-test: image-test ## as root: the whole DAG (both branches), every step in those images via podman, equal to the subprocess run
	$(BIN)/pytest -m containers tests/containers $(PYTEST_ARGS)

## arguments for every benchmark script: --quick (what make bench runs, minutes) or empty for the full runs
BENCH_ARGS ?= --quick
.PHONY: bench bench-full-scale gpu-check

bench: install ## the benchmarks in bench/ on synthetic data: each prints its figures, the seed's, and the ratios
	set -e; for script in bench/bench_pack.py bench/bench_train_step.py bench/bench_frozen.py bench/bench_full_scale.py; do $(BIN)/python $$script $(BENCH_ARGS); done

bench-full-scale: install ## GTZAN's scale (1000 x 30 s, set made once into $(WORKSPACE)/bench-full-scale): frozen-base CV end to end, bf16 vs fp32
	$(BIN)/python bench/bench_full_scale.py --cache $(WORKSPACE)/bench-full-scale

gpu-check: install ## the seed recipe's fine-tune step on a CUDA GPU (fp32, bf16, channels_last, compile) in under 8 minutes; a dry run on a CPU
	$(BIN)/python bench/gpu_check.py

## uv, which `make lock` runs (this release: its output is the locks' form)
UV_PIN ?= uv==0.13.10
## where `make lock` finds torch's CPU wheel: TORCH_INDEX's torch page, or a folder of wheels
TORCH_WHEELS ?= $(TORCH_INDEX)/torch/
## `make lock` leaves out releases after this day: the same day, the same locks
LOCK_DATE ?= 2026-12-07
## the venv `make test-floors` makes, and the part of the suite it runs there: the library
## (audio, packing, the models, MLflow on a real server, the registry, gs://) and the
## component tier (each step through kfp.local, the compiled DAG, submit)
FLOORS_VENV ?= .venv-floors
FLOORS_TESTS ?= tests/test_audio.py tests/test_pack.py tests/test_models.py \
    tests/test_tracking.py tests/test_promote.py tests/test_gcs.py \
    tests/test_components.py tests/test_compile.py tests/test_submit.py
.PHONY: lock test-floors

$(BIN)/uv: $(BIN)/python
	$(BIN)/pip install --quiet "$(UV_PIN)"

lock: $(BIN)/uv ## requirements/{runtime,cuda,retrain}.lock from pyproject.toml with uv, every file by sha256
	$(BIN)/python requirements/lock.py --uv $(BIN)/uv --torch "$(TORCH_PIN)" --torch-wheels "$(TORCH_WHEELS)" --date $(LOCK_DATE)

# torch stays at TORCH_PIN: its older releases are multi-GB CUDA builds on PyPI.
test-floors: ## the lowest versions pyproject admits (torch: TORCH_PIN) in $(FLOORS_VENV), then FLOORS_TESTS on them
	rm -rf $(FLOORS_VENV) && $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/pip install --quiet --upgrade pip
	$(FLOORS_VENV)/bin/pip install --quiet $(if $(TORCH_INDEX),$$($(FLOORS_VENV)/bin/python docker/torch_index.py --pip-option '$(TORCH_INDEX)') )"$(TORCH_PIN)"
	$(FLOORS_VENV)/bin/python requirements/floors.py pyproject.toml --keep torch | tee $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/pip install --quiet --constraint $(FLOORS_VENV)/floors.txt -e '.[test]'
	$(FLOORS_VENV)/bin/pytest -n 0 -p no:cacheprovider $(PYTEST_ARGS) $(FLOORS_TESTS)

# genreflow: `make help` lists the targets and the settings you can override (make X VAR=...).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
WORKSPACE ?= workspace
## pytest arguments, e.g. make test PYTEST_ARGS="-k pack -x"
PYTEST_ARGS ?=
# The local CPU wheel: installed first so that the project's torch range is already met
# (a bare `torch` requirement would pull a multi-GB CUDA build).
TORCH_PIN ?= torch==2.13.0

BIN := $(VENV)/bin
GF := $(BIN)/genreflow

.PHONY: help install test lint run clean

help: ## show this help
	@echo "Targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'
	@echo "Settings (override with make TARGET NAME=value):"
	@grep -E '^[A-Z_]+ \?= ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = " \\?= "}; {printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python ## create .venv and install genreflow with its test extras
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e '.[test]'

lint: install ## ruff: lint and format check
	$(BIN)/ruff check genreflow tests
	$(BIN)/ruff format --check genreflow tests

test: install ## install, then run the whole test suite
	$(BIN)/pytest $(PYTEST_ARGS)

run: install ## the main job on the embedded default: synth -> download -> pack
	$(GF) synth --out $(WORKSPACE)/source
	$(GF) download --source file://$(abspath $(WORKSPACE))/source/genres.tar.gz --out $(WORKSPACE)/dataset
	$(GF) pack --dataset $(WORKSPACE)/dataset --out $(WORKSPACE)/features.h5

clean: ## remove the workspace (outputs of make run)
	rm -rf $(WORKSPACE)

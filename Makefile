# One command runs the service (make run), one runs the tests (make test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of this exact version lies on the build machines' disk; an unpinned torch pulls
# a multi-GB CUDA build. The package itself only asks for torch>=2.5.
TORCH_PIN := torch==2.13.0

.PHONY: install install-ray install-test run demo test test-e2e test-container lint gpu-check gpu-check-cpu clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "fluxtrain needs Python 3.11 or newer: run with PYTHON=python3.11 (or newer)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[cloud]'
	touch $@

# Ray stays optional: FLUXTRAIN_EXECUTOR=ray needs it, nothing else does.
$(VENV)/.installed-ray: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e '.[cloud,ray]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-ray: $(VENV)/.installed-ray

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/fluxtrain serve

# URLs to a LoRA on tiny models, through the HTTP API, in under two minutes on a laptop CPU.
demo: install
	$(BIN)/fluxtrain demo

test: install-test
	$(BIN)/pytest -q -m "not e2e"

# The multi-process scenarios (services killed and adopted, PostgreSQL replicas, the demo, --reload):
# three minutes on the 2-core dev machine, which would take `make test` past its 15-minute budget.
test-e2e: install-test
	$(BIN)/pytest -q -m e2e

# Builds the Dockerfile with buildah over a debootstrapped Debian (cached in
# /var/cache/fluxtrain-test) and smoke-tests the image; needs root, buildah and debootstrap.
test-container: install-test
	FLUXTRAIN_TEST_CONTAINER=1 $(BIN)/pytest -q tests/container

lint: install-test
	$(BIN)/ruff check .

# The GPU check (bench/gpu_check.py): `make gpu-check GPU_CHECK_ARGS="--out results"` on a CUDA host;
# gpu-check-cpu runs its slow CPU test, the correctness part on the tiny models.
gpu-check: install
	$(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-cpu: install-test
	FLUXTRAIN_GPU_CHECK_CPU=1 $(BIN)/pytest -q tests/bench/test_gpu_check.py

clean:
	rm -rf $(VENV)

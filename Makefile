# One command runs the service (make run), one runs the tests (make test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: install install-test run test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e .

install-test: install
	$(BIN)/pip install -q -e '.[test]'

run: install
	$(BIN)/fluxtrain serve

test: install-test
	$(BIN)/pytest -q

lint: install-test
	$(BIN)/ruff check .

# One-command set-up: every target creates .venv if needed and installs seqlab with its dev extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint arena bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev,triton,report,hf]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check seqlab tests benchmarks

test: $(STAMP) lint
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

arena: $(STAMP)
	$(BIN)/seqlab arena

clean:
	rm -rf $(VENV) build *.egg-info

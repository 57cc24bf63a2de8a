# Two commands set up a fresh machine: `make search` and `make test`.
# Python 3.11 when present, else the default python3 (the project needs >= 3.11).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format search bench clean

install: $(STAMP)

# Reinstall only when the project metadata changed; otherwise this is a no-op.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The quickstart design exploration on the bundled synthetic data (resumes if run again).
search: install
	$(BIN)/covidnet search --config experiments/quickstart.yaml --workdir runs/quickstart

bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/input_pipeline.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/search_efficiency.py

clean:
	rm -rf runs .pytest_cache

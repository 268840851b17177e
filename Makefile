# Two commands do all the set-up on a fresh clone (offline, from PyPI packages alone):
#   make demo   creates .venv, installs edgetl[train,dev,sweep], runs `edgetl build recipes/quickstart.yaml`
#   make test   creates .venv, installs edgetl[train,dev,sweep], runs the test suite
#   make lint   ruff's lint and format checks (CI runs them before the tests)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[train,dev,sweep]'
	touch $@

.PHONY: install demo test lint
install: $(BIN)/.installed

demo: install
	$(BIN)/edgetl build recipes/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

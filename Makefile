# Both entry points set up a fresh machine themselves: a virtual environment in
# $(VENV), the pinned CPU build of torch, and the package in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.autopart-installed

.PHONY: install demo test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/pinned.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/pinned.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements/pinned.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/autopart demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests bench examples
	$(VENV)/bin/ruff format src tests bench examples

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache

# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv with $(PYTHON) and install from the lock (requirements/lock.txt);
# `make lock` refreshes the lock, `make docs` builds the documentation site into site/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
INSTALL := $(BIN)/python -m pip install -q --constraint $(LOCK)
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test docs bench lock build clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# one stamp per set of extras: `make demo` installs only what the demo needs
$(VENV)/.demo: pyproject.toml $(LOCK) | $(BIN)/python
	$(INSTALL) -e '.[demo]'
	touch $@

$(VENV)/.test: pyproject.toml $(LOCK) | $(BIN)/python
	$(INSTALL) -e '.[demo,test,interop,docs,zoo]'
	touch $@ $(VENV)/.demo $(VENV)/.docs

$(VENV)/.docs: pyproject.toml $(LOCK) | $(BIN)/python
	$(INSTALL) -e '.[docs]'
	touch $@

demo: $(VENV)/.demo
	$(BIN)/trax-attr demo

# the suite over every core (pytest-xdist; one test file per worker, so a module's fixtures
# are built once); tests/conftest.py shares one JAX compilation cache between the workers
test: $(VENV)/.test
	$(BIN)/python -m pytest -q -n auto --dist loadfile

docs: $(VENV)/.docs
	$(BIN)/python -m mkdocs build --strict --site-dir site

bench: $(VENV)/.test
	$(BIN)/python benchmarks/run_all.py

# Re-resolve every pin to the newest versions the ranges in pyproject.toml allow (Python
# 3.11); torch stays 2.13.0 (the CPU wheel this machine serves as 2.13.0+cpu).
lock: | $(BIN)/python
	$(BIN)/python -m pip install -q pip-tools
	$(BIN)/pip-compile --quiet --upgrade --strip-extras --no-emit-index-url --no-emit-find-links \
	  --extra demo --extra test --extra interop --extra docs --extra zoo -o $(LOCK) pyproject.toml
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' $(LOCK)

# the wheel and sdist in dist/, checked by twine
build: | $(BIN)/python
	$(BIN)/python -m pip install -q build twine
	$(BIN)/python -m build
	$(BIN)/python -m twine check --strict dist/*

clean:
	rm -rf $(VENV) build dist site *.egg-info src/*.egg-info .pytest_cache

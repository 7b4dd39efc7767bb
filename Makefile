# `make demo` and `make test` are the README's two commands; both build .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# The Procfile names bare commands (alembic, gunicorn, celery): this venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# What `make run` starts; e.g. `make run PROCESSES="web classify"` for fewer.
PROCESSES ?= web classify conversations agent callbacks beat flower

.PHONY: demo test lint run bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m hookline.demo

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# honcho stops every process when one exits, and `release` exits once the schema is
# current, so it runs first and the long-running processes after it.
run: $(STAMP)
	$(VENV)/bin/honcho run alembic upgrade head
	$(VENV)/bin/honcho start $(PROCESSES)

bench: $(STAMP)
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) var *.egg-info .pytest_cache .ruff_cache

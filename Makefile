# Two entry points: `make demo` and `make test`. Each sets up .venv on a new machine first.
PY := .venv/bin/python
PIP := $(PY) -m pip
STAMP := .venv/.installed

.PHONY: demo test setup lint format

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh $(shell find integrations -name pyproject.toml)
	bash scripts/setup.sh
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/megacontext demo

test: $(STAMP)
	bash scripts/test.sh

lint: $(STAMP)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format: $(STAMP)
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

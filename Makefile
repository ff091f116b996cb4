# Everything a fresh machine needs is installed by these targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv tools lint typecheck test test-fast demo kafka sandbox bench soak clean

all: test

# Re-install only when the project metadata changed (editable install: code changes need nothing).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Pinned command-line tools the tests use for real (promtool, helm), installed into .tools/bin.
TOOLS := .tools/bin
$(TOOLS)/promtool:
	@echo "make: installing promtool into $(TOOLS) (taken from Debian's prometheus package; the alert-rule tests run it)"
	bash .ci/tools/install-promtool.sh $(TOOLS)

# Built once per machine (Go >= 1.26, ~10 min, ~1.2 GB under ~/.cache/ingest/go), then copied from
# ~/.cache/ingest/helm/ into every checkout.
$(TOOLS)/helm:
	@echo "make: installing helm into $(TOOLS) (the chart tests run the real helm)"
	bash .ci/tools/install-helm.sh $(TOOLS)

tools: $(TOOLS)/promtool $(TOOLS)/helm

lint: venv
	$(BIN)/ruff check ingest tests

typecheck: venv
	$(BIN)/mypy

test: lint typecheck tools
	PATH="$(CURDIR)/$(TOOLS):$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

# The unit tests alone (tests/unit): no broker, no sandbox, no subprocess, no tools.
test-fast: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

demo: venv
	$(BIN)/ingest demo

kafka: venv
	$(BIN)/ingest dev kafka

sandbox: venv
	$(BIN)/ingest sandbox

# Three runs of every scenario against a local broker; writes bench-results/ and docs/benchmarks.md.
bench: venv
	$(BIN)/python -m tests.bench.run

# Chaos soak (not in `make test`): a worker group under random faults, 10 minutes by default;
# SOAK_ARGS="--minutes 20 --seed N --mode exactly-once" (tests/soak.py).
SOAK_ARGS ?=
soak: venv
	$(BIN)/python -m tests.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist

# Thin targets over the project's own tools. Every target creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint types unit test-kernel fmt clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "error: '$(PYTHON) -m venv' failed. On Debian/Ubuntu: sudo apt-get install python3-venv" >&2; \
	  rm -rf $(VENV); exit 1; }
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=strict
	@touch $@

## demo: the main job on simulated devices
demo: $(STAMP)
	$(BIN)/vfmig inspect 'sim:demo,size=4MiB,flags=stop-copy+p2p+pre-copy'

## test: lint, type check and the whole test suite (what CI runs)
test: check unit

check: lint types

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy -p vfmig

unit: $(STAMP)
	$(BIN)/pytest

## test-kernel: only the real-kernel tier: Debian's 6.12 under QEMU, tests/kernel in the guest
## (docs/kernel-tier.md; 'make test' runs it too). ARGS='-k uapi' picks guest tests.
test-kernel: $(STAMP)
	$(BIN)/python tests/kernel/harness.py $(if $(ARGS),-- tests/kernel $(ARGS))

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build .cache .mypy_cache .pytest_cache .ruff_cache .hypothesis *.egg-info

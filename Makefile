# Thin targets over the project's own tools. Every target creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint types unit test-kernel fuzz bench-protocol bench fmt clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "error: '$(PYTHON) -m venv' failed. On Debian/Ubuntu: sudo apt-get install python3-venv" >&2; \
	  rm -rf $(VENV); exit 1; }
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=strict
	@touch $@

## demo: a live migration between two simulated devices -- 256 MiB of realistic state,
## dirtied at 20 MiB/s while precopy runs -- with progress and summary, then a check that
## the destination's state (dumped to a file) is exactly the source's
DEMO := .cache/demo
DEMO_SRC := sim:src,size=256MiB,content=realistic,state-dir=$(DEMO)/src
demo: $(STAMP)
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/vfmig migrate '$(DEMO_SRC),dirty-rate=20MiB' 'sim:dst,size=256MiB,dump=$(DEMO)/dst.bin'
	$(BIN)/python examples/compare_state.py '$(DEMO_SRC)' $(DEMO)/dst.bin

## test: lint, type check and the whole test suite (what CI runs)
test: check unit

check: lint types

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy -p vfmig

unit: $(STAMP)
	$(BIN)/pytest --durations=10

## test-kernel: only the real-kernel tier: Debian's 6.12 under QEMU, tests in the guest
## (docs/kernel-tier.md; 'make test' runs it too). K=uapi: only guest tests matching -k uapi.
test-kernel: $(STAMP)
	$(BIN)/python tests/kernel/harness.py $(if $(K),-k '$(K)')

## fuzz: the protocol fuzzer (atheris, installed into .venv on first use) for FUZZ_SECONDS
## (default 300); new inputs go to .cache/fuzz/corpus, crashes to .cache/fuzz/crash-*
FUZZ_SECONDS ?= 300
fuzz: $(VENV)/.fuzz-installed
	@mkdir -p .cache/fuzz/corpus
	$(BIN)/python tests/fuzz/fuzz_protocol.py .cache/fuzz/corpus tests/fuzz/corpus \
	  -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=1024 \
	  -artifact_prefix=.cache/fuzz/ -print_final_stats=1

$(VENV)/.fuzz-installed: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[fuzz]' --config-settings editable_mode=strict
	@touch $@

## bench-protocol: micro-benchmark of the protocol's data path on one core (not a test)
bench-protocol: $(STAMP)
	$(BIN)/python tests/bench/bench_protocol.py

## bench: vfmig migrate between two agents vs zstd -1 | socat, same bytes, same machine
## (needs socat and zstd); ARGS='--size 1GiB --rounds 7' to change the defaults
bench: $(STAMP)
	$(BIN)/python tests/bench/bench_migrate.py $(ARGS)

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build .cache .mypy_cache .pytest_cache .ruff_cache .hypothesis *.egg-info

# Two entry points for a fresh machine: `make demo` and `make test`. Each sets up what it needs:
# a local virtualenv with the project installed, and mosquitto (via apt-get) when it is missing.
VENV    ?= .venv
PYTHON  ?= python3
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.14.1 torchvision==0.29.1
# Test files run on this many pytest-xdist workers (each file's tests in one worker, in order): most of
# the suite waits on agent processes and brokers, so 2 workers on 2 cores take ~7 min instead of ~11.
TEST_WORKERS ?= 2

.PHONY: demo test lint typecheck bench bench-quick utility learning mosquitto clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y python3-venv)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

mosquitto:
	@(command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]) && command -v mosquitto_sub >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y mosquitto mosquitto-clients)

demo: $(STAMP) mosquitto
	$(BIN)/mistnet demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) mosquitto lint typecheck
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP) mosquitto
	$(BIN)/mistnet bench

bench-quick: $(STAMP) mosquitto
	$(BIN)/mistnet bench --quick

# Learning from the edges: coco-person under each shift, MistNet at each epsilon against pretrained and
# centralized (docs/privacy-utility.md); about 1.5 h per shift on 2 cores.
SHIFTS ?= contrast:5 contrast:3 fog:3 clean
learning: $(STAMP)
	for s in $(SHIFTS); do $(BIN)/python -m bench.person --shift $$s || exit 1; done
	$(BIN)/python -m bench.utility_doc

# Privacy/utility table and feature-inversion attack (docs/privacy-utility.md); about an hour on 2 cores.
utility: $(STAMP)
	$(BIN)/python -m bench.utility
	$(BIN)/mistnet privacy-report --bits 1 --out bench/results/privacy-report
	$(BIN)/mistnet privacy-report --bits 4 --epsilons 100,10 --out bench/results/privacy-report-4bit
	$(BIN)/python -m bench.utility_doc

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

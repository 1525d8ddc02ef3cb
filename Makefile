# Set-up bootstraps itself: a .venv with torch 2.13.0 (CPU) installed first, then equiseg[dev].
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test docs bench lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job: the paper's comparison, small, on synthetic data (~12 min on 2 cores)
	$(BIN)/equiseg demo --out demo

test: $(STAMP)  ## the test suite, on both cores, with the 15 slowest tests listed (-m "not slow" skips the slow ones)
	$(BIN)/python -m pytest -n 2 -q --durations=15

docs: $(STAMP)  ## the documentation site into site/ (reference pages generated from the code; warnings fail)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)  ## speed benchmarks (not part of the tests)
	$(BIN)/python benchmarks/layers.py
	$(BIN)/python benchmarks/unet_step.py
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/pipeline.py

lint: $(STAMP)  ## ruff (imports, bugbear, pyupgrade, docstrings; pyproject.toml says which)
	$(BIN)/ruff check src tests benchmarks docs/hooks

typecheck: $(STAMP)  ## pyright in basic mode over src ([tool.pyright] in pyproject.toml); any error fails
	$(BIN)/pyright --project pyproject.toml

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache

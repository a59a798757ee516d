# The two README commands. Both build .venv from scratch when it is missing.
# torch is pinned in the same pip command as everything else: an unpinned torch
# (or a dependency resolving one first) would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

# `import tokenmdp` writes the plugin catalog, so that even the first `tokenmdp --help`
# runs without importing torch (docs/hooks.md).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[test,plots]" tests/fixtures/outside_plugin
	$(BIN)/python -c "import tokenmdp"
	touch $(STAMP)

install: $(STAMP)

# One torch thread: with two, while other jobs shared the 2 cores, the first demo cell
# took 229 s instead of 13 s.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/tokenmdp compare configs/compare_demo.toml

# The rules of the code first (seconds): ruff lint and format, the import contracts of
# pyproject.toml (the core's layers; plugins and envs import only the tokenmdp namespace).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs

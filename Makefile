# The two README commands. Both build .venv from scratch when it is missing.
# torch is pinned in the same pip command as everything else: an unpinned torch
# (or a dependency resolving one first) would pull a multi-GB CUDA build.
#
# Every install of the README's set-up goes through constraints.txt, the lock: the exact
# versions CI tested, so two fresh machines a month apart get the same packages.
# pyproject.toml keeps compatible ranges for people who install tokenmdp as a library.
# `make lock` refreshes the lock from a clean resolve; `make test-latest` runs the suite
# against the newest releases without it (docs/testing.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := constraints.txt
PIP    := pip install --quiet --disable-pip-version-check
# What `make demo`/`make test` install (the lock also covers the gemma extra of the docs).
PACKAGES := "torch==2.13.0" -e ".[test,plots]" tests/fixtures/outside_plugin
LOCKED_PACKAGES := "torch==2.13.0" -e ".[test,plots,gemma]" tests/fixtures/outside_plugin

.PHONY: demo test check install browser lock test-latest clean

# The build backend first, from the lock, then everything else without build isolation,
# so that the backend that builds tokenmdp is the locked one too (an isolated build would
# take the newest setuptools every time).
# `import tokenmdp` writes the plugin catalog, so that even the first `tokenmdp --help`
# runs without importing torch (docs/hooks.md).
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP) -c $(LOCK) setuptools
	$(BIN)/$(PIP) -c $(LOCK) --no-build-isolation $(PACKAGES)
	$(BIN)/python -c "import tokenmdp"
	touch $(STAMP)

install: $(STAMP)

# One torch thread: with two, while other jobs shared the 2 cores, the first demo cell
# took 229 s instead of 13 s.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/tokenmdp compare configs/compare_demo.toml

test: $(STAMP) browser
	$(MAKE) --no-print-directory check BIN=$(BIN)

# The credit explorer's browser test (tests/test_explorer.py) drives Debian's chromium; it
# fails without it, so a fresh machine gets it here (docs/testing.md). TOKENMDP_CHROMIUM
# names another Chrome or Chromium instead.
browser:
	@command -v chromium >/dev/null 2>&1 || test -x "$$TOKENMDP_CHROMIUM" || { \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	  echo "installing Debian's chromium for the browser test (docs/testing.md)"; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The rules of the code first (seconds): ruff lint and format, the import contracts of
# pyproject.toml (the core's layers; plugins and envs import only the tokenmdp namespace),
# then the suite. BIN picks the environment (test-latest runs it on .venv-latest).
check:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# A clean resolve of the newest releases pyproject.toml admits (torch stays pinned),
# written as name==version lines: no index address, no local path. torch's local label
# (+cpu) is dropped so the lock also fits a torch 2.13.0 taken from another source.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/$(PIP) --upgrade setuptools
	.venv-lock/bin/$(PIP) --no-build-isolation $(LOCKED_PACKAGES)
	{ echo "# The lock: exact versions for make demo, make test and CI (pip install -c $(LOCK))."; \
	  echo "# Written by make lock on $$(date -u +%Y-%m-%d) with $$(.venv-lock/bin/python --version); do not edit."; \
	  echo "# Refresh it as docs/testing.md says (make test-latest first)."; \
	  .venv-lock/bin/pip freeze --all --exclude-editable --disable-pip-version-check \
	    | grep -v -e ' @ ' -e '^pip==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# The suite against the newest releases, in an environment of its own built without the
# lock: an upgrade that breaks something is found here before the lock is moved. Not in CI.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/$(PIP) --upgrade setuptools
	.venv-latest/bin/$(PIP) --upgrade --no-build-isolation $(PACKAGES)
	.venv-latest/bin/pip list --disable-pip-version-check --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/python -c "$$LOCK_DIFF" $(LOCK) .venv-latest/versions.txt
	$(MAKE) --no-print-directory check BIN=.venv-latest/bin

# Which installed versions differ from the lock (names normalised as pip does; torch's +cpu
# label ignored), for test-latest's report.
define LOCK_DIFF
import re, sys
def read(path):
    pins = {}
    for line in open(path):
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+")[0]
    return pins
lock, now = read(sys.argv[1]), read(sys.argv[2])
changed = [f"  {n}: {lock[n]} -> {now[n]}" for n in sorted(lock.keys() & now.keys()) if lock[n] != now[n]]
new = [f"  {n}=={now[n]} (not in the lock)" for n in sorted(now.keys() - lock.keys()) if n not in ("pip", "tokenmdp", "tokenmdp-outside-advantage")]
print("newest releases against the lock:", *(changed + new or ["  the same versions"]), sep="\n")
endef
export LOCK_DIFF

clean:
	rm -rf $(VENV) .venv-latest .venv-lock runs

import atexit
import os
import random
import shutil
import tempfile

# The plugin catalog (tokenmdp/plugin/catalog.py) of this test session lives in a folder
# of its own, set before tokenmdp is first imported: the suite never reads or writes the
# user's ~/.cache, and subprocesses inherit the same folder.
if "TOKENMDP_CACHE_DIR" not in os.environ:
    os.environ["TOKENMDP_CACHE_DIR"] = tempfile.mkdtemp(prefix="tokenmdp-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TOKENMDP_CACHE_DIR"], ignore_errors=True)

import numpy as np
import pytest
import torch
from helpers import TINY
from hypothesis import settings

from tokenmdp.config import load_config

torch.set_num_threads(1)

# CI (``CI`` set, as .ci/run does) replays the same examples on every run and keeps no
# example database, so a landing is never blocked by a new random draw. A plain local
# `make test` explores new examples each run; a failure it finds is saved in .hypothesis/
# (git-ignored) and replayed first next time. The tests' own @settings(max_examples=...,
# deadline=None) apply on top of either profile.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "explore")


@pytest.fixture(autouse=True)
def _same_global_random_state():
    """Every test starts from the same global RNG state, whatever ran before it, so no
    result depends on the order tests run in (tests also seed what they draw)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_config(tmp_path):
    def make(*overrides, run_dir=None):
        return load_config(None, [*TINY, f"run.dir={run_dir or tmp_path / 'run'}", *overrides])

    return make

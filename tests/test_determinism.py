"""The suite itself is reproducible: CI replays the same hypothesis examples on every run,
a local run explores new ones, the example database is never committed, and no test sees
global random state left behind by another test (docs/testing.md)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]

DRAWING_TEST = """
import os

from hypothesis import given, settings, strategies as st

@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10**9))
def test_draw(n):
    with open(os.environ["DRAWS_FILE"], "a") as fh:
        fh.write(f"{n}\\n")
"""


def _draws(tmp_path: Path, name: str, ci: bool) -> list[str]:
    """The examples one fresh pytest process draws, under tests/conftest.py's profiles."""
    folder = tmp_path / name
    folder.mkdir()
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(ROOT / "tests" / name, folder / name)
    out = folder / "draws.txt"
    (folder / "test_draw.py").write_text(DRAWING_TEST)  # the same source: derandomize hashes it
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["DRAWS_FILE"] = str(out)
    if ci:
        env["CI"] = "true"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out.read_text().splitlines()


def test_ci_replays_the_same_examples_and_a_local_run_explores(tmp_path):
    first, second = _draws(tmp_path, "ci1", ci=True), _draws(tmp_path, "ci2", ci=True)
    assert first == second and len(set(first)) > 5
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.database is None  # CI keeps no example database
    # Locally each run draws afresh: two runs of 20 draws in 0..1e9 never agree by chance.
    assert _draws(tmp_path, "local1", ci=False) != _draws(tmp_path, "local2", ci=False)


def test_the_hypothesis_example_database_is_never_committed():
    tracked = subprocess.run(["git", "ls-files", ".hypothesis"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.returncode != 0 or tracked.stdout == ""  # not a git checkout, or nothing tracked
    assert ".hypothesis/" in (ROOT / ".gitignore").read_text().split()


def test_each_test_starts_from_the_same_global_random_state():
    """The autouse fixture in conftest.py: what this test draws from the global RNGs is the
    same whatever ran before it (the values are those of seed 0)."""
    drawn = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    assert drawn == (random.random(), float(np.random.rand()), float(torch.rand(())))

"""``train.release_memory`` (tokenmdp/host_memory.py): freed large tensors go back to the
system, the numbers do not change, and a C library without ``mallopt`` is a one-line error.
Each check that sets the threshold runs in its own process: the setting is the process's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import TINY

from tokenmdp import host_memory
from tokenmdp.cli import main

GLIBC = pytest.mark.skipif(host_memory.glibc() is None, reason="glibc only (the error path is tested anywhere)")

RESIDENT = textwrap.dedent("""
    import os, sys, torch
    from tokenmdp import host_memory

    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    if sys.argv[1] == "release":
        assert host_memory.release_freed_memory()
    big = torch.ones(1 << 22)  # 16 MiB: glibc maps it, and raises its threshold when it is freed
    del big
    start = resident_mib()
    # 128 MiB in 2 MiB tensors, each followed on the heap by a small one that stays: the
    # heap cannot shrink past a block in use, as in a training step, where the small
    # tensors a step keeps (metrics, the optimizer's scalars) sit between the large ones
    kept, pins = [], []
    for _ in range(64):
        kept.append(torch.ones(1 << 19))
        pins.append(torch.ones(1 << 12))
    grown = resident_mib() - start
    del kept
    print(round(grown), round(resident_mib() - start))
""")


@GLIBC
@pytest.mark.parametrize("mode, kept_mib", [("default", 128), ("release", 0)])
def test_freed_tensors_leave_the_resident_set_only_when_released(mode, kept_mib):
    """glibc's default keeps 128 MiB of freed 2 MiB tensors; with the threshold at 1 MiB
    each had its own mapping, and all of it goes back."""
    done = subprocess.run([sys.executable, "-c", RESIDENT, mode], capture_output=True, text=True, check=True)
    grown, kept = map(int, done.stdout.split())
    assert grown == pytest.approx(128, abs=8)
    assert kept == pytest.approx(kept_mib, abs=8)


def run_metrics(tmp_path: Path, name: str, *extra: str) -> bytes:
    run_dir = tmp_path / name
    args = ["train", *[a for s in [*TINY, f"run.dir={run_dir}", *extra] for a in ("--set", s)]]
    done = subprocess.run([sys.executable, "-m", "tokenmdp", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return (run_dir / "metrics.jsonl").read_bytes()


@GLIBC
def test_the_numbers_are_the_same_with_and_without(tmp_path):
    assert run_metrics(tmp_path, "on", "train.release_memory=true") == run_metrics(tmp_path, "off")


def test_without_glibc_it_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(host_memory, "glibc", lambda: None)
    args = [a for s in [*TINY, f"run.dir={tmp_path / 'run'}", "train.release_memory=true"] for a in ("--set", s)]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.release_memory needs glibc's malloc" in err[0]
    assert not (tmp_path / "run").exists()

"""`tokenmdp compare` against damage and misuse: cached references are checked (checksums,
form, finiteness, shapes) and a damaged one is fine-tuned again with a one-line note; Ctrl-C
cancels the cells not started; an ``out`` that is a file, or that another compare holds, is
a one-line error (tokenmdp/reports/compare/)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import wait_until
from safetensors.torch import load_file, save_file
from test_compare import ROOT, TINY

from tokenmdp import cli
from tokenmdp.plugin.registry import Registry, plugin_manager
from tokenmdp.reports import compare
from tokenmdp.reports.compare import references
from tokenmdp.training.rundir import RunDir


def write_grid(path: Path, settings=TINY, seeds="[0, 1, 2]") -> Path:
    shared = ", ".join(json.dumps(s) for s in settings)
    path.write_text(
        f'[compare]\nrecipes = ["reinforce"]\nenvs = ["Pattern"]\nseeds = {seeds}\n'
        f'out = "{path.parent / "out"}"\nset = [{shared}]\n'
    )
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checksum(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _reseal(path: Path) -> None:
    """Make the checksum match the damaged file: the other checks must catch it."""
    _checksum(path).write_text(_sha(path) + "\n")


# --- the reference cache ----------------------------------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A finished grid; its seed-0 cell, its cached reference and what they held."""
    path = write_grid(tmp_path_factory.mktemp("safety") / "grid.toml")
    compare.run_grid(compare.load_grid(path), progress=False)
    registry = Registry(plugin_manager())
    registry.register_envs()
    cell = compare.plan_cells(compare.load_grid(path), registry)[0]
    assert cell.seed == 0 and cell.finished
    weights, meta = references._reference_files(cell)
    files = [weights, meta, _checksum(weights), _checksum(meta)]
    assert all(p.is_file() for p in files)  # the cell's own fine-tune got its checksums
    assert _checksum(weights).read_text().strip() == _sha(weights)
    saved = {p: p.read_bytes() for p in files}
    return path, cell, weights, meta, saved, (cell.dir / "metrics.jsonl").read_text()


@pytest.fixture
def whole(grid):
    """The grid as the module fixture left it (a test damages it; its rerun repairs it)."""
    path, cell, weights, meta, saved, metrics = grid
    for p, data in saved.items():
        if p.is_dir():
            shutil.rmtree(p)
        p.unlink(missing_ok=True)
        p.write_bytes(data)
    return grid


def _rerun_cell(grid, capsys) -> str:
    """Rerun the seed-0 cell (its folder deleted), which reads the cached reference; stderr."""
    path, cell, *_ = grid
    shutil.rmtree(cell.dir)
    capsys.readouterr()
    compare.run_grid(compare.load_grid(path), progress=False)
    return capsys.readouterr().err


def _flip_a_bit(weights, meta):
    data = bytearray(weights.read_bytes())
    data[len(data) - 40] ^= 0x01  # in the last tensor's data, past the header
    weights.write_bytes(bytes(data))


def _truncate(weights, meta):
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _reseal(weights)


def _empty(weights, meta):
    weights.write_bytes(b"")
    _reseal(weights)


def _truncate_unsealed(weights, meta):
    weights.write_bytes(weights.read_bytes()[:100])


def _edit_weights(change, seal=True):
    def damage(weights, meta):
        stored = load_file(str(weights))
        name = next(k for k in stored if k != "__rng_state__")
        stored[name] = change(stored[name])
        save_file(stored, str(weights))
        if seal:
            _reseal(weights)
        else:
            _checksum(weights).unlink()
            _checksum(meta).unlink()

    return damage


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _meta(text):
    def damage(weights, meta):
        meta.write_text(text)
        _reseal(meta)

    return damage


def _no_meta(weights, meta):
    meta.unlink()


DAMAGE = {
    "bit-flip": (_flip_a_bit, "is corrupt"),
    "truncated": (_truncate, "cannot be loaded"),
    "truncated-no-checksum-update": (lambda w, m: w.write_bytes(w.read_bytes()[:-64]), "is corrupt"),
    "truncated-unsealed": (_truncate_unsealed, "cannot be loaded"),
    "empty": (_empty, "cannot be loaded"),
    "nan": (_edit_weights(_nan), "holds non-finite weights"),
    "inf-unsealed": (_edit_weights(lambda t: t * float("inf"), seal=False), "holds non-finite weights"),
    "wrong-shape": (_edit_weights(lambda t: torch.zeros(t.shape[0] + 1, *t.shape[1:])), "does not fit"),
    "corrupt-json": (_meta("{not json"), "has damaged metadata"),
    "json-wrong-types": (_meta('{"losses": "low", "tagged_sft_tokens": -1}'), "has damaged metadata"),
    "json-nan-loss": (_meta('{"losses": [NaN], "tagged_sft_tokens": 0}'), "has damaged metadata"),
    "meta-missing": (_no_meta, "is incomplete"),
    "weights-a-folder": (lambda w, m: (w.unlink(), w.mkdir()), "is incomplete"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_cached_reference_is_fine_tuned_again(whole, capsys, kind):
    path, cell, weights, meta, saved, metrics = whole
    damage, says = DAMAGE[kind]
    if kind == "truncated-unsealed":
        _checksum(weights).unlink()
        _checksum(meta).unlink()
    damage(weights, meta)
    err = _rerun_cell(whole, capsys)
    assert "Traceback" not in err
    notes = [line for line in err.splitlines() if "cached reference" in line]
    assert len(notes) == 1 and notes[0].startswith(f"tokenmdp: cached reference {weights} {says}"), err
    assert notes[0].endswith("; fine-tuning it again")
    # fine-tuned again, never the damaged file: the same fine-tune, bit for bit, and the same run
    assert weights.read_bytes() == saved[weights] and meta.read_bytes() == saved[meta]
    assert _checksum(weights).read_bytes() == saved[_checksum(weights)]
    assert (cell.dir / "metrics.jsonl").read_text() == metrics


def test_a_whole_entry_without_checksums_is_sealed_and_reused(whole, capsys):
    path, cell, weights, meta, saved, metrics = whole
    _checksum(weights).unlink()
    _checksum(meta).unlink()
    before = weights.stat().st_mtime_ns
    err = _rerun_cell(whole, capsys)
    assert "cached reference" not in err and "Traceback" not in err
    assert weights.stat().st_mtime_ns == before  # loaded, not fine-tuned again
    assert _checksum(weights).read_bytes() == saved[_checksum(weights)]
    assert _checksum(meta).read_bytes() == saved[_checksum(meta)]
    assert (cell.dir / "metrics.jsonl").read_text() == metrics


def _meta_edited_after_its_checksum(weights, meta):
    meta.write_text('{"losses": [], "tagged_sft_tokens": 9}')  # well-formed, but not what was checksummed


@pytest.mark.parametrize("damage", [_meta("{not json"), _meta_edited_after_its_checksum], ids=["not-json", "edited"])
def test_extras_of_a_finished_cell_never_trust_damaged_metadata(whole, capsys, damage):
    """compare.json recomputed from a damaged KEY.json: the tagged tokens are recounted."""
    path, cell, weights, meta, saved, metrics = whole
    extras = json.loads((cell.dir / "compare.json").read_text())
    (cell.dir / "compare.json").unlink()
    damage(weights, meta)
    compare.run_grid(compare.load_grid(path), progress=False)
    assert "Traceback" not in capsys.readouterr().err
    assert json.loads((cell.dir / "compare.json").read_text()) == extras


# --- Ctrl-C ------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("when", ["cells-training", "workers-starting"])
def test_ctrl_c_cancels_the_cells_not_started_and_prints_one_line(tmp_path, when):
    """SIGINT to the process group (as a terminal's Ctrl-C) while the first cells train, or
    while the workers are still starting (importing torch): cells training checkpoint and
    stop, no other cell starts, no process prints a traceback, and the exit code is 130."""
    long_cells = [*TINY, "train.steps=400", "run.checkpoint_every=50"]
    grid = write_grid(tmp_path / "grid.toml", long_cells, seeds="[0, 1, 2, 3, 4, 5]")
    cells = tmp_path / "out" / "cells"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenmdp.cli", "compare", str(grid), "--jobs", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # its own process group, signalled as a terminal would
    )
    if when == "cells-training":
        ready = lambda: any(cells.glob("*/metrics.jsonl"))  # noqa: E731
    else:  # both workers spawned (they take seconds to import torch)
        ready = lambda: len(_children(process.pid)) >= 2  # noqa: E731
    try:
        started = wait_until(lambda: ready() or process.poll() is not None, timeout=300)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert started and ready is not None, "the grid never got there"
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenmdp: interrupted"), err
    if when == "cells-training":
        assert lines[0].endswith(
            "rerun the same `tokenmdp compare` command to resume the grid (finished cells are kept)"
        )
    assert out == ""
    ran = sorted(p.name for p in cells.iterdir()) if cells.is_dir() else []
    # two workers: at most the two cells handed out first started; the others never did
    assert set(ran) <= {"reinforce__Pattern__seed0", "reinforce__Pattern__seed1"}, ran
    assert ran or when == "workers-starting"
    for name in ran:  # each stopped as a run stops on Ctrl-C: finished, or checkpointed and resumable
        run = RunDir(cells / name)
        assert (run.path / "summary.json").is_file() or run.load_latest_checkpoint()["step"] >= 1, name


# --- the out folder -----------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("tokenmdp: error: "), err
    return err


def test_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.toml")
    (tmp_path / "results").write_text("not a folder")
    assert cli.main(["compare", str(grid), "--out", str(tmp_path / "results"), "--jobs", "1"]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert cli.main(["compare", str(grid), "--out", str(tmp_path / "results" / "inside"), "--jobs", "1"]) == 2
    assert "cannot be used" in _one_error_line(capsys)
    assert (tmp_path / "results").read_text() == "not a folder"


def test_a_second_compare_on_one_out_is_a_one_line_error_naming_the_holder(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.toml")
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from pathlib import Path
                from tokenmdp.reports.compare.run import _locked_out
                with _locked_out(Path({str(out)!r})):
                    print("held", flush=True)
                    sys.stdin.read()  # until the test closes it
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(["compare", str(grid), "--jobs", "1"]) == 2
        err = _one_error_line(capsys)
        assert f"is in use by tokenmdp compare pid {holder.pid}" in err
        assert not (out / "cells").exists()  # nothing trained
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # released when its holder ends: the grid runs
    assert cli.main(["compare", str(grid), "--jobs", "1"]) == 0
    assert len(list((out / "cells").glob("*/summary.json"))) == 3

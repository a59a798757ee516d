"""Reliability and security of run directories (docs/reliability.md): nothing in a run
directory is ever unpickled, corrupt checkpoints are caught and skipped, tokenmdp deletes
only what it wrote, and one trainer at a time holds a run directory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from helpers import TINY

from tokenmdp import CheckpointError, ConfigError
from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.train.rundir import read_checkpoint
from tokenmdp.train.trainer import Trainer


class Payload:
    """Pickling this runs ``touch <marker>`` when it is unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def finished_run(tmp_path, name="run", *extra) -> Path:
    run_dir = tmp_path / name
    Trainer(load_config(None, [*TINY, f"run.dir={run_dir}", "run.checkpoint_every=1", *extra])).train()
    return run_dir


def plant(checkpoint: Path, marker: Path) -> None:
    """A checkpoint with one extra key whose unpickling would run code; its checksum file
    is rewritten to match, so only the loader itself stands between the file and the code."""
    state = torch.load(checkpoint, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, checkpoint)
    checkpoint.with_name(checkpoint.name + ".sha256").write_text(hashlib.sha256(checkpoint.read_bytes()).hexdigest())


def newest(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]


def test_a_checkpoint_that_carries_code_is_never_run(tmp_path, capsys):
    run_dir = finished_run(tmp_path)
    marker = tmp_path / "pwned"
    plant(newest(run_dir), marker)
    with pytest.raises(CheckpointError, match=r"step_00000004.pt cannot be loaded safely: UnpicklingError"):
        read_checkpoint(newest(run_dir))
    # explain reads the newest checkpoint: a one-line error, no code run
    assert main(["explain", str(run_dir), "--out", str(tmp_path / "explain")]) == 2
    assert "cannot be loaded safely" in capsys.readouterr().err
    # a teacher read from the run directory
    teacher = [*TINY, "algorithm.name=inverse-q-distill", "estimator.source=teacher", f"estimator.teacher={run_dir}"]
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        Trainer(load_config(None, [*teacher, f"run.dir={tmp_path / 'student'}"])).train()
    # --resume (and so an unfinished compare cell) skips it for the checkpoint before it
    summary = Trainer.from_run_dir(run_dir, ["train.steps=5"]).train()
    err = capsys.readouterr().err
    assert "step_00000004.pt cannot be loaded safely" in err and "resuming from step_00000003.pt" in err
    assert summary["steps"] == 5
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped", "nan"])
def test_a_corrupt_checkpoint_is_named_and_resume_falls_back(tmp_path, capsys, damage):
    run_dir = finished_run(tmp_path)
    Trainer(load_config(None, [*TINY, f"run.dir={tmp_path / 'full'}", "run.checkpoint_every=1"])).train()
    path = newest(run_dir)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flipped":  # one byte inside the tensor data: it would load, silently wrong
        state = torch.load(path, weights_only=True)
        first = next(iter(state["policy"].values()))
        raw = first.numpy().tobytes()
        at = data.find(raw[:16])
        assert at > 0
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
    else:  # non-finite weights, with a matching checksum
        state = torch.load(path, weights_only=True)
        next(iter(state["policy"].values())).fill_(float("nan"))
        torch.save(state, path)
        path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match=r"step_00000004\.pt"):
        read_checkpoint(path)
    Trainer.from_run_dir(run_dir).train()
    err = capsys.readouterr().err
    assert "step_00000004.pt" in err and "resuming from step_00000003.pt" in err
    # the resumed run is the uninterrupted one (resuming from step 3 replays step 4)
    assert (run_dir / "metrics.jsonl").read_text() == (tmp_path / "full/metrics.jsonl").read_text()


def test_every_checkpoint_has_a_checksum(tmp_path):
    run_dir = finished_run(tmp_path)
    for path in (run_dir / "checkpoints").glob("step_*.pt"):
        digest = path.with_name(path.name + ".sha256").read_text().strip()
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000003.pt",
        "step_00000003.pt.sha256",
        "step_00000004.pt",
        "step_00000004.pt.sha256",
    ]  # keep_checkpoints = 2 removes old checksums too


def test_resume_without_any_good_checkpoint_is_one_line(tmp_path):
    run_dir = finished_run(tmp_path)
    for path in (run_dir / "checkpoints").glob("step_*.pt"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="every checkpoint in .* is corrupt"):
        Trainer.from_run_dir(run_dir).train()
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        for path in (run_dir / "checkpoints").iterdir():
            path.unlink()
        Trainer.from_run_dir(run_dir).train()


def test_no_module_is_ever_imported_from_the_run_directory(tmp_path, monkeypatch):
    """config.toml names Python callables (env.reward), so it is as trusted as code; but a
    module sitting in the run directory itself is refused before it is imported."""
    from tokenmdp.policies.hf import train_sentencepiece

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    marker = tmp_path / "imported"
    (run_dir / "planted_reward.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f(p, c):\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(run_dir))  # as if tokenmdp were started from inside it
    spm = tmp_path / "spm.model"
    spm.write_bytes(train_sentencepiece(["a kind word", "the cat sat"] * 20, vocab_size=24).serialized_model_proto())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a kind\nthe cat\n")
    config = load_config(
        None,
        [
            "env.id=tokenmdp/Text-v0",
            f"env.prompts={prompts}",
            f"env.tokenizer={spm}",
            "env.reward=planted_reward:f",
            "policy.kind=hf",
            "policy.config={n_layer = 1, n_head = 2, n_embd = 16}",
            "reference.init=init",
            "algorithm.name=reinforce",
            f"run.dir={run_dir}",
        ],
    )
    with pytest.raises(ConfigError, match=r"planted_reward.*inside the run directory.*never imports code"):
        Trainer(config)
    assert not marker.exists()

"""Faults: a process killed mid-checkpoint, a full disk, NaN, hostile config values and a
crashing lifecycle plugin. After each, the run directory stays usable: the previous
checkpoint loads, ``metrics.jsonl`` parses and ``--resume`` finishes the run."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from helpers import TINY
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tokenmdp
from tokenmdp import CheckpointError, NonFiniteError, PluginError, TokenMDPError, hookimpl
from tokenmdp.cli import main
from tokenmdp.config import dump_config, load_config
from tokenmdp.plugin.registry import plugin_manager
from tokenmdp.training.trainer import Trainer
from tokenmdp_reinforce import PolicyGradient

TESTS = Path(__file__).resolve().parent


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))


def temp_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob(".*.tmp-*"))


def load_step(run_dir: Path, step: int) -> dict:
    state = torch.load(run_dir / "checkpoints" / f"step_{step:08d}.pt", weights_only=False)
    assert state["step"] == step
    assert all(bool(torch.isfinite(v).all()) for v in state["policy"].values())
    return state


# --- SIGKILL in the middle of a checkpoint write ---------------------------------------------

KILLED_SCRIPT = textwrap.dedent('''
    import io, os, sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from helpers import TINY
    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    real_save = torch.save

    def slow_save(obj, fh, *args, **kwargs):
        """The step-2 checkpoint: write half of it, then hang (the test kills us here)."""
        if isinstance(obj, dict) and obj.get("step") == 2:
            data = io.BytesIO()
            real_save(obj, data)
            fh.write(data.getvalue()[: len(data.getvalue()) // 2])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(600)
        return real_save(obj, fh, *args, **kwargs)

    torch.save = slow_save
    Trainer(load_config(None, [*TINY, "run.checkpoint_every=1", "run.dir=" + {run_dir!r}])).train()
''')


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_config):
    run_dir = tmp_path / "killed"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT.format(tests=str(TESTS), run_dir=str(run_dir)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            partial = list((run_dir / "checkpoints").glob(".step_00000002.pt.tmp-*"))
            if partial and partial[0].stat().st_size > 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    # the half-written file never took the final name; the previous checkpoint loads
    assert checkpoints(run_dir) == ["step_00000001.pt"]
    assert [p.name for p in temp_files(run_dir)] == [partial[0].name]
    load_step(run_dir, 1)
    assert all(isinstance(row, dict) for row in read_rows(run_dir))

    summary = Trainer.from_run_dir(run_dir).train()
    assert summary["steps"] == 4
    assert not temp_files(run_dir)  # the stale temporary file is cleaned up on resume
    full = tmp_path / "full"
    Trainer(tiny_config("run.checkpoint_every=1", run_dir=full)).train()
    assert (run_dir / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()


# --- the disk fills up during a checkpoint write ---------------------------------------------


def disk_full_on(step: int, monkeypatch):
    real_save = torch.save

    def save(obj, fh, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == step:
            fh.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_is_a_clear_error_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    disk_full_on(2, monkeypatch)
    with pytest.raises(
        CheckpointError,
        match=r"could not write .*step_00000002\.pt: No space left on device "
        r"\(errno 28\); nothing was written there",
    ):
        Trainer(load_config(None, [*TINY, "run.checkpoint_every=1", f"run.dir={run_dir}"])).train()
    assert checkpoints(run_dir) == ["step_00000001.pt"]
    load_step(run_dir, 1)
    assert not temp_files(run_dir)

    # the same through the command line: one line, exit status 2
    sets = [
        a for s in [*TINY, "run.checkpoint_every=1", f"run.dir={run_dir}", "run.overwrite=true"] for a in ("--set", s)
    ]
    assert main(["train", *sets]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tokenmdp: error: could not write {run_dir}")
    assert "No space left on device" in err

    # resumed from step 1, the disk fills up at step 4: steps 2 and 3 stay on disk
    monkeypatch.undo()
    disk_full_on(4, monkeypatch)
    with pytest.raises(CheckpointError, match=r"step_00000004\.pt: No space left on device"):
        Trainer.from_run_dir(run_dir).train()
    assert checkpoints(run_dir) == ["step_00000002.pt", "step_00000003.pt"]
    load_step(run_dir, 3)
    assert not temp_files(run_dir)
    monkeypatch.undo()
    assert Trainer.from_run_dir(run_dir).train()["steps"] == 4
    assert [row["step"] for row in read_rows(run_dir)] == [0, 1, 2, 3, 4]


# --- NaN never overwrites the last good checkpoint --------------------------------------------


class NaNLoss(PolicyGradient):
    """From step 2 on, the advantages (and so the loss and the gradients) are NaN."""

    name = "nan-loss-test"

    def update(self, batch, signals, advantages, ctx):
        if ctx.step >= 2:
            advantages = {**advantages, "advantages": advantages["advantages"] * float("nan")}
        return super().update(batch, signals, advantages, ctx)


class SilentNaN(PolicyGradient):
    """At step 2 the weights turn NaN while every reported metric stays finite."""

    name = "silent-nan-test"

    def update(self, batch, signals, advantages, ctx):
        metrics = super().update(batch, signals, advantages, ctx)
        if ctx.step == 2:
            with torch.no_grad():
                next(ctx.policy.parameters()).fill_(float("nan"))
        return metrics


@pytest.mark.parametrize(
    "updater, message",
    [
        (NaNLoss, r"updater 'nan-loss-test' produced a non-finite 'losses/policy' at step 2"),
        (SilentNaN, r"the policy after updater 'silent-nan-test' produced a non-finite '[\w.]+' at step 2"),
    ],
)
def test_nan_in_the_update_never_reaches_a_checkpoint(tmp_path, updater, message):
    pm = plugin_manager(extra_plugins=[_module("nan_updater", tokenmdp_policy_updaters=lambda: [updater])])
    config = load_config(
        None, [*TINY, f"algorithm.updater={updater.name}", "run.checkpoint_every=1", f"run.dir={tmp_path / 'run'}"]
    )
    with pytest.raises(NonFiniteError, match=message):
        Trainer(config, pm=pm).train()
    run_dir = tmp_path / "run"
    assert checkpoints(run_dir) == ["step_00000001.pt"]
    load_step(run_dir, 1)  # finite weights
    assert [row["step"] for row in read_rows(run_dir)] == [0, 1]


# --- a lifecycle plugin that crashes -----------------------------------------------------------


def _module(name: str, **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    return mod


def _step_end_crashes_at_2(step, metrics):
    if step == 2:
        raise RuntimeError("gremlin in the logger")


class TrainEndPlugin:
    """A plugin object whose hook is a method."""

    @hookimpl
    def tokenmdp_on_train_end(self, summary):
        raise KeyError("summary_field")


def test_a_crashing_lifecycle_hook_is_reported_with_the_plugin_name(tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(None, [*TINY, "run.checkpoint_every=1", f"run.dir={run_dir}"])
    flaky = _module("flaky_logger", tokenmdp_on_step_end=_step_end_crashes_at_2)
    with pytest.raises(
        PluginError,
        match=r"plugin 'flaky_logger' raised in tokenmdp_on_step_end at step 2: "
        r"RuntimeError: gremlin in the logger",
    ):
        Trainer(config, pm=plugin_manager(extra_plugins=[flaky])).train()
    # the run directory is consistent: every line parses, the checkpoints load, resume works
    steps = [row["step"] for row in read_rows(run_dir)]
    assert steps in ([0, 1], [0, 1, 2])
    assert checkpoints(run_dir) == ["step_00000001.pt"]
    load_step(run_dir, 1)
    Trainer.from_run_dir(run_dir).train()
    assert [row["step"] for row in read_rows(run_dir)] == [0, 1, 2, 3, 4]

    pm = plugin_manager()
    pm.register(TrainEndPlugin(), name="summary-mailer")
    with pytest.raises(
        PluginError,
        match=r"plugin 'summary-mailer' raised in tokenmdp_on_train_end: "
        r"KeyError: 'summary_field'",
    ):
        Trainer(load_config(None, [*TINY, "train.steps=1", f"run.dir={tmp_path / 'end'}"]), pm=pm).train()
    assert json.loads((tmp_path / "end" / "summary.json").read_text())["steps"] == 1


def test_a_crash_in_train_start_names_the_plugin(tiny_config):
    def start(run):
        raise ValueError("no tensorboard today")

    pm = plugin_manager(extra_plugins=[_module("starter", tokenmdp_on_train_start=start)])
    with pytest.raises(PluginError, match="plugin 'starter' raised in tokenmdp_on_train_start: ValueError"):
        Trainer(tiny_config(), pm=pm).train()


# --- hostile config values ---------------------------------------------------------------------

#: Every key of the run config, with free [env]/[policy] keys and the reinforce options.
KNOWN_KEYS = [
    *(
        f"{section}.{field.name}"
        for section, cls in [
            ("algorithm", tokenmdp.config.AlgorithmConfig),
            ("reference", tokenmdp.config.ReferenceConfig),
            ("train", tokenmdp.config.TrainConfig),
            ("run", tokenmdp.config.RunConfig),
        ]
        for field in __import__("attrs").fields(cls)
    ),
    *(
        f"env.{k}"
        for k in [
            "id",
            "vocab_size",
            "horizon",
            "seed",
            "eos_token",
            "num_prompts",
            "prompt_len",
            "base_scale",
            "reward_scale",
            "modulus",
            "num_forbidden",
            "penalty",
        ]
    ),
    *(f"policy.{k}" for k in ["kind", "hidden", "layers", "config", "path"]),
    "advantage.baseline",
    "advantage.whiten",
    *(f"updater.{k}" for k in ["lr", "max_grad_norm", "anneal_lr", "epochs", "minibatches"]),
]
#: Keys a Trainer builds something from at construction: small sizes only (a huge vocabulary
#: is a resource problem, not a validation one).
SIZED = ("env.", "policy.")

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "tokenmdp/Pattern-v0",
            "tokenmdp/Bandit-v0",
            "reinforce",
            "inverse-q",
            "gru",
            "mlp",
            "sft",
            "init",
            "none",
            "position-mean",
            "",
            " ",
            "\x00",
        ]
    ),
)
hostile = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "id", "n_layer", "hidden"]), inner, max_size=2),
    ),
    max_leaves=5,
)
#: Values a real config might hold, so that many examples get past validation.
plausible = st.one_of(
    st.integers(min_value=1, max_value=8),
    st.floats(min_value=0.01, max_value=4.0),
    st.booleans(),
    st.sampled_from(
        ["tokenmdp/SumMod-v0", "reinforce", "reward-to-go", "policy-gradient", "mlp", "tabular", "init", "none"]
    ),
)
values = st.one_of(plausible, hostile)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def _is_small(value) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return -3 <= value <= 40
    if isinstance(value, list):
        return all(map(_is_small, value))
    if isinstance(value, dict):
        return all(map(_is_small, value.values()))
    return True


@st.composite
def overrides(draw, small_sizes=False):
    out = []
    for key in draw(st.lists(st.sampled_from(KNOWN_KEYS), min_size=1, max_size=3)):
        value = draw(values)
        if small_sizes and key.startswith(SIZED) and not _is_small(value):
            value = draw(st.integers(min_value=-3, max_value=40))
        raw = toml_value(value) if draw(st.integers(0, 4)) else draw(st.text(max_size=8))  # mostly valid TOML
        out.append(f"{key}={raw}")
    return out


FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(overrides())
def test_config_loader_gives_a_config_or_a_config_error(sets):
    try:
        config = load_config(None, sets)
    except tokenmdp.ConfigError:
        return
    assert isinstance(config, tokenmdp.config.Config)
    # what a run writes as config.toml reads back as the same config
    text = dump_config(config)
    again = load_config(None, base=__import__("tomllib").loads(text))
    assert dump_config(again) == text


_REGISTRY = []


@settings(FUZZ, max_examples=100)
@example(["env.seed=0.5"])  # once a RuntimeError from torch.manual_seed
@example(["run.dir=5"])  # once a TypeError from Path(5)
@given(overrides(small_sizes=True))
def test_trainer_construction_gives_a_trainer_or_a_clean_error(tmp_path_factory, sets):
    from unittest import mock

    import tokenmdp.training.trainer

    if not _REGISTRY:  # collecting the plugins' registrations is the slow part, and always the same
        _REGISTRY.append(tokenmdp.Registry(plugin_manager()))
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    try:  # a fuzzed run.dir comes after (and wins over) the temporary one
        config = load_config(None, [*TINY, f"run.dir={run_dir}", *sets])
        with mock.patch.object(tokenmdp.training.trainer, "Registry", lambda pm: _REGISTRY[0]):
            trainer = Trainer(config, pm=_REGISTRY[0].pm)
    except TokenMDPError:
        return
    assert trainer.env.num_envs == config.train.batch_size
    assert not run_dir.exists()  # construction writes nothing

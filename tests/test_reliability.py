"""Reliability and security of run directories (docs/reliability.md): nothing in a run
directory is ever unpickled, corrupt checkpoints are caught and skipped, tokenmdp deletes
only what it wrote, and one trainer at a time holds a run directory."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import TINY, has_lines, wait_until

from tokenmdp import CheckpointError, ConfigError
from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.training.checkpoints import read_checkpoint
from tokenmdp.training.trainer import Trainer


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


# --- tokenmdp deletes only what it wrote ----------------------------------------------------


def test_a_folder_with_foreign_files_is_refused_and_overwrite_removes_only_ours(tmp_path):
    run_dir = tmp_path / "mine"
    (run_dir / "checkpoints").mkdir(parents=True)
    user_file = run_dir / "checkpoints" / "resnet50_epoch90.pth"
    user_file.write_bytes(b"weights of a month-long run")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "notes.txt").write_text("mine")
    (run_dir / ".draft.tmp-42").write_text("not tokenmdp's temporary file")
    with pytest.raises(ConfigError, match=r"holds files tokenmdp did not write \(.draft.tmp-42, checkpoints/resnet50"):
        Trainer(load_config(None, [*TINY, f"run.dir={run_dir}"]))
    Trainer(load_config(None, [*TINY, f"run.dir={run_dir}", "run.overwrite=true"])).train()
    Trainer(load_config(None, [*TINY, f"run.dir={run_dir}", "run.overwrite=true"])).train()  # and again
    assert user_file.read_bytes() == b"weights of a month-long run"
    assert (run_dir / "tensorboard" / "notes.txt").read_text() == "mine"
    assert (run_dir / ".draft.tmp-42").exists() and (run_dir / ".tokenmdp-run").is_file()


@pytest.mark.parametrize("value", [".", "..", "../..", "/", "~/runs/x"])
def test_run_dir_must_be_a_folder_of_its_own(tmp_path, capsys, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *sum((["--set", s] for s in TINY), []), "--set", f"run.dir={value}"]) == 2
    err = capsys.readouterr().err
    assert "run.dir" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written anywhere


def test_run_dir_naming_a_file_is_one_line(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        Trainer(load_config(None, [*TINY, f"run.dir={path}"]))


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_behind(tmp_path):
    run_dir = tmp_path / "fails"
    with pytest.raises(ConfigError, match="policy.kind 'lstm' is unknown"):
        Trainer(load_config(None, [*TINY, f"run.dir={run_dir}", "policy.kind=lstm"])).train()
    assert not run_dir.exists()
    # a folder that existed keeps the user's files, and can be rerun without overwrite
    run_dir.mkdir()
    (run_dir / "README").write_text("the user's")
    with pytest.raises(ConfigError, match="holds files tokenmdp did not write"):
        Trainer(load_config(None, [*TINY, f"run.dir={run_dir}"]))


# --- one trainer per run directory --------------------------------------------------------


LONG_RUN = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from helpers import TINY, has_lines, wait_until
from tokenmdp.config import load_config
from tokenmdp.training.trainer import Trainer
Trainer(load_config(None, [*TINY, "train.steps=100000", "run.checkpoint_every=1", "run.dir=" + {run_dir!r}])).train()
"""


def test_a_second_trainer_on_a_locked_run_directory_is_refused(tmp_path):
    import signal
    import subprocess
    import sys

    run_dir = tmp_path / "busy"
    script = tmp_path / "long.py"
    script.write_text(LONG_RUN.format(tests=str(Path(__file__).parent), run_dir=str(run_dir)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: bool(list((run_dir / "checkpoints").glob("step_*.pt.sha256"))))
        assert proc.poll() is None, proc.communicate()
        from tokenmdp import RunDirInUse

        with pytest.raises(RunDirInUse, match=r"is in use by tokenmdp pid \d+"):
            Trainer.from_run_dir(run_dir, ["train.steps=3"]).train()
        with pytest.raises(RunDirInUse, match="is in use"):
            Trainer(load_config(None, [*TINY, f"run.dir={run_dir}", "run.overwrite=true"])).train()
        assert (run_dir / "config.toml").is_file() and list((run_dir / "checkpoints").glob("step_*.pt"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    # the killed process's lock file is stale: the next resume takes it over
    assert (run_dir / ".tokenmdp.lock").exists()
    last = int(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1].stem.split("_")[1])
    summary = Trainer.from_run_dir(run_dir, [f"train.steps={last + 1}"]).train()
    assert summary["steps"] == last + 1


# --- signals, torn files, read-only file systems ---------------------------------------------


def _cli_run(run_dir, *extra):
    import sys

    sets = [a for s in [*TINY, "train.steps=300", "train.eval_every=50"] for a in ("--set", s)]
    return [sys.executable, "-m", "tokenmdp", "train", *sets, "--set", f"run.dir={run_dir}", *extra]


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGINT", "SIGINT")])
def test_sigterm_and_a_double_ctrl_c_stop_cleanly_with_a_checkpoint(tmp_path, signals):
    """SIGTERM (schedulers, docker stop) is handled like Ctrl-C; two Ctrl-C 5 ms apart with
    the default checkpoint_every = 0 still end with the last finished step checkpointed."""
    import signal as sig
    import subprocess
    import time

    import tokenmdp.training.rundir  # noqa: F401

    subprocess.run(_cli_run(tmp_path / "full"), check=True, capture_output=True)
    proc = subprocess.Popen(_cli_run(tmp_path / "cut"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut/metrics.jsonl"
    wait_until(lambda: has_lines(metrics, 5))
    for name in signals:
        proc.send_signal(getattr(sig, name))
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(sig, signals[0]), err
    assert f"interrupted ({signals[0]})" in err and "checkpoint saved" in err
    # the second signal is acknowledged while the run still goes; one that lands after the
    # run has already stopped (its last step and checkpoint took under 5 ms) is ignored
    # silently, so the ack line is not required, only that nothing else is printed
    assert all(
        line.startswith(("tokenmdp: interrupted", "tokenmdp: stopping after this step")) for line in err.splitlines()
    )
    assert len(err.splitlines()) <= len(signals) and ("stopping after this step" in err) <= (len(signals) == 2)
    rows = metrics.read_text().splitlines()
    assert sorted((tmp_path / "cut/checkpoints").glob("*.pt"))[-1].name == f"step_{len(rows) - 1:08d}.pt"
    resumed = subprocess.run(
        _cli_run(tmp_path / "cut")[:4] + ["--resume", str(tmp_path / "cut")], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert metrics.read_text() == (tmp_path / "full/metrics.jsonl").read_text()


def test_a_torn_last_line_of_metrics_is_dropped_on_resume(tmp_path, capsys):
    run_dir = finished_run(tmp_path)
    full = (run_dir / "metrics.jsonl").read_text()
    lines = full.splitlines()
    # a crash after step 3's checkpoint, in the middle of writing step 4's line
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])
    (run_dir / "checkpoints" / "step_00000004.pt").unlink()
    Trainer.from_run_dir(run_dir).train()
    assert "ends in a torn line" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == full


def test_a_read_only_file_system_reports_the_real_error(tmp_path, monkeypatch):
    """The clean-up in the atomic write's ``finally`` fails too (EROFS); the error that
    reaches the user is still the write's own, naming the file."""
    import errno

    from tokenmdp.training import files

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.os, "replace", read_only)
    monkeypatch.setattr(files.Path, "unlink", read_only)
    with pytest.raises(CheckpointError, match=r"could not write .*config.toml: Read-only file system \(errno 30\)"):
        files.atomic_write_text(tmp_path / "config.toml", "x")


# --- a memory estimate before anything large is built ------------------------------------------


@pytest.mark.parametrize(
    "setting, part",
    [
        (["env.vocab_size=40", "env.horizon=8"], "the exact solver (vocabulary 40, horizon 8"),
        (["train.batch_size=1000000000000"], "the vector env"),
        (["policy.hidden=1000000"], "the policy, its reference and Adam"),
        (["reference.sft_samples=100000000000"], "the reference's SFT data"),
    ],
)
def test_a_run_too_large_for_the_machine_stops_at_start_up_with_the_estimate(tmp_path, capsys, setting, part):
    run_dir = tmp_path / "huge"
    assert main(["train", *sum((["--set", s] for s in [*TINY, f"run.dir={run_dir}", *setting]), [])]) == 2
    err = capsys.readouterr().err
    assert "this run needs about" in err and "train.max_memory_gb" in err and part in err and err.count("\n") == 1
    assert not run_dir.exists()


def test_the_memory_budget_is_configurable_and_tokenmdp_solve_checks_it(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"over train.max_memory_gb = 1e-06"):
        Trainer(load_config(None, [*TINY, f"run.dir={tmp_path / 'r'}", "train.max_memory_gb=0.000001"]))
    assert main(["solve", "configs/demo.toml", "--set", "env.vocab_size=40", "--set", "env.horizon=8"]) == 2
    assert "the exact solver (vocabulary 40, horizon 8" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, message",
    [
        ("reference.sft_lr=inf", "sft_lr must be a finite number > 0 (got inf)"),
        ("train.beta=inf", "beta must be a finite number > 0 (got inf)"),
        ("updater.max_grad_norm=inf", "max_grad_norm must be a finite number >= 0 (got inf)"),
        ("policy.hidden=-1", "policy (gru): Trying to create tensor with negative dimension"),
    ],
)
def test_values_that_must_be_finite_or_sane_are_one_line_errors(tmp_path, capsys, setting, message):
    run_dir = tmp_path / "run"
    assert main(["train", *sum((["--set", s] for s in [*TINY, f"run.dir={run_dir}", setting]), [])]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not run_dir.exists()


# --- rewards and plugins that misbehave ------------------------------------------------------


def exiting_reward(prompt, completion):
    raise SystemExit(0)


def hanging_reward(prompt, completion):
    import time

    time.sleep(600)


def string_reward(prompt, completion):
    return "1.5"


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    from tokenmdp.policies.hf import HFCausalLMPolicy, train_sentencepiece

    root = tmp_path_factory.mktemp("text")
    (root / "spm.model").write_bytes(
        train_sentencepiece(["a kind word", "the cat sat", "kind words"] * 20, vocab_size=24).serialized_model_proto()
    )
    (root / "prompts.txt").write_text("a kind\nthe cat\n")
    config = {
        "model_type": "gpt2",
        "vocab_size": 24,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 16,
        "n_positions": 32,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    HFCausalLMPolicy.from_config(config, seed=0).model.save_pretrained(root / "gpt")
    return root


def text_train(root, run_dir, *extra) -> list[str]:
    sets = [
        "env.id=tokenmdp/Text-v0",
        f"env.prompts={root / 'prompts.txt'}",
        f"env.tokenizer={root / 'spm.model'}",
        "policy.kind=hf",
        f"policy.path={root / 'gpt'}",
        "reference.init=init",
        "algorithm.name=reinforce",
        "env.horizon=4",
        "train.steps=2",
        "train.batch_size=4",
        "train.progress=false",
        f"run.dir={run_dir}",
        *extra,
    ]
    return ["train", *sum((["--set", s] for s in sets), [])]


@pytest.mark.parametrize(
    "reward, message",
    [
        ("exiting_reward", "raised on prompt .*: SystemExit: 0"),
        ("string_reward", r"returned '1.5' \(str\) .*rewards must be numbers"),
    ],
)
def test_a_reward_that_exits_or_returns_a_string_is_an_error_naming_it(text_setup, tmp_path, capsys, reward, message):
    run_dir = tmp_path / "run"
    assert main(text_train(text_setup, run_dir, f"env.reward=test_reliability:{reward}")) == 2
    err = capsys.readouterr().err
    assert f"reward 'test_reliability:{reward}'" in err and re.search(message, err), err
    assert not run_dir.exists()  # it failed before its first checkpoint


def test_a_reward_that_hangs_is_bounded_by_env_reward_timeout(text_setup, tmp_path, capsys):
    import time

    started = time.perf_counter()
    code = main(
        text_train(text_setup, tmp_path / "run", "env.reward=test_reliability:hanging_reward", "env.reward_timeout=0.2")
    )
    assert code == 2 and time.perf_counter() - started < 60
    assert "no answer within env.reward_timeout = 0.2 s" in capsys.readouterr().err


def test_a_plugin_that_calls_sys_exit_is_an_error_naming_it(tmp_path):
    import tokenmdp
    from tokenmdp.plugin.registry import plugin_manager
    from tokenmdp_reinforce import KLPenalisedReward

    class Exiting(KLPenalisedReward):
        name = "exiting"

        def estimate(self, batch, ctx):
            raise SystemExit(0)

    class Plugin:
        @tokenmdp.hookimpl
        def tokenmdp_trajectory_estimators(self):
            return [Exiting]

    pm = plugin_manager(extra_plugins=[Plugin()])
    with pytest.raises(tokenmdp.PluginError, match="estimator 'exiting' raised in estimate at step 1: SystemExit"):
        Trainer(load_config(None, [*TINY, "algorithm.estimator=exiting", f"run.dir={tmp_path / 'r'}"]), pm=pm).train()


# --- one-line errors and consistent behaviour (items 10, 11) ------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe\x00bad", "is not UTF-8 text"),
        (b'algorithm = "reinforce"\n', r"\[algorithm\] must be a table \(got algorithm = 'reinforce'\)"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "setting, message",
    [
        ("env.base_scale=nan", "env.base_scale must be a finite number (got nan)"),
        ("env.num_prompts=2.5", "env.num_prompts must be an integer (got 2.5)"),
        (
            "env.colour=1",
            "valid options: base_scale, eos_token, horizon, num_prompts, prompt_len, reward, reward_scale, "
            "reward_weights, seed, step_delimiter, vocab_size",
        ),
    ],
)
def test_bad_env_values_are_one_line(tmp_path, capsys, setting, message):
    assert main(["train", *sum((["--set", s] for s in [*TINY, f"run.dir={tmp_path / 'r'}", setting]), [])]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert "args" not in err.split("valid options:")[-1]


@pytest.mark.parametrize(
    "setting, message",
    [
        ("env.horizon=100000", "more than the model's 32"),
        ('env.add_bos="false"', "env.add_bos must be true, false or unset (got 'false')"),
        ("env.reward_timeout=-1", "env.reward_timeout must be a number of seconds > 0"),
    ],
)
def test_bad_text_values_are_one_line(text_setup, tmp_path, capsys, setting, message):
    run_dir = tmp_path / "run"
    assert main(text_train(text_setup, run_dir, setting)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not run_dir.exists()


def test_resume_extends_a_run_and_records_it_but_never_changes_what_it_trains(tmp_path, capsys):
    run_dir = finished_run(tmp_path)
    with pytest.raises(ConfigError, match=r"--resume can extend a run .*not change what it trains: policy.hidden"):
        Trainer.from_run_dir(run_dir, ["policy.hidden=8"])
    with pytest.raises(ConfigError, match="algorithm.name"):
        Trainer.from_run_dir(run_dir, ["algorithm.name=ppo"])
    (run_dir / "reference.pt").unlink()
    assert Trainer.from_run_dir(run_dir, ["train.steps=6"]).train()["steps"] == 6
    assert "steps = 6" in (run_dir / "config.toml").read_text()  # a later plain resume continues this run
    assert (run_dir / "reference.pt").is_file()  # rewritten: explain and compare read it
    assert Trainer.from_run_dir(run_dir).train()["steps"] == 6
    config = Path("configs/demo.toml").resolve()
    assert main(["train", str(config), "--resume", str(run_dir)]) == 2
    assert "give either CONFIG" in capsys.readouterr().err


def test_an_unwritable_parent_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    from tokenmdp.training import rundir

    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="is not writable, so the run could not be saved"):
        Trainer(load_config(None, [*TINY, f"run.dir={tmp_path / 'new' / 'run'}"]))


def test_explain_bounds_its_samples_and_wants_a_folder(tmp_path, capsys):
    run_dir = finished_run(tmp_path)
    assert main(["explain", str(run_dir), "--samples", "100000"]) == 2
    assert "--samples must be in 1..64" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert main(["explain", str(run_dir), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file" in capsys.readouterr().err

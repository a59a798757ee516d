"""Reliability, second round (docs/reliability.md): no code from a run directory on any
path, a folder without tokenmdp's marker is the user's whatever its file names, a run
killed before its first checkpoint can be rerun, a damaged metrics.jsonl is never resumed
silently, and the errors a tester found as tracebacks or obscure messages are one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, has_lines, train_until_interrupted, wait_until
from test_reliability import text_setup, text_train  # noqa: F401 (a fixture)

from tokenmdp import CheckpointError, ConfigError
from tokenmdp.cli import main
from tokenmdp.config import load_config
from tokenmdp.training import files
from tokenmdp.training.envs import load_task
from tokenmdp.training.rundir import RunDir
from tokenmdp.training.trainer import Trainer

TESTS = str(Path(__file__).parent)


def ok_reward(prompt, completion):
    return float(len(completion))


def sets(*settings) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def python_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


# --- no code from a run directory ----------------------------------------------------------


@pytest.fixture(scope="module")
def text_run(text_setup, tmp_path_factory):  # noqa: F811
    """A finished text run whose reward lives outside it."""
    run_dir = tmp_path_factory.mktemp("text_run") / "run"
    assert main(text_train(text_setup, run_dir, "env.reward=test_reliability_round2:ok_reward")) == 0
    return run_dir


def planted(text_run, tmp_path, reward: str) -> tuple[Path, Path]:
    """A copy of ``text_run`` whose config.toml names ``reward``, with an ``evilpkg``
    package and an ``evilreward`` module in it that create ``marker`` when imported."""
    run_dir = tmp_path / "run"
    shutil.copytree(text_run, run_dir)
    marker = tmp_path / "code_ran"
    touch = f"open({str(marker)!r}, 'w').close()\n"
    (run_dir / "evilpkg").mkdir()
    (run_dir / "evilpkg" / "__init__.py").write_text(touch)
    (run_dir / "evilpkg" / "r.py").write_text(touch + "def f(p, c):\n    return 0.0\n")
    (run_dir / "evilreward.py").write_text(touch + "def f(p, c):\n    return 0.0\n")
    config = run_dir / "config.toml"
    config.write_text(config.read_text().replace("test_reliability_round2:ok_reward", reward))
    return run_dir, marker


def test_resume_never_runs_a_package_init_from_the_run_directory(text_run, tmp_path):
    """``importlib.util.find_spec("evilpkg.r")`` imports ``evilpkg`` to find ``r``: the
    barrier must locate every part of the dotted name without importing any."""
    run_dir, marker = planted(text_run, tmp_path, "evilpkg.r:f")
    done = subprocess.run(
        [sys.executable, "-m", "tokenmdp", "train", "--resume", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=python_env(PYTHONPATH=str(run_dir)),
    )
    assert done.returncode == 2
    err = one_line(done.stderr)
    assert "module 'evilpkg' is" in err and "inside the run directory" in err and "never imports code" in err
    assert not marker.exists()


def test_explain_never_imports_a_reward_from_the_run_directory(text_run, tmp_path, monkeypatch, capsys):
    run_dir, marker = planted(text_run, tmp_path, "evilreward:f")
    monkeypatch.syspath_prepend(str(run_dir))
    assert main(["explain", str(run_dir), "--out", str(tmp_path / "out")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "'evilreward:f': module 'evilreward' is" in err and "inside the run directory" in err
    assert not marker.exists()


def test_a_module_imported_by_the_reward_is_refused_from_the_run_directory(text_run, tmp_path, monkeypatch):
    """The named module lies outside; the ``import`` inside it would load one from the run
    directory (on the path, as with ``PYTHONPATH=RUN``)."""
    run_dir, marker = planted(text_run, tmp_path, "outside_reward:f")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "outside_reward.py").write_text("import evilreward\n\ndef f(p, c):\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(run_dir))
    monkeypatch.syspath_prepend(str(outside))
    with pytest.raises(ConfigError, match=r"module 'evilreward' \(imported by it\) is .*inside the run directory"):
        Trainer.from_run_dir(run_dir)
    assert not marker.exists() and "outside_reward" not in sys.modules


def test_a_module_already_imported_from_the_run_directory_is_refused(text_run, tmp_path, monkeypatch):
    import types

    run_dir, marker = planted(text_run, tmp_path, "evilreward:f")
    loaded = types.ModuleType("evilreward")
    loaded.__file__ = str(run_dir / "evilreward.py")
    loaded.f = ok_reward
    monkeypatch.setitem(sys.modules, "evilreward", loaded)
    with pytest.raises(ConfigError, match=r"module 'evilreward' is .*inside the run directory"):
        Trainer.from_run_dir(run_dir)


def test_every_tool_that_makes_a_runs_env_applies_the_barrier(text_run, tmp_path, monkeypatch):
    """compare's cells and frontiers, export and solve make the env through load_task."""
    run_dir, marker = planted(text_run, tmp_path, "evilpkg.r:f")
    monkeypatch.syspath_prepend(str(run_dir))
    config = load_config(run_dir / "config.toml", [f"run.dir={run_dir}"])
    with pytest.raises(ConfigError, match="inside the run directory"):
        load_task(config)
    assert not marker.exists() and "evilpkg" not in sys.modules


# --- a folder without the marker is the user's ---------------------------------------------------


def test_a_users_own_config_toml_is_never_rewritten_or_deleted(tmp_path, capsys):
    exp = tmp_path / "exp1"
    exp.mkdir()
    text = "# my experiment: keep these comments\n[train]\nsteps = 4\n"
    (exp / "config.toml").write_text(text)
    (exp / "summary.json").write_text('{"mine": true}')
    command = ["train", str(exp / "config.toml"), *sets(*TINY, f"run.dir={exp}")]
    for overwrite in ("false", "true"):
        assert main([*command, "--set", f"run.overwrite={overwrite}"]) == 2
        err = one_line(capsys.readouterr().err)
        assert "holds config.toml, summary.json, which tokenmdp did not write (the folder has no .tokenmdp-run" in err
        assert "a run there would replace them, which tokenmdp never does, run.overwrite or not" in err
    assert sorted(p.name for p in exp.iterdir()) == ["config.toml", "summary.json"]
    assert (exp / "config.toml").read_text() == text and (exp / "summary.json").read_text() == '{"mine": true}'
    # nor by the RunDir methods themselves, whoever calls them
    with pytest.raises(ConfigError, match="which tokenmdp did not write"):
        RunDir(exp).start_fresh("x", {})
    RunDir(exp).discard(remove_folder=True)
    assert (exp / "config.toml").read_text() == text and (exp / "summary.json").read_text() == '{"mine": true}'


def test_a_failed_overwrite_run_in_a_users_folder_removes_only_its_own_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.md").write_text("mine")
    trainer = Trainer(load_config(None, [*TINY, f"run.dir={folder}", "run.overwrite=true"]))
    train_until_interrupted(trainer, at_step=2)  # before its first checkpoint
    assert sorted(p.name for p in folder.iterdir()) == ["notes.md"]


KILLED_RUN = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from helpers import TINY
from tokenmdp.cli import main
sets = [a for s in [*TINY, "train.steps=100000", "run.dir=" + {run_dir!r}] for a in ("--set", s)]
main(["train", *sets])
"""


def test_a_run_killed_before_its_first_checkpoint_reruns_without_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "killed"
    script = tmp_path / "long.py"
    script.write_text(KILLED_RUN.format(tests=TESTS, run_dir=str(run_dir)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=python_env()
    )
    try:
        assert wait_until(lambda: has_lines(run_dir / "metrics.jsonl", 3)), proc.communicate()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert (run_dir / ".tokenmdp-run").is_file() and not list((run_dir / "checkpoints").glob("step_*.pt"))
    # --resume names the command that starts it again
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "no checkpoint to resume from (the run stopped before its first one); start it again" in err
    assert f"tokenmdp train {run_dir}/config.toml --set run.dir={run_dir}" in err
    # ... which works without run.overwrite, and so does any fresh run into the folder
    assert main(["train", str(run_dir / "config.toml"), *sets(f"run.dir={run_dir}", "train.steps=2")]) == 0
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    # a finished run is kept, as before
    assert main(["train", *sets(*TINY, f"run.dir={run_dir}")]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_folder_killed_while_the_reference_was_built_reruns(tmp_path):
    """Killed before anything but the marker and the lock were written."""
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    (run_dir / ".tokenmdp-run").write_text("{}\n")
    (run_dir / ".tokenmdp.lock").write_text("tokenmdp pid 1")
    assert Trainer(load_config(None, [*TINY, f"run.dir={run_dir}"])).train()["steps"] == 4


def test_resume_of_a_folder_without_a_run_is_one_line(tmp_path):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    (folder / "config.toml").write_text('[algorithm]\nname = "reinforce"\n')
    with pytest.raises(ConfigError, match="no checkpoint to resume from, and no .tokenmdp-run marker"):
        Trainer.from_run_dir(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.toml"]  # nothing written


# --- metrics.jsonl on resume --------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path):
    run_dir = tmp_path / "run"
    Trainer(load_config(None, [*TINY, f"run.dir={run_dir}", "run.checkpoint_every=1"])).train()
    return run_dir


@pytest.mark.parametrize(
    "damage, message",
    [
        ("deleted", r"metrics.jsonl is missing \(steps 0-4; the checkpoint is at step 4\)"),
        ("shortened", r"metrics.jsonl lacks 3 of its 5 rows \(steps 2-4; the checkpoint is at step 4\)"),
        ("no step", r"metrics.jsonl line 2 is an object without an integer step, not a metrics row"),
        ("array", r"metrics.jsonl line 3 is a JSON array, not a metrics row"),
    ],
)
def test_a_damaged_metrics_file_is_never_resumed_silently(finished, capsys, damage, message):
    import re

    path = finished / "metrics.jsonl"
    lines = path.read_text().splitlines()
    if damage == "deleted":
        path.unlink()
    elif damage == "shortened":
        path.write_text("\n".join(lines[:2]) + "\n")
    elif damage == "no step":
        path.write_text("\n".join([lines[0], '{"loss": 1.0}', *lines[2:]]) + "\n")
    else:
        path.write_text("\n".join([*lines[:2], "[1, 2]", *lines[3:]]) + "\n")
    before = path.read_text() if path.exists() else None
    config_before = (finished / "config.toml").read_text()
    assert main(["train", "--resume", str(finished), "--set", "train.steps=6"]) == 2
    err = one_line(capsys.readouterr().err)
    assert re.search(message, err), err
    assert (path.read_text() if path.exists() else None) == before  # nothing rewritten
    assert (finished / "config.toml").read_text() == config_before


# --- one-line errors ---------------------------------------------------------------------------


def test_a_horizon_past_any_memory_is_one_line(tmp_path, capsys, monkeypatch):
    from tokenmdp.training import budget

    run_dir = tmp_path / "run"
    assert main(["train", *sets(*TINY, f"run.dir={run_dir}", "env.horizon=1000")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "estimate overflows" in err and "horizon 1000" in err and "more than the budget" in err
    # without a budget (a machine whose memory is unknown) too
    monkeypatch.setattr(budget, "machine_memory", lambda: 0)
    assert main(["train", *sets(*TINY, f"run.dir={run_dir}", "env.horizon=1000")]) == 2
    assert "more than the budget" in one_line(capsys.readouterr().err)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        ("run.wandb_project=true", "wandb_project must be a non-empty string or unset (got True)"),
        ('run.wandb_project=""', "wandb_project must be a non-empty string or unset (got '')"),
        ("train.sampling_backend=3", "sampling_backend must be a non-empty string (got 3)"),
    ],
)
def test_bad_option_types_are_one_line_with_the_key(tmp_path, capsys, setting, message):
    assert main(["train", *sets(*TINY, f"run.dir={tmp_path / 'r'}", setting)]) == 2
    err = one_line(capsys.readouterr().err)
    assert message in err and "Attribute(" not in err


@pytest.mark.parametrize(
    "setting, message",
    [
        ("env.eval_prompts=true", "env.eval_prompts must be a path string: a .jsonl, .txt, .parquet or .csv file"),
        ("env.reward=5", "env.reward must be 'module:function' or a list of them (got 5)"),
        ("env.reward=[5]", "env.reward must be 'module:function' or a list of them (got [5])"),
    ],
)
def test_bad_text_options_are_one_line(text_setup, tmp_path, capsys, setting, message):  # noqa: F811
    run_dir = tmp_path / "run"
    assert main(text_train(text_setup, run_dir, setting)) == 2
    assert message in one_line(capsys.readouterr().err)
    assert not run_dir.exists()


def test_a_lone_surrogate_in_a_prompt_file_names_the_file_and_line(text_setup, tmp_path, capsys):  # noqa: F811
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"a kind"\n{"prompt": "the \\ud800 cat"}\n')
    assert main(text_train(text_setup, tmp_path / "run", f"env.prompts={prompts}")) == 2
    err = one_line(capsys.readouterr().err)
    assert f"env.prompts: file {str(prompts)!r} line 2: holds a lone surrogate" in err
    text = tmp_path / "prompts.txt"  # the same surrogate as (invalid) UTF-8 bytes in a text file
    text.write_bytes(b"a kind\nthe cat\nthe \xed\xa0\x80 dog\n")
    assert main(text_train(text_setup, tmp_path / "run", f"env.prompts={text}")) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{str(text)!r} line 3 is not UTF-8 text (invalid continuation byte: byte 0xed)" in err, err


class FillsUp:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, path, mode, room: int):
        self.fh, self.room = open(path, mode), room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_a_full_disk_inside_torch_save_names_the_file_and_the_reason(tmp_path, monkeypatch):
    """torch.save's writer turns the failed write into 'unexpected pos N vs M'."""
    monkeypatch.setattr(files, "open", lambda path, mode: FillsUp(path, mode, room=100), raising=False)
    target = tmp_path / "step_00000001.pt"
    with pytest.raises(CheckpointError, match=r"could not write .*step_00000001\.pt: No space left on device"):
        files.atomic_save({"w": torch.zeros(10_000)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a failure that carries no OSError still says what happened, not only torch's words
    monkeypatch.undo()

    def failing_save(obj, fh):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 239104 vs 238996")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(
        CheckpointError, match=r"step_00000001\.pt: the write failed; is the disk full\? \(.* bytes free"
    ):
        files.atomic_save({"w": torch.zeros(10)}, target)


# --- signals -----------------------------------------------------------------------------------

SIGNALS_IN_THE_WRITE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from helpers import TINY
from tokenmdp.cli import main
from tokenmdp.training import files

class Signalling:
    # three Ctrl-C inside torch.save's writer callback: the abort must wait for the write
    # (without the wait, torch turned the KeyboardInterrupt into "unexpected pos", or the
    # process ended in std::terminate)
    def __init__(self, path, mode):
        self.fh, self.writes = open(path, mode), 0
    def write(self, data):
        self.writes += 1
        if self.writes == 3 and "step_" in self.fh.name:
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGINT)
        return self.fh.write(data)
    def __getattr__(self, name):
        return getattr(self.fh, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.fh.close()

files.open = Signalling
sets = [a for s in [*TINY, "run.checkpoint_every=2", "run.dir=" + {run_dir!r}] for a in ("--set", s)]
sys.exit(main(["train", *sets]))
"""

SIGNALS_AFTER_THE_STOP = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from helpers import TINY
from tokenmdp.cli import main
from tokenmdp.training.trainer import Trainer

step = Trainer.train_step
def train_step(self, n):
    if n == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return step(self, n)
Trainer.train_step = train_step
sets = [a for s in [*TINY, "run.dir=" + {run_dir!r}] for a in ("--set", s)]
code = main(["train", *sets])
for _ in range(2):  # the rest of the burst, after the run and the CLI are done with it
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
sys.exit(code)
"""


def run_script(tmp_path, template: str, run_dir: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(template.format(tests=TESTS, run_dir=str(run_dir)))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=python_env(), timeout=300)


def test_an_abort_inside_a_checkpoint_write_is_one_line_and_leaves_no_half_file(tmp_path):
    run_dir = tmp_path / "run"
    done = run_script(tmp_path, SIGNALS_IN_THE_WRITE, run_dir)
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == [
        "tokenmdp: stopping after this step and its checkpoint (signal again to abort without saving)",
        "tokenmdp: interrupted",
    ]
    # aborted in step 2's checkpoint: nothing to resume, so nothing is left behind
    assert not run_dir.exists()


def test_stop_signals_after_a_saved_stop_end_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    done = run_script(tmp_path, SIGNALS_AFTER_THE_STOP, run_dir)
    assert done.returncode == 130, done.stderr
    assert done.stderr.splitlines() == [
        f"tokenmdp: interrupted (SIGINT) after step 2; checkpoint saved; continue with: tokenmdp train --resume "
        f"{run_dir}"
    ]
    assert Trainer.from_run_dir(run_dir).train()["steps"] == 4


def test_three_ctrl_c_within_10_ms_end_in_one_line(tmp_path):
    """Wherever the burst lands: the run is saved or aborted, and the process ends with
    its one line (plus the second signal's acknowledgement), never a traceback."""
    import time

    for trial in range(2):
        run_dir = tmp_path / f"run{trial}"
        command = [sys.executable, "-m", "tokenmdp", "train", *sets(*TINY, "train.steps=300", f"run.dir={run_dir}")]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env())
        metrics, rows = run_dir / "metrics.jsonl", 5 + 3 * trial
        wait_until(lambda: has_lines(metrics, rows))  # noqa: B023 (waited on before the next trial)
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.003)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        lines = [line for line in err.splitlines() if "stopping after this step" not in line]
        assert len(lines) == 1 and lines[0].startswith("tokenmdp: interrupted"), err


def test_an_abort_that_lands_in_a_finalizer_is_sent_again_after_it(monkeypatch, capsys):
    """A KeyboardInterrupt raised inside ``__del__`` (tqdm's, under load) is printed as
    "Exception ignored" and lost: the third signal is re-sent instead, then aborts."""
    import signal
    import types

    from tokenmdp.training import interrupts

    sent = []
    monkeypatch.setattr(
        interrupts.threading, "Timer", lambda delay, fn, args: types.SimpleNamespace(start=lambda: sent.append(args))
    )
    in_finalizer = types.SimpleNamespace(f_code=types.SimpleNamespace(co_name="__del__"))
    with interrupts.deferred_interrupt() as flag:
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        handler(signal.SIGINT, None)
        assert flag.is_set() and "stopping after this step" in capsys.readouterr().err
        handler(signal.SIGINT, in_finalizer)  # no exception inside the finalizer
        assert sent == [(os.getpid(), signal.SIGINT)]
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)  # the re-sent signal, outside it

"""A reward that calls ``os._exit(0)`` must not end a run with status 0 and no message
(issue 25). Run in a subprocess: if the guard failed, the test process itself would exit."""

from __future__ import annotations

import subprocess
import sys

from test_reliability import text_setup, text_train  # noqa: F401  (a fixture)

EXITING = """
import os


def reward(prompt, completion):
    os._exit(0)


def forking_reward(prompt, completion):
    # a child that leaves through os._exit, as multiprocessing's fork start does
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    return float(os.waitstatus_to_exitcode(status))
"""


def run_cli(tmp_path, root, reward):
    (tmp_path / "mods").mkdir(exist_ok=True)
    (tmp_path / "mods" / "exiting_rewards.py").write_text(EXITING)
    args = text_train(root, tmp_path / "run", f"env.reward=exiting_rewards:{reward}")
    code = f"import sys; from tokenmdp.cli import main; sys.exit(main({args!r}))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path / "mods", capture_output=True, text=True, timeout=300
    )


def test_a_reward_calling_os_exit_is_a_one_line_error_not_a_silent_success(text_setup, tmp_path):  # noqa: F811
    done = run_cli(tmp_path, text_setup, "reward")
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "reward 'exiting_rewards:reward' called os._exit(0) on prompt" in lines[0]
    assert not (tmp_path / "run").exists()  # it failed before its first checkpoint


def test_a_forked_child_of_a_reward_still_leaves_through_os_exit(text_setup, tmp_path):  # noqa: F811
    done = run_cli(tmp_path, text_setup, "forking_reward")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run directory:" in done.stdout

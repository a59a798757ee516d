"""What several test files share (imported as ``helpers``; fixtures live in conftest.py)."""

import math

import pytest
import torch

#: The tests' tiny GPT-2 (2 layers, width 32; vocabulary 48, BOS 1, EOS 2).
TINY_GPT2 = {
    "model_type": "gpt2",
    "vocab_size": 48,
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 32,
    "n_positions": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

#: A config small enough to train in a second or two.
TINY = [
    "algorithm.name=reinforce",
    "env.id=tokenmdp/Pattern-v0",
    "env.vocab_size=4",
    "env.horizon=3",
    "policy.kind=gru",
    "policy.hidden=16",
    "reference.sft_samples=256",
    "reference.sft_epochs=2",
    "train.steps=4",
    "train.batch_size=16",
    "train.eval_every=2",
    "train.progress=false",
]


def train_until_interrupted(trainer, at_step: int) -> None:
    """Run ``trainer`` until step ``at_step`` raises KeyboardInterrupt (the steps before it,
    and their checkpoints, are done), as a crash or Ctrl-C mid-run would."""
    original = trainer.train_step

    def crash(step):
        if step == at_step:
            raise KeyboardInterrupt
        return original(step)

    trainer.train_step = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


def wait_until(done, timeout: float = 120.0, poll: float = 0.05) -> bool:
    """Poll ``done()`` until it is true or ``timeout`` seconds pass; whether it became true.
    (Subprocess tests wait on files another process writes.)"""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if done():
            return True
        time.sleep(poll)
    return bool(done())


def has_lines(path, n: int) -> bool:
    """Whether the text file ``path`` exists and holds at least ``n`` lines."""
    return path.exists() and len(path.read_text().splitlines()) >= n


def rounding_tolerance(expected: torch.Tensor, *, reduction: int, depth: int = 1, ulps: float = 4.0) -> float:
    """The absolute tolerance for two computations of ``expected`` that are the same maths
    but not the same code path (another kernel, another blocking, an adapter switched off
    instead of absent), so that their floating-point additions happen in another order.

    Each of ``depth`` sequential stages sums ``reduction`` products; a sum in another order
    rounds differently at each addition, and those roundings add up like a random walk, so
    the two results differ by about ``sqrt(depth * reduction)`` machine epsilons at the scale
    of the largest value. ``ulps`` is the headroom for the walk's tails. Bit-equality is
    asserted only where both sides are the same computation (see docs/testing.md)."""
    eps = torch.finfo(expected.dtype).eps
    return ulps * math.sqrt(depth * reduction) * eps * float(expected.abs().max())


#: What gloo's TCP transport says when a connection between two ranks on this machine drops
#: (seen about once in ten full suites on 2 shared cores, in a launch that passes when run again).
GLOO_TRANSPORT = ("gloo/transport/tcp", "Connection reset by peer", "Connection closed by peer")


def torchrun_two_ranks(script, log_dir, timeout: float, env: dict | None = None):
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 script`` (gloo on
    the CPU, one thread a rank). Each rank's output also goes to its own files under
    ``log_dir`` (torchrun's ``--tee 3``), so when a rank fails the assertion shows *that*
    rank's traceback, not the launcher's summary and the other rank's "connection closed".

    A launch whose every failing rank died of a dropped gloo connection is run once more
    (with a warning saying so); any other failure, or a second drop, fails the test."""
    import glob
    import os
    import shutil
    import subprocess
    import sys
    import warnings

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENMDP_DIST_TIMEOUT": "120", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [f"--log-dir={log_dir}", "--tee=3", str(script)]
    for attempt in (1, 2):
        shutil.rmtree(log_dir, ignore_errors=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode == 0:
            return done
        logs = {}
        for path in sorted(glob.glob(f"{log_dir}/**/stderr.log", recursive=True)):
            with open(path, encoding="utf-8", errors="replace") as fh:
                logs[path] = fh.read()
        failed = [text for text in logs.values() if "Traceback" in text]
        dropped = failed and all(any(s in text for s in GLOO_TRANSPORT) for text in failed)
        if attempt == 1 and dropped:
            warnings.warn(f"{script}: a gloo connection dropped; launched again", stacklevel=2)
            continue
        shown = "\n".join(f"--- {path} ---\n{text[-4000:]}" for path, text in logs.items())
        pytest.fail(f"torchrun exited {done.returncode}:\n{shown}\n--- torchrun ---\n{done.stderr[-1500:]}")
    raise AssertionError("unreachable")

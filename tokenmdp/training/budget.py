"""A memory estimate before anything large is built: the exact solver's prefix tree, the
reference's SFT data, the vector env, the policy and its optimiser, the batch's logits and
the sampled evaluation. Over ``train.max_memory_gb`` (default: 80% of this machine's
memory) the run stops at start-up with the estimate, instead of being killed by the
kernel with no message after minutes of work."""

from __future__ import annotations

import math
import os

import torch

from ..errors import ConfigError
from ..policies import build_policy

GB = 2**30
#: The share of the machine's memory a run may plan to use when train.max_memory_gb is unset.
DEFAULT_SHARE = 0.8


def machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no default budget
        return 0


def budget_bytes(config) -> float:
    if config.train.max_memory_gb is not None:
        return config.train.max_memory_gb * GB
    total = machine_memory()
    return DEFAULT_SHARE * total if total else float("inf")


def _budget_text(config) -> str:
    if config.train.max_memory_gb is not None:
        return f"train.max_memory_gb = {config.train.max_memory_gb:g}"
    total = machine_memory()
    if not total:
        return "train.max_memory_gb (unset, and this machine's memory is unknown)"
    return f"train.max_memory_gb (unset: {DEFAULT_SHARE:.0%} of this machine's {total / GB:.1f} GB)"


def _check(parts: dict[str, float], config) -> None:
    total, limit = sum(parts.values()), budget_bytes(config)
    what, size = max(parts.items(), key=lambda kv: kv[1])
    if math.isinf(total):  # an estimate that saturated: refused even without a budget
        raise ConfigError(
            f"this run needs more memory than {_budget_text(config)} allows (the estimate overflows); "
            f"the largest part is {what}: more than the budget"
        )
    if total > limit:
        raise ConfigError(
            f"this run needs about {total / GB:.3g} GB of memory, over {_budget_text(config)}; "
            f"the largest part is {what}: {size / GB:.3g} GB"
        )


def check_before_env(config) -> None:
    """The vector env's tables, from the config alone (before the env is made)."""
    horizon = config.env.get("horizon", 1)
    horizon = horizon if isinstance(horizon, int) and horizon > 0 else 1
    _check(
        {
            f"the vector env (train.batch_size = {config.train.batch_size} x horizon)": config.train.batch_size
            * horizon
            * 8
            * 6
        },
        config,
    )


def solver_bytes(num_prompts: int, vocab: int, horizon: int, state_width: int = 64) -> float:
    """The exact solver over the prefix tree: float64 tables of every depth (rewards, Q, V,
    the reference's, pi*'s and an evaluated policy's log-probs, temporaries), and the
    decoding states of the deepest level."""
    v = float(vocab)
    try:  # sum_{t=1..H} V^t in closed form: a huge horizon costs no loop
        entries = num_prompts * (horizon if vocab == 1 else v * (v**horizon - 1) / (v - 1))
        deepest = num_prompts * v ** max(horizon - 1, 0)
    except OverflowError:  # vocab^horizon past a float (4^1000): more than any budget
        return math.inf
    return entries * 8 * 8 + deepest * (vocab + 3 * state_width) * 8


def policy_parameters(config, task) -> int:
    """The policy's parameter count, from a model built on the meta device (no memory);
    0 for a model loaded from a folder (its size is the folder's)."""
    if "path" in config.policy:
        return 0
    with torch.device("meta"):
        return sum(p.numel() for p in build_policy(config.policy, task, seed=config.train.seed).parameters())


def check_run(config, task) -> None:
    """Everything the run builds, once the task is known."""
    t, ref = config.train, config.reference
    vocab, horizon = task.vocab_size, task.horizon
    width = task.prompts.shape[1] + horizon
    params = policy_parameters(config, task)
    parts = {
        f"the policy, its reference and Adam ({params:,} parameters)": params * 4 * 5,
        f"the batch's logits (train.batch_size = {t.batch_size} x {width} positions x vocabulary {vocab})": t.batch_size
        * width
        * vocab
        * 4
        * 4,
    }
    if task.exact:
        hidden = int(config.policy.get("hidden", 96)) if isinstance(config.policy.get("hidden", 96), int) else 96
        solver = _solver_part(task, hidden)
        parts.update({k: v * (2 if ref.tagged_samples else 1) for k, v in solver.items()})  # the tilt solves too
        if ref.init == "sft":
            parts[f"the reference's SFT data ({ref.sft_samples + ref.tagged_samples:,} samples)"] = (
                (ref.sft_samples + ref.tagged_samples) * width * 8 * 4
            )
    else:
        samples = t.eval_samples or t.batch_size
        parts[f"the sampled evaluation (train.eval_samples = {samples} x {width} positions x vocabulary {vocab})"] = (
            samples * width * vocab * 4 * 4
        )
    _check(parts, config)


def _solver_part(task, state_width: int = 64) -> dict[str, float]:
    vocab, horizon = task.vocab_size, task.horizon
    what = f"the exact solver (vocabulary {vocab}, horizon {horizon}: {vocab}^{horizon} leaves per prompt)"
    return {what: solver_bytes(task.prompts.shape[0], vocab, horizon, state_width)}


def check_solver(config, task) -> None:
    """The exact solver alone (``tokenmdp solve``)."""
    _check(_solver_part(task), config)

"""``summary.json``: what a finished run reports (docs/metrics.md, "summary.json")."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..plugin.composition import Composition


def _nan_mean(values: list[float]) -> float | None:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else None


def run_summary(
    config: Config,
    composition: Composition,
    task,
    *,
    start: dict[str, float],
    final: dict[str, float],
    env_tokens: int,
    wall_seconds: float,
    j_star: float | None = None,
    stopped_at: int | None = None,
    recent_credit: list[float] = (),
    warnings: list[str] = (),
    guided_reference: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The summary of a run of ``composition`` on ``task``: ``start`` and ``final``, the
    reference's and the trained policy's scores; for a toy task (exact), ``j_star``, the step
    the run reached its target at (``stopped_at``, None if it did not stop early) and its
    last steps' ``credit_corr`` values (``recent_credit``); for a text task, the health
    watch's ``warnings`` and, for a guide method, the guided reference's scores
    (``guided_reference``: :meth:`Component.guide`)."""
    reports = {k: v for c in composition.components for k, v in c.report().items()}
    common = {
        **composition.describe(),
        "env": config.env["id"],
    }
    if not task.exact:  # sampled scores; nothing knows the optimum
        eval_task = task.eval_task
        return {
            **common,
            "steps": config.train.steps,
            "env_tokens": env_tokens,
            "wall_seconds": wall_seconds,
            "used_env_reward": composition.needs_env_reward,
            "eval_on": (
                f"held-out prompts: env.eval_prompts = {eval_task.prompts_path}"
                if eval_task is not task
                else "the training prompts (env.eval_prompts unset)"
            ),
            "start": dict(start),
            **({"guided_reference": dict(guided_reference)} if guided_reference is not None else {}),
            **final,
            **reports,
            # a collapse or a run-away policy (training/health.py); empty for a healthy run
            "warnings": list(warnings),
        }
    return {
        **common,
        "steps": stopped_at or config.train.steps,
        "reached_target": stopped_at is not None,
        "env_tokens": env_tokens,
        "wall_seconds": wall_seconds,
        "used_env_reward": composition.needs_env_reward,
        "j_star": j_star,
        "start": {**start, "regret_frac": 1.0, "closure": 0.0},
        **final,
        # mean over the last (up to) 10 steps: one step's correlation is noisy
        "credit_corr": _nan_mean(list(recent_credit)),
        **reports,
    }

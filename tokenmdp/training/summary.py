"""``summary.json``: what a finished run reports (docs/metrics.md, "summary.json")."""

from __future__ import annotations

from typing import Any


def _nan_mean(values: list[float]) -> float | None:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else None


def run_summary(trainer, final: dict[str, float], env_tokens: int, wall_seconds: float) -> dict[str, Any]:
    """The summary of ``trainer``'s run, with ``final``, its policy's last scores."""
    config, composition, evaluator = trainer.config, trainer.composition, trainer.evaluator
    reports = {k: v for c in composition.components for k, v in c.report().items()}
    common = {
        **composition.describe(),
        "env": config.env["id"],
    }
    if not trainer.task.exact:  # sampled scores; nothing knows the optimum
        eval_task = trainer.task.eval_task
        return {
            **common,
            "steps": config.train.steps,
            "env_tokens": env_tokens,
            "wall_seconds": wall_seconds,
            "used_env_reward": composition.needs_env_reward,
            "eval_on": (
                f"held-out prompts: env.eval_prompts = {eval_task.prompts_path}"
                if eval_task is not trainer.task
                else "the training prompts (env.eval_prompts unset)"
            ),
            "start": dict(evaluator.start),
            **final,
            **reports,
            # a collapse or a run-away policy (training/health.py); empty for a healthy run
            "warnings": list(trainer.health.warnings) if trainer.health is not None else [],
        }
    return {
        **common,
        "steps": trainer.stopped_at or config.train.steps,
        "reached_target": trainer.stopped_at is not None,
        "env_tokens": env_tokens,
        "wall_seconds": wall_seconds,
        "used_env_reward": composition.needs_env_reward,
        "j_star": evaluator.solution.j_star,
        "start": {**evaluator.start, "regret_frac": 1.0, "closure": 0.0},
        **final,
        # mean over the last (up to) 10 steps: one step's correlation is noisy
        "credit_corr": _nan_mean(trainer.recent_credit),
        **reports,
    }

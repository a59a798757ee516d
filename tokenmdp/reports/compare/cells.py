"""One cell of the grid: its training run (resumed from a checkpoint, its reference from the
grid's cache), and the numbers the results read from it: the exact reward-KL frontier of its
reference, the guide-tagged SFT tokens, and its record for the tables and plots.
"""

from __future__ import annotations

import json
from typing import Any

from ...config import Config
from ...errors import TrainingInterrupted
from ...mdp.solver import solve, tree_logprobs
from ...plugin.composition import compose
from ...plugin.registry import Registry
from ...training.envs import load_task
from ...training.files import atomic_write_text
from ...training.layout import EVAL_COMPLETIONS
from ...training.models import load_reference
from ...training.rundir import latest_checkpoint
from ...training.sft import run_sft_data, tagged_tokens
from ...training.trainer import Trainer
from .grid import Cell, recorded_config
from .output import COLUMNS, TEXT_KEYS
from .references import cached_tagged_sft_tokens, check_cached_reference, reference_cache

#: "Tokens to 90% of the achievable improvement": first evaluation with closure >= this.
TARGET_CLOSURE = 0.9
#: The beta sweep that traces the exact reward-KL frontier (1/128 .. 128, 4 points per octave).
FRONTIER_BETAS = tuple(2.0 ** (k / 4) for k in range(-28, 29))
#: Allowed slack in ``E[R] - b KL <= J*_b``: both sides are exact float64 sums.
FRONTIER_TOLERANCE = 1e-6


def run_cell(cell: Cell, pm) -> None:
    """Train one cell; one interrupted after a checkpoint continues from it, anything else
    unfinished starts from scratch (``run.overwrite = true``). Its reference comes from the
    grid's cache when another cell fine-tuned the same one (checked first; a damaged one is
    fine-tuned again), and the entry gets its checksums once the cell ends."""
    resume = latest_checkpoint(cell.dir) is not None and recorded_config(cell) == cell.config
    (cell.dir / "compare.json").unlink(missing_ok=True)  # cached numbers of an older run of this cell
    check_cached_reference(cell, pm)
    try:
        Trainer(cell.config, pm=pm, resume=resume, reference_cache=reference_cache(cell)).train()
    except TrainingInterrupted:
        raise TrainingInterrupted(
            f"interrupted in cell {cell.dir.name}; rerun the same `tokenmdp compare` "
            "command to resume the grid (finished cells are kept)"
        ) from None
    check_cached_reference(cell, pm)  # the checksums of an entry this cell's fine-tune wrote


def exact_frontier(task, reference, betas=FRONTIER_BETAS) -> list[dict[str, float]]:
    """For each beta: J*_beta and the exact E[R] and KL(pi*_beta || pi_ref) of pi*_beta."""
    ref_logp = tree_logprobs(reference, task)
    out = []
    for beta in betas:
        solution = solve(task, reference, beta, ref_logp=ref_logp)
        scores = solution.evaluate(solution.opt_logp)
        out.append(
            {"beta": beta, "j_star": solution.j_star, "true_reward": scores["true_reward"], "kl_ref": scores["kl_ref"]}
        )
    return out


def frontier_excess(points: list[tuple[float, float]], frontier: list[dict[str, float]]) -> float:
    """``max over points and beta of E[R] - beta KL - J*_beta``: <= 0 for every policy, because
    ``J*_beta`` is the best ``E[R] - beta KL`` of all. So > 0 means a point above the frontier."""
    return max(r - f["beta"] * kl - f["j_star"] for kl, r in points for f in frontier)


def tagged_sft_tokens(task, config: Config) -> int:
    """Real tokens of the guide-tagged SFT data in the cell's reference: its run's SFT data
    (``run_sft_data``, the draw its fine-tune trained on), recounted."""
    ref = config.reference
    if ref.init != "sft" or ref.tagged_samples == 0:
        return 0
    return tagged_tokens(run_sft_data(task, config)[0], config)


def cell_extras(cell: Cell, registry: Registry) -> dict[str, Any]:
    """The exact frontier of the cell's own reference and its tagged SFT tokens (cached);
    nothing for a text cell."""
    path = cell.dir / "compare.json"
    if path.is_file():
        return json.loads(path.read_text())
    if "j_star" not in json.loads((cell.dir / "summary.json").read_text()):
        return {}  # a text cell: no exact frontier to trace
    config = cell.config
    _, task = load_task(config, registry=registry)
    reference = load_reference(cell.dir, config, task)
    betas = sorted({*FRONTIER_BETAS, config.train.beta})  # the run's own beta: pi*'s point is on the curve
    tagged = cached_tagged_sft_tokens(cell)
    tagged = tagged_sft_tokens(task, config) if tagged is None else tagged  # a cell fine-tuned before the cache
    extras = {"frontier": exact_frontier(task, reference, betas), "tagged_sft_tokens": tagged}
    atomic_write_text(path, json.dumps(extras))  # a cache that is whole or absent
    return extras


def first_reaching(rows: list[dict], target: float = TARGET_CLOSURE) -> dict | None:
    """The first evaluation row with ``closure >= target`` (90% of ``J* - J(pi_ref)``), or None."""
    return next((row for row in rows if row["closure"] >= target), None)


def _data_token_counters(cell: Cell, registry: Registry) -> list[str]:
    """The metrics in which the cell's components count the supervision data they consumed
    (DPO's pairs, context distillation's guided samples, ...)."""
    return [m for c in compose(registry, cell.config).components for m in c.data_token_metrics]


def tokens_per_second(summary: dict, rows: list[dict]) -> float | None:
    """The sampled policy tokens of a text cell per wall second (evaluations included), over
    the steps its ``wall_seconds`` covers (from ``wall_from_step``, when a resume could not
    count the earlier pieces: ``env_tokens`` of that step's row of ``metrics.jsonl``)."""
    if "wall_from_step" not in summary:  # a summary of an older tokenmdp: its resumes were not counted
        return None
    since = summary["wall_from_step"]
    before = next((row["env_tokens"] for row in rows if row.get("step") == since), None) if since else 0
    if before is None or not summary.get("wall_seconds"):
        return None  # no row for that step: the tokens the time covers are unknown
    return (summary["env_tokens"] - before) / summary["wall_seconds"]


def text_record(cell: Cell, registry: Registry, summary: dict, rows: list[dict]) -> dict[str, Any]:
    """A text cell's record: its sampled held-out scores (no exact optimum, so no regret,
    closure or frontier) and each judge's, with the data tokens it consumed."""
    per_second = tokens_per_second(summary, rows)  # every step's row: where a resumed count starts
    rows = [row for row in rows if "kl_ref" in row]
    counters = _data_token_counters(cell, registry)
    return {
        "recipe": cell.recipe,
        "env": cell.env,
        "seed": cell.seed,
        "supervision": registry.recipe(cell.config.algorithm.name).supervision,
        **{key: value for key, value in summary.items() if key in TEXT_KEYS or key.startswith("judge/")},
        "data_tokens": sum(rows[-1].get(m, 0) for m in counters),
        "tokens_per_second": per_second,
        "eval_rows": rows,
        # the baselines' rows (output.baseline_rows): the reference's own held-out scores and,
        # for a guide method, the guided reference's
        "start": summary["start"],
        "guided_reference": summary.get("guided_reference"),
        "frontier": None,
        "cell": cell.dir.name,
        "eval_completions": str(cell.dir / EVAL_COMPLETIONS),
    }


def cell_record(cell: Cell, registry: Registry) -> dict[str, Any]:
    """Everything the tables and plots need from one finished cell."""
    summary = json.loads((cell.dir / "summary.json").read_text())
    lines = (cell.dir / "metrics.jsonl").read_text().splitlines()
    if "j_star" not in summary:  # a text cell: sampled scores
        return text_record(cell, registry, summary, [json.loads(line) for line in lines if line])
    rows = [row for row in map(json.loads, filter(None, lines)) if "closure" in row]
    extras = cell_extras(cell, registry)
    points = [(row["kl_ref"], row["true_reward"]) for row in rows]
    hit = first_reaching(rows)
    never = float("inf")
    supervision = registry.recipe(cell.config.algorithm.name).supervision
    # The guide-tagged SFT data is the teacher of a recipe that uses neither reward nor pairs;
    # reward and pair recipes may start from the same reference but never read the guide.
    tagged = extras["tagged_sft_tokens"] if supervision == "none" else 0
    counters = _data_token_counters(cell, registry)

    def data_tokens(row: dict) -> int:
        return tagged + sum(row.get(m, 0) for m in counters)

    return {
        "recipe": cell.recipe,
        "env": cell.env,
        "seed": cell.seed,
        "supervision": supervision,
        **{key: summary.get(key) for key, _ in COLUMNS if key in summary},
        "tokens_to_90": hit["env_tokens"] if hit else never,
        # Supervision data is paid for in tokens too: the guide-tagged SFT data, and DPO's
        # preference pairs (both responses) sampled up to that step.
        "tokens_to_90_with_data": hit["env_tokens"] + data_tokens(hit) if hit else never,
        "data_tokens": data_tokens(rows[-1]),
        "frontier_excess": frontier_excess(points + [(summary["kl_ref"], summary["true_reward"])], extras["frontier"]),
        "eval_rows": rows,
        "frontier": extras["frontier"],
    }

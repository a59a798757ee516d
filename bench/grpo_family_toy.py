"""What `tokenmdp compare` does not print for the GRPO-family grid: each variant's length
bias per seed, its early credit correlation, and on Length its length per target.

    OMP_NUM_THREADS=1 tokenmdp compare configs/compare_grpo_family.toml --jobs 2
    python bench/grpo_family_toy.py                        # reads runs/compare_grpo_family
    python bench/grpo_family_toy.py --grid runs/other --early 30

From every finished cell of the grid (docs/results_grpo_family.md) it prints, as
median [min, max] over seeds:

* ``length - pi* length``: the final policy's exact mean response length minus pi*'s, per
  seed (each seed has its own reference, so its own pi*);
* ``|length - pi* length| per prompt``: the mean over prompts of the absolute difference,
  from the final checkpoint (a policy can have pi*'s mean length and the wrong length on
  every prompt);
* ``credit_corr, steps 1..E``: the mean per-step ``credit_corr`` over the first ``--early``
  steps, while the policy is still far from pi* (at the end every group recipe's
  KL-penalised credit is near 0: docs/compare.md);

and for the Length env one more table: the exact mean length of the final policy on the
prompts of each target length, against pi*'s and pi_ref's.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

from tokenmdp.mdp.solver import DTYPE, solve, tree_logprobs  # noqa: E402
from tokenmdp.reports.compare.grid import short_env  # noqa: E402
from tokenmdp.reports.explain import load_run  # noqa: E402


def spread(values: list[float], fmt: str = "{:+.3f}") -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def per_prompt_lengths(task, logp: list[torch.Tensor]) -> torch.Tensor:
    """``[num_prompts]``: ``E[len(y) | x]``, EOS included (``Solution.expected_length`` per prompt)."""
    reach = torch.ones(task.prompts.shape[0], 1, dtype=DTYPE)
    length = torch.zeros(task.prompts.shape[0], dtype=DTYPE)
    for t, lp in enumerate(logp):
        length += reach.sum(1)
        weight = reach[..., None] * lp.to(DTYPE).exp()
        reach = (weight * ~task.ending_actions(t)).reshape(weight.shape[0], -1)
    return length


def cell_scores(cell: Path, early: int) -> dict:
    summary = json.loads((cell / "summary.json").read_text())
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines() if line]
    credit = [r["credit_corr"] for r in rows if 1 <= r["step"] <= early and r.get("credit_corr") is not None]
    config, _, task, policy, reference, _ = load_run(cell)
    solution = solve(task, reference, config.train.beta)
    own = per_prompt_lengths(task, tree_logprobs(policy, task))
    opt = per_prompt_lengths(task, solution.opt_logp)
    ref = per_prompt_lengths(task, solution.ref_logp)
    out = {
        "bias": summary["response_length"] - summary["optimal_length"],
        "per_prompt": float((own - opt).abs().mean()),
        "early_credit": sum(credit) / len(credit) if credit else None,
        "start_length": summary["start"]["response_length"],
    }
    if task.name == "Length":  # the mean length on the prompts of each target
        for target in sorted(set(task.target.tolist())):
            on = task.target == target
            out[f"target {target}"] = (float(own[on].mean()), float(opt[on].mean()), float(ref[on].mean()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="runs/compare_grpo_family", help="the grid's results folder")
    parser.add_argument("--early", type=int, default=50, help="credit_corr over steps 1..EARLY")
    args = parser.parse_args()
    groups: dict[tuple[str, str], list[dict]] = {}
    for cell in sorted((Path(args.grid) / "cells").iterdir()):
        if not (cell / "summary.json").is_file():
            continue
        recipe, env, _ = cell.name.split("__")
        groups.setdefault((recipe, env), []).append(cell_scores(cell, args.early))
    table = Path(args.grid) / "results.csv"  # the grid's order of recipes and envs, when written
    if table.is_file():
        order = [(r["recipe"], short_env(r["env"])) for r in csv.DictReader(table.open())]
        groups = {key: groups[key] for key in order if key in groups} | groups
    envs = list(dict.fromkeys(env for _, env in groups))
    header = "| env | recipe | length - pi* length | abs(length - pi* length) per prompt |"
    print(f"{header} credit_corr, steps 1..{args.early} |")
    print("|---|---|---|---|---|")
    for env in envs:
        for (recipe, e), scores in groups.items():
            if e == env:
                print(
                    f"| {env} | {recipe} | {spread([s['bias'] for s in scores])} | "
                    f"{spread([s['per_prompt'] for s in scores], '{:.3f}')} | "
                    f"{spread([s['early_credit'] for s in scores], '{:.3f}')} |"
                )
    length = [(recipe, scores) for (recipe, e), scores in groups.items() if e == "Length"]
    if length:
        targets = [k for k in length[0][1][0] if k.startswith("target ")]
        print()
        print("Length: the exact mean length on the prompts of each target (final policy; pi* and pi_ref below)")
        print()
        print("| recipe | " + " | ".join(targets) + " |")
        print("|---|" + "---|" * len(targets))
        for recipe, scores in length:
            cells = [spread([s[t][0] for s in scores], "{:.2f}") for t in targets]
            print(f"| {recipe} | " + " | ".join(cells) + " |")
        scores = length[0][1]
        print("| pi* | " + " | ".join(spread([s[t][1] for s in scores], "{:.2f}") for t in targets) + " |")
        print("| pi_ref | " + " | ".join(spread([s[t][2] for s in scores], "{:.2f}") for t in targets) + " |")


if __name__ == "__main__":
    main()

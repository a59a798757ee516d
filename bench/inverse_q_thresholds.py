"""Issue-3 thresholds at full size (V=6, H=5, beta=1, GRU hidden 96, 64 responses/step).

Prints, over seeds, median [min, max] of:
  1. oracle Inverse-Q*: env tokens until regret < 2% of the starting gap
     (reverse-kl budget 0.6M tokens, clipped-pg budget 1.5M tokens), on Pattern and SumMod;
  2. the no-preference guide experiment (10k + 10k SFT samples): closure, ceiling,
     kl_ref and credit_corr on Pattern, Forbidden, SumThreshold and SumMod.

    .venv/bin/python bench/inverse_q_thresholds.py --seeds 0 1 2
    .venv/bin/python bench/inverse_q_thresholds.py --part guide --envs Pattern
"""

from __future__ import annotations

import time

from _common import TOKENS_PER_STEP, run, spread, start, threshold_parser

BUDGETS = {"inverse-q-distill": 600_000, "inverse-q": 1_500_000}
#: clipped-pg's default lr (3e-3) is fast on Pattern but too noisy on SumMod's delayed
#: reward: 1e-3, decaying linearly over the whole 1.5M-token budget, gets both there.
UPDATER = {"inverse-q-distill": [], "inverse-q": ["updater.lr=1e-3"]}


def oracle_part(seeds, envs) -> None:
    print("\n## Oracle Inverse-Q*: env tokens until regret < 2% of the starting gap\n")
    print("| recipe (updater) | env | budget | reached | env tokens median [min, max] |")
    print("|---|---|---|---|---|")
    for recipe, budget in BUDGETS.items():
        for env in envs:
            tokens, reached = [], 0
            for seed in seeds:
                s, _, _ = run(
                    "configs/inverse_q_oracle.toml",
                    [
                        f"algorithm.name={recipe}",
                        f"env.id=tokenmdp/{env}-v0",
                        f"train.seed={seed}",
                        f"train.steps={budget // TOKENS_PER_STEP}",
                        *UPDATER[recipe],
                    ],
                )
                reached += bool(s["reached_target"])
                tokens.append(s["env_tokens"] if s["reached_target"] else float("inf"))
            shown = spread([t for t in tokens if t != float("inf")], "{:,.0f}")
            print(f"| {recipe} | {env} | {budget:,} | {reached}/{len(seeds)} | {shown} |", flush=True)


def guide_part(seeds, envs) -> None:
    print("\n## No preference data: Inverse-Q* with the guide only (10k + 10k SFT samples)\n")
    print("| env | closure | ceiling | kl_ref | credit_corr |")
    print("|---|---|---|---|---|")
    for env in envs:
        rows = [
            run("configs/inverse_q_guide.toml", [f"env.id=tokenmdp/{env}-v0", f"train.seed={seed}"])[0]
            for seed in seeds
        ]
        cols = [spread([r[k] for r in rows]) for k in ("closure", "ceiling", "kl_ref", "credit_corr")]
        print(f"| {env} | " + " | ".join(cols) + " |", flush=True)


def main() -> None:
    args = threshold_parser(__doc__, ["oracle", "guide"]).parse_args()
    started = start(args)
    if args.part in ("oracle", "all"):
        oracle_part(args.seeds, args.envs or ["Pattern", "SumMod"])
    if args.part in ("guide", "all"):
        guide_part(args.seeds, args.envs or ["Pattern", "Forbidden", "SumThreshold", "SumMod"])
    print(f"\nwall time: {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()

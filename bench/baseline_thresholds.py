"""Issue-4 thresholds at full size (V=6, H=5, beta=1, GRU hidden 96, 64 responses/step).

Prints, over seeds, median [min, max] of:
  1. PPO, RLOO and GRPO (configs/<recipe>.toml): env tokens until regret < 10% of the
     starting gap J* - J(pi_ref), within a 1M-token budget, on the dense (Pattern) and the
     delayed-reward (SumMod) environments; and the regret_frac where each run stopped;
  2. DPO offline (configs/dpo.toml) and online (configs/dpo_online.toml) at the same
     8k-pair budget: final regret_frac and KL(pi || pi_ref) on Pattern and Forbidden.
     --set applies overrides to both DPO configs (e.g. env.penalty=3, estimator.labels=...).

    .venv/bin/python bench/baseline_thresholds.py --seeds 0 1 2 --threads 1
    .venv/bin/python bench/baseline_thresholds.py --part dpo --envs Forbidden --set env.penalty=3
"""

from __future__ import annotations

import time

from _common import TOKENS_PER_STEP, run, spread, start, threshold_parser

RL_BUDGET = 1_000_000
RL_TARGET = 0.10


def rl_part(recipes, envs, seeds) -> None:
    print(f"\n## Env tokens until regret < {RL_TARGET:.0%} of the starting gap (budget {RL_BUDGET:,})\n")
    print("| recipe | env | reached | env tokens | regret_frac at stop | wall s |")
    print("|---|---|---|---|---|---|")
    for recipe in recipes:
        for env in envs:
            tokens, final, wall, reached = [], [], [], 0
            for seed in seeds:
                summary, _, _ = run(
                    f"configs/{recipe}.toml",
                    [
                        f"env.id=tokenmdp/{env}-v0",
                        f"train.seed={seed}",
                        f"train.steps={RL_BUDGET // TOKENS_PER_STEP}",
                        f"train.target_regret_frac={RL_TARGET}",
                    ],
                )
                reached += bool(summary["reached_target"])
                tokens.append(summary["env_tokens"] if summary["reached_target"] else None)
                final.append(summary["regret_frac"])
                wall.append(summary["wall_seconds"])
            print(
                f"| {recipe} | {env} | {reached}/{len(seeds)} | {spread(tokens, '{:,.0f}')} | "
                f"{spread(final)} | {spread(wall, '{:.0f}')} |",
                flush=True,
            )


def dpo_part(envs, seeds, overrides: list[str]) -> None:
    with_overrides = f" with {' '.join(overrides)}" if overrides else ""
    print(f"\n## DPO, 8k pairs, 3 epochs: final regret_frac and kl_ref (offline vs online){with_overrides}\n")
    print("| env | offline regret_frac | online regret_frac | online better in | offline kl_ref | online kl_ref |")
    print("|---|---|---|---|---|---|")
    for env in envs:
        regret, kl_ref = {}, {}
        for name in ("dpo", "dpo_online"):
            finals = [
                run(f"configs/{name}.toml", [f"env.id=tokenmdp/{env}-v0", f"train.seed={seed}", *overrides])[2][-1]
                for seed in seeds
            ]
            regret[name], kl_ref[name] = [r["regret_frac"] for r in finals], [r["kl_ref"] for r in finals]
        wins = sum(on < off for on, off in zip(regret["dpo_online"], regret["dpo"]))
        print(
            f"| {env} | {spread(regret['dpo'])} | {spread(regret['dpo_online'])} | {wins}/{len(seeds)} seeds | "
            f"{spread(kl_ref['dpo'])} | {spread(kl_ref['dpo_online'])} |",
            flush=True,
        )


def main() -> None:
    parser = threshold_parser(__doc__, ["rl", "dpo"])
    parser.add_argument("--recipes", nargs="+", default=["ppo", "rloo", "grpo"])
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DPO part: an override for both configs (repeatable)",
    )
    args = parser.parse_args()
    started = start(args)
    if args.part in ("rl", "all"):
        rl_part(args.recipes, args.envs or ["Pattern", "SumMod"], args.seeds)
    if args.part in ("dpo", "all"):
        dpo_part(args.envs or ["Pattern", "Forbidden"], args.seeds, args.overrides)
    print(f"\nwall time: {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()

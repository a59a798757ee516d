"""How many environment tokens Inverse-Q* (guide only) and PPO (true reward) need.

For each env and seed: Inverse-Q* with `configs/inverse_q_guide.toml` runs until its
closure reaches 90% of its ceiling (the closure of the guided teacher); the true_reward
it has then is the bar. PPO (recipe `ppo`, with the env's true reward, same reference
model) then runs until its true_reward reaches that bar. Printed as median [min, max]
over seeds, for Inverse-Q* both without and with the tokens of its guide-tagged SFT data
(that data is supervision too). The untagged base SFT data is shared by both methods and
is not counted.

    .venv/bin/python bench/inverse_q_convergence.py --envs Pattern Forbidden --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import run, spread


def first(rows: list[dict], ok) -> int | None:
    return next((r["env_tokens"] for r in rows if ok(r)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["Pattern", "Forbidden", "SumThreshold"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iq-steps", type=int, default=100)
    parser.add_argument("--ppo-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, seeds: {args.seeds}\n")
    print("| env | Inverse-Q* rollout tokens | Inverse-Q* + tagged SFT tokens | PPO rollout tokens (true reward) | bar (true_reward) |")
    print("|---|---|---|---|---|")
    for env in args.envs:
        iq, iq_sft, ppo, bars = [], [], [], []
        for seed in args.seeds:
            common = [f"env.id=tokenmdp/{env}-v0", f"train.seed={seed}", "train.eval_every=2"]
            summary, config, rows = run("configs/inverse_q_guide.toml", [*common, f"train.steps={args.iq_steps}"])
            goal = 0.9 * summary["ceiling"]
            hit = next((r for r in rows if r["closure"] >= goal), None)
            if hit is None:
                iq.append(None), iq_sft.append(None), ppo.append(None)
                continue
            sft_tokens = config.reference.tagged_samples * config.env["horizon"]
            iq.append(hit["env_tokens"])
            iq_sft.append(hit["env_tokens"] + sft_tokens)
            bars.append(hit["true_reward"])
            _, _, ppo_rows = run("configs/ppo.toml", [
                *common, f"train.steps={args.ppo_steps}",
                # same reference model as the guide run: same SFT data and seed
                f"reference.sft_samples={config.reference.sft_samples}",
                f"reference.tagged_samples={config.reference.tagged_samples}",
                f"reference.sft_epochs={config.reference.sft_epochs}",
            ])
            ppo.append(first(ppo_rows, lambda r: r["true_reward"] >= hit["true_reward"]))
        bar = f"{statistics.median(bars):.3f}" if bars else "-"
        print(f"| {env} | {spread(iq, '{:,.0f}')} | {spread(iq_sft, '{:,.0f}')} | {spread(ppo, '{:,.0f}')} | {bar} |", flush=True)


if __name__ == "__main__":
    main()

"""Inverse-Q* with a text guide on Gemma-3 270M, scored on held-out prompts by a
lexicon the method never sees (docs/results_gemma.md).

    pip install "torch==2.13.0" -e ".[gemma,lora]"
    OMP_NUM_THREADS=2 python bench/gemma_guide.py [--samples 10] [--set train.steps=64 ...]

1. ``tokenmdp models fetch-gemma models/gemma-3-270m`` if that folder is missing.
2. Train with ``configs/gemma_guide_positive.toml`` (reward-free: the guide is the only
   supervision).
3. On the held-out prompts (``data/gemma_prompts_heldout.txt``), sample
   ``--samples`` completions per prompt, with one fixed seed, from: the reference
   (unguided), the reference with the guide (the target pi_hat*), and the trained policy
   (unguided). Print the lexicon score (positive minus negative words,
   ``tokenmdp.text.lexicon_score``) of each, and ``kl_ref``: the sampled estimate of
   the sequence-level KL(pi || pi_ref) on each row's own completions, and likewise the
   KL to the method's target pi_hat* (the reference with the guide in front), which the
   training should shrink.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def score_model(model, reference, task, samples: int, seed: int, prefix=None, guide_prefix=None):
    from tokenmdp.plugin.batch import RolloutBatch, token_logprobs
    from tokenmdp.training.rollout import generate

    n = len(task.texts) * samples
    index = torch.arange(len(task.texts)).repeat_interleave(samples)
    ids, mask = task.prompts[index], task.prompt_mask[index]
    if prefix is not None:  # [BOS, guide, pad..., prompt]
        k = task.prefix_offset
        ids = torch.cat([ids[:, :k], prefix.expand(n, -1), ids[:, k:]], 1)
        mask = torch.cat([mask[:, :k], torch.ones(n, len(prefix), dtype=torch.long), mask[:, k:]], 1)
    generator = torch.Generator().manual_seed(seed)
    response, rmask = generate(model, ids, task.horizon, task.eos_token, generator, attention_mask=mask)
    scores = task.sequence_rewards(index, response, rmask)
    batch = RolloutBatch(
        prompt_ids=task.prompts[index],
        prompt_mask=task.prompt_mask[index],
        response_ids=response,
        response_mask=rmask,
        rewards=torch.zeros_like(rmask),
        prompt_index=index,
        prefix_offset=task.prefix_offset,
    )
    with torch.no_grad():  # KL of the sampling model vs the unguided reference, on these completions
        own = token_logprobs(model, batch, prefix_ids=prefix)
        kl = ((own - token_logprobs(reference, batch)) * rmask).sum(1)
        # KL(. || pi_hat*): pi_hat* is the reference with the guide in front, the method's target
        target = (
            own
            if (model is reference and prefix is guide_prefix)
            else token_logprobs(reference, batch, prefix_ids=guide_prefix)
        )
        kl_target = ((own - target) * rmask).sum(1)
    texts = [task.completion_text(r[: int(m.sum())]) for r, m in zip(response, rmask)]
    return {
        "score": float(scores.mean()),
        "score_se": float(scores.std() / len(scores) ** 0.5),
        "kl_ref": float(kl.mean()),
        "kl_ref_se": float(kl.std() / len(kl) ** 0.5),
        "kl_target": float(kl_target.mean()),
        "kl_target_se": float(kl_target.std() / len(kl) ** 0.5),
        "texts": texts,
        "n": n,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "gemma_guide_positive.toml"))
    parser.add_argument("--heldout", default=str(ROOT / "data" / "gemma_prompts_heldout.txt"))
    parser.add_argument("--samples", type=int, default=10, help="completions per held-out prompt (default 10)")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed of the held-out evaluation")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    from tokenmdp.config import load_config
    from tokenmdp.text import TextTask
    from tokenmdp.text.gemma import fetch_gemma
    from tokenmdp.training.trainer import Trainer

    config = load_config(args.config, args.set)
    model_dir = Path(config.policy["path"])
    if not (model_dir / "config.json").is_file():
        fetch_gemma(model_dir)
    started = time.perf_counter()
    trainer = Trainer(config)
    summary = trainer.train()
    train_seconds = time.perf_counter() - started
    print(
        f"trained: {summary['recipe']} ({summary['estimator']} + {summary['advantage']} + {summary['updater']}), "
        f"{summary['steps']} steps, {summary['env_tokens']} env tokens, used_env_reward={summary['used_env_reward']}, "
        f"{train_seconds:.0f}s; trainer's sampled kl_ref {summary['kl_ref']:.3f}",
        flush=True,
    )

    env = config.env
    task = TextTask(
        prompts=args.heldout,
        tokenizer=env["tokenizer"],
        reward="tokenmdp.text:lexicon_score",
        horizon=env.get("horizon", 32),
    )
    guide = trainer.composition.components[0].options.guide
    prefix = task.encode_guide(guide)
    rows = {}
    for name, model, pre in [
        ("reference (unguided, before)", trainer.reference, None),
        ("reference + guide (the target)", trainer.reference, prefix),
        ("trained policy (unguided, after)", trainer.policy, None),
    ]:
        t = time.perf_counter()
        rows[name] = score_model(model, trainer.reference, task, args.samples, args.seed, pre, prefix)
        print(f"  scored {name} in {time.perf_counter() - t:.0f}s", flush=True)
    total = time.perf_counter() - started
    print(
        f"\nheld-out: {len(task.texts)} prompts x {args.samples} completions, horizon {task.horizon}, "
        f"seed {args.seed}; total {total:.0f}s"
    )
    print("| model | lexicon score (mean +- s.e.) | kl_ref (nats, +- s.e.) | KL to pi_hat* (nats, +- s.e.) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['score']:.3f} +- {r['score_se']:.3f} | {r['kl_ref']:.3f} +- {r['kl_ref_se']:.3f} "
            f"| {r['kl_target']:.3f} +- {r['kl_target_se']:.3f} |"
        )
    for name, r in rows.items():
        print(f"\n{name}: first completions")
        for i in range(0, min(len(r["texts"]), 4 * args.samples), args.samples):
            print(f"  {task.texts[i // args.samples]!r} -> {r['texts'][i]!r}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"summary": summary, "rows": rows, "train_seconds": train_seconds, "total_seconds": total},
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

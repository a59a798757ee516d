"""The GRPO family on real text: the mean completion length each variant ends with.

    python bench/grpo_family_text.py                  # 6 variants x 3 seeds, about 4 minutes
    python bench/grpo_family_text.py --seeds 0 --steps 40

The real-text row of docs/results_grpo_family.md. A tiny GPT-2 (2 layers, d = 64, random
init, GPT-2's default dropout) over a word-level tokenizer of 16 words and the 4 specials,
so that EOS is one token in 20 at the start and completions of 1 to ``--horizon`` tokens all
occur (``env.stop_at_eos = true``). Prompts are 4 random words; the reward is the fraction
of the completion's words among 8 target words (:func:`target_fraction`), which does not
depend on the length. Each variant of docs/grpo_family.md (the toy grid's recipes) trains
from the same model for the same budget: ``--steps`` steps of 8 prompts x 8 samples, the
group recipes' defaults otherwise (the KL, ``train.beta = 0.04`` for an HF policy, in the
sequence reward). It prints, median [min, max] over seeds, the sampled mean completion
length (EOS included) at step 0 and at the end, the reward and ``kl_ref`` at the end, each
on ``--eval-samples`` held-out samples (the same prompts and random stream for every run).
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_lm  # noqa: E402

WORDS = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "fa", "gu", "hi", "jo", "be", "vo", "wy"]
TARGET = frozenset(WORDS[:8])

#: label -> the run-config overrides of the variant (configs/compare_grpo_family.toml's recipes)
VARIANTS = {
    "grpo": ["algorithm.name=grpo"],
    "grpo-seqmean": ["algorithm.name=grpo", "updater.loss_type=grpo"],
    "dr-grpo": ["algorithm.name=grpo", "updater.loss_type=dr_grpo", "estimator.scale_rewards=none"],
    "dapo": [
        "algorithm.name=grpo",
        "updater.loss_type=dapo",
        "updater.epsilon_high=0.28",
        "updater.mask_truncated_completions=true",
    ],
    "clip-higher": ["algorithm.name=grpo", "updater.loss_type=dapo", "updater.epsilon_high=0.28"],
    "overlong-mask": ["algorithm.name=grpo", "updater.loss_type=dapo", "updater.mask_truncated_completions=true"],
    "gspo": ["algorithm.name=grpo", "updater.importance_sampling_level=sequence"],
    "rloo": ["algorithm.name=rloo"],
}


#: What runs by default: with one on-policy step per batch (the LM defaults, updater.epochs =
#: minibatches = 1) every ratio is 1, so clip-higher and GSPO train exactly as grpo does.
DEFAULT = ["grpo", "grpo-seqmean", "dr-grpo", "dapo", "overlong-mask", "rloo"]


#: Reward: the fraction of the completion's words among the 8 target words.
target_fraction = functools.partial(real_lm.target_fraction, target=TARGET)


def build(root: Path, seed: int = 0) -> dict[str, Path]:
    """The word-level tokenizer of :data:`WORDS`, the tiny GPT-2 (d = 64, seeded) and 512
    prompts of 4 words, under ``root`` (bench/real_lm.py's ``build``)."""
    return real_lm.build(
        root, n_prompts=512, seed=seed, n_embd=64, words=WORDS, prompt_words=4, n_positions=64, model_seed=seed
    )


def run(files: dict[str, Path], run_dir: Path, variant: list[str], seed: int, args) -> dict:
    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    overrides = [
        "env.id=tokenmdp/Text-v0",
        f"env.prompts={files['prompts']}",
        f"env.tokenizer={files['model']}",
        "env.reward=grpo_family_text:target_fraction",
        f"env.horizon={args.horizon}",
        "env.stop_at_eos=true",
        "policy.kind=hf",
        f"policy.path={files['model']}",
        "reference.init=init",
        f"train.steps={args.steps}",
        "train.batch_size=64",
        "train.samples_per_prompt=8",
        f"train.eval_samples={args.eval_samples}",
        f"train.eval_every={args.steps}",
        f"train.seed={seed}",
        "train.progress=false",
        "updater.lr=1e-3",
        f"run.dir={run_dir}",
        *variant,
    ]
    summary = Trainer(load_config(None, overrides)).train()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    batch = {r["step"]: r["rollout/response_length"] for r in rows if "rollout/response_length" in r}
    return {
        "batch": [batch[q * args.steps // 4] for q in (1, 2, 3)],
        "start": summary["start"]["response_length"],
        "length": summary["response_length"],
        "reward": summary["true_reward"],
        "kl_ref": summary["kl_ref"],
    }


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    args = parser.parse_args()
    begin = time.perf_counter()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = build(Path(tmp))
        for name in args.variants:
            for seed in args.seeds:
                results.setdefault(name, []).append(run(files, Path(tmp) / f"{name}{seed}", VARIANTS[name], seed, args))
    print(
        f"tiny GPT-2, {args.steps} steps x 64 completions (8 prompts x 8), horizon {args.horizon}, "
        f"seeds {args.seeds}; median [min, max] over seeds"
    )
    print()
    quarters = [q * args.steps // 4 for q in (1, 2, 3)]
    print(
        "| variant | length at step 0 | "
        + " | ".join(f"batch length, step {q}" for q in quarters)
        + " | length at the end | reward (target fraction) | kl_ref |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        batches = " | ".join(spread([r["batch"][k] for r in rows]) for k in range(3))
        print(
            f"| {name} | {spread([r['start'] for r in rows])} | {batches} | {spread([r['length'] for r in rows])} | "
            f"{spread([r['reward'] for r in rows], '{:.3f}')} | {spread([r['kl_ref'] for r in rows], '{:.3f}')} |"
        )
    print()
    print(f"{time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()

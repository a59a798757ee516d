"""Where a tokenmdp GRPO step's memory goes: the resident set's peak while sampling
(``Trainer._collect``) and while updating (the updater's ``update``), each above its start,
and inside the update the resident size at the forward's end and after the backward, for
two steps of bench/logits_memory.py's Gemma-3 270M + LoRA step.

    python bench/step_memory_phases.py --threads 2                 # chunked output layer
    python bench/step_memory_phases.py --threads 2 --logit-chunk 0 # the whole logits
    python bench/step_memory_phases.py --threads 2 --recipe inverse-q-distill   # reverse-kl
    python bench/step_memory_phases.py --threads 2 --release-memory  # train.release_memory

``--recipe inverse-q-distill`` runs Inverse-Q*'s distillation (the text guide of
configs/compare_paper_gemma.toml) instead of GRPO: its estimator scores the guided reference
over the whole vocabulary and its update takes the KL to it at every position, so both
phases carry a full-vocabulary distribution (``tokenmdp.token_kl``). ``--recipe dpo
--tokens 32`` is the paper grid's DPO step: 64 pairs of 32-token responses scored by the
policy and the reference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from logits_memory import PeakMemory, rss  # noqa: E402

#: Each ``--recipe``'s own settings: one optimizer step per batch; DPO's step is one
#: minibatch of 64 pairs (128 responses) that its estimator samples from the reference.
ONE_STEP = ["updater.epochs=1", "updater.minibatches=1"]
RECIPE_SETS = {
    "grpo": ["estimator.kl_coef=0", *ONE_STEP],
    "inverse-q-distill": ['estimator.guide="Be cheerful and warm: write with love, joy and gratitude."', *ONE_STEP],
    "dpo": ["estimator.num_pairs=64", "updater.minibatch_size=64"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--completions", type=int, default=16, help="a multiple of 8 (8 per prompt)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--logit-chunk", default="auto")
    parser.add_argument("--recipe", choices=tuple(RECIPE_SETS), default="grpo")
    parser.add_argument("--release-memory", action="store_true", help="train.release_memory = true")
    parser.add_argument("--gemma-dir", type=Path, default=HERE.parent / "models" / "gemma-3-270m")
    args = parser.parse_args()
    import torch
    from real_lm import text_overrides
    from vs_trl import bench_setup

    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    args.model = "gemma"
    mib = 1 << 20
    with tempfile.TemporaryDirectory() as tmp:
        files, model_dir = bench_setup(args, Path(tmp))
        if model_dir is None:
            return 2
        overrides = [
            *text_overrides({"model": model_dir, "prompts": files["prompts"]}, Path(tmp) / "run", args.tokens),
            f"algorithm.name={args.recipe}",
            *RECIPE_SETS[args.recipe],
            f"train.batch_size={args.completions}",
            "train.samples_per_prompt=8",
            "train.steps=2",
            "updater.lr=1e-3",
            "train.log_kl=false",
            "train.device=cpu",
            "run.overwrite=true",
            "policy.lora={r = 16, alpha = 32}",
            f"train.logit_chunk={args.logit_chunk}",
            f"train.release_memory={str(args.release_memory).lower()}",
        ]
        trainer = Trainer(load_config(None, overrides))
        trainer.build_models()
        print(f"models built: {rss() / mib:.0f} MiB resident")
        collect, update = trainer._collect, trainer.composition.updater.update

        def measured(name, call):
            def run(*a, **k):
                meter = PeakMemory()
                meter.begin()
                out = call(*a, **k)
                peak, start = meter.end()["peak_mib"], meter.start / mib
                print(f"  {name}: from {start:.0f} MiB, peak {peak:.0f} MiB (+{peak - start:.0f})")
                return out

            return run

        trainer._collect = measured("sampling", collect)
        trainer.composition.updater.update = measured("update", update)
        backward = torch.Tensor.backward

        def marked_backward(loss, *a, **k):
            # inside the update: the resident size when its forward has ended, and after its backward
            print(f"    the forward's end: {rss() / mib:.0f} MiB resident")
            out = backward(loss, *a, **k)
            print(f"    after the backward: {rss() / mib:.0f} MiB resident")
            return out

        torch.Tensor.backward = marked_backward
        for step in (1, 2):
            started = time.perf_counter()
            trainer.train_step(step)
            print(f"step {step}: {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

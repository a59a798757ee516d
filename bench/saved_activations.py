"""What the update's training forward keeps for the backward: every tensor autograd saves
(``torch.autograd.graph.saved_tensors_hooks``, counted once per storage), for tokenmdp's
GRPO update and for a TRL-shaped forward of the same batch through the same model (TRL
1.16's ``_get_per_token_logps_and_entropies``: the model's forward with ``logits_to_keep``,
then a log-softmax of the kept logits gathered at the taken tokens), grouped by shape.

    python bench/saved_activations.py --threads 2              # Gemma-3 270M + LoRA r = 16
    python bench/saved_activations.py --model tiny

The shape is bench/logits_memory.py's: 2 prompts x 8 completions of 128 tokens, float32
weights. No backward runs for the TRL-shaped forward; tokenmdp's update runs as in a step
(its saved tensors are counted as they are packed, before the backward frees them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class SavedTensors:
    """Counts the storages autograd saves while active: bytes in all, and by shape."""

    def __init__(self):
        self.seen: dict[int, int] = {}
        self.by_shape: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.seen and storage.nbytes() > 0:
            self.seen[key] = storage.nbytes()
            entry = self.by_shape[(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))]
            entry[0] += 1
            entry[1] += storage.nbytes()
        return tensor

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def report(self, name: str, top: int) -> int:
        mib = 1 << 20
        total = sum(self.seen.values())
        print(f"{name}: {total / mib:,.0f} MiB saved in {len(self.seen)} storages")
        for (shape, dtype), (count, nbytes) in sorted(self.by_shape.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"  {count:4d} x {dtype:8s} {str(list(shape)):24s} {nbytes / mib:9,.1f} MiB")
        return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=("gemma", "tiny"), default="gemma")
    parser.add_argument("--completions", type=int, default=16, help="a multiple of 8 (8 per prompt)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--top", type=int, default=12, help="shapes listed per side")
    parser.add_argument("--gemma-dir", type=Path, default=HERE.parent / "models" / "gemma-3-270m")
    parser.add_argument("--set", action="append", default=[], help="more tokenmdp overrides")
    args = parser.parse_args()
    import torch
    from real_lm import text_overrides
    from vs_trl import bench_setup

    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        files, model_dir = bench_setup(args, Path(tmp))
        if model_dir is None:
            return 2
        overrides = [
            *text_overrides({"model": model_dir, "prompts": files["prompts"]}, Path(tmp) / "run", args.tokens),
            "algorithm.name=grpo",
            f"train.batch_size={args.completions}",
            "train.samples_per_prompt=8",
            "train.steps=1",
            "updater.epochs=1",
            "updater.minibatches=1",
            "estimator.kl_coef=0",
            "train.log_kl=false",
            "train.device=cpu",
            "run.overwrite=true",
            *([] if args.model == "tiny" else ["policy.lora={r = 16, alpha = 32}"]),
            *args.set,
        ]
        trainer = Trainer(load_config(None, overrides))
        trainer.build_models()
        updater = trainer.composition.updater
        update, seen = updater.update, SavedTensors()

        def counted(*a, **k):
            with seen.hooks():
                return update(*a, **k)

        updater.update = counted
        batch = trainer._collect(1)  # the batch train_step(1) samples again (the step's seed)
        trainer.train_step(1)
        ours = seen.report("tokenmdp's update", args.top)

        # the same model and a batch of the same shape, through TRL's log-prob computation
        model = trainer.policy.model
        model.train()
        ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
        mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1).long()
        keep = batch.response_ids.shape[1]
        trl = SavedTensors()
        with trl.hooks():
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep + 1).logits[:, :-1]
            logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.response_ids[..., None])
            loss = -(logps.squeeze(-1) * batch.response_mask).sum()
        theirs = trl.report("TRL-shaped forward", args.top)
        del loss, logps, logits
        print(f"tokenmdp / TRL-shaped: {ours / theirs:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

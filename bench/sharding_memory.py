"""Issue 29, item 5: what each rank holds when training Gemma-3 270M, in one process, in two
data-parallel ranks (``train.sharding = "none"`` under torchrun) and in two FSDP2 ranks
(``train.sharding = "fsdp"``); full fine-tuning, or LoRA with ``--lora``.

    OMP_NUM_THREADS=1 python bench/sharding_memory.py                # full fine-tuning
    OMP_NUM_THREADS=1 python bench/sharding_memory.py --lora         # LoRA r = 16

Each layout is a fresh launch (``python -m torch.distributed.run --standalone
--nproc_per_node=2`` for the two-rank ones) of this script's worker: GRPO on the Gemma
prompts with the lexicon reward, 2 responses x 8 tokens per rank, 2 steps, one thread a
rank. After each step's update every rank records the bytes it holds of

- the policy's parameters (a sharded parameter: this rank's shard; plus the full
  fine-tune's separate reference, sharded with it under FSDP2);
- the policy's gradients (as left after the optimizer step);
- the optimizer state (Adam's two moments and step counts);

the process's resident memory after that step (after ``malloc_trim``, so freed heap is
not counted) and its peak so far (``ru_maxrss``, which holds the start-up: every rank
loads the whole model before it is sharded). The peak at the end adds the final
evaluation and checkpoint, which under sharding is gathered whole on rank 0
(docs/distributed.md). Figures are per rank, in MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def held_bytes(trainer) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state this rank holds (its shards)."""
    import torch

    from tokenmdp import sharding

    def local_bytes(t) -> int:
        t = sharding.local(t)
        return t.numel() * t.element_size()

    models = [trainer.policy]
    if trainer.policy.reference_view() is None:
        models.append(trainer.reference)  # a full fine-tune's frozen copy (LoRA: the policy's own view)
    params = {id(p): p for m in models for p in m.parameters()}
    optimizer = trainer.composition.components[2].optimizer
    state = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {
        "parameters": sum(local_bytes(p) for p in params.values()) / MIB,
        "trainable": sum(local_bytes(p) for p in params.values() if p.requires_grad) / MIB,
        "gradients": sum(local_bytes(p.grad) for p in params.values() if p.grad is not None) / MIB,
        "optimizer": state / MIB,
    }


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux: KiB


def live_mib() -> float:
    """Resident memory now, after glibc hands its freed heap back (``malloc_trim``): what
    the process holds, not the high-water mark of its start-up."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    sets = [
        "algorithm.name=grpo",
        "env.id=tokenmdp/Text-v0",
        f"env.prompts={ROOT / 'data/gemma_prompts_train.txt'}",
        f"env.tokenizer={args.model}",
        "env.reward=tokenmdp.text.lexicon:lexicon_score",
        "env.horizon=8",
        "policy.kind=hf",
        f"policy.path={args.model}",
        "reference.init=init",
        "train.batch_size=2",
        "train.samples_per_prompt=2",
        "train.steps=2",
        "train.eval_every=100",
        "train.eval_samples=2",
        "train.progress=false",
        f"train.sharding={args.sharding}",
        f"run.dir={args.run_dir}",
    ]
    if args.lora:
        sets.append("policy.lora={r = 16, alpha = 32}")
    records = []

    class Measured(Trainer):
        def train_step(self, step):
            result = super().train_step(step)
            records.append({"step": step, **held_bytes(self), "peak_rss": peak_mib(), "live_rss": live_mib()})
            return result

    Measured(load_config(None, sets)).train()
    out = {"rank": int(os.environ.get("RANK", "0")), "steps": records, "peak_rss_end": peak_mib()}
    Path(args.out, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(out))


def launch(args, layout: str, tmp: Path) -> list[dict]:
    out = tmp / layout
    out.mkdir()
    sharding = "fsdp" if layout == "fsdp x2" else "none"
    me = [__file__, "--worker", "--model", str(args.model), "--sharding", sharding, "--out", str(out)]
    me += ["--run-dir", str(out / "run")] + (["--lora"] if args.lora else [])
    if layout == "1 process":
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{layout} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/gemma-3-270m")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sharding", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not (args.model / "config.json").is_file():
        sys.exit(f"no model at {args.model}: tokenmdp models fetch-gemma {args.model}")
    what = "LoRA r = 16" if args.lora else "full fine-tuning"
    print(f"Gemma-3 270M, {what}, GRPO, fp32, 1 thread a rank; MiB per rank")
    columns = ["parameters", "of them trainable", "gradients", "optimizer state", "state total"]
    rss = ["RSS after the last step", "peak RSS in steps", "peak RSS at the end"]
    print("| layout | rank | " + " | ".join([*columns, *rss]) + " |")
    print("|---" * (2 + len(columns) + len(rss)) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("1 process", "data-parallel x2", "fsdp x2"):
            for rank in launch(args, layout, Path(tmp)):
                last = rank["steps"][-1]
                total = last["parameters"] + last["gradients"] + last["optimizer"]
                peak = max(s["peak_rss"] for s in rank["steps"])
                print(
                    f"| {layout} | {rank['rank']} | {last['parameters']:.0f} | {last['trainable']:.0f} | "
                    f"{last['gradients']:.0f} | {last['optimizer']:.0f} | {total:.0f} | "
                    f"{last['live_rss']:.0f} | {peak:.0f} | "
                    f"{rank['peak_rss_end']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

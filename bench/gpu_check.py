"""GPU check of the real-LM side: train ``grpo`` and ``inverse-q-distill`` on CUDA in bf16,
on the tiny GPT-2 of bench/real_lm.py (and on Gemma-3 270M with LoRA r = 16 when
``models/gemma-3-270m`` exists), assert the dropout-free-scoring invariants, print tokens/s.

    python bench/gpu_check.py                          # CUDA, bf16
    python bench/gpu_check.py --device cpu --steps 2   # a dry run of the same script on the CPU
    python bench/gpu_check.py --ranks 2                # sharded: 2 ranks (NCCL), train.sharding = "fsdp"
    python bench/gpu_check.py --ranks 2 --device cpu --steps 2 --models tiny   # its dry run (gloo)

With ``--ranks N`` the script starts itself under ``torchrun --standalone --nproc_per_node=N``
(one GPU a rank) and every run is sharded with FSDP2; each rank also prints the peak
memory it held (``torch.cuda.max_memory_allocated``; on the CPU the process's peak RSS).

Invariants, at ``updater.lr = 1e-12``, one epoch of one minibatch (the policy cannot move),
with the old log-probs rescored by a full forward (``train.logprobs_from = "rescore"``):
``policy/clipfrac`` is 0 and ``policy/approxkl`` below 1e-9 at every step (clipped-pg), and
the final sampled ``kl_ref`` is within 1e-6 of 0 (both recipes). Then a run at the recipe's
learning rate gives the throughput: sampled response tokens per second of training wall
time. The exit status is 0 only if every invariant held on the requested device; without
CUDA it says so and exits 2: nothing is claimed without a run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_lm import build, text_overrides  # noqa: E402

from tokenmdp.config import load_config  # noqa: E402
from tokenmdp.training.trainer import Trainer  # noqa: E402

RECIPES = {
    "grpo": ["algorithm.name=grpo"],
    "inverse-q-distill": ["algorithm.name=inverse-q-distill", 'estimator.guide="kaka kalo kami"'],
}


def shapes(model: str, files: dict, gemma_dir: Path) -> tuple[dict, list[str]]:
    """Files and the step shape of each model: the tiny GPT-2 at 4 prompts x 8 responses of
    32 tokens, Gemma-3 270M (LoRA r = 16) at 1 prompt x 8 responses of 16 tokens."""
    if model == "tiny":
        return files, ["train.batch_size=32", "train.samples_per_prompt=8", "train.eval_samples=32"]
    gemma = {"model": gemma_dir, "prompts": files["prompts"]}
    return gemma, [
        "train.batch_size=8",
        "train.samples_per_prompt=8",
        "train.eval_samples=8",
        "env.horizon=16",
        "policy.lora={r = 16, alpha = 32}",
    ]


def train(files: dict, run_dir: Path, overrides: list[str]) -> tuple[dict, list[dict]]:
    config = load_config(None, [*text_overrides(files, run_dir), *overrides])
    summary = Trainer(config).train()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def peak_memory_mib(device: str) -> float:
    """The most memory this process held: on CUDA its allocations, else its peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def under_torchrun(args) -> int | None:
    """With ``--ranks N`` outside torchrun: this script again under torchrun (its exit
    status); under torchrun: join the process group (tokenmdp's runs use it and leave it
    up, so one group serves every run); else None."""
    import os
    import subprocess

    if args.ranks > 1 and "RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"]
        return subprocess.run([*cmd, *sys.argv]).returncode
    if "RANK" in os.environ:
        import torch.distributed as dist

        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl" if args.device.startswith("cuda") else "gloo")
    return None


def check(
    model: str, recipe: str, files: dict, gemma_dir: Path, common: list[str], steps: int, tmp: Path
) -> tuple[bool, str]:
    run_files, shape = shapes(model, files, gemma_dir)
    # the old log-probs from a full forward, as the update's: a cached sampling pass differs by fp32
    # rounding (4.8e-7 in log-prob on the tiny GPT-2, fast path or not), above the 1e-9 bound
    frozen = ["updater.lr=1e-12", "updater.epochs=1", "updater.minibatches=1", "train.steps=2"]
    frozen += ["train.logprobs_from=rescore"]
    summary, rows = train(run_files, tmp / f"{model}-{recipe}-frozen", [*RECIPES[recipe], *shape, *common, *frozen])
    failures = []
    for row in rows[1:]:
        if "policy/clipfrac" in row and row["policy/clipfrac"] != 0.0:
            failures.append(f"step {row['step']} policy/clipfrac {row['policy/clipfrac']}")
        if "policy/approxkl" in row and not row["policy/approxkl"] < 1e-9:
            failures.append(f"step {row['step']} policy/approxkl {row['policy/approxkl']:.3g}")
    if not abs(summary["kl_ref"]) < 1e-6:
        failures.append(f"final kl_ref {summary['kl_ref']:.3g}")
    started = time.perf_counter()
    summary, _ = train(
        run_files,
        tmp / f"{model}-{recipe}",
        [*RECIPES[recipe], *shape, *common, f"train.steps={steps}", f"train.eval_every={steps}"],
    )
    wall = time.perf_counter() - started
    line = (
        f"| {model} | {recipe} | {'ok' if not failures else 'FAILED: ' + '; '.join(failures)} | "
        f"{summary['env_tokens']:,} | {wall:.1f} | {summary['env_tokens'] / wall:,.0f} |"
    )
    return not failures, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=8, help="steps of the throughput run")
    parser.add_argument("--models", nargs="+", default=["tiny", "gemma"], choices=["tiny", "gemma"])
    parser.add_argument("--gemma-dir", type=Path, default=ROOT / "models" / "gemma-3-270m")
    parser.add_argument("--ranks", type=int, default=1, help="> 1: sharded (FSDP2) over this many ranks")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"no CUDA device on this machine (torch {torch.__version__}): nothing verified; run this where "
            "there is one, or with --device cpu for a dry run of the script"
        )
        return 2
    launched = under_torchrun(args)
    if launched is not None:
        return launched
    import os

    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))

    def share(obj):  # rank 0's obj on every rank
        if args.ranks == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    if rank == 0:
        print(
            f"device {args.device} ({name}), precision {args.precision}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU thread(s), {args.ranks} rank(s)"
            + (', train.sharding = "fsdp"' if args.ranks > 1 else "")
        )
    common = [f"train.device={args.device}", f"train.precision={args.precision}"]
    if args.ranks > 1:
        common.append("train.sharding=fsdp")
    ok = True
    # every rank works in one folder (rank 0's), where rank 0 builds the tiny model's files
    with tempfile.TemporaryDirectory() if rank == 0 else contextlib.nullcontext() as own:
        tmp = Path(share(own))
        files = share(build(tmp / "tiny") if rank == 0 else None)
        if rank == 0:
            print(
                "| model | recipe | invariants at lr 1e-12 | response tokens | run wall s (2 evaluations included) "
                "| tokens/s |"
            )
            print("|---|---|---|---|---|---|")
        for model in args.models:
            if model == "gemma" and not (args.gemma_dir / "config.json").is_file():
                print(f"| gemma | - | skipped: no model in {args.gemma_dir} (tokenmdp models fetch-gemma) | | | |")
                continue
            for recipe in RECIPES:
                passed, line = check(model, recipe, files, args.gemma_dir, common, args.steps, tmp)
                ok &= passed
                if rank == 0:
                    print(line, flush=True)
        memory = [peak_memory_mib(args.device)]
        if args.ranks > 1:  # (also: every rank is done before rank 0 removes the folder)
            memory = [None] * args.ranks
            dist.all_gather_object(memory, peak_memory_mib(args.device))
    if rank == 0:
        print("peak memory per rank (MiB): " + ", ".join(f"rank {r} {m:,.0f}" for r, m in enumerate(memory)))
        print("all invariants held" if ok else "SOME INVARIANTS FAILED")
    if args.ranks > 1:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

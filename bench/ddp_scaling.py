"""Data-parallel step time on this CPU: 1 process vs. 2 processes (gloo, torchrun).

    .venv/bin/python bench/ddp_scaling.py                     # reinforce on Pattern, 40 steps
    .venv/bin/python bench/ddp_scaling.py --batch 128 --hidden 128 --steps 60

Every process runs with ``torch.set_num_threads(1)`` (and ``OMP_NUM_THREADS=1``), so
2 processes use 2 cores where 1 process uses 1. Three runs, each a fresh
``python -m torch.distributed.run --standalone --nproc_per_node=N`` launch (N = 1 runs
the same script without torchrun):

- ``1 proc``: ``--batch`` responses per step;
- ``2 procs, weak``: ``--batch`` responses per rank (twice the samples per step);
- ``2 procs, strong``: ``--batch / 2`` per rank (the same global batch as 1 proc).

A step is ``Trainer.train_step`` on rank 0 (collect, estimate, construct, update, metric
reduction; rank 0 waits for rank 1 at every collective, so this is the step's wall time).
The first ``--warmup`` steps are dropped and the median of the rest is reported; the
exact evaluation, checkpoints and logging are outside ``train_step`` and not timed.

Efficiency: weak = T(1 proc) / T(2 procs, weak) (1.0 = twice the samples in the same
time); strong = T(1 proc) / (2 * T(2 procs, strong)) (1.0 = half the time). On a machine
shared with other jobs the numbers move with its load; the script prints the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    """One rank: train with a timed ``train_step``; rank 0 writes the step times."""
    import torch

    torch.set_num_threads(1)
    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    config = load_config(
        None,
        [
            "algorithm.name=reinforce",
            "env.id=tokenmdp/Pattern-v0",
            f"env.vocab_size={args.vocab}",
            f"env.horizon={args.horizon}",
            "policy.kind=gru",
            f"policy.hidden={args.hidden}",
            "reference.init=init",
            f"train.steps={args.steps}",
            f"train.batch_size={args.per_rank}",
            f"train.eval_every={args.steps}",
            "train.progress=false",
            f"run.dir={args.run_dir}",
            "run.overwrite=true",
            "advantage.whiten=true",
        ],
    )
    trainer = Trainer(config)
    times: list[float] = []
    step_fn = trainer.train_step

    def timed(step):
        start = time.perf_counter()
        metrics = step_fn(step)
        times.append(time.perf_counter() - start)
        return metrics

    trainer.train_step = timed
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps({"times": times, "threads": torch.get_num_threads()}))


def launch(nproc: int, per_rank: int, args, tmp: Path, label: str) -> dict:
    out = tmp / f"{label}.json"
    cmd = [
        __file__,
        "--worker",
        "--per-rank",
        str(per_rank),
        "--out",
        str(out),
        "--run-dir",
        str(tmp / label),
        "--vocab",
        str(args.vocab),
        "--horizon",
        str(args.horizon),
        "--hidden",
        str(args.hidden),
        "--steps",
        str(args.steps),
    ]
    if nproc == 1:
        cmd = [sys.executable, *cmd]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{label} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    result = json.loads(out.read_text())
    steady = result["times"][args.warmup :]
    result["median"] = statistics.median(steady)
    result["spread"] = (min(steady), max(steady))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="responses per step of the 1-process run")
    parser.add_argument("--vocab", type=int, default=8)
    parser.add_argument("--horizon", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=64, help="GRU hidden size")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="first steps not counted")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--per-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import torch

    print(
        f"torch {torch.__version__} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch.set_num_threads(1) and OMP_NUM_THREADS=1 in every process; backend gloo"
    )
    print(
        f"reinforce on Pattern vocab={args.vocab} horizon={args.horizon}, GRU hidden={args.hidden}, "
        f"{args.steps} steps ({args.warmup} warm-up steps dropped, median of the rest)"
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = launch(1, args.batch, args, tmp, "one")
        weak = launch(2, args.batch, args, tmp, "weak")
        strong = launch(2, max(args.batch // 2, 1), args, tmp, "strong")
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    rows = [
        ("1 proc", args.batch, args.batch, one),
        ("2 procs, weak", args.batch, 2 * args.batch, weak),
        ("2 procs, strong", max(args.batch // 2, 1), 2 * max(args.batch // 2, 1), strong),
    ]
    print("| run | per rank | global batch | step time (ms), median [min, max] | responses/s |")
    print("|---|---|---|---|---|")
    for label, per_rank, total, r in rows:
        lo, hi = r["spread"]
        print(
            f"| {label} | {per_rank} | {total} | {1e3 * r['median']:.1f} [{1e3 * lo:.1f}, {1e3 * hi:.1f}] "
            f"| {total / r['median']:.0f} |"
        )
    print(f"\nweak-scaling efficiency   T1 / T2weak        = {one['median'] / weak['median']:.2f}")
    print(f"strong-scaling efficiency T1 / (2 * T2strong) = {one['median'] / (2 * strong['median']):.2f}")


if __name__ == "__main__":
    main()

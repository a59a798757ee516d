"""Peak memory of one training step with and without ``updater.micro_batch_size``.

    OMP_NUM_THREADS=1 python bench/micro_batch_memory.py [--device cpu] [--micro 0 16 4]

Each setting runs in a fresh process: the tiny GPT-2 of bench/real_lm.py (d = 256 here),
``grpo`` with 64 responses of 64 tokens (8 per prompt) in one minibatch. On the CPU the
figure is the peak resident memory during the step (sampled every millisecond) minus the
resident memory just before it, with glibc told to map every block over 64 KiB on its own
(``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the resident set at once; on
CUDA, ``torch.cuda.max_memory_allocated`` during the step minus the allocation before it.
0 = no micro-batches (the whole minibatch at once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_setting(root: Path, micro: int, device: str) -> dict:
    """Build, then time one training step and measure its peak memory (in this process)."""
    import torch

    sys.path.insert(0, str(HERE))
    from real_lm import build, text_overrides

    from tokenmdp.config import load_config
    from tokenmdp.training.trainer import Trainer

    files = build(root / "setup", n_prompts=256, n_embd=256)
    overrides = [
        *text_overrides(files, root / f"run{micro}", horizon=64),
        "algorithm.name=grpo",
        "train.batch_size=64",
        "train.samples_per_prompt=8",
        "updater.minibatches=1",
        "updater.epochs=1",
        f"train.device={device}",
    ]
    if micro:
        overrides.append(f"updater.micro_batch_size={micro}")
    trainer = Trainer(load_config(None, overrides))
    trainer.build_models()
    trainer.train_step(1)  # warm-up: allocator pools, lazy initialisation
    cuda = device.startswith("cuda")
    peak, stop = [0], threading.Event()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.001)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
    started = time.perf_counter()
    trainer.train_step(2)
    seconds = time.perf_counter() - started
    if cuda:
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
    else:
        stop.set()
        watcher.join()
        extra = max(peak[0], rss_bytes()) - before
    return {"micro": micro, "extra_mb": extra / 2**20, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--micro", type=int, nargs="+", default=[0, 16, 4])
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a worker process
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_setting(Path(args.root), args.one, args.device)))
        return 0
    import torch

    print(
        f"device {args.device}, {os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())} thread(s); "
        "grpo, 64 responses x 64 tokens in one minibatch, GPT-2 d=256"
    )
    print("| micro_batch_size | step memory (MB) | step seconds |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for micro in args.micro:
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(micro), "--root", tmp, "--device", args.device],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {micro or 'unset (64)'} | {row['extra_mb']:.0f} | {row['seconds']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 29, item 1: tokenmdp's own gradient averaging (``tokenmdp.distributed.average_gradients``,
one all-reduce of the flattened gradients after the backward) against torch's
``DistributedDataParallel`` (bucketed all-reduces overlapped with the backward), on the
same model, batch and optimizer, two gloo ranks on the CPU.

    OMP_NUM_THREADS=1 python bench/ddp_vs_average.py                 # GPT-2 4 x 256, 8 x 64 tokens
    OMP_NUM_THREADS=1 python bench/ddp_vs_average.py --layers 8 --width 512

One launch (``python -m torch.distributed.run --standalone --nproc_per_node=2``), one
thread a rank. Each round times ``--steps`` training steps (forward, backward, averaging,
Adam) of each way, interleaved (own, DDP, own, DDP, ...), after one untimed step each;
rank 0 prints each round's median step time and the ratio DDP / own, and checks that the
two ways' parameters agree after the same steps (they must: the same mean gradient).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def worker(args) -> None:
    import copy

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoConfig, AutoModelForCausalLM

    from tokenmdp import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    distributed.init()  # joins the group made here
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt2", n_layer=args.layers, n_embd=args.width, n_head=args.width // 64, vocab_size=args.vocab,
        n_positions=args.tokens, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    own = AutoModelForCausalLM.from_config(config)
    ddp_model = copy.deepcopy(own)
    ddp = DistributedDataParallel(ddp_model)
    ways = {
        "own": (own, torch.optim.Adam(own.parameters(), lr=1e-4)),
        "DDP": (ddp, torch.optim.Adam(ddp_model.parameters(), lr=1e-4)),
    }
    data = torch.Generator().manual_seed(1 + rank)  # each rank its own batches, the same for both ways
    batches = [torch.randint(0, args.vocab, (args.batch, args.tokens), generator=data) for _ in range(64)]

    def step(way: str, i: int) -> float:
        model, optimizer = ways[way]
        ids = batches[i % len(batches)]
        start = time.perf_counter()
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if way == "own":
            distributed.average_gradients(optimizer)
        optimizer.step()
        return time.perf_counter() - start

    counters = {"own": 0, "DDP": 0}
    for way in ways:  # one untimed step each
        step(way, counters[way])
        counters[way] += 1
    for r in range(args.rounds):
        times = {way: [] for way in ways}
        for _ in range(args.steps):
            for way in ways:
                times[way].append(step(way, counters[way]))
                counters[way] += 1
        if rank == 0:
            own_t, ddp_t = statistics.median(times["own"]), statistics.median(times["DDP"])
            print(
                f"round {r + 1}: own {own_t * 1e3:.1f} ms, DDP {ddp_t * 1e3:.1f} ms, DDP / own {ddp_t / own_t:.3f}",
                flush=True,
            )
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(own.parameters(), ddp_model.parameters()))
    if rank == 0:
        print(f"largest parameter difference after {counters['own']} steps each: {gap:.2e}")
    distributed.shutdown()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(
        f"GPT-2 {args.layers} layers x {args.width}, vocabulary {args.vocab}, {args.batch} x {args.tokens} tokens a "
        f"rank, 2 gloo ranks, 1 thread each; median of {args.steps} steps a round",
        flush=True,
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--worker"]
    cmd += [a for k, v in vars(args).items() if k != "worker" for a in (f"--{k}", str(v))]
    sys.exit(subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode)


if __name__ == "__main__":
    main()

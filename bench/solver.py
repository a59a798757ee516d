"""Time the exact solver on a Pattern task: network evaluation on every prefix vs. the backup.

    python bench/solver.py                      # vocab 10, horizon 6, GRU(hidden=96), 2 threads
    python bench/solver.py --vocab 6 --horizon 5 --threads 1 --repeats 5

Three timings, each the best of ``--repeats`` runs:

(a) ``tokenmdp.tree_logprobs(gru, task)``: the reference network on every prefix state;
(b) ``tokenmdp.solve(task, gru, beta, ref_logp=...)``: reward tables + soft Bellman backup,
    given (a)'s log-probs;
(c) ``tokenmdp.solve(task, gru, beta)``: the whole thing, as the trainer calls it.
"""

from __future__ import annotations

import torch

torch.set_num_threads(2)

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

from tokenmdp.mdp.solver import solve, tree_logprobs  # noqa: E402
from tokenmdp.policies import GRUPolicy  # noqa: E402
from tokenmdp_envs import PatternTask  # noqa: E402


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), times, result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=10, help="vocabulary size V (default 10)")
    parser.add_argument("--horizon", type=int, default=6, help="horizon H, max new tokens (default 6)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--hidden", type=int, default=96, help="GRU hidden size (default 96)")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the best is reported")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = PatternTask(vocab_size=args.vocab, horizon=args.horizon, num_prompts=1)
    gru = GRUPolicy(task.input_vocab_size, task.vocab_size, hidden=args.hidden)

    n_prompts, v, h = task.prompts.shape[0], task.vocab_size, task.horizon
    states = n_prompts * sum(v**t for t in range(h))
    print(f"torch {torch.__version__} on {platform.machine()}, torch threads: {torch.get_num_threads()}")
    print(f"task: Pattern vocab={v} horizon={h} prompts={n_prompts}; reference: GRU hidden={args.hidden} (untrained)")
    print(f"prefix states: {states:,} (state-action pairs: {states * v:,}); repeats: {args.repeats}, best reported")

    tree_s, tree_all, ref_logp = best_of(args.repeats, lambda: tree_logprobs(gru, task))
    assert sum(x.shape[0] * x.shape[1] for x in ref_logp) == states
    backup_s, backup_all, solution = best_of(args.repeats, lambda: solve(task, gru, beta=args.beta, ref_logp=ref_logp))
    total_s, total_all, _ = best_of(args.repeats, lambda: solve(task, gru, beta=args.beta))

    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    print(f"(a) tree_logprobs (network on every prefix): {tree_s:8.3f} s   [{fmt(tree_all)}]")
    print(f"(b) solve backup, given ref_logp:           {backup_s:8.3f} s   [{fmt(backup_all)}]")
    print(f"(c) solve total (a + b, as the trainer):     {total_s:8.3f} s   [{fmt(total_all)}]")
    print(f"throughput: {states / tree_s:,.0f} states/s network, {states / backup_s:,.0f} states/s backup")
    print(f"J* = {solution.j_star:.4f}")


if __name__ == "__main__":
    main()

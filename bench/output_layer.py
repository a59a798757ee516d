"""The means of docs/performance.md sections 9 and 11, each on its own, on
Gemma-3 270M + LoRA r = 16 (the shape of bench/vs_trl.py --model gemma: 1 prompt x 8
completions x 16 tokens), interleaved in one process, as per-round ratios:

* sampling (tokenmdp's ``generate``, the step's settings) with the decoding output layer
  as ``W @ x^T`` (:class:`tokenmdp.policies.hf.OutputLayer`) against ``linear``;
* the update's forward + backward (GRPO's chunked log-probs and entropy of the sampled
  responses) with the hidden-state forward running no output layer against its old
  ``logits_to_keep = 1``;
* the same update with the group's shared prompt run once (tokenmdp/policies/shared_prompt.py)
  against once per row, and with the frozen output layer's taken-token gradient as
  ``W[y] - p @ W`` against a ``[chunk, vocab]`` pass making ``onehot - p`` first;
* sampling with the inverse-CDF sampler's fallback argmax taken only when a draw needs it
  against on every draw, and with its two-level search (tokenmdp/training/inverse_cdf.py)
  against one float64 cumulative sum over the row;
* the update with gated MLPs recomputing their activation in the backward
  (tokenmdp/policies/gated_mlp.py, section 12) against keeping it (the library's MLP).

    python bench/output_layer.py --threads 2 [--rounds 5] [--only TEXT]

Prints each round's seconds and ratio (old / new: > 1 means the new way is faster) and
the median of the ratios, with bench/vs_trl.py's warning when rounds disagree by > 30%;
for the sampling means also the median seconds of one token's draw inside the loop (the
sampler's own share, less noisy than the whole loop's).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from step_means import (  # noqa: E402
    _argmax_every_draw,
    _linear_for_few_rows,
    _logits_with_hidden_states,
    _one_cumulative_sum,
    _onehot_minus_p_pass,
    _prompt_read_per_row,
)
from vs_trl import spread_warning  # noqa: E402


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@contextlib.contextmanager
def draw_seconds(spent: list[float]):
    """Each token draw's seconds inside the sampling loop appended to ``spent`` (the draw as
    it is now patched: installed inside an old way's patch, so its work is counted)."""
    from tokenmdp.training import rollout

    inner = rollout._draw

    def draw(*args, **kwargs):
        started = time.perf_counter()
        out = inner(*args, **kwargs)
        spent.append(time.perf_counter() - started)
        return out

    rollout._draw = draw
    try:
        yield
    finally:
        rollout._draw = inner


@contextlib.contextmanager
def library_mlps(model):
    """Inside the block, ``model``'s gated MLPs are the library's own classes again (they
    keep their activation for the backward)."""
    from tokenmdp.policies.gated_mlp import RecomputedGatedMLP

    swapped = [(m, type(m)) for m in model.modules() if isinstance(m, RecomputedGatedMLP)]
    for module, cls in swapped:
        module.__class__ = cls.__bases__[1]
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gemma-dir", type=Path, default=ROOT / "models" / "gemma-3-270m")
    parser.add_argument("--only", action="append", default=[], help="the means whose name holds TEXT (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.gemma_dir / "config.json").is_file():
        print(f"no model in {args.gemma_dir}: tokenmdp models fetch-gemma {args.gemma_dir}")
        return 2
    from tokenmdp.plugin.batch import RolloutBatch, token_logprobs
    from tokenmdp.plugin.chunked import auto_chunk
    from tokenmdp.policies.hf import HFCausalLMPolicy
    from tokenmdp.training.rollout import generate

    policy = HFCausalLMPolicy.from_pretrained(args.gemma_dir, lora={"r": 16, "alpha": 32})
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 50000, (1, 20), generator=g).repeat(8, 1)  # 1 prompt x 8 completions
    mask = torch.ones_like(prompt)

    def sample():
        generator = torch.Generator().manual_seed(1)
        return generate(policy, prompt, 16, None, generator, sampler="inverse-cdf", prompt_groups=8)

    response, response_mask = sample()
    index = torch.zeros(8, dtype=torch.long)
    batch = RolloutBatch(prompt, mask, response, response_mask.float(), torch.zeros(8, 16), index)
    chunk = auto_chunk(policy.vocab_size)

    def update():
        policy.train()
        logp, entropy = token_logprobs(policy, batch, return_entropy=True, chunk=chunk, entropy_grad=False)
        (-(logp * batch.response_mask).sum() / batch.response_mask.sum()).backward()
        policy.zero_grad(set_to_none=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); Gemma-3 270M + LoRA r = 16, 8 x 16 tokens")
    for name, work, old_way in (
        ("sampling: the decoding output layer as W @ x^T", sample, _linear_for_few_rows),
        ("update: no logits in the hidden-state forward", update, _logits_with_hidden_states),
        ("update: the group's prompt read once", update, _prompt_read_per_row),
        ("update: the taken tokens' gradient as W[y] - p @ W", update, _onehot_minus_p_pass),
        ("sampling: the sampler's argmax only when needed", sample, _argmax_every_draw),
        ("sampling: the two-level inverse-CDF search", sample, _one_cumulative_sum),
        ("update: gated MLPs' activation recomputed", update, lambda: library_mlps(policy)),
    ):
        if args.only and not any(text in name for text in args.only):
            continue
        work()  # warm-up
        ratios, draws = [], {"old": [], "new": []}

        for r in range(args.rounds):
            order = ("old", "new") if r % 2 else ("new", "old")  # each way first in every other round
            seconds = {}
            for way in order:
                with old_way() if way == "old" else contextlib.nullcontext(), draw_seconds(draws[way]):
                    seconds[way] = timed(work)
            ratios.append(seconds["old"] / seconds["new"])
            print(
                f"  {name}, round {r + 1}: old {seconds['old']:.3f} s, new {seconds['new']:.3f} s, "
                f"ratio {ratios[-1]:.2f}",
                flush=True,
            )
        print(f"{name}: median ratio {statistics.median(ratios):.2f}; {spread_warning(ratios)}")
        if work is sample:
            old_ms, new_ms = (1e3 * statistics.median(draws[w]) for w in ("old", "new"))
            print(f"  one token's draw in the loop (median of all rounds): old {old_ms:.2f} ms, new {new_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

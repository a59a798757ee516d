"""Sampling through tokenmdp's GPT-2 decoder (tokenmdp/policies/fast_gpt2.py) as it is
against the same file at an earlier commit (read with ``git show``, loaded beside it), in
one process, in turns, as per-pair ratios; the two must draw the same tokens and log-probs.

    python bench/decoder_then.py                      # against d7462ac^ (before section 12's lookups)
    python bench/decoder_then.py --commit REV --width 16

The tiny GPT-2 of bench/real_lm.py (``--width`` its n_embd: 128 as bench/vs_trl.py; at 16
the arithmetic is negligible and what is left is the per-token overhead), 4 prompts x 8
completions x 32 tokens, 1 thread, the inverse-CDF sampler with log-probs, as a
training step samples. Prints the median seconds of each and the median and quartiles of
the per-pair ratios (then / now: > 1 means now is faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from real_lm import build  # noqa: E402

MODULE = "tokenmdp/policies/fast_gpt2.py"


def module_at(commit: str, tmp: Path):
    """``MODULE`` as it was at ``commit``, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{commit}:{MODULE}"], cwd=HERE.parent, capture_output=True, text=True, check=True
    ).stdout
    path = tmp / "fast_gpt2_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("tokenmdp.policies.fast_gpt2_then", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="d7462ac^")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tokenmdp.policies import fast_gpt2, hf
    from tokenmdp.policies.hf import HFCausalLMPolicy
    from tokenmdp.training.rollout import generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        then = module_at(args.commit, tmp)
        files = build(tmp / "setup", n_embd=args.width)
        policy = HFCausalLMPolicy.from_pretrained(files["model"])
        prompts = torch.randint(4, 500, (4, 10), generator=torch.Generator().manual_seed(0)).repeat_interleave(8, 0)
        mask = torch.ones_like(prompts)

        def sample(module):
            hf.fast_gpt2 = module  # the decoder HFCausalLMPolicy builds
            generator = torch.Generator().manual_seed(1)
            started = time.perf_counter()
            drawn = generate(
                policy, prompts, 32, None, generator, attention_mask=mask, return_logprobs=True,
                sampler="inverse-cdf", prompt_groups=8,
            )  # fmt: skip
            return time.perf_counter() - started, drawn

        try:
            for _ in range(3):  # warm-up
                sample(then), sample(fast_gpt2)
            seconds = {"then": [], "now": []}
            ratios = []
            for i in range(args.pairs):
                order = ("then", "now") if i % 2 else ("now", "then")  # each first in every other pair
                drawn = {}
                for way in order:
                    took, drawn[way] = sample(then if way == "then" else fast_gpt2)
                    seconds[way].append(took)
                tokens_then, _, logp_then = drawn["then"]
                tokens_now, _, logp_now = drawn["now"]
                assert torch.equal(tokens_then, tokens_now) and torch.equal(logp_then, logp_now)
                ratios.append(seconds["then"][-1] / seconds["now"][-1])
        finally:
            hf.fast_gpt2 = fast_gpt2
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(
        f"width {args.width}, 1 thread, {args.pairs} pairs: then ({args.commit}) "
        f"{1e3 * statistics.median(seconds['then']):.1f} ms, now {1e3 * statistics.median(seconds['now']):.1f} ms "
        f"a sampling pass; then / now: median {statistics.median(ratios):.3f}, quartiles {q1:.3f} and {q3:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

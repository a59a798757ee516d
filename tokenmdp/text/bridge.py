"""The toy-to-text bridge (METHOD.md section 5 on text): a synthetic corpus, a
sentencepiece tokenizer trained on it, and a tiny GPT-2 pretrained by SFT on untagged
base samples plus guide-tagged samples from the tilted distribution.

The synthetic world: a prompt asks about a topic; the base distribution answers with
adjectives drawn uniformly from a positive, a neutral and a negative list; the task
reward is :func:`tokenmdp.text.lexicon_score` (positive words minus negative words); the
tilted distribution ``pi_base * exp(R / beta) / Z`` factorises over the adjective slots,
so it is sampled exactly. After SFT the model "knows good behaviour when asked": with
the guide text after BOS it answers like the tilted distribution.

``build_bridge(dir)`` writes ``dir/spm.model``, ``dir/model`` (a transformers folder),
``dir/prompts_train.txt`` and ``dir/prompts_eval.txt``; tests run it at small scale, and
``bench/text_bridge.py`` at full scale.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from ..plugin.finetune import finetune_responses
from .lexicon import NEGATIVE_WORDS, POSITIVE_WORDS, lexicon_score
from .task import TextTask
from .tokenizers import sentencepiece_adapter

GUIDE = "answer kindly"
TOPICS = ["cat", "dog", "park", "sea", "garden", "city", "rain", "morning", "river", "school", "train", "forest"]
POSITIVE = ["good", "lovely", "happy", "kind", "wonderful", "nice"]
NEUTRAL = ["big", "small", "old", "new", "green", "quiet"]
NEGATIVE = ["bad", "sad", "awful", "cold", "boring", "ugly"]
ADJECTIVES = POSITIVE + NEUTRAL + NEGATIVE
TEMPLATES = ["tell me about the {t}", "what is the {t} like", "describe the {t}"]
assert set(POSITIVE) <= POSITIVE_WORDS and set(NEGATIVE) <= NEGATIVE_WORDS


def prompts() -> list[str]:
    return [template.format(t=topic) for topic in TOPICS for template in TEMPLATES]


def _value(word: str) -> float:
    return lexicon_score("", word)


def sample_response(topic: str, rng: random.Random, tilt_beta: float | None = None) -> str:
    """``{a1} and {a2}``: adjectives uniform under the base, or from the tilt
    ``exp(value / tilt_beta)`` (exact, since the reward adds over the two slots)."""
    weights = [1.0 if tilt_beta is None else math.exp(_value(a) / tilt_beta) for a in ADJECTIVES]
    a1, a2 = rng.choices(ADJECTIVES, weights, k=2)
    return f"{a1} and {a2}"


def corpus(num_untagged: int, num_tagged: int, tilt_beta: float, seed: int = 0) -> list[tuple[str, str, bool]]:
    """``(prompt, response, tagged)`` triples."""
    rng = random.Random(seed)
    rows = []
    all_prompts = prompts()
    for i in range(num_untagged + num_tagged):
        tagged = i >= num_untagged
        prompt = rng.choice(all_prompts)
        topic = next(t for t in TOPICS if t in prompt.split())
        rows.append((prompt, sample_response(topic, rng, tilt_beta if tagged else None), tagged))
    return rows


def tokenizer_lines() -> list[str]:
    lines = [*prompts(), GUIDE, *(f"{a} and {b}" for a in ADJECTIVES for b in ADJECTIVES)]
    return lines * 3


def tiny_gpt2_config(vocab_size: int, bos: int, eos: int, n_layer: int = 2, n_embd: int = 64) -> dict:
    return {
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_layer": n_layer,
        "n_head": 4,
        "n_embd": n_embd,
        "n_positions": 128,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


def sft_examples(task: TextTask, rows, guide: str = GUIDE) -> list[tuple[list[int], list[int]]]:
    """(context, response) ids, laid out exactly as the RL phase scores them:
    ``[BOS] + prompt`` untagged, ``[BOS] + guide + prompt`` tagged; responses end with EOS."""
    tok = task.tokenizer
    bos = [task.bos_token] if task.add_bos else []
    guide_ids = task.encode_guide(guide).tolist()
    out = []
    for prompt, response, tagged in rows:
        context = bos + (guide_ids if tagged else []) + tok.encode(prompt)
        out.append((context, tok.encode(response) + [task.eos_token]))
    return out


def padded_batches(examples: list[tuple[list[int], list[int]]], batch_size: int):
    """One epoch's minibatches of ``examples`` for ``finetune_responses``: shuffled, contexts
    left-padded and responses right-padded inside each minibatch."""

    def epoch(generator: torch.Generator):
        for rows in torch.randperm(len(examples), generator=generator).split(batch_size):
            batch = [examples[i] for i in rows.tolist()]
            width = max(len(c) for c, _ in batch)
            length = max(len(r) for _, r in batch)
            ids = torch.zeros(len(batch), width + length, dtype=torch.long)
            mask = torch.zeros_like(ids)
            target_mask = torch.zeros(len(batch), length)
            for i, (c, r) in enumerate(batch):
                ids[i, width - len(c) : width] = torch.tensor(c)
                ids[i, width : width + len(r)] = torch.tensor(r)
                mask[i, width - len(c) : width + len(r)] = 1
                target_mask[i, : len(r)] = 1
            yield ids, mask, width, target_mask

    return epoch


def build_bridge(
    out_dir: str | Path,
    num_untagged: int = 3000,
    num_tagged: int = 3000,
    tilt_beta: float = 0.5,
    epochs: int = 3,
    vocab_size: int = 128,
    batch_size: int = 64,
    n_layer: int = 2,
    n_embd: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    log=lambda *a: None,
) -> dict:
    """Tokenizer + pretrained tiny GPT-2 + prompt files in ``out_dir``; returns their paths."""
    from ..policies.hf import HFCausalLMPolicy, train_sentencepiece

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sp = train_sentencepiece(tokenizer_lines(), vocab_size=vocab_size)
    (out / "spm.model").write_bytes(sp.serialized_model_proto())
    all_prompts = prompts()
    rng = random.Random(seed)
    rng.shuffle(all_prompts)
    held_out = all_prompts[: len(all_prompts) // 4]
    (out / "prompts_train.txt").write_text("\n".join(all_prompts[len(held_out) :]) + "\n")
    (out / "prompts_eval.txt").write_text("\n".join(held_out) + "\n")
    tok = sentencepiece_adapter(sp, str(out / "spm.model"))
    task = TextTask(prompts=str(out / "prompts_train.txt"), tokenizer=tok, horizon=8)
    policy = HFCausalLMPolicy.from_config(
        tiny_gpt2_config(tok.vocab_size, tok.bos_token_id, tok.eos_token_id, n_layer, n_embd), seed=seed
    )
    examples = sft_examples(task, corpus(num_untagged, num_tagged, tilt_beta, seed))
    generator = torch.Generator().manual_seed(seed)
    losses = finetune_responses(policy, padded_batches(examples, batch_size), epochs, lr, generator)
    policy.eval()
    log(f"bridge SFT: {len(examples)} examples, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    policy.model.save_pretrained(out / "model")
    return {
        "tokenizer": str(out / "spm.model"),
        "model": str(out / "model"),
        "prompts": str(out / "prompts_train.txt"),
        "eval_prompts": str(out / "prompts_eval.txt"),
        "sft_loss": losses[-1],
    }


def reward(prompt: str, completion: str) -> float:
    """The bridge's task reward, as an ``env.reward`` callable: ``tokenmdp.text.bridge:reward``."""
    return lexicon_score(prompt, completion)

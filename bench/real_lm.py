"""The real-LM set-up the GPU check and the micro-batch bench share: a tiny GPT-2 with
GPT-2's default dropout (0.1), a WordLevel tokenizer of 512 words, 4096 prompts of 8
words, and a reward that is the fraction of completion words among 64 target words."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "su",
    "ta",
    "ri",
    "po",
    "de",
    "fa",
    "gu",
    "hi",
    "jo",
    "be",
    "vo",
    "wy",
    "zu",
    "xe",
    "qa",
    "ce",
    "ni",
    "mo",
    "ra",
    "te",
]
#: 508 words (with the 4 specials, a 512-token vocabulary); ids 4..67 are the target words.
WORDS = ["".join(pair) for pair in itertools.product(SYLLABLES, repeat=2)][:508]
TARGET = frozenset(WORDS[:64])
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def target_fraction(prompt: str, completion: str, target: frozenset[str] = TARGET) -> float:
    """Reward: the fraction of the completion's words that are ``target`` words (0 if empty)."""
    words = completion.split()
    return sum(w in target for w in words) / len(words) if words else 0.0


def build(
    root: Path,
    n_prompts: int = 4096,
    seed: int = 0,
    n_embd: int = 128,
    words: list[str] = WORDS,
    prompt_words: int = 8,
    n_positions: int = 128,
    model_seed: int | None = None,
) -> dict[str, Path]:
    """Write the tokenizer (``words`` and the 4 specials), the model (``GPT2Config(n_layer=2,
    n_embd=128, n_head=4, vocab_size=512)`` by default, default dropout; initialised under
    ``torch.manual_seed(model_seed)`` when given) and the prompt file (``prompt_words``
    random words each) under ``root``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate([*SPECIALS, *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(root / "model")
    config = GPT2Config(
        n_layer=2,
        n_embd=n_embd,
        n_head=4,
        vocab_size=len(vocab),
        n_positions=n_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if model_seed is not None:
        import torch

        torch.manual_seed(model_seed)
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    rng = random.Random(seed)
    with open(root / "prompts.jsonl", "w") as fh:
        for _ in range(n_prompts):
            fh.write(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(prompt_words))}) + "\n")
    return {"model": root / "model", "prompts": root / "prompts.jsonl"}


def text_overrides(files: dict[str, Path], run_dir: Path, horizon: int = 32) -> list[str]:
    """The ``--set`` overrides of a text run on this set-up (reward: :func:`target_fraction`)."""
    return [
        "env.id=tokenmdp/Text-v0",
        f"env.prompts={files['prompts']}",
        f"env.tokenizer={files['model']}",
        "env.reward=real_lm:target_fraction",
        f"env.horizon={horizon}",
        "env.stop_at_eos=false",
        "policy.kind=hf",
        f"policy.path={files['model']}",
        "reference.init=init",
        "train.progress=false",
        f"run.dir={run_dir}",
    ]

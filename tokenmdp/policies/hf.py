"""Hugging Face causal LMs behind the :class:`TokenPolicy` interface, and a tiny
sentencepiece trainer so tests never need a download."""

from __future__ import annotations

import inspect
import io
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from ..errors import TokenMDPError
from .base import TokenPolicy


class HFCausalLMPolicy(TokenPolicy):
    """Wraps ``AutoModelForCausalLM``. Left padding is handled with explicit position ids;
    decoding reuses the KV cache. ``vocab_size`` may be smaller than the model's (the
    extra ids are input-only specials such as a guide token)."""

    def __init__(self, model, vocab_size: int | None = None):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size or model.config.vocab_size
        # transformers >= 5 renamed ``past_key_values`` to ``cache``; accept both.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        if self.vocab_size > model.config.vocab_size:
            raise TokenMDPError(
                f"action vocabulary {self.vocab_size} exceeds the model's vocab_size {model.config.vocab_size}"
            )

    @classmethod
    def from_config(cls, config: dict[str, Any], vocab_size: int | None = None, seed: int = 0):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = dict(config)
        model_type = config.pop("model_type", "gpt2")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
        return cls(model, vocab_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, vocab_size: int | None = None):
        from transformers import AutoModelForCausalLM

        if not Path(path).is_dir():
            raise TokenMDPError(f"policy.path: model directory {str(path)!r} does not exist")
        return cls(AutoModelForCausalLM.from_pretrained(path), vocab_size)

    @staticmethod
    def _positions(mask: Tensor) -> Tensor:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=self._positions(attention_mask), use_cache=False)
        return out.logits[..., : self.vocab_size]

    def start(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = self._positions(attention_mask)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
        return out.logits[:, -1, : self.vocab_size], (self._cache_of(out), attention_mask, positions[:, -1])

    def _cache_of(self, out):
        return out["cache"] if "cache" in out else out["past_key_values"]

    def reindex_state(self, state, index):
        past, mask, last_pos = state
        past.reorder_cache(index)  # index_select on every layer; repeats allowed
        return past, mask[index], last_pos[index]

    def advance(self, state, tokens):
        past, mask, last_pos = state
        mask = torch.cat([mask, torch.ones_like(tokens[:, None])], dim=1)
        pos = last_pos + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos[:, None],
                         use_cache=True, **{self._cache_arg: past})
        return out.logits[:, -1, : self.vocab_size], (self._cache_of(out), mask, pos)


def train_sentencepiece(lines: Iterable[str], vocab_size: int, model_type: str = "bpe"):
    """Train a sentencepiece model in memory (well under a second on a few KB of text)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)), model_writer=buffer, vocab_size=vocab_size,
        model_type=model_type, bos_id=1, eos_id=2, pad_id=0, unk_id=3, minloglevel=2,
        hard_vocab_limit=False,
    )
    return spm.SentencePieceProcessor(model_proto=buffer.getvalue())

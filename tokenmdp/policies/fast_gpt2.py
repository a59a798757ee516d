"""A transformers GPT-2 run on its own weights without the library's layers of Python, for
sampling (a preallocated KV cache) and for the scoring and training forwards.

Sampling calls the model once per token. Through ``GPT2LMHeadModel.forward`` each call
pays for output records, cache objects, mask building and a five-op GELU around a handful
of small matrix products, and for a ``torch.cat`` of the growing cache. This module runs
the same arithmetic on the model's own parameters (so gradients reach them as usual):
keys and values are written into tensors allocated once per sampling pass, and the GELU
is torch's fused ``gelu(approximate="tanh")``, the same function as GPT-2's ``gelu_new``
to float rounding (2.4e-7). The logits equal the library's to float rounding (tested to
1e-5, with left padding, in decoding and in full forwards with gradients);
docs/performance.md has the speed.

It is used only where it is exactly the library's model (:func:`supports`): a plain
``GPT2LMHeadModel`` (no adapter) with the default attention settings, and no dropout
active. Anything else runs through the library.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .shared_prompt import SharedPrefix

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def supports(model) -> bool:
    """Whether ``model`` is a GPT-2 this module reproduces exactly."""
    config = getattr(model, "config", None)
    return (
        type(model).__name__ == "GPT2LMHeadModel"
        and getattr(config, "scale_attn_weights", True)
        and not getattr(config, "scale_attn_by_inverse_layer_idx", False)
        and not getattr(config, "reorder_and_upcast_attn", False)
        and not getattr(config, "add_cross_attention", False)
    )


def dropout_active(model: nn.Module) -> bool:
    """Whether a forward of ``model`` now would drop anything (train mode and a p > 0)."""
    return any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in model.modules())


class _Norm(NamedTuple):
    """A ``LayerNorm``'s tensors, applied as its ``forward`` does."""

    shape: tuple[int, ...]
    weight: Tensor
    bias: Tensor
    eps: float

    @classmethod
    def of(cls, norm: nn.LayerNorm) -> _Norm:
        return cls(tuple(norm.normalized_shape), norm.weight, norm.bias, norm.eps)

    def __call__(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class _Conv1D(NamedTuple):
    """transformers' ``Conv1D`` on flat rows: ``x @ weight + bias`` (weight stored [in, out])."""

    weight: Tensor
    bias: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight)


class _Layer(NamedTuple):
    """One GPT-2 block's tensors."""

    norm_1: _Norm
    attn: _Conv1D
    proj: _Conv1D
    norm_2: _Norm
    fc: _Conv1D
    out: _Conv1D
    act: Callable[[Tensor], Tensor]

    @classmethod
    def of(cls, block, act) -> _Layer:
        attn, mlp = block.attn, block.mlp
        conv = [_Conv1D(m.weight, m.bias) for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)]
        return cls(_Norm.of(block.ln_1), conv[0], conv[1], _Norm.of(block.ln_2), conv[2], conv[3], act or mlp.act)


def _positions(attention_mask: Tensor) -> Tensor:
    """Each token's position id: its count of real tokens before it (left padding: 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Cache:
    """Keys and values of every layer, ``[layers, B, heads, capacity, head_dim]``, the
    boolean key mask ``[B, capacity]``, the filled length and each row's last position id."""

    def __init__(self, keys: Tensor, values: Tensor, key_mask: Tensor, length: int, positions: Tensor):
        self.keys, self.values, self.key_mask = keys, values, key_mask
        self.length, self.positions = length, positions

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more tokens (doubling the capacity when it runs out)."""
        if self.length + extra <= self.keys.shape[3]:
            return
        capacity = max(2 * self.keys.shape[3], self.length + extra)

        def widened(t: Tensor, dim: int) -> Tensor:
            shape = list(t.shape)
            shape[dim] = capacity - shape[dim]
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        self.keys, self.values = widened(self.keys, 3), widened(self.values, 3)
        self.key_mask = widened(self.key_mask, 1)

    def select(self, index: Tensor) -> Cache:
        """Rows ``index`` (repeats allowed), as a new cache."""
        return Cache(
            self.keys[:, index], self.values[:, index], self.key_mask[index], self.length, self.positions[index]
        )


class GPT2Decoder:
    """``forward``, ``start`` and ``advance`` of a ``GPT2LMHeadModel``, on its parameters."""

    #: Cache room allocated beyond the prompt at ``start`` (it doubles when outgrown).
    initial_room = 64

    def __init__(self, model):
        self.model = model
        self.transformer = model.transformer
        config = model.config
        self.heads = config.n_head
        self.width = config.n_embd
        self.head_dim = self.width // self.heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        fused = getattr(config, "activation_function", None) in _TANH_GELUS
        act = (lambda x: F.gelu(x, approximate="tanh")) if fused else None
        # each block's tensors looked up once per decoder (a sampling pass or a forward), not
        # through four module attributes per product per decoded token
        self.layers = [_Layer.of(block, act) for block in self.transformer.h]
        self.final_norm = _Norm.of(self.transformer.ln_f)

    def _split_heads(self, x: Tensor) -> Tensor:  # [B, T, width] -> [B, heads, T, head_dim]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _blocks(
        self,
        x: Tensor,
        allowed: Tensor,
        cache: Cache | None = None,
        past: list[tuple[Tensor, Tensor]] | None = None,
        keys_out: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """Every block on ``x`` ([B, T, width]); ``allowed`` ([B, 1, T, keys]) says which
        keys each query sees. With a cache, the T new keys/values are written at its end
        and attention reads the whole filled cache. With ``past`` (each layer's earlier
        keys and values, ``[B, heads, P, head_dim]``, gradients kept) attention reads them
        before the T new ones. With ``keys_out`` each layer's keys and values are appended
        to it, and nothing after the last layer's is computed (None is returned)."""
        b, t = x.shape[:2]
        at = cache.length if cache is not None else 0
        last = len(self.layers) - 1
        x = x.reshape(b * t, self.width)  # rows flat: every product is one addmm, no reshapes
        for i, layer in enumerate(self.layers):
            q, k, v = layer.attn(layer.norm_1(x)).view(b, t, 3 * self.width).split(self.width, dim=2)
            k, v = self._split_heads(k), self._split_heads(v)
            if keys_out is not None:
                keys_out.append((k, v))
                if i == last:
                    return None
            if cache is not None:
                cache.keys[i, :, :, at : at + t] = k
                cache.values[i, :, :, at : at + t] = v
                k, v = cache.keys[i, :, :, : at + t], cache.values[i, :, :, : at + t]
            if past is not None:
                k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
            q = self._split_heads(q)
            if k.dtype != q.dtype:  # an autocast forward's half queries against a float32 cache
                k, v = k.to(q.dtype), v.to(q.dtype)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
            x = x + layer.proj(attended.transpose(1, 2).reshape(b * t, self.width))
            x = x + layer.out(layer.act(layer.fc(layer.norm_2(x))))
        return self.final_norm(x).view(b, t, self.width)

    def _embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.transformer.wte(input_ids) + self.transformer.wpe(positions)

    @staticmethod
    def _prefix_attention(attention_mask: Tensor) -> Tensor:
        """``[B, 1, L, L]``: causal, real keys only. A left-padding query sees only itself
        (its output is never read, and a row with no key would be NaN, even in gradients)."""
        length = attention_mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        allowed = causal[None] & attention_mask.bool()[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool, device=attention_mask.device)[None]
        return allowed[:, None]

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int = 0, hidden: bool = False
    ) -> Tensor:
        """``[B, L or logits_to_keep, vocab]`` logits of whole sequences (with gradients);
        with ``hidden``, the last hidden states the output layer would read instead."""
        positions = _positions(attention_mask)
        x = self._blocks(self._embed(input_ids, positions), self._prefix_attention(attention_mask))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return x if hidden else self.model.lm_head(x)

    def shared_hidden(self, input_ids: Tensor, attention_mask: Tensor, keep: int, shared: SharedPrefix) -> Tensor:
        """``[B, keep, width]``: :meth:`forward`'s last hidden states of the last ``keep``
        positions, with the leading positions run once per distinct row of them (``shared``,
        :mod:`.shared_prompt`) and their keys and values handed to every row that has them."""
        lead = shared.length
        kv: list[tuple[Tensor, Tensor]] = []
        self._blocks(self._embed(shared.ids, _positions(shared.mask)), self._prefix_attention(shared.mask), keys_out=kv)
        past = [(k.index_select(0, shared.rows), v.index_select(0, shared.rows)) for k, v in kv]
        b = input_ids.shape[0]
        lead_keys = shared.mask.bool().index_select(0, shared.rows)[:, None, None, :].expand(b, 1, keep, lead)
        allowed = torch.cat([lead_keys, self._prefix_attention(attention_mask[:, lead:])], dim=-1)
        positions = _positions(attention_mask)[:, lead:]
        return self._blocks(self._embed(input_ids[:, lead:], positions), allowed, past=past)

    @torch.no_grad()
    def start(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Cache]:
        """The prompt's last logits, and a cache holding the prompt."""
        b, length = input_ids.shape
        positions = _positions(attention_mask)
        x = self._embed(input_ids, positions)
        layers, capacity = len(self.transformer.h), length + self.initial_room
        keys = x.new_zeros(layers, b, self.heads, capacity, self.head_dim)
        key_mask = torch.zeros(b, capacity, dtype=torch.bool, device=x.device)
        key_mask[:, :length] = attention_mask.bool()
        cache = Cache(keys, torch.zeros_like(keys), key_mask, 0, positions[:, -1])
        x = self._blocks(x, self._prefix_attention(attention_mask), cache)
        cache.length = length
        return self.model.lm_head(x[:, -1]), cache

    @torch.no_grad()
    def advance(self, cache: Cache, tokens: Tensor) -> tuple[Tensor, Cache]:
        """Append ``tokens`` ([B]); the next logits. The cache is updated in place."""
        cache.reserve(1)
        cache.positions = cache.positions + 1
        x = self._embed(tokens[:, None], cache.positions[:, None])
        cache.key_mask[:, cache.length] = True
        allowed = cache.key_mask[:, None, None, : cache.length + 1]
        x = self._blocks(x, allowed, cache)
        cache.length += 1
        return self.model.lm_head(x[:, -1]), cache

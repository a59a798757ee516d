"""Per-token log-probs, entropies and KLs to a full-vocabulary target from the last hidden
states and the output layer, a chunk of positions at a time, never holding the
``[B, T, vocab]`` logits of a batch (:func:`chunked_token_stats`, :func:`chunked_kl`).

A training forward's output layer is the largest tensor of a step on a large vocabulary:
Gemma-3's 262,144 entries make ``batch x tokens x 262,144`` float32 logits, then a
log-softmax and an entropy of the same size, and autograd keeps them for the backward.
Here each chunk's logits live only inside :func:`torch.utils.checkpoint.checkpoint`: the
forward keeps the chunk's hidden states (``[chunk, width]``) and drops its logits, and the
backward computes them again, one chunk at a time. TRL's chunked log-prob function and
verl's chunked entropy do the same (a custom backward would save the recomputation; the
recomputation costs one output-layer matmul per chunk).

Per position the operations are those of the unchunked path (:func:`token_logprobs`:
``log_softmax``, ``gather``, ``-(p * log p).sum``), so values differ only where a smaller
matrix product rounds differently: tests/test_chunked_logits.py states the tolerance.

A **frozen** output layer (LoRA leaves it alone: :class:`FrozenLinear`) needs no weight
gradient, so :class:`_FrozenHeadStats` skips the recomputation: while a chunk's
probabilities exist in the forward, it multiplies the two vectors the backward will need
back through the layer (``d log p(y) / d logits = onehot(y) - p`` and, when the entropy
takes a gradient, ``d H / d logits = -p (log p + H)``) into ``[chunk, width]`` tensors, and
the backward only scales them by the incoming gradients. The output layer then costs two
products per chunk, as unchunked (forward and backward), instead of three.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..policies.base import FrozenLinear
from .ops import at_least_float32

#: ``train.logit_chunk = "auto"``: positions per chunk such that one chunk's logits hold
#: about this many entries (16 Mi: 64 MiB of float32; 64 positions of Gemma-3's vocabulary).
AUTO_CHUNK_ENTRIES = 1 << 24


def auto_chunk(vocab: int) -> int:
    """Positions per chunk for a vocabulary of ``vocab`` entries (at least 1)."""
    return max(1, AUTO_CHUNK_ENTRIES // max(1, vocab))


def resolve_chunk(setting: int | str, vocab: int) -> int | None:
    """``train.logit_chunk`` in positions: ``"auto"`` -> :func:`auto_chunk`, 0 -> None (off)."""
    return auto_chunk(vocab) if setting == "auto" else (setting or None)


def _stats(hidden: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor], entropy: bool):
    logp = torch.log_softmax(at_least_float32(head(hidden)), dim=-1)
    taken = logp.gather(-1, targets[:, None]).squeeze(-1)
    if not entropy:
        return (taken,)
    return taken, -(logp.exp() * logp).sum(-1)


def _taken(logp: Tensor, p: Tensor, targets: Tensor, layer: FrozenLinear) -> tuple[Tensor, Tensor]:
    """The taken tokens' log-probs, and their gradient (``onehot - p`` on the logits) carried
    back to the hidden states as ``W[targets] - p @ W``: the same product, without a pass
    over ``[chunk, vocab]`` to make ``onehot - p`` (18 ms a chunk on Gemma-3)."""
    taken = logp.gather(-1, targets[:, None]).squeeze(-1)
    return taken, layer.rows(targets) - layer.back(p)


class _FrozenHeadStats(torch.autograd.Function):
    """:func:`_stats` through a :class:`FrozenLinear`, its backward precomputed in the
    forward (see the module docstring); the entropy takes a gradient only if
    ``entropy_grad``."""

    @staticmethod
    def forward(ctx, hidden, targets, layer: FrozenLinear, entropy: bool, entropy_grad: bool):
        logp = torch.log_softmax(layer.logits(hidden), dim=-1)
        p = logp.exp()
        taken, taken_back = _taken(logp, p, targets, layer)
        saved = [taken_back]
        ent = None
        if entropy and entropy_grad:
            ent = -(p * logp).sum(-1)
            saved.append(layer.back(-p * (logp + ent[:, None])))
        elif entropy:
            # p is not read again: the product in its place, so that no third [chunk, vocab]
            # tensor exists beside log p and p (64 MiB a chunk on Gemma-3, at the step's peak)
            ent = -p.mul_(logp).sum(-1)
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(*saved)
        ctx.input_dtype = hidden.dtype
        return (taken, ent) if entropy else (taken,)

    @staticmethod
    def backward(ctx, grad_taken, grad_ent=None):
        saved = ctx.saved_tensors
        grad = grad_taken[:, None] * saved[0]
        if len(saved) > 1 and grad_ent is not None:
            grad = grad + grad_ent[:, None] * saved[1]
        return grad.to(ctx.input_dtype), None, None, None, None


def chunked_token_stats(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    targets: Tensor,
    chunk: int,
    entropy: bool = False,
    frozen: FrozenLinear | None = None,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(logprobs, entropy)`` ``[N]`` of ``targets`` ``[N]`` under the logits
    ``head(hidden)`` (``hidden``: ``[N, width]``), ``chunk`` positions at a time; entropy
    None unless asked. Differentiable in ``hidden`` and in ``head``'s parameters; with
    gradients on and more than one chunk, each chunk's logits are recomputed in the backward
    instead of kept, unless the output layer is ``frozen`` (the same layer as ``head``,
    without a weight gradient): :class:`_FrozenHeadStats` then needs no recomputation and,
    with ``entropy_grad`` false, makes the entropy a value only (no gradient flows from it,
    which saves a product per chunk); elsewhere the entropy always carries its gradient."""
    # one chunk holds everything: nothing to save by recomputing (its logits are small by
    # the choice of ``chunk``), so it runs as the unchunked path does
    grad = torch.is_grad_enabled() and hidden.shape[0] > chunk
    taken, entropies = [], []
    for start in range(0, hidden.shape[0], chunk):
        args = (hidden[start : start + chunk], targets[start : start + chunk], head, entropy)
        if grad and frozen is not None and hidden.requires_grad:
            out = _FrozenHeadStats.apply(args[0], args[1], frozen, entropy, entropy_grad)
        elif grad:
            out = checkpoint(_stats, *args, use_reentrant=False)
        else:
            out = _stats(*args)
        taken.append(out[0])
        if entropy:
            entropies.append(out[1])
    if not taken:  # no position at all
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if entropy else None)
    return torch.cat(taken), (torch.cat(entropies) if entropy else None)


# --- the KL to a target distribution over the whole vocabulary ---------------------------
# reverse: KL(pi || q) = sum_v p_v (log p_v - log q_v), its gradient through pi's logits
#          p_v (log p_v - log q_v - KL);
# forward: KL(q || pi) = sum_v q_v (log q_v - log p_v), its gradient p_v - q_v.
# A chunk's target log-probs are made from the target's own hidden states inside the chunk
# (no gradient), so neither side's [N, vocab] ever exists whole.

#: ``direction`` values: ``"reverse"`` is KL(pi || q) (reverse-kl's), ``"forward"`` KL(q || pi) (TDPO's).
KL_DIRECTIONS = ("reverse", "forward")


def _target_logp(target: Tensor, target_head: Callable[[Tensor], Tensor] | None) -> Tensor:
    if target_head is None:  # already log-probabilities
        return target
    with torch.no_grad():
        return torch.log_softmax(at_least_float32(target_head(target)), dim=-1)


def _kl(hidden, target, head, target_head, forward: bool, targets):
    logp = torch.log_softmax(at_least_float32(head(hidden)), dim=-1)
    q = _target_logp(target, target_head)
    p = logp.exp()
    kl = (q.exp() * (q - logp)).sum(-1) if forward else (p * (logp - q)).sum(-1)
    entropy = -(p.detach() * logp.detach()).sum(-1)
    if targets is None:
        return kl, entropy
    return kl, entropy, logp.gather(-1, targets[:, None]).squeeze(-1)


class _FrozenHeadKL(torch.autograd.Function):
    """:func:`_kl` through a :class:`FrozenLinear`: the gradients' vectors back through the
    layer (the KL's, and the taken tokens' ``onehot - p`` when asked) are made while ``p``
    exists, ``[chunk, width]`` each, so the backward recomputes nothing; the entropy is a
    value only."""

    @staticmethod
    def forward(ctx, hidden, target, layer: FrozenLinear, target_head, forward_kl: bool, targets):
        logp = torch.log_softmax(layer.logits(hidden), dim=-1)
        p = logp.exp()
        q = _target_logp(target, target_head)
        if forward_kl:
            kl = (q.exp() * (q - logp)).sum(-1)
            saved = [layer.back(p - q.exp())]
        else:
            diff = logp - q
            kl = (p * diff).sum(-1)
            saved = [layer.back(p * (diff - kl[:, None]))]
        entropy = -(p * logp).sum(-1)
        ctx.mark_non_differentiable(entropy)
        out = (kl, entropy)
        if targets is not None:
            taken, taken_back = _taken(logp, p, targets, layer)
            saved.append(taken_back)
            out = (kl, entropy, taken)
        ctx.save_for_backward(*saved)
        ctx.input_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_kl, grad_entropy=None, grad_taken=None):
        saved = ctx.saved_tensors
        grad = grad_kl[:, None] * saved[0]
        if len(saved) > 1 and grad_taken is not None:
            grad = grad + grad_taken[:, None] * saved[1]
        return grad.to(ctx.input_dtype), None, None, None, None, None


def chunked_kl(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    target: Tensor,
    chunk: int,
    target_head: Callable[[Tensor], Tensor] | None = None,
    frozen: FrozenLinear | None = None,
    direction: str = "reverse",
    targets: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """``(kl, entropy)`` ``[N]``, and with ``targets`` (``[N]`` token ids) their log-probs
    third: the KL between pi and q over the whole vocabulary at each of ``N`` positions
    (``direction``: :data:`KL_DIRECTIONS`) and pi's entropy (a value, no gradient), where
    pi's logits are ``head(hidden)`` (``hidden``: ``[N, width]``) and q's log-probs are
    ``target`` (``[N, vocab]``) or, with ``target_head``, ``log_softmax(target_head(target))``
    from the target model's ``[N, width]`` hidden states (no gradient). ``chunk`` positions at
    a time; with gradients each chunk is recomputed in the backward, unless the output layer
    is ``frozen`` (:class:`_FrozenHeadKL`)."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    forward = direction == "forward"
    grad = torch.is_grad_enabled() and hidden.shape[0] > chunk
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, q = hidden[start : start + chunk], target[start : start + chunk]
        ids = None if targets is None else targets[start : start + chunk]
        if grad and frozen is not None and hidden.requires_grad:
            parts.append(_FrozenHeadKL.apply(h, q, frozen, target_head, forward, ids))
        elif grad:
            parts.append(checkpoint(_kl, h, q, head, target_head, forward, ids, use_reentrant=False))
        else:
            parts.append(_kl(h, q, head, target_head, forward, ids))
    width = 2 if targets is None else 3
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty,) * width
    return tuple(torch.cat([part[i] for part in parts]) for i in range(width))

"""The signals components pass one another, declared once with their shapes and dtypes
(TorchRL's ``_AcceptedKeys`` idea), and the run-time check of the tensors a component returns.

A shape is symbolic: ``batch`` and ``response_len`` are the rollout batch's (``batch.size``,
``batch.response_ids.shape[1]``) and ``prompt_len`` its prompts' width; any other dimension
(``vocab``) is free, taken from the first tensor of a call that has it. A name no table
declares stays allowed and unchecked, so an outside plugin may pass signals of its own; a
component may declare their shapes in its ``signal_shapes``. docs/hooks.md ("Signals") is
this table for readers; tests/test_signals.py keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from ..errors import PluginError

#: The dtype kinds of a tensor signal; any other ``dtype`` names the type of a non-tensor
#: signal (a ``PairBatch``), which is documented but not checked.
TENSOR_KINDS = ("floating", "integer", "bool")

#: Every per-token tensor's shape: aligned with the response tokens.
PER_TOKEN = ("batch", "response_len")


def _check_shape(instance: Signal, attribute: attrs.Attribute, value: Any) -> None:
    if instance.dtype in TENSOR_KINDS:
        if not (isinstance(value, tuple) and value and all(isinstance(d, str) and d for d in value)):
            raise ValueError(f"signal {instance.name!r}: shape must be a tuple of dimension names, got {value!r}")
    elif value is not None:
        raise ValueError(f"signal {instance.name!r}: a {instance.dtype} is not a tensor, so its shape must be None")


def _kind(tensor: torch.Tensor) -> str:
    if tensor.is_floating_point():
        return "floating"
    return "bool" if tensor.dtype == torch.bool else "integer"


@attrs.frozen
class Signal:
    """One signal: its name, symbolic shape (None for a non-tensor), dtype kind and meaning."""

    name: str
    shape: tuple[str, ...] | None = attrs.field(validator=_check_shape)
    #: "floating", "integer" or "bool" for a tensor; else the name of the value's type.
    dtype: str
    doc: str

    @property
    def is_tensor(self) -> bool:
        return self.dtype in TENSOR_KINDS

    def describe(self) -> str:
        """The shape as the docs write it (``[batch, response_len]``), or the type's name."""
        return f"[{', '.join(self.shape)}]" if self.is_tensor else self.dtype

    def in_words(self) -> str:
        """What the signal is, in words: ``a floating tensor [batch, response_len]``, ``a PairBatch``."""
        return f"a {self.dtype} tensor {self.describe()}" if self.is_tensor else f"a {self.dtype}"

    def agrees_with(self, other: Signal) -> bool:
        """Whether ``other`` declares the same shape and dtype (the doc may differ)."""
        return (self.shape, self.dtype) == (other.shape, other.dtype)

    def mismatch(self, value: Any, sizes: dict[str, int]) -> tuple[str, str] | None:
        """``(got, expected)`` when ``value`` is not this signal, else None. The free
        dimensions ``value`` has are bound into ``sizes``, for the later tensors of the call."""
        bound = dict(sizes)
        tensor = isinstance(value, torch.Tensor)
        fits = tensor and value.dim() == len(self.shape)
        fits = fits and all(bound.setdefault(dim, size) == size for dim, size in zip(self.shape, value.shape))
        if fits and _kind(value) == self.dtype:
            sizes.update(bound)
            return None
        sized = f"{self.describe()} = [{', '.join(str(bound.get(d, d)) for d in self.shape)}]"
        if not tensor:
            return f"of type {type(value).__name__}", f"a {self.dtype} tensor {sized}"
        if not fits:
            return f"of shape {list(value.shape)}", sized
        return f"of dtype {value.dtype}", f"a {self.dtype} tensor {sized}"


def _per_token(name: str, doc: str, dtype: str = "floating") -> Signal:
    return Signal(name, PER_TOKEN, dtype, doc)


#: What every rollout batch carries (as attributes of ``batch``), so any component may require it.
BATCH_TABLE = (
    Signal("prompt_ids", ("batch", "prompt_len"), "integer", "the prompts' token ids, left-padded"),
    _per_token("response_ids", "the sampled response tokens, 0 after EOS", "integer"),
    _per_token("response_mask", "1.0 on real response tokens, 0.0 on the padding after EOS"),
    _per_token("logprobs", "log pi_old of each sampled token (the behaviour policy), 0 on padding"),
    _per_token("ref_logprobs", "log pi_ref of each sampled token, 0 on padding"),
    _per_token("rewards", "the environment's reward on each token, 0 where none (and in reward-free runs)"),
)

#: What the built-in components provide one another (estimators' and advantage constructors' outputs).
COMPONENT_TABLE = (
    _per_token("token_rewards", "the per-token reward r_t the advantage is built from"),
    _per_token("values", "the critic's V(s_t) before each response token"),
    _per_token("target_logprobs", "log pi_hat* of each sampled token (the target policy), 0 on padding"),
    Signal(
        "target_logits",
        ("batch", "response_len", "vocab"),
        "floating",
        "the target policy's log-probabilities over the full vocabulary (for distillation)",
    ),
    Signal(
        "target_distribution",
        None,
        "TokenDistribution",
        "the target policy's distribution at every response position, as whole log-probs or as hidden states "
        "with the output layer (made a chunk of positions at a time)",
    ),
    _per_token("advantages", "the per-token advantage A_t the updater trains on, 0 on padding"),
    _per_token("returns", "the return (reward-to-go) from each token, the critic's target"),
    Signal("preference_pairs", None, "PairBatch", "the preference pairs a pair updater trains on this step"),
)

#: Every declared signal, by name.
SIGNALS: Mapping[str, Signal] = {s.name: s for s in (*BATCH_TABLE, *COMPONENT_TABLE)}

#: Signals every rollout batch carries, so any component may require them.
BATCH_SIGNALS = frozenset(s.name for s in BATCH_TABLE)


def check_signal_shapes(outputs: Mapping[str, Any], batch: Any, component: Any, step: int) -> None:
    """Stop the run when ``component`` returned a declared signal of the wrong shape or
    dtype, with a one-line ``PluginError`` naming it, the signal and both shapes. Only
    shapes are compared (no tensor is read), so it costs nothing next to the call."""
    sizes = {
        "batch": batch.size,
        "response_len": batch.response_ids.shape[1],
        "prompt_len": batch.prompt_ids.shape[1],
    }
    own = None
    for key, value in outputs.items():
        signal = SIGNALS.get(key)
        if signal is None:
            own = {s.name: s for s in getattr(component, "signal_shapes", ())} if own is None else own
            signal = own.get(key)
        if signal is None or not signal.is_tensor:
            continue
        wrong = signal.mismatch(value, sizes)
        if wrong is not None:
            got, expected = wrong
            raise PluginError(
                f"{component.kind} {component.name!r} provided {key} {got} at step {step}; expected {expected}"
            )

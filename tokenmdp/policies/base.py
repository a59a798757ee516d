"""The one policy interface shared by toy networks, exact tree policies and HF causal LMs.

``forward(input_ids, attention_mask) -> logits [B, L, vocab_size]``: position ``i``
predicts the token after ``input_ids[:, i]`` (causal-LM convention). ``start`` /
``advance`` give incremental decoding; the default recomputes the whole prefix, and
recurrent or KV-cached models override them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from .. import devices
from ..errors import TokenMDPError


class TokenPolicy(nn.Module):
    vocab_size: int
    #: Autocast dtype of this policy's forwards (``train.precision = "bf16"``: bfloat16);
    #: None = float32. Policies that support it (HF causal LMs) run under :meth:`autocast`.
    autocast_dtype: torch.dtype | None = None
    #: Whether :attr:`autocast_dtype` applies to this kind of policy.
    supports_autocast = False

    #: The longest sequence (prompt + response) the policy can take; None = unbounded.
    max_positions: int | None = None

    def autocast(self):
        """The autocast context of this policy's forwards (nothing in float32)."""
        if self.autocast_dtype is None:  # no device lookup: this runs once per decoded token
            return contextlib.nullcontext()
        return devices.autocast(self.autocast_dtype, devices.module_device(self))

    def reference_view(self) -> TokenPolicy | None:
        """A frozen reference that shares this policy's weights (a LoRA policy: itself with
        the adapter off), or None: the trainer then freezes a copy of the initial policy."""
        return None

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint must keep to restore this policy: every weight by default.
        A policy that rebuilds its frozen part from elsewhere (a LoRA base from its model
        folder) keeps only what trains."""
        return self.state_dict()

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)

    def start(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """Logits for the first response token and a decoding state."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self(input_ids, attention_mask)[:, -1], (input_ids, attention_mask)

    def reindex_state(self, state: Any, index: Tensor) -> Any:
        """Select (and repeat) batch rows of a decoding state, e.g. to expand a prefix tree."""
        ids, mask = state
        return ids[index], mask[index]

    def advance(self, state: Any, tokens: Tensor) -> tuple[Tensor, Any]:
        """Append ``tokens`` ([B]) and return the next logits and the new state."""
        ids, mask = state
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(tokens[:, None])], dim=1)
        return self(ids, mask)[:, -1], (ids, mask)


def require_unpadded(attention_mask: Tensor | None, who: str) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise TokenMDPError(
            f"{who} needs unpadded inputs (all prompts of one length); use an HF policy for padded text"
        )


class ExactPolicy(TokenPolicy):
    """A fixed policy given by a function of (prompt index, prefix) on a toy task.

    Inputs are laid out as ``[guide...] + prompt + response``; the prompt is found by its
    BOS token, so a conditioning prefix in front is ignored.
    """

    def __init__(self, task):
        super().__init__()
        self.task = task
        self.vocab_size = task.vocab_size

    def next_logits(self, prompt_index: Tensor, prefix: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        require_unpadded(attention_mask, type(self).__name__)
        device, input_ids = input_ids.device, input_ids.cpu()  # the task's tables live on the CPU
        prompts = self.task.prompts
        p = prompts.shape[1]
        start = int((input_ids[0] == self.task.bos_token).nonzero()[0])
        window = input_ids[:, start : start + p]
        match = (window[:, None, :] == prompts[None]).all(-1)
        if not bool(match.any(1).all()):
            raise TokenMDPError(f"{type(self).__name__}: input holds a prompt the task does not know")
        prompt_index = match.float().argmax(1)
        b, length = input_ids.shape
        logits = torch.zeros(b, length, self.vocab_size)
        for pos in range(start + p - 1, length):
            prefix = input_ids[:, start + p : pos + 1]
            logits[:, pos] = self.next_logits(prompt_index, prefix)
        return logits.to(device)


class TaskBasePolicy(ExactPolicy):
    """The task's base distribution ``pi_base`` as a policy (for SFT data and tests)."""

    def next_logits(self, prompt_index, prefix):
        return self.task.base_logits(prompt_index, prefix)


def place(module: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None, no_dropout: bool) -> nn.Module:
    """``module`` on ``device``, the policies in it set to autocast to ``autocast_dtype``
    (those that support it), and its dropout off if ``no_dropout``; returns ``module``."""
    for sub in module.modules():
        if isinstance(sub, TokenPolicy) and sub.supports_autocast:
            sub.autocast_dtype = autocast_dtype
    if no_dropout:
        devices.disable_dropout(module)
    return module.to(device)


@attrs.frozen
class FrozenLinear:
    """An output layer without a weight gradient (tokenmdp/plugin/chunked.py's fast path):
    ``logits = hidden @ weight.T + bias``, the first ``vocab`` of them the policy's, the
    product in ``dtype`` (the policy's autocast; None: float32)."""

    weight: Tensor  # [V', width], requires_grad False
    bias: Tensor | None
    vocab: int
    dtype: torch.dtype | None = None

    def logits(self, hidden: Tensor) -> Tensor:
        dtype = self.dtype or self.weight.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        out = torch.nn.functional.linear(hidden.to(dtype), self.weight.to(dtype), bias)
        return _at_least_float32(out[..., : self.vocab])

    def back(self, grad_logits: Tensor) -> Tensor:
        """``grad_logits @ weight[:vocab]``: a gradient on the logits carried back to the
        hidden states, in float32."""
        dtype = self.dtype or self.weight.dtype
        return _at_least_float32(grad_logits.to(dtype) @ self.weight[: self.vocab].to(dtype))

    def rows(self, tokens: Tensor) -> Tensor:
        """``weight[tokens]`` as :meth:`back` multiplies it (``onehot(tokens) @ weight``)."""
        dtype = self.dtype or self.weight.dtype
        return _at_least_float32(self.weight[tokens].to(dtype))


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x

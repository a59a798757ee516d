"""The rows of a training forward that begin with the same tokens, so that those tokens run
through the model once.

With ``train.samples_per_prompt = G`` every G rows of a batch answer the same prompt, and a
forward over prompt + response per row reads that prompt G times (so does TRL's
``GRPOTrainer`` under ``num_generations``). A forward that wants the hidden states of the
last ``keep`` positions only (:meth:`HFCausalLMPolicy.response_hidden`) can instead run the
first ``L - keep`` positions once per distinct row of them and hand their keys and values
to the ``keep`` positions of every row, gradients included: the same function of the
parameters, its sums taken in another order (float rounding; tests/test_shared_prompt.py).
Sampling reads a group's prompt once the same way (``prompt_groups``, rollout.py).

The rows are matched by value, not by position, so a shuffled minibatch, a guide in front of
the prompt, or a batch with no repeats (nothing shared: the plain forward) all work.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

#: Share only when it removes at least this fraction of a forward's positions: below it,
#: the second model call's fixed cost (its Python, a cache per layer) may eat the saving.
LEAST_SAVED = 1 / 16


@attrs.frozen
class SharedPrefix:
    """The distinct leading rows, ``ids`` and ``mask`` (``[U, P]``), and for each of the
    batch's ``B`` rows the index of its leading row (``rows``, ``[B]``)."""

    ids: Tensor
    mask: Tensor
    rows: Tensor

    @property
    def length(self) -> int:
        return self.ids.shape[1]


def find(input_ids: Tensor, attention_mask: Tensor, keep: int) -> SharedPrefix | None:
    """The shared leading ``L - keep`` positions of ``input_ids`` (``[B, L]``) and their
    mask, or None when sharing them would save less than :data:`LEAST_SAVED` of the
    positions (every row distinct, or a short lead)."""
    b, length = input_ids.shape
    lead = length - keep
    if lead < 1 or b < 2:
        return None
    rows = torch.cat([input_ids[:, :lead], attention_mask[:, :lead].to(input_ids.dtype)], dim=1)
    distinct, index = torch.unique(rows, dim=0, return_inverse=True)
    if (b - distinct.shape[0]) * lead < LEAST_SAVED * b * length:
        return None
    return SharedPrefix(distinct[:, :lead], distinct[:, lead:].to(attention_mask.dtype), index)

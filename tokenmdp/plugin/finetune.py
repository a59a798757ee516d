"""Supervised fine-tuning's one loop: Adam on :func:`~tokenmdp.plugin.batch.response_nll`
over minibatches that the caller lays out, so the toy reference's SFT (token groups,
``training/sft.py``) and the text bridge's (padded examples, ``text/bridge.py``) train
with the same arithmetic while each keeps its own batching and shuffling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ..policies.base import TokenPolicy
from .batch import response_nll

#: One minibatch as ``response_nll`` reads it: token ids (context, then response), the
#: attention mask (None: no padding), the context width, and the response-token mask.
SFTBatch = tuple[Tensor, Tensor | None, int, Tensor]
#: One epoch's minibatches, in training order, drawn with the fine-tune's generator.
EpochBatches = Callable[[torch.Generator], Iterable[SFTBatch]]


def finetune_responses(
    policy: TokenPolicy, epoch_batches: EpochBatches, epochs: int, lr: float, generator: torch.Generator
) -> list[float]:
    """Cross-entropy on response tokens for ``epochs`` passes; returns every step's loss.
    The policy is left in train mode: what follows decides its mode."""
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    losses = []
    policy.train()
    for _ in range(epochs):
        for ids, attention_mask, context_len, target_mask in epoch_batches(generator):
            loss = response_nll(policy, ids, attention_mask, context_len, target_mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses

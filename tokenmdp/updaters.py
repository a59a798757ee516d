"""Shared machinery for gradient-based policy updaters (one obvious place, as in SB3):
Adam, optional linear learning-rate annealing over ``train.steps``, gradient clipping,
minibatch iteration and checkpointable state. Algorithms subclass and write only their loss.
"""

from __future__ import annotations

from typing import Iterator

import attrs
import torch

from . import distributed
from .components import PolicyUpdater
from .options import non_negative, positive, positive_int
from .rollout import RolloutBatch


@attrs.frozen
class GradientOptions:
    lr: float = attrs.field(default=1e-3, validator=positive)
    #: Clip the global gradient norm to this value (0 = no clipping).
    max_grad_norm: float = attrs.field(default=1.0, validator=non_negative)
    #: Decay the learning rate linearly to 0 over ``train.steps``.
    anneal_lr: bool = True
    #: Passes over each rollout, and minibatches per pass.
    epochs: int = attrs.field(default=1, validator=positive_int)
    minibatches: int = attrs.field(default=1, validator=positive_int)


class GradientUpdater(PolicyUpdater):
    Options = GradientOptions

    def setup(self, ctx):
        self.optimizer = torch.optim.Adam(ctx.policy.parameters(), lr=self.options.lr)
        total = ctx.config.train.steps
        anneal = self.options.anneal_lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, (lambda i: max(0.0, 1 - i / total)) if anneal else (lambda i: 1.0)
        )

    def minibatches(self, batch: RolloutBatch, ctx) -> Iterator[torch.Tensor]:
        """Row indices of every minibatch of every epoch, shuffled with the step's generator."""
        for _ in range(self.options.epochs):
            order = torch.randperm(batch.size, generator=ctx.generator)
            yield from order.chunk(min(self.options.minibatches, batch.size))

    def apply_gradients(self, loss: torch.Tensor, ctx) -> float:
        """Backward, average the gradients over ranks (distributed runs only), clip, step;
        returns the pre-clipping norm of the averaged gradient.

        An override that steps its optimizer itself should call
        ``tokenmdp.distributed.average_gradients(self.optimizer)`` between ``backward`` and
        clipping; otherwise the trainer averages just before ``step()``, after per-rank clipping."""
        self.optimizer.zero_grad()
        loss.backward()
        distributed.average_gradients(self.optimizer)
        limit = self.options.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(ctx.policy.parameters(), limit)
        self.optimizer.step()
        return float(norm)

    def end_rollout(self) -> dict[str, float]:
        """Advance the LR schedule once per rollout and report the rate used."""
        rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return {"charts/learning_rate": rate}

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        if state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical given by ``logits``."""
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)

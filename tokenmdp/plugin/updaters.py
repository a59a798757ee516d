"""Shared machinery for gradient-based policy updaters (one obvious place, as in SB3):
Adam, optional linear learning-rate annealing over ``train.steps``, gradient clipping,
minibatch iteration, micro-batch gradient accumulation and checkpointable state.
Algorithms subclass and write only their loss.

Micro-batches. With ``micro_batch_size = m`` a minibatch is scored ``m`` rows at a time
and the gradients of the slices are accumulated before the one optimizer step, so the step
sees the gradient of the whole minibatch while only ``m`` rows' activations are alive at
once. For that, a loss is written as a sum of per-slice shares normalised by the *whole*
minibatch: :meth:`MicroBatch.token_mean` (a masked mean over the minibatch's real tokens)
and :meth:`MicroBatch.row_mean` (a mean over its rows). Unset, the one slice is the
minibatch and every loss is computed exactly as without micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import attrs
import torch
from torch import Tensor

from .. import distributed
from ..errors import ConfigError
from ..options import non_negative, optional, positive, positive_int
from .batch import RolloutBatch
from .components import PolicyUpdater
from .ops import zero_padding


@attrs.frozen
class OptimizerOptions:
    """Options of every gradient updater: Adam, clipping, the LR schedule, micro-batches."""

    #: Adam learning rate (annealed when anneal_lr).
    lr: float = attrs.field(default=1e-3, validator=positive)
    #: Clip the global gradient norm to this value (0 = no clipping).
    max_grad_norm: float = attrs.field(default=1.0, validator=non_negative)
    #: Decay the learning rate linearly to 0 over ``train.steps``.
    anneal_lr: bool = True
    #: Rows (pairs, for the pair updaters) per forward/backward inside a minibatch; the
    #: slices' gradients are accumulated into one optimizer step on the whole minibatch
    #: (same loss, less memory). Unset = the whole minibatch at once.
    micro_batch_size: int | None = attrs.field(default=None, validator=optional(positive_int))


@attrs.frozen
class GradientOptions(OptimizerOptions):
    """:class:`OptimizerOptions`, plus passes over each rollout and minibatches per pass."""

    #: Passes over each rollout, each in a new shuffled order.
    epochs: int = attrs.field(default=1, validator=positive_int)
    #: Minibatches each pass is split into, one optimizer step each (at most one per row).
    minibatches: int = attrs.field(default=1, validator=positive_int)


@attrs.frozen
class MicroBatch:
    """One slice of a minibatch: its loss is one term of the minibatch's loss."""

    #: The slice's rows (a RolloutBatch, or a PairBatch for the pair updaters).
    batch: object
    #: Their indices in the step's batch (for per-row signals such as advantages).
    rows: Tensor
    #: Real response tokens in the whole minibatch: the normaliser of token means.
    tokens: Tensor | None
    #: Rows in the whole minibatch: the normaliser of row means.
    size: int

    def token_mean(self, x: Tensor, mask: Tensor) -> Tensor:
        """This slice's share of the minibatch's masked mean of ``x`` (``[rows, T]``, padding
        ignored); summed over the slices, it is ``masked_mean`` over the minibatch."""
        return (zero_padding(x, mask) * mask).sum() / self.tokens.clamp(min=1)

    def row_mean(self, x: Tensor) -> Tensor:
        """This slice's share of the minibatch's mean over rows of ``x`` (``[rows, ...]``:
        everything in a row is summed into that row's value)."""
        return x.sum() / self.size


class GradientUpdater(PolicyUpdater):
    Options = GradientOptions

    def check(self, config, task):
        """``micro_batch_size`` must fit in a minibatch."""
        micro = getattr(self.options, "micro_batch_size", None)
        if micro is not None and self._steps_itself():
            raise ConfigError(
                f"updater {self.name!r} overrides apply_gradients, which takes a whole minibatch's "
                "loss, so it cannot accumulate micro-batches; unset updater.micro_batch_size"
            )
        largest = self.largest_minibatch(config) if micro is not None else None
        if largest is not None and micro > largest:
            raise ConfigError(
                f"updater.micro_batch_size = {micro} is larger than a minibatch of updater "
                f"{self.name!r} ({largest} rows); choose 1..{largest}, or unset it"
            )

    def largest_minibatch(self, config) -> int | None:
        """Rows in the largest minibatch :meth:`minibatches` makes of one step's batch."""
        rows = config.train.batch_size * (config.train.simulate_world_size or 1)
        parts = getattr(self.options, "minibatches", None)
        return None if parts is None else -(-rows // min(parts, rows))

    def parameter_groups(self, ctx) -> list[dict]:
        """The optimizer's parameter groups: the policy's parameters. An updater that trains
        more (PPO's critic) adds a group; all of them are clipped together."""
        return [{"params": list(ctx.policy.parameters())}]

    def setup(self, ctx):
        self.optimizer = torch.optim.Adam(self.parameter_groups(ctx), lr=self.options.lr)
        total = ctx.config.train.steps
        anneal = self.options.anneal_lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, (lambda i: max(0.0, 1 - i / total)) if anneal else (lambda i: 1.0)
        )

    def trained_parameters(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def minibatches(self, batch: RolloutBatch, ctx) -> Iterator[torch.Tensor]:
        """Row indices of every minibatch of every epoch, shuffled with the step's generator."""
        for _ in range(self.options.epochs):
            order = torch.randperm(batch.size, generator=ctx.generator)
            yield from order.chunk(min(self.options.minibatches, batch.size))

    def micro_batches(self, batch: RolloutBatch, rows: Tensor) -> Iterator[MicroBatch]:
        """The minibatch ``rows`` of ``batch`` in slices of ``micro_batch_size`` rows."""
        tokens = batch.response_mask[rows].sum()
        for part in rows.split(self.options.micro_batch_size or len(rows)):
            yield MicroBatch(batch.select(part), part, tokens, len(rows))

    def accumulate(
        self, shares: Iterable[tuple[Tensor, dict]], ctx, skip: Callable[[dict[str, float]], bool] | None = None
    ) -> tuple[float | None, dict[str, float]]:
        """One optimizer step from a minibatch's ``(loss share, metric shares)`` per slice:
        backward on each share as it comes (so one slice's activations are alive at a
        time), average over ranks, clip, step. Returns the pre-clipping gradient norm and
        the summed metric shares; when ``skip(metrics)`` is true the step is dropped
        (norm None), e.g. PPO's early stop on the minibatch's approximate KL.

        An updater that overrides :meth:`apply_gradients` keeps stepping through it, with
        its one slice's loss (:meth:`check` refuses micro-batches for it)."""
        if self._steps_itself():
            ((loss, metrics),) = shares
            totals = {key: float(value) for key, value in metrics.items()}
            if skip is not None and skip(totals):
                return None, totals
            return self.apply_gradients(loss, ctx), totals
        self.optimizer.zero_grad()
        totals: dict[str, float] = {}
        for loss, metrics in shares:
            loss.backward()
            for key, value in metrics.items():
                totals[key] = totals[key] + float(value) if key in totals else float(value)
        if skip is not None and skip(totals):
            self.optimizer.zero_grad()
            return None, totals
        return self._step(), totals

    def _steps_itself(self) -> bool:
        return type(self).apply_gradients is not GradientUpdater.apply_gradients

    def apply_gradients(self, loss: torch.Tensor, ctx) -> float:
        """Backward, average the gradients over ranks (distributed runs only), clip, step;
        returns the pre-clipping norm of the averaged gradient.

        An override that steps its optimizer itself should call
        ``tokenmdp.distributed.average_gradients(self.optimizer)`` between ``backward`` and
        clipping; otherwise the trainer averages just before ``step()``, after per-rank clipping."""
        self.optimizer.zero_grad()
        loss.backward()
        return self._step()

    def _step(self) -> float:
        distributed.average_gradients(self.optimizer)
        limit = self.options.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trained_parameters(), limit)
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

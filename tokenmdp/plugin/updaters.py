"""Shared machinery for gradient-based policy updaters (one obvious place, as in SB3):
Adam (AdamW with weight decay), the learning-rate schedule over ``train.steps``, gradient
clipping, minibatch iteration, micro-batch gradient accumulation and checkpointable state.
Algorithms subclass and write only their loss.

The schedule. ``lr_scheduler`` names one of ``transformers.get_scheduler``'s (unset: linear
decay to 0 with ``anneal_lr``, else constant, computed as before). It advances once per
training step. A resume that changes ``train.steps`` re-plans it (:class:`Schedule`): the
part after the checkpoint (or after the warm-up, if that is later) is stretched in time to
end at the new last step, so the rate goes on from where it was, without a jump.

Micro-batches. With ``micro_batch_size = m`` a minibatch is scored ``m`` rows at a time
and the gradients of the slices are accumulated before the one optimizer step, so the step
sees the gradient of the whole minibatch while only ``m`` rows' activations are alive at
once. For that, a loss is written as a sum of per-slice shares normalised by the *whole*
minibatch: :meth:`MicroBatch.token_mean` (a masked mean over the minibatch's real tokens)
and :meth:`MicroBatch.row_mean` (a mean over its rows). Unset, the one slice is the
minibatch and every loss is computed exactly as without micro-batches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator

import attrs
import torch
from torch import Tensor

from .. import distributed, sharding
from ..errors import ConfigError
from ..options import non_negative, non_negative_int, one_of, optional, positive, positive_int, probability
from .batch import RolloutBatch
from .components import PolicyUpdater
from .ops import zero_padding

#: ``updater.lr_scheduler`` names: ``transformers.get_scheduler``'s schedules that need
#: nothing beyond the warm-up and ``train.steps``.
#: ``updater.adam``: torch's three implementations of Adam and AdamW, as their keyword arguments.
ADAM_IMPLEMENTATIONS = {"for-loop": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@attrs.frozen
class OptimizerOptions:
    """Options of every gradient updater: Adam, clipping, the LR schedule, micro-batches."""

    #: Adam learning rate (the peak of the schedule).
    lr: float = attrs.field(default=1e-3, validator=positive)
    #: Clip the global gradient norm to this value (0 = no clipping).
    max_grad_norm: float = attrs.field(default=1.0, validator=non_negative)
    #: Decay the learning rate linearly to 0 over ``train.steps`` (read only while
    #: ``lr_scheduler`` is unset).
    anneal_lr: bool = True
    #: Rows (pairs, for the pair updaters) per forward/backward inside a minibatch; the
    #: slices' gradients are accumulated into one optimizer step on the whole minibatch
    #: (same loss, less memory). Unset = the whole minibatch at once.
    micro_batch_size: int | None = attrs.field(default=None, validator=optional(positive_int))
    #: The learning-rate schedule over ``train.steps``, one of ``transformers.get_scheduler``'s
    #: (TRL's ``lr_scheduler_type``): "linear", "cosine", "constant", "constant_with_warmup",
    #: "cosine_with_restarts" or "polynomial"; it advances once per training step. Unset =
    #: ``anneal_lr``'s: linear decay to 0 (true) or constant (false), with a warm-up if set.
    lr_scheduler: str | None = attrs.field(default=None, validator=optional(one_of(*LR_SCHEDULERS)))
    #: Steps of linear warm-up from 0 to ``lr`` at the start of the schedule; unset = none
    #: (or ``warmup_ratio``).
    warmup_steps: int | None = attrs.field(default=None, validator=optional(non_negative_int))
    #: The warm-up as a fraction of ``train.steps``, rounded up; unset = ``warmup_steps``.
    warmup_ratio: float | None = attrs.field(default=None, validator=optional(probability))
    #: AdamW's decoupled weight decay, on the weight matrices and embeddings only (biases and
    #: norm scales are left alone, as TRL's trainers do); 0 = plain Adam.
    weight_decay: float = attrs.field(default=0.0, validator=non_negative)
    #: How Adam updates the tensors: "for-loop" (torch's CPU default, one tensor at a time:
    #: every run's numbers so far), "foreach" (each operation over all tensors at once: the
    #: same numbers) or "fused" (one kernel per parameter group, TRL's "adamw_torch_fused":
    #: equal to "for-loop" to float rounding, not bit for bit; docs/performance.md).
    adam: str = attrs.field(default="for-loop", validator=one_of(*ADAM_IMPLEMENTATIONS))

    def __attrs_post_init__(self):
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("warmup_steps and warmup_ratio are both set; set one of them")
        if self.lr_scheduler == "constant" and (self.warmup_steps or self.warmup_ratio):
            raise ValueError(
                "lr_scheduler = 'constant' has no warm-up; use 'constant_with_warmup' or unset the warm-up"
            )


@attrs.frozen
class GradientOptions(OptimizerOptions):
    """:class:`OptimizerOptions`, plus passes over each rollout and minibatches per pass."""

    #: Passes over each rollout, each in a new shuffled order.
    epochs: int = attrs.field(default=1, validator=positive_int)
    #: Minibatches each pass is split into, one optimizer step each (at most one per row).
    minibatches: int = attrs.field(default=1, validator=positive_int)


def warmup_steps(options, steps: int) -> int:
    """Warm-up steps of ``options``' schedule over ``steps`` training steps (options classes
    that predate the warm-up options have none)."""
    ratio = getattr(options, "warmup_ratio", None)
    if ratio is not None:  # rounded up, less float noise: 0.1 * 30 is 3.0000000000000004, 3 steps
        return math.ceil(ratio * steps - 1e-9)
    return getattr(options, "warmup_steps", None) or 0


def schedule_shape(options, steps: int, warmup: int) -> Callable[[float], float]:
    """The LR factor at (possibly fractional) step ``i`` of ``options``' schedule planned over
    ``steps`` with ``warmup``: the lambdas of before when ``lr_scheduler`` and the warm-up
    are unset (so those runs keep their exact numbers), else ``transformers.get_scheduler``'s."""
    name = getattr(options, "lr_scheduler", None)
    if name is None and not warmup:
        return (lambda i: max(0.0, 1 - i / steps)) if options.anneal_lr else (lambda i: 1.0)
    if name is None:
        name = "linear" if options.anneal_lr else "constant_with_warmup"
    from transformers import get_scheduler

    # the library's LambdaLR on a stand-in optimizer, for its lambda (polynomial reads the
    # peak lr off it): the updater's own LambdaLR evaluates it at re-planned steps
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=options.lr)
    return get_scheduler(name, stand_in, num_warmup_steps=warmup, num_training_steps=steps).lr_lambdas[0]


class Schedule:
    """The LR factor by step, planned over ``steps`` with ``warmup``, re-planned whenever a
    resume changes ``train.steps``. Factor ``i`` is the rate of update ``i + 1``.

    A re-plan from ``T`` planned steps to ``N`` pivots at ``p``: the factor the last update
    before the checkpoint used, or the end of the warm-up if that is later. Factors up to
    ``p`` stay; what the old plan had left after ``p`` is stretched (or squeezed) in time
    over the new remainder: ``f_new(i) = f_old(p + (i - p) * (T - p) / (N - p))`` for
    ``i > p``. So the rate goes on from the last update's, ends where it would have ended,
    and changes per step by the old plan's change times ``(T - p) / (N - p)``: linear decay
    continues from the last rate to 0 at step ``N`` in equal steps (a finished run, whose
    next rate was 0, decays again from its last rate), cosine follows its curve, the
    warm-up keeps its length. Re-plans compose."""

    def __init__(self, options: OptimizerOptions, steps: int, warmup: int, replans: Iterable = ()):
        self.steps, self.warmup = steps, warmup
        self.shape = schedule_shape(options, steps, warmup)
        #: ``(pivot, planned steps before, after)`` of each re-plan, oldest first.
        self.replans: list[tuple[int, int, int]] = [tuple(r) for r in replans]

    @property
    def planned_steps(self) -> int:
        """The last step of the schedule as now planned."""
        return self.replans[-1][2] if self.replans else self.steps

    def replan(self, taken: int, steps: int) -> bool:
        """End the schedule at step ``steps`` instead, after ``taken`` steps; whether it changed."""
        before, pivot = self.planned_steps, max(taken - 1, self.warmup)
        if steps == before or steps <= pivot or before <= pivot:
            return False  # the same plan, or nothing left to stretch (the run is within its warm-up)
        self.replans.append((pivot, before, steps))
        return True

    def factor(self, i: int) -> float:
        # step i back on the time axis of the original plan, the newest re-plan first
        for pivot, before, after in reversed(self.replans):
            if i > pivot:
                i = pivot + (i - pivot) * (before - pivot) / (after - pivot)
        return self.shape(i)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "warmup": self.warmup, "replans": [list(r) for r in self.replans]}


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
        if largest is not None and micro == largest and largest > 1:
            # legal, and the same numbers, but it saves no memory: say so rather than let the
            # user believe the step is split
            warnings.warn(
                f"updater.micro_batch_size = {micro} is a whole minibatch of updater {self.name!r} "
                f"({largest} rows), so it splits nothing; lower it (1..{largest - 1}) to save memory, or unset it",
                stacklevel=2,
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
        o = self.options
        decay = getattr(o, "weight_decay", 0.0)
        how = ADAM_IMPLEMENTATIONS[getattr(o, "adam", "for-loop")]
        if decay:
            self.optimizer = torch.optim.AdamW(_decay_groups(self.parameter_groups(ctx), decay), lr=o.lr, **how)
        else:  # exactly the optimizer of before, so every existing run keeps its numbers
            self.optimizer = torch.optim.Adam(self.parameter_groups(ctx), lr=o.lr, **how)
        #: ``train.steps`` of this run (a resume may have changed it: load_state_dict re-plans)
        self.train_steps = ctx.config.train.steps
        self.lr_schedule = Schedule(o, self.train_steps, warmup_steps(o, self.train_steps))
        # a plain function (not the Schedule) so that LambdaLR's state_dict keeps none of it:
        # state_dict/load_state_dict below save and restore the schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: self.lr_schedule.factor(i))

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
        norm = sharding.clip_grad_norm_(self.trained_parameters(), limit)  # torch's, unless FSDP shards them
        self.optimizer.step()
        return float(norm)

    def end_rollout(self) -> dict[str, float]:
        """Advance the LR schedule once per rollout and report the rate used."""
        rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return {"charts/learning_rate": rate}

    def state_dict(self):
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "schedule": self.lr_schedule.state_dict(),
        }

    def load_state_dict(self, state):
        """Restore the checkpoint's optimizer and schedule; when ``train.steps`` now differs
        from the steps the schedule was planned for, re-plan it from the checkpoint's step."""
        if state:
            self.optimizer.load_state_dict(state["optimizer"])
            sharding.shard_optimizer_state(self.optimizer)  # a checkpoint's whole moments, cut to this rank's
            self.scheduler.load_state_dict(state["scheduler"])
            saved = state.get("schedule")  # absent from checkpoints of before the re-plans
            if saved is not None:
                self.lr_schedule = Schedule(self.options, saved["steps"], saved["warmup"], saved["replans"])
            taken = self.scheduler.last_epoch
            if self.lr_schedule.replan(taken, self.train_steps):
                # the next step's rate by the new plan: the checkpoint holds the old plan's
                rate = self.lr_schedule.factor(taken)
                for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                    group["lr"] = base * rate
                self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _decay_groups(groups: list[dict], weight_decay: float) -> list[dict]:
    """Each parameter group split in two: its matrices (weights, embeddings) decayed, its
    vectors (biases, norm scales) not, as TRL's trainers split them."""
    out = []
    for group in groups:
        params = list(group["params"])
        for decayed, rate in ((True, weight_decay), (False, 0.0)):
            chosen = [p for p in params if (p.ndim >= 2) == decayed]
            if chosen:
                out.append({**group, "params": chosen, "weight_decay": rate})
    return out


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical given by ``logits``."""
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)

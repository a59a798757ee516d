"""The training context ``ctx`` every component receives."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from ..policies.base import TokenPolicy
from .batch import RolloutBatch, TokenDistribution, token_distribution, token_kl, token_logprobs
from .chunked import resolve_chunk


@attrs.define
class TrainContext:
    policy: TokenPolicy
    reference: TokenPolicy
    beta: float
    task: Any
    config: Any
    #: The step, and its seeded generator (the components' shuffles draw from it): the trainer
    #: sets both at the start of each step, and on the CPU the step's batch was sampled with it.
    step: int = 0
    generator: torch.Generator = attrs.field(factory=torch.Generator)
    #: Exact solution of the toy task under the reference (None for text tasks).
    solution: Any = None
    #: Exact scorer (``ExactEvaluator``) for toy tasks; None for text tasks.
    evaluator: Any = None
    #: Free slot for components that share state within a run.
    extras: dict = attrs.field(factory=dict)
    #: Where the policy, reference and every batch tensor live (``train.device``).
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    #: Autocast dtype of HF model forwards (``train.precision``); None = float32.
    autocast_dtype: torch.dtype | None = None

    @property
    def logs_kl(self) -> bool:
        """``train.log_kl``: whether KL metrics are logged even where no loss reads the
        reference (a component may then skip them, and the reference forward they need)."""
        return getattr(getattr(self.config, "train", None), "log_kl", True)

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Prepare a network a component builds for itself (a critic, a reward model, a
        teacher) like the policy: on ``device``, its HF forwards in the run's precision, its
        dropout off (it scores, so it must be deterministic), and its HF language models
        sharded as the policy is under ``train.sharding = "fsdp"`` (build its optimizer
        after this call). Returns ``module``."""
        from .. import sharding
        from ..policies.base import place
        from ..policies.hf import HFCausalLMPolicy

        place(module, self.device, self.autocast_dtype, no_dropout=True)
        if getattr(getattr(self.config, "train", None), "sharding", "none") == "fsdp":
            for sub in list(module.modules()):
                if isinstance(sub, HFCausalLMPolicy):
                    sharding.shard_policy(sub, self.autocast_dtype)
        return module

    @property
    def guide_ids(self) -> Tensor:
        """The default conditioning prefix ``c``: the task's guide token (text tasks have
        none: their guides are text, given as ``[estimator] guide = "..."``)."""
        if self.task.guide_token is None:
            from ..errors import ConfigError

            raise ConfigError(
                f"env {self.task.name!r} has no guide token; give the guide as "
                'text, e.g. [estimator] guide = "Answer kindly and helpfully."'
            )
        return torch.tensor([self.task.guide_token])

    def guide_prefix(self, guide: str | tuple[int, ...] | None) -> Tensor:
        """The conditioning prefix ``c`` of an ``[estimator] guide`` option: the task's guide
        token when unset, else token ids, or text through a text env's tokenizer (its
        ``encode_guide``: ids after BOS, or every chat prompt re-templated with the guide)."""
        if guide is None:
            return self.guide_ids
        if isinstance(guide, str):
            return self.task.encode_guide(guide)
        return torch.tensor(list(guide), dtype=torch.long)

    def token_logprobs(
        self,
        model: TokenPolicy,
        batch: RolloutBatch,
        prefix_ids: Tensor | None = None,
        return_logits: bool = False,
        return_entropy: bool = False,
        entropy_grad: bool = True,
    ):
        """Score the batch's response tokens under ``model`` (optionally guide-prefixed):
        their log-probs, and the ``[B, T, V]`` logits or (cheaper) the ``[B, T]`` entropies
        when asked. An HF model's output layer runs :attr:`logit_chunk` positions at a time
        unless the logits themselves are asked for (:func:`tokenmdp.token_logprobs`);
        ``entropy_grad`` false where the entropy is only a metric."""
        return token_logprobs(
            model,
            batch,
            prefix_ids=prefix_ids,
            return_logits=return_logits,
            return_entropy=return_entropy,
            chunk=self.logit_chunk,
            entropy_grad=entropy_grad,
        )

    def token_distribution(self, model: TokenPolicy, batch: RolloutBatch, prefix_ids: Tensor | None = None):
        """``(log-probs of the taken tokens, TokenDistribution)`` under ``model`` (no
        gradients): an HF model's distribution is kept as its hidden states when
        :attr:`logit_chunk` is on (:func:`tokenmdp.token_distribution`)."""
        return token_distribution(model, batch, prefix_ids=prefix_ids, chunk=self.logit_chunk)

    def token_kl(
        self,
        model: TokenPolicy,
        batch: RolloutBatch,
        target: TokenDistribution,
        direction: str = "reverse",
        return_logprobs: bool = False,
    ):
        """``(KL(model || target), model's entropy)`` per response token (``direction =
        "forward"``: ``KL(target || model)``; ``return_logprobs``: the taken tokens' log-probs
        third), the output layer :attr:`logit_chunk` positions at a time
        (:func:`tokenmdp.token_kl`)."""
        return token_kl(model, batch, target, self.logit_chunk, direction, return_logprobs)

    @property
    def logit_chunk(self) -> int | None:
        """``train.logit_chunk`` in positions (None: off)."""
        return resolve_chunk(self.config.train.logit_chunk, self.task.vocab_size)

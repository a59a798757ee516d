"""The one interface sampling goes through: a :class:`SamplingBackend` turns prompts into
responses. The built-in ``torch`` backend (plugin ``tokenmdp_sampling``) decodes with the
policy's own ``start``/``advance``; a backend for an inference engine (vLLM on a GPU)
implements the same method and registers through the ``tokenmdp_sampling_backends`` hook
(docs/performance.md)."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor


@attrs.frozen
class SamplingParams:
    """What shapes a draw (``train.*``): the distribution (temperature, top-k, top-p) and how
    a token is drawn from it (``sampler``)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    sampler: str = "multinomial"
    #: G when every G consecutive rows share one prompt (``train.samples_per_prompt``), so
    #: a backend may read each prompt once; 1 = no such structure.
    prompt_groups: int = 1


@attrs.frozen
class Samples:
    """A backend's answer: ``response`` ``[B, horizon]`` (0 after EOS), its 0/1 ``mask``,
    and (when asked for) ``logprobs`` ``[B, horizon]``: the sampled tokens' log-probs
    under the policy itself (temperature 1, unfiltered; 0 on padding)."""

    response: Tensor
    mask: Tensor
    logprobs: Tensor | None = None


class SamplingBackend:
    """Samples responses of a policy. Subclasses set ``name`` and implement :meth:`sample`.

    A backend is built once per run with the run's config. It must draw with the given
    ``generator`` (so a seed fixes the responses), stop a row at ``eos_token``, and return
    every tensor on the policy's device. ``logprobs`` may be None even when asked for: the
    trainer then scores the batch with a forward pass."""

    name: ClassVar[str] = ""

    def __init__(self, config: Any = None):
        self.config = config

    def sample(
        self,
        policy,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        horizon: int,
        eos_token: int | None,
        generator: torch.Generator,
        params: SamplingParams,
        return_logprobs: bool = False,
    ) -> Samples:
        raise NotImplementedError

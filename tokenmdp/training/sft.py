"""The supervised stage that builds a reference model "that knows good behaviour when
asked" (METHOD.md section 5): untagged samples from ``pi_base`` plus guide-tagged samples
from the tilted distribution ``pi_base * exp(R / beta) / Z``, which the exact solver gives.
:func:`run_sft_data` draws a run's data from its config: the trainer's fine-tune (cached
or not) and ``tokenmdp compare``'s count of tagged tokens both take it from there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import Config
from ..mdp.solver import solve
from ..plugin.finetune import finetune_responses
from ..policies.base import TaskBasePolicy, TokenPolicy
from .rollout import generate


def sample_contexts(task, n: int, generator: torch.Generator, tagged: bool) -> tuple[Tensor, Tensor]:
    """Prompt indices drawn from the task's prompt distribution, and their input contexts."""
    index = torch.multinomial(task.prompt_probs, n, replacement=True, generator=generator)
    context = task.prompts[index]
    if tagged:
        context = torch.cat([torch.full((n, 1), task.guide_token), context], dim=1)
    return index, context


def make_sft_data(task, untagged: int, tagged: int, tilt_beta: float, generator: torch.Generator):
    """Returns a list of ``(contexts, responses, masks)`` groups (one per context length)."""
    base = TaskBasePolicy(task)
    groups = []
    if untagged:
        _, ctx = sample_contexts(task, untagged, generator, tagged=False)
        groups.append((ctx, *generate(base, ctx, task.horizon, task.eos_token, generator)))
    if tagged:
        tilted = solve(task, base, tilt_beta).policy()
        _, ctx = sample_contexts(task, tagged, generator, tagged=True)
        groups.append((ctx, *generate(tilted, ctx, task.horizon, task.eos_token, generator)))
    return groups


def tilt_beta(config: Config) -> float | None:
    """The beta of the tilt the tagged samples come from: ``reference.tilt_beta``, or else the
    run's ``train.beta`` (None in a config without the recipe defaults, whose trainer sets it)."""
    return config.reference.tilt_beta or config.train.beta


def run_sft_data(task, config: Config) -> tuple[list, torch.Generator]:
    """The SFT data of a run with ``reference.init = "sft"``, and the generator that drew it
    (seeded from ``train.seed``; the fine-tune goes on with it)."""
    ref = config.reference
    generator = torch.Generator().manual_seed(config.train.seed)
    groups = make_sft_data(task, ref.sft_samples, ref.tagged_samples, tilt_beta(config), generator)
    return groups, generator


def tagged_tokens(groups, config: Config) -> int:
    """Real tokens of the guide-tagged responses in :func:`run_sft_data`'s groups (the last)."""
    return int(groups[-1][2].sum()) if config.reference.tagged_samples else 0


def fine_tune_reference(base: TokenPolicy, task, config: Config) -> tuple[list[float], int]:
    """Fine-tune ``base`` on its run's SFT data; returns the losses and the tagged tokens."""
    groups, generator = run_sft_data(task, config)
    ref = config.reference
    losses = supervised_finetune(base, groups, ref.sft_epochs, ref.sft_batch_size, ref.sft_lr, generator)
    return losses, tagged_tokens(groups, config)


def group_batches(groups, batch_size: int):
    """One epoch's minibatches of :func:`make_sft_data`'s groups, for ``finetune_responses``:
    each group shuffled and split (a minibatch never mixes context lengths, so it needs no
    padding), then the minibatches shuffled."""

    def epoch(generator: torch.Generator):
        batches = []
        for ctx, resp, mask in groups:
            order = torch.randperm(ctx.shape[0], generator=generator)
            batches += [(ctx[i], resp[i], mask[i]) for i in order.split(batch_size)]
        for k in torch.randperm(len(batches), generator=generator).tolist():
            ctx, resp, mask = batches[k]
            yield torch.cat([ctx, resp], dim=1), None, ctx.shape[1], mask

    return epoch


def supervised_finetune(
    policy: TokenPolicy, groups, epochs: int, batch_size: int, lr: float, generator: torch.Generator
) -> list[float]:
    """Cross-entropy on the response tokens of ``groups``, in :func:`group_batches`' minibatches."""
    return finetune_responses(policy, group_batches(groups, batch_size), epochs, lr, generator)

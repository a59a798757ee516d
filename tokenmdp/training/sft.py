"""The supervised stage that builds a reference model "that knows good behaviour when
asked" (METHOD.md section 5): untagged samples from ``pi_base`` plus guide-tagged samples
from the tilted distribution ``pi_base * exp(R / beta) / Z``, which the exact solver gives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..mdp.solver import solve
from ..plugin.batch import response_nll
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


def supervised_finetune(
    policy: TokenPolicy, groups, epochs: int, batch_size: int, lr: float, generator: torch.Generator
) -> list[float]:
    """Cross-entropy on response tokens; minibatches never mix context lengths."""
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    losses = []
    policy.train()
    for _ in range(epochs):
        batches = []
        for ctx, resp, mask in groups:
            order = torch.randperm(ctx.shape[0], generator=generator)
            batches += [(ctx[i], resp[i], mask[i]) for i in order.split(batch_size)]
        for k in torch.randperm(len(batches), generator=generator).tolist():
            ctx, resp, mask = batches[k]
            loss = response_nll(policy, torch.cat([ctx, resp], dim=1), None, ctx.shape[1], mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses

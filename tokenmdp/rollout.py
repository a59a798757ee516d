"""Rollout records and batched sampling through the vector environment."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from .env import TokenVectorEnv
from .policies.base import TokenPolicy


@attrs.define
class RolloutBatch:
    """One step's responses. Per-token tensors are ``[batch, response_len]``;
    ``response_mask`` is 1 on real tokens (padding after EOS is 0)."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    rewards: Tensor
    prompt_index: Tensor
    logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    #: False when the env was run reward-free (no component required ``rewards``).
    rewards_observed: bool = True

    @property
    def size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def sequence_rewards(self) -> Tensor:
        return (self.rewards * self.response_mask).sum(1)

    def select(self, index: Tensor) -> "RolloutBatch":
        """Rows ``index`` of every tensor (for minibatches)."""
        return attrs.evolve(
            self,
            **{f.name: getattr(self, f.name)[index] for f in attrs.fields(type(self))
               if isinstance(getattr(self, f.name), Tensor)},
        )


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """The rows of several batches, in order, as one batch (tensor shapes must agree past
    the first dimension)."""
    if len(batches) == 1:
        return batches[0]
    tensors = {}
    for f in attrs.fields(RolloutBatch):
        values = [getattr(b, f.name) for b in batches]
        if isinstance(values[0], Tensor):
            shapes = {tuple(v.shape[1:]) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot concatenate batches: {f.name} shapes differ past dim 0: {sorted(shapes)}")
            tensors[f.name] = torch.cat(values)
    observed = {b.rewards_observed for b in batches}
    return attrs.evolve(batches[0], **tensors, rewards_observed=all(observed))


@torch.no_grad()
def generate(policy: TokenPolicy, context_ids: Tensor, horizon: int, eos_token: int | None,
             generator: torch.Generator, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Sample ``[B, horizon]`` responses (0-padded after EOS) and their 0/1 mask."""
    was_training = policy.training
    policy.eval()
    b = context_ids.shape[0]
    response = torch.zeros(b, horizon, dtype=torch.long)
    mask = torch.zeros(b, horizon)
    active = torch.ones(b, dtype=torch.bool)
    logits, state = policy.start(context_ids)
    for t in range(horizon):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        actions = torch.where(active, torch.multinomial(probs, 1, generator=generator).squeeze(1), 0)
        response[:, t] = actions
        mask[:, t] = active.float()
        if eos_token is not None:
            active = active & (actions != eos_token)
        if t + 1 == horizon or not bool(active.any()):
            break
        logits, state = policy.advance(state, actions)
    policy.train(was_training)
    return response, mask


@torch.no_grad()
def collect(policy: TokenPolicy, env: TokenVectorEnv, seed: int, generator: torch.Generator,
            temperature: float = 1.0) -> RolloutBatch:
    """One response per env: sample with the policy, then step the env with those tokens
    (which yields rewards, unless the env is reward-free)."""
    obs, info = env.reset(seed=seed)
    response, mask = generate(policy, obs["prompt"], env.task.horizon, env.task.eos_token, generator, temperature)
    rewards = torch.zeros_like(mask)
    for t in range(response.shape[1]):
        if bool(env.done.all()):
            break
        _, rewards[:, t], _, _, _ = env.step(response[:, t])
    return RolloutBatch(
        prompt_ids=obs["prompt"],
        prompt_mask=torch.ones_like(obs["prompt"]),
        response_ids=response,
        response_mask=mask,
        rewards=rewards * mask,
        prompt_index=info["prompt_index"],
        rewards_observed=env.compute_rewards,
    )


def response_logits(model: TokenPolicy, batch: RolloutBatch, prefix_ids: Tensor | None = None) -> Tensor:
    """``[B, T, V]`` logits of each response token's distribution under ``model``,
    optionally with a conditioning prefix in front of the prompt (one forward pass)."""
    ids, mask = batch.prompt_ids, batch.prompt_mask
    if prefix_ids is not None:
        prefix = prefix_ids.view(1, -1).expand(ids.shape[0], -1) if prefix_ids.dim() == 1 else prefix_ids
        ids = torch.cat([prefix, ids], dim=1)
        mask = torch.cat([torch.ones_like(prefix), mask], dim=1)
    full_ids = torch.cat([ids, batch.response_ids], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(batch.response_ids)], dim=1)
    logits = model(full_ids, full_mask)
    start = ids.shape[1] - 1
    return logits[:, start : start + batch.response_ids.shape[1]]


def token_logprobs(model: TokenPolicy, batch: RolloutBatch, prefix_ids: Tensor | None = None,
                   return_logits: bool = False):
    """Log-prob of each taken response token under ``model`` (0 on padding)."""
    logits = response_logits(model, batch, prefix_ids).float()
    logp = torch.log_softmax(logits, dim=-1)
    taken = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask
    return (taken, logits) if return_logits else taken

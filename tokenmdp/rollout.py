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
    #: Leading columns of ``prompt_ids`` kept in front of a conditioning prefix: 1 for text
    #: prompts laid out ``[BOS, pad..., prompt]`` (the guide goes after BOS), else 0.
    prefix_offset: int = 0

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


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """The logits of the sampling distribution: divided by ``temperature``, then every token
    outside the ``top_k`` most likely and outside the smallest set whose probability reaches
    ``top_p`` (nucleus) set to -inf. The most likely token always stays."""
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
        drop = before >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(policy: TokenPolicy, context_ids: Tensor, horizon: int, eos_token: int | None,
             generator: torch.Generator, temperature: float = 1.0, attention_mask: Tensor | None = None,
             top_k: int | None = None, top_p: float | None = None) -> tuple[Tensor, Tensor]:
    """Sample ``[B, horizon]`` responses (0-padded after EOS) and their 0/1 mask.

    ``attention_mask`` marks real context tokens (left padding = 0); decoding is
    incremental (KV-cached for HF models). ``temperature``/``top_k``/``top_p`` shape the
    sampling distribution only (:func:`filter_logits`)."""
    was_training = policy.training
    policy.eval()
    b = context_ids.shape[0]
    response = torch.zeros(b, horizon, dtype=torch.long)
    mask = torch.zeros(b, horizon)
    active = torch.ones(b, dtype=torch.bool)
    logits, state = policy.start(context_ids, attention_mask)
    for t in range(horizon):
        probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
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
            temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
            prompt_index: Tensor | None = None) -> RolloutBatch:
    """One response per env: sample with the policy, then step the env with those tokens
    (which yields rewards, unless the env is reward-free). ``prompt_index`` fixes the
    prompts (else the env draws them)."""
    obs, info = env.reset(seed=seed, options=None if prompt_index is None else {"prompt_index": prompt_index})
    prompt_mask = obs["prompt_mask"].long() if "prompt_mask" in obs else torch.ones_like(obs["prompt"])
    response, mask = generate(policy, obs["prompt"], env.task.horizon, env.task.eos_token, generator, temperature,
                              attention_mask=prompt_mask, top_k=top_k, top_p=top_p)
    rewards = torch.zeros_like(mask)
    for t in range(response.shape[1]):
        if bool(env.done.all()):
            break
        _, rewards[:, t], _, _, _ = env.step(response[:, t])
    return RolloutBatch(
        prompt_ids=obs["prompt"],
        prompt_mask=prompt_mask,
        response_ids=response,
        response_mask=mask,
        rewards=rewards * mask,
        prompt_index=info["prompt_index"],
        rewards_observed=env.compute_rewards,
        prefix_offset=env.task.prefix_offset,
    )


def response_logits(model: TokenPolicy, batch: RolloutBatch, prefix_ids: Tensor | None = None) -> Tensor:
    """``[B, T, V]`` logits of each response token's distribution under ``model``,
    optionally with a conditioning prefix in front of the prompt (one forward pass).

    The prefix goes after the first ``batch.prefix_offset`` prompt columns (a pinned BOS
    of text prompts), else in front of everything. Models that can (HF causal LMs)
    compute the output layer on the response positions only."""
    ids, mask = batch.prompt_ids, batch.prompt_mask
    if prefix_ids is not None:
        prefix = prefix_ids.view(1, -1).expand(ids.shape[0], -1) if prefix_ids.dim() == 1 else prefix_ids
        k = batch.prefix_offset
        ids = torch.cat([ids[:, :k], prefix, ids[:, k:]], dim=1)
        mask = torch.cat([mask[:, :k], torch.ones_like(prefix), mask[:, k:]], dim=1)
    full_ids = torch.cat([ids, batch.response_ids], dim=1)
    full_mask = torch.cat([mask.to(batch.response_ids.dtype), torch.ones_like(batch.response_ids)], dim=1)
    t = batch.response_ids.shape[1]
    if getattr(model, "supports_logits_to_keep", False):
        return model(full_ids, full_mask, logits_to_keep=t + 1)[:, :t]
    logits = model(full_ids, full_mask)
    start = ids.shape[1] - 1
    return logits[:, start : start + t]


def token_logprobs(model: TokenPolicy, batch: RolloutBatch, prefix_ids: Tensor | None = None,
                   return_logits: bool = False):
    """Log-prob of each taken response token under ``model`` (0 on padding)."""
    logits = response_logits(model, batch, prefix_ids).float()
    logp = torch.log_softmax(logits, dim=-1)
    taken = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask
    return (taken, logits) if return_logits else taken

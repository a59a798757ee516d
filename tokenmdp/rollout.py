"""Rollout records and batched sampling through the vector environment."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from .devices import module_device
from .env import TokenVectorEnv
from .ops import at_least_float32
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
    #: ``[batch]``: rows with one value are the responses to one draw of a prompt
    #: (``train.samples_per_prompt > 1``); None: the batch was not sampled in groups.
    group_index: Tensor | None = None

    @property
    def size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def sequence_rewards(self) -> Tensor:
        return (self.rewards * self.response_mask).sum(1)

    @property
    def groups(self) -> Tensor:
        """``[batch]`` group of each response, for group baselines (RLOO, GRPO): its draw
        of a prompt when sampled in groups, else its prompt (every response to a prompt)."""
        return self.group_index if self.group_index is not None else self.prompt_index

    @property
    def device(self) -> torch.device:
        return self.response_ids.device

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in attrs.fields(type(self))
                if isinstance(getattr(self, f.name), Tensor)}

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """The batch with every tensor on ``device`` (itself when they already are)."""
        device, tensors = torch.device(device), self._tensors()
        if all(t.device == device for t in tensors.values()):
            return self
        return attrs.evolve(self, **{name: t.to(device) for name, t in tensors.items()})

    def select(self, index: Tensor) -> "RolloutBatch":
        """Rows ``index`` of every tensor (for minibatches)."""
        return attrs.evolve(self, **{name: t[index] for name, t in self._tensors().items()})


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
    groups = [b.group_index for b in batches]
    if all(g is not None for g in groups):  # each sub-batch's groups stay its own
        offsets = torch.tensor([0, *[int(g.max()) + 1 for g in groups[:-1]]]).cumsum(0).tolist()
        tensors["group_index"] = torch.cat([g + k for g, k in zip(groups, offsets)])
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


def sampling_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with ``seed`` on ``device``, where sampling draws its tokens."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def _draw(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row. A generator on another device than ``probs`` (a CPU generator for
    a GPU policy) draws on its own device, so every caller's seeded stream works anywhere."""
    if generator.device == probs.device:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    drawn = torch.multinomial(probs.to(generator.device), 1, generator=generator)
    return drawn.squeeze(1).to(probs.device)


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
    device = module_device(policy)
    context_ids = context_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    b = context_ids.shape[0]
    response = torch.zeros(b, horizon, dtype=torch.long, device=device)
    mask = torch.zeros(b, horizon, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)
    logits, state = policy.start(context_ids, attention_mask)
    for t in range(horizon):
        probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
        actions = torch.where(active, _draw(probs, generator), 0)
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
            prompt_index: Tensor | None = None, samples_per_prompt: int = 1) -> RolloutBatch:
    """One response per env: sample with the policy, then step the env with those tokens
    (which yields rewards, unless the env is reward-free). ``prompt_index`` fixes the
    prompts (else the env draws them). With ``samples_per_prompt = G`` the env draws
    ``num_envs / G`` prompts and each is answered G times, by consecutive rows, numbered
    in ``group_index`` (given prompts are grouped G rows at a time, in order).

    The env and the task live on the CPU; the batch is returned on the policy's device."""
    options = {} if prompt_index is None else {"prompt_index": prompt_index}
    if samples_per_prompt != 1:
        options["samples_per_prompt"] = samples_per_prompt
    obs, info = env.reset(seed=seed, options=options or None)
    prompt_mask = obs["prompt_mask"].long() if "prompt_mask" in obs else torch.ones_like(obs["prompt"])
    response, mask = generate(policy, obs["prompt"], env.task.horizon, env.task.eos_token, generator, temperature,
                              attention_mask=prompt_mask, top_k=top_k, top_p=top_p)
    actions = response.cpu()
    rewards = torch.zeros(actions.shape)
    for t in range(actions.shape[1]):
        if bool(env.done.all()):
            break
        _, rewards[:, t], _, _, _ = env.step(actions[:, t])
    device = response.device
    return RolloutBatch(
        prompt_ids=obs["prompt"].to(device),
        prompt_mask=prompt_mask.to(device),
        response_ids=response,
        response_mask=mask,
        rewards=rewards.to(device) * mask,
        prompt_index=info["prompt_index"].to(device),
        rewards_observed=env.compute_rewards,
        prefix_offset=env.task.prefix_offset,
        group_index=info["group_index"].to(device) if "group_index" in info else None,
    )


def response_logits(model: TokenPolicy, batch: RolloutBatch, prefix_ids: Tensor | None = None) -> Tensor:
    """``[B, T, V]`` logits of each response token's distribution under ``model``,
    optionally with a conditioning prefix in front of the prompt (one forward pass).

    The prefix goes after the first ``batch.prefix_offset`` prompt columns (a pinned BOS
    of text prompts), else in front of everything. Models that can (HF causal LMs)
    compute the output layer on the response positions only."""
    ids, mask = batch.prompt_ids, batch.prompt_mask
    if prefix_ids is not None:
        prefix_ids = prefix_ids.to(ids.device)
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
    logits = at_least_float32(response_logits(model, batch, prefix_ids))
    logp = torch.log_softmax(logits, dim=-1)
    taken = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask
    return (taken, logits) if return_logits else taken

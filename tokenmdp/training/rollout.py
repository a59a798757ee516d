"""Sampling responses: the sampling distribution, batched (KV-cached) generation, and one
step's batch collected through the vector environment."""

from __future__ import annotations

import torch
from torch import Tensor

from ..devices import module_device
from ..mdp.env import TokenVectorEnv
from ..plugin.batch import RolloutBatch, concat_batches, response_logits, token_logprobs  # noqa: F401 (old home)
from ..plugin.ops import at_least_float32
from ..plugin.sampling import Samples, SamplingBackend, SamplingParams
from ..policies.base import TokenPolicy
from ..policies.hf import HFCausalLMPolicy


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """The logits of the sampling distribution: divided by ``temperature``, then every token
    outside the ``top_k`` most likely and outside the smallest set whose probability reaches
    ``top_p`` (nucleus) set to -inf. The most likely token always stays."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
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


#: How a token is drawn from the sampling distribution (``train.sampler``).
SAMPLERS = ("multinomial", "inverse-cdf")


def _draw(probs: Tensor, generator: torch.Generator, sampler: str = "multinomial") -> Tensor:
    """One token per row. A generator on another device than ``probs`` (a CPU generator for
    a GPU policy) draws on its own device, so every caller's seeded stream works anywhere.

    ``multinomial``: ``torch.multinomial`` (on the CPU it draws an exponential variate per
    vocabulary entry: 0.6 ms for 32 rows of 512). ``inverse-cdf``: one uniform per row,
    placed in the row's cumulative distribution (float64): the same distribution, a
    different stream of draws, 13x cheaper there (docs/performance.md). A token of
    probability 0 is never drawn by either."""
    device = generator.device
    if sampler == "inverse-cdf":
        cdf = probs.to(device, torch.float64).cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=device, dtype=torch.float64) * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, u, right=True).squeeze(1)
        # u rounds up to the total only with probability ~2^-53; the likeliest token then
        drawn = torch.where(drawn < cdf.shape[1], drawn, probs.argmax(-1).to(device))
        return drawn.to(probs.device)
    if device == probs.device:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    drawn = torch.multinomial(probs.to(device), 1, generator=generator)
    return drawn.squeeze(1).to(probs.device)


@torch.no_grad()
def generate(
    policy: TokenPolicy,
    context_ids: Tensor,
    horizon: int,
    eos_token: int | None,
    generator: torch.Generator,
    temperature: float = 1.0,
    attention_mask: Tensor | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    return_logprobs: bool = False,
    sampler: str = "multinomial",
    prompt_groups: int = 1,
):
    """Sample ``[B, horizon]`` responses (0-padded after EOS) and their 0/1 mask.

    ``attention_mask`` marks real context tokens (left padding = 0); decoding is
    incremental (KV-cached for HF models). ``temperature``/``top_k``/``top_p`` shape the
    sampling distribution only (:func:`filter_logits`). With ``return_logprobs`` also the
    ``[B, horizon]`` log-probs of the sampled tokens under the policy itself (temperature
    1, unfiltered; 0 on padding), read off the sampling pass's logits. ``sampler``: how
    a token is drawn (:data:`SAMPLERS`). With ``prompt_groups = G`` every G consecutive
    rows hold the same prompt: the prompt is read once per group and its decoding state
    repeated (``reindex_state``), instead of G times."""
    was_training = policy.training
    policy.eval()
    device = module_device(policy)
    context_ids = context_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    b = context_ids.shape[0]
    response = torch.zeros(b, horizon, dtype=torch.long, device=device)
    mask = torch.zeros(b, horizon, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)
    logprobs = torch.zeros(b, horizon, device=device) if return_logprobs else None
    if prompt_groups > 1:
        first = torch.arange(0, b, prompt_groups, device=device)
        mask_first = None if attention_mask is None else attention_mask[first]
        logits, state = policy.start(context_ids[first], mask_first)
        repeat = torch.arange(first.numel(), device=device).repeat_interleave(prompt_groups)
        logits, state = logits[repeat], policy.reindex_state(state, repeat)
    else:
        logits, state = policy.start(context_ids, attention_mask)
    for t in range(horizon):
        probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
        actions = torch.where(active, _draw(probs, generator, sampler), 0)
        response[:, t] = actions
        mask[:, t] = active.float()
        if logprobs is not None:
            own = torch.log_softmax(at_least_float32(logits), dim=-1).gather(1, actions[:, None]).squeeze(1)
            logprobs[:, t] = own * mask[:, t]
        if eos_token is not None:
            active = active & (actions != eos_token)
        if t + 1 == horizon or not bool(active.any()):
            break
        logits, state = policy.advance(state, actions)
    policy.train(was_training)
    return (response, mask, logprobs) if return_logprobs else (response, mask)


def generate_samples(
    policy: TokenPolicy,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    horizon: int,
    eos_token: int | None,
    generator: torch.Generator,
    params: SamplingParams,
    return_logprobs: bool = False,
) -> Samples:
    """:func:`generate` behind the :class:`SamplingBackend` signature (the ``torch`` backend)."""
    response, mask, *logprobs = generate(
        policy,
        prompt_ids,
        horizon,
        eos_token,
        generator,
        params.temperature,
        attention_mask=prompt_mask,
        top_k=params.top_k,
        top_p=params.top_p,
        return_logprobs=return_logprobs,
        sampler=params.sampler,
        prompt_groups=params.prompt_groups,
    )
    return Samples(response, mask, logprobs[0] if logprobs else None)


@torch.no_grad()
def collect(
    policy: TokenPolicy,
    env: TokenVectorEnv,
    seed: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    prompt_index: Tensor | None = None,
    samples_per_prompt: int = 1,
    score: bool = False,
    sampler: str = "multinomial",
    backend: SamplingBackend | None = None,
) -> RolloutBatch:
    """One response per env: sample with the policy, then step the env with those tokens
    (which yields rewards, unless the env is reward-free). ``prompt_index`` fixes the
    prompts (else the env draws them). With ``samples_per_prompt = G`` the env draws
    ``num_envs / G`` prompts and each is answered G times, by consecutive rows, numbered
    in ``group_index`` (given prompts are grouped G rows at a time, in order).

    With ``score`` (only meaningful at temperature 1 without top-k/top-p, when the sampling
    distribution is the policy's own) ``batch.logprobs`` is filled from the sampling pass,
    which saves a forward pass over the whole batch.

    ``backend`` samples (default: :func:`generate`, the ``torch`` backend). The env and
    the task live on the CPU; the batch is returned on the policy's device."""
    options = {} if prompt_index is None else {"prompt_index": prompt_index}
    if samples_per_prompt != 1:
        options["samples_per_prompt"] = samples_per_prompt
    obs, info = env.reset(seed=seed, options=options or None)
    prompt_mask = obs["prompt_mask"].long() if "prompt_mask" in obs else torch.ones_like(obs["prompt"])
    # HF models read a group's shared prompt once; the toy networks keep their exact numbers
    groups = samples_per_prompt if isinstance(policy, HFCausalLMPolicy) else 1
    params = SamplingParams(temperature, top_k, top_p, sampler, prompt_groups=groups)
    sample = backend.sample if backend is not None else generate_samples
    drawn = sample(policy, obs["prompt"], prompt_mask, env.task.horizon, env.task.eos_token, generator, params, score)
    response, mask = drawn.response, drawn.mask
    actions = response.cpu()
    rewards = env.play(actions)
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
        logprobs=drawn.logprobs if score else None,
    )

"""Sampling responses: the sampling distribution, batched (KV-cached) generation, stop
strings, and one step's batch collected through the vector environment, with the step's
seeds."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .. import sharding
from ..devices import module_device
from ..errors import ConfigError
from ..mdp.env import TokenVectorEnv
from ..plugin.batch import RolloutBatch, concat_batches
from ..plugin.ops import at_least_float32
from ..plugin.sampling import Samples, SamplingBackend, SamplingParams
from ..policies.base import TokenPolicy
from ..policies.hf import HFCausalLMPolicy
from . import inverse_cdf


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
    placed in the row's cumulative distribution (float64, :mod:`.inverse_cdf`): the same
    distribution, a different stream of draws, 13x cheaper there (docs/performance.md). A
    token of probability 0 is never drawn by either."""
    device = generator.device
    if sampler == "inverse-cdf":
        u = torch.rand(probs.shape[0], 1, generator=generator, device=device, dtype=torch.float64)
        drawn = inverse_cdf.draw(probs.to(device), u)
        # u rounds up to the total only with probability ~2^-53; the likeliest token then
        # (looked for only then: an argmax over Gemma's 262k entries is ~1.5 ms a token)
        over = drawn >= probs.shape[1]
        if bool(over.any()):
            drawn = torch.where(over, probs.argmax(-1).to(device), drawn)
        return drawn.to(probs.device)
    if device == probs.device:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    drawn = torch.multinomial(probs.to(device), 1, generator=generator)
    return drawn.squeeze(1).to(probs.device)


class StopStrings:
    """``train.stop_strings`` of a text task: a row ends after the token that makes its
    decoded completion contain one of ``strings``, and that token stays (transformers'
    ``stop_strings``, which also stop *after* the token that completes a string).

    Rows are checked after every token, so a string is found at the token that completes
    it; only the last :attr:`window` tokens are decoded (a whole completion per token
    would be quadratic in its length)."""

    #: Tokens decoded ahead of those a string can span: the first tokens of a window may
    #: decode unlike in context (a dropped leading space, half a UTF-8 character).
    context = 16

    def __init__(self, strings, tokenizer):
        self.strings = tuple(strings)
        self.decode = tokenizer.decode
        # a token decodes to at least one byte (bar specials: the context covers a few), so a
        # string of n bytes spans at most n tokens
        self.window = max(len(s.encode("utf-8")) for s in self.strings) + self.context

    def found(self, response: Tensor, rows: Tensor) -> Tensor:
        """``[B]`` bool: which of ``rows`` (``[B]`` bool) have a stop string in their
        completion so far, ``response`` (``[B, t]``, no padding in those rows)."""
        hit = torch.zeros_like(rows)
        index = rows.nonzero().squeeze(1)
        if index.numel() == 0:
            return hit
        texts = [self.decode(ids) for ids in response[index, -self.window :].tolist()]  # one copy off the device
        hit[index] = torch.tensor([any(s in text for s in self.strings) for text in texts], device=hit.device)
        return hit


@sharding.whole_policy
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
    stop: StopStrings | None = None,
):
    """Sample ``[B, horizon]`` responses (0-padded after EOS) and their 0/1 mask.

    ``attention_mask`` marks real context tokens (left padding = 0); decoding is
    incremental (KV-cached for HF models). ``temperature``/``top_k``/``top_p`` shape the
    sampling distribution only (:func:`filter_logits`). With ``return_logprobs`` also the
    ``[B, horizon]`` log-probs of the sampled tokens under the policy itself (temperature
    1, unfiltered; 0 on padding), read off the sampling pass's logits. ``sampler``: how
    a token is drawn (:data:`SAMPLERS`). With ``prompt_groups = G`` every G consecutive
    rows hold the same prompt: the prompt is read once per group and its decoding state
    repeated (``reindex_state``), instead of G times. ``stop``: rows also end after the
    token that completes a stop string (:class:`StopStrings`)."""
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
        if logprobs is not None:  # 0 on padding: multiplied by the mask once, after the loop
            logprobs[:, t] = torch.log_softmax(at_least_float32(logits), dim=-1).gather(1, actions[:, None]).squeeze(1)
        if eos_token is not None:
            active = active & (actions != eos_token)
        if stop is not None:
            active = active & ~stop.found(response[:, : t + 1], active)
        if t + 1 == horizon or not bool(active.any()):
            break
        logits, state = policy.advance(state, actions)
    policy.train(was_training)
    if logprobs is not None:
        logprobs *= mask
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
    stop: StopStrings | None = None,
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
        stop=stop,
    )
    return Samples(response, mask, logprobs[0] if logprobs else None)


class StopStringSampling(SamplingBackend):
    """The ``torch`` backend with ``train.stop_strings``: :func:`generate` ending rows at
    the strings too. The trainer's collection and its sampled evaluation both sample
    through it, so both stop."""

    name = "torch"

    def __init__(self, config, stop: StopStrings):
        super().__init__(config)
        self.stop = stop

    def sample(self, policy, prompt_ids, prompt_mask, horizon, eos_token, generator, params, return_logprobs=False):
        return generate_samples(
            policy, prompt_ids, prompt_mask, horizon, eos_token, generator, params, return_logprobs, self.stop
        )


def with_stop_strings(backend: SamplingBackend, config, task) -> SamplingBackend:
    """``backend``, ending responses at ``config.train.stop_strings`` as well when there are
    any; a task or backend that cannot is a ConfigError naming the key."""
    strings = config.train.stop_strings
    if not strings:
        return backend
    if task.tokenizer is None:
        raise ConfigError(
            f"train.stop_strings needs a text task, whose tokenizer decodes the completions; env {config.env['id']!r} "
            "has token ids only: unset train.stop_strings"
        )
    if task.eos_token is None:
        raise ConfigError(
            "train.stop_strings ends a response as EOS does, so it needs the task's EOS token: "
            "set env.stop_at_eos = true, or unset train.stop_strings"
        )
    if backend.name != "torch":
        raise ConfigError(
            f"train.stop_strings: sampling backend {backend.name!r} does not stop at strings; "
            'use train.sampling_backend = "torch" or unset train.stop_strings'
        )
    return StopStringSampling(backend.config, StopStrings(strings, task.tokenizer))


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
    rows, lengths = _stopped_early(actions, mask.cpu(), env.task)
    if rows is not None:
        # The env ends a response at EOS or at the horizon only, so a row a stop string ended
        # is played with EOS after it: the env scores the response it would score at EOS
        # (a text task's completion leaves EOS out) and pays on the EOS, which is padding
        # here, so that reward moves onto the row's last token.
        actions = actions.clone()
        actions[rows, lengths] = env.task.eos_token
    rewards = env.play(actions)
    if rows is not None:
        rewards[rows, lengths - 1] += rewards[rows, lengths]
        rewards[rows, lengths] = 0.0
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


def _stopped_early(actions: Tensor, mask: Tensor, task) -> tuple[Tensor | None, Tensor | None]:
    """The rows that ended before the horizon without EOS (by a stop string), and their
    lengths; ``(None, None)`` when there are none."""
    if task.eos_token is None:
        return None, None
    lengths = mask.sum(1).long()
    last = actions.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    early = (lengths > 0) & (lengths < actions.shape[1]) & (last != task.eos_token)
    if not bool(early.any()):
        return None, None
    rows = early.nonzero().squeeze(1)
    return rows, lengths[rows]


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Each step's sampling seed depends only on (seed, step) (and the rank of a distributed
    run), so a resumed run replays exactly. Rank 0 uses the single-process seed."""
    base = (seed * 1_000_003 + step * 7_919) % (2**63)
    return base if rank == 0 else (base + rank * 0x9E3779B97F4A7C15) % (2**63)


def step_generators(seed: int, step: int, ranks: Iterable[int]) -> list[tuple[int, torch.Generator]]:
    """``(seed, generator)`` of each batch sampled at ``step``, one per rank of ``ranks``
    (CPU generators: the components' shuffles go on with the first)."""
    seeds = [step_seed(seed, step, rank) for rank in ranks]
    return [(s, torch.Generator().manual_seed(s)) for s in seeds]


def collect_step(
    policy: TokenPolicy,
    env: TokenVectorEnv,
    generators: list[tuple[int, torch.Generator]],
    train,
    device: torch.device,
    score: bool,
    sampler: str,
    backend: SamplingBackend,
) -> RolloutBatch:
    """One step's batch: a sub-batch per ``(seed, generator)`` of :func:`step_generators`
    (several where ``train.simulate_world_size`` stands in for the ranks), concatenated; the
    sampling options are ``train``'s (``[train]``). On the CPU one generator samples and then
    shuffles; a policy on another ``device`` samples with its own generator (same seed), and
    the CPU one is left for the components."""
    batches = []
    for seed, generator in generators:
        sampling = generator if device.type == "cpu" else sampling_generator(seed, device)
        batches.append(
            collect(
                policy,
                env,
                seed=seed,
                generator=sampling,
                temperature=train.temperature,
                top_k=train.top_k,
                top_p=train.top_p,
                samples_per_prompt=train.samples_per_prompt,
                score=score,
                sampler=sampler,
                backend=backend,
            )
        )
    try:
        return concat_batches(batches)
    except ValueError as exc:
        raise ConfigError(f"train.simulate_world_size: {exc}") from None

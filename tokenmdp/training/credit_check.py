"""``train.score_credit = N`` on a text run: at the end, the run's own token credit on N
fresh responses against the Monte-Carlo ground truth (:mod:`.mc_credit`), for
``summary.json``. Toy runs score every step against the exact A* instead (``credit_corr``)."""

from __future__ import annotations

import torch

from ..plugin.batch import token_logprobs
from ..plugin.ops import correlation_interval, masked_correlation
from .mc_credit import monte_carlo_credit
from .rollout import collect


@torch.no_grad()
def credit_against_monte_carlo(trainer, responses: int, k: int, seed: int) -> dict[str, object]:
    """The correlation of the run's estimator + advantage constructor (their live state,
    unwhitened or not: whitening is affine and leaves it unchanged) with the Monte-Carlo
    ``A^pi`` of the trained policy, over every token of ``responses`` responses sampled in
    groups of ``train.samples_per_prompt``, with a 95% bootstrap interval over responses."""
    cfg, task = trainer.config, trainer.task
    group = cfg.train.samples_per_prompt
    count = -(-responses // group) * group  # whole groups: group estimators compare within them
    env = trainer.make_env(count)
    generator = torch.Generator().manual_seed(seed)
    batch = collect(trainer.policy, env, seed=seed, generator=generator, samples_per_prompt=group)
    ctx, run = trainer.ctx, trainer.composition
    # the output layer in chunks (train.logit_chunk), as the training steps score
    batch.logprobs = token_logprobs(trainer.policy, batch, chunk=ctx.logit_chunk)
    batch.ref_logprobs = token_logprobs(trainer.reference, batch, chunk=ctx.logit_chunk)
    signals = dict(run.estimator.estimate(batch, ctx))
    credit = run.advantage.construct(batch, signals, ctx)["advantages"].double().cpu()
    truth = monte_carlo_credit(trainer.policy, trainer.reference, task, batch, ctx.beta, k, generator)
    mask = batch.response_mask.double().cpu()
    low, high = correlation_interval(credit, truth.advantages, mask, seed=seed)
    return {
        "credit_corr_mc": masked_correlation(credit, truth.advantages, mask),
        "credit_corr_mc_interval": [low, high],
        "credit_corr_mc_k": k,
        "credit_corr_mc_responses": count,
        "credit_corr_mc_sampled_tokens": truth.sampled_tokens,
    }

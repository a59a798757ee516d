"""Monte-Carlo credit: an estimate of ``A(s_t, a_t)`` at every token of sampled responses,
under a policy and the task's KL-regularised objective, from K continuations of every
prefix (VinePPO's rollouts), with a standard error per token. It is the ground truth of
token credit on text, where no exact ``A*`` exists; on toy tasks the tests check it
against the solver's.

With ``lr_k = log pi(a_k|s_k) - log pi_ref(a_k|s_k)`` and ``r_k`` the task's per-token
rewards of the whole completed response (``task.response_rewards``)::

    G_j = sum_{k >= j} (r_k - beta * lr_k)       return from prefix length j
    V(s_j) = E_pi[G_j | s_j]                      G_T = 0 at the end of the response
    Q(s_t, a_t) = E_pi[r_t + G_{t+1} | s_t, a_t]  the same continuations as V(s_{t+1})
    A(s_t, a_t) = Q - V

At ``pi = pi_ref`` this is the plain ``A^{pi_ref}``; at ``pi = pi*`` it is the solver's
``A* = Q* - V*`` (METHOD.md section 2), and exactly so: ``r_t - beta log pi*/pi_ref =
V*(s_t) - V*(s_{t+1})`` telescopes, so every continuation of ``s_j`` returns ``V*(s_j)``.
Sample means estimate ``Q`` and ``V`` without bias; those of one token come from two
independent sets of continuations, so the standard error is ``sqrt(var_Q / K + var_V / K)``
(a sample one: a continuation of small probability that all K samples miss leaves it
too small, 0 when the K returns agree).

Cost: a response of ``T`` tokens samples K continuations at each prefix length
``j = 0..T-1`` (``j = T`` is terminal), each up to ``horizon - j`` tokens:
``K * sum_j (horizon - j)`` sampled tokens at most (:func:`needed_tokens`).
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import Tensor

from ..devices import module_device
from ..errors import ConfigError
from ..plugin.batch import RolloutBatch, token_logprobs
from ..plugin.chunked import auto_chunk
from ..policies.base import TokenPolicy
from .rollout import generate

#: Continuations sampled by one ``generate`` call at most: memory (a decoding state, a KV
#: cache for an HF model, per continuation) stays bounded whatever the batch and K.
MAX_SEQUENCES = 256


@attrs.frozen
class MonteCarloCredit:
    """Monte-Carlo ``A(s_t, a_t)`` of a batch's response tokens."""

    #: ``[B, T]`` float64 estimate of ``A(s_t, a_t)``; 0 on padding and on rows not estimated.
    advantages: Tensor
    #: ``[B, T]`` float64 standard error of each estimate (0 where there is none).
    stderr: Tensor
    #: ``[B]`` bool: the rows estimated (those past the budget are not).
    estimated: Tensor
    #: Continuations per prefix.
    k: int
    #: Tokens sampled in all (at most the sum of :func:`needed_tokens` of the estimated rows).
    sampled_tokens: int


def needed_tokens(batch: RolloutBatch, horizon: int, k: int) -> list[int]:
    """Worst-case sampled tokens of each row: ``k * sum_{j=0}^{T-1} (horizon - j)`` for a
    response of ``T`` tokens (every continuation running to the horizon)."""
    lengths = batch.response_mask.sum(1).long().tolist()
    return [k * (n * horizon - n * (n - 1) // 2) for n in lengths]


def _rows_within(cost: list[int], budget: int | None, k: int, first_length: int, horizon: int) -> int:
    """How many leading rows fit ``budget`` sampled tokens (all of them without one)."""
    if budget is None:
        return len(cost)
    rows, total = 0, 0
    for c in cost:
        if total + c > budget:
            break
        rows, total = rows + 1, total + c
    if rows == 0 and cost:
        raise ConfigError(
            f"--budget {budget} sampled tokens is too small for one Monte-Carlo estimate: response 0 needs "
            f"up to {cost[0]:,} (K = {k} continuations at each of {first_length} prefixes, up to {horizon} - j "
            "tokens after a prefix of j)"
        )
    return rows


def _continuations(
    policy: TokenPolicy,
    reference: TokenPolicy,
    task,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prompt_index: Tensor,
    prefix: Tensor,
    beta: float,
    k: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, int]:
    """K continuations of each of ``n`` contexts ``prompt + prefix`` (CPU tensors, prefix
    ``[n, j]``): ``G_j`` ``[n, k]``, the reward ``r_{j-1}`` of the prefix's last token read
    off each completed response ``[n, k]`` (0 when ``j = 0``), and the tokens sampled."""
    n, j = prefix.shape
    ids = torch.cat([prompt_ids, prefix], 1).repeat_interleave(k, 0)
    mask = torch.cat([prompt_mask, torch.ones_like(prefix, dtype=prompt_mask.dtype)], 1).repeat_interleave(k, 0)
    rows = prompt_index.repeat_interleave(k, 0)
    cont, cont_mask, logp = generate(
        policy, ids, task.horizon - j, task.eos_token, generator, attention_mask=mask, return_logprobs=True
    )
    # the reference scores the continuation in one forward, its context as the "prompt"
    device = module_device(reference)
    scored = RolloutBatch(
        prompt_ids=ids.to(device),
        prompt_mask=mask.to(device),
        response_ids=cont.to(device),
        response_mask=cont_mask.to(device),
        rewards=torch.zeros(cont.shape, device=device),
        prompt_index=rows.to(device),
    )
    ref_logp = token_logprobs(reference, scored, chunk=auto_chunk(task.vocab_size))  # never the whole logits
    cont, cont_mask = cont.cpu(), cont_mask.cpu()
    kl = ((logp.cpu().double() - ref_logp.cpu().double()) * cont_mask).sum(1)
    # rewards of the whole completed response: a text reward may depend on every token
    full = torch.cat([prefix.repeat_interleave(k, 0), cont], 1)
    full_mask = torch.cat([torch.ones(n * k, j, dtype=cont_mask.dtype), cont_mask], 1)
    rewards = _rewards(task, rows, full, full_mask)
    g = rewards[:, j:].sum(1) - beta * kl
    last = rewards[:, j - 1] if j else torch.zeros_like(g)
    return g.view(n, k), last.view(n, k), int(cont_mask.sum())


def _rewards(task, prompt_index: Tensor, response: Tensor, mask: Tensor) -> Tensor:
    """``[N, T]`` float64 per-token rewards of whole responses; 0 for a reward-free task,
    whose objective is the KL term alone."""
    if not task.has_reward:
        return torch.zeros(response.shape, dtype=torch.float64)
    return task.response_rewards(prompt_index, response, mask).double() * mask


@torch.no_grad()
def monte_carlo_credit(
    policy: TokenPolicy,
    reference: TokenPolicy,
    task,
    batch: RolloutBatch,
    beta: float,
    k: int,
    generator: torch.Generator,
    budget: int | None = None,
) -> MonteCarloCredit:
    """Monte-Carlo ``A(s_t, a_t)`` under ``policy`` of every response token of ``batch``
    (its ``prompt_ids``, ``prompt_mask``, ``response_ids``, ``response_mask`` and
    ``prompt_index``), for the task's reward less ``beta`` times the log-ratio to
    ``reference``, from ``k`` continuations (temperature 1, up to ``task.horizon``, ending
    at ``task.eos_token``) of every prefix.

    Rows are estimated in order while the sum of their worst-case costs
    (:func:`needed_tokens`) fits ``budget`` sampled tokens (None: every row); a budget
    too small for row 0 is a one-line ConfigError naming what it needs. Deterministic
    for a fixed ``generator``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(
            f"Monte-Carlo credit needs K >= 2 continuations per prefix (its standard error is a sample variance); "
            f"got K = {k!r}"
        )
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta >= 0):
        raise ConfigError(f"Monte-Carlo credit: beta must be a finite number >= 0 (got {beta!r})")
    lengths = batch.response_mask.sum(1).long().cpu()
    cost = needed_tokens(batch, task.horizon, k)
    n = _rows_within(cost, budget, k, int(lengths[0]) if len(lengths) else 0, task.horizon)
    b, width = batch.response_ids.shape
    q_mean, q_var, v_mean, v_var = (torch.zeros(b, width, dtype=torch.float64) for _ in range(4))
    prompt_ids, prompt_mask = batch.prompt_ids.cpu(), batch.prompt_mask.cpu()
    prompt_index, response, mask = batch.prompt_index.cpu(), batch.response_ids.cpu(), batch.response_mask.cpu()
    was_training = reference.training
    reference.eval()  # no dropout in the reference's scores
    sampled = 0
    try:
        if n:
            # j = T is terminal (G_T = 0): Q of the last token is its own reward, no sampling
            own = _rewards(task, prompt_index[:n], response[:n], mask[:n])
            ended = (lengths[:n] > 0).nonzero().squeeze(1)
            q_mean[ended, lengths[ended] - 1] = own[ended, lengths[ended] - 1]
            # prefix length j: one set of continuations gives V(s_j) and Q(s_{j-1}, a_{j-1})
            for j in range(int(lengths[:n].max())):
                live = (lengths[:n] > j).nonzero().squeeze(1)
                for rows in live.split(max(1, MAX_SEQUENCES // k)):
                    g, last, tokens = _continuations(
                        policy,
                        reference,
                        task,
                        prompt_ids[rows],
                        prompt_mask[rows],
                        prompt_index[rows],
                        response[rows, :j],
                        beta,
                        k,
                        generator,
                    )
                    sampled += tokens
                    v_mean[rows, j], v_var[rows, j] = g.mean(1), g.var(1)
                    if j:
                        q = last + g
                        q_mean[rows, j - 1], q_var[rows, j - 1] = q.mean(1), q.var(1)
    finally:
        reference.train(was_training)
    real = mask.double()
    estimated = torch.arange(b) < n
    return MonteCarloCredit(
        advantages=(q_mean - v_mean) * real,
        stderr=((q_var + v_var) / k).sqrt() * real,
        estimated=estimated,
        k=k,
        sampled_tokens=sampled,
    )

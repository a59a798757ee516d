"""PPO's maths as plain functions of tensors (testable on their own): GAE and the PPO loss.

Shapes: ``B`` responses of ``T`` response positions (``V``: the vocabulary). Every per-token
tensor is ``[B, T]`` and ``mask`` marks the real tokens (1) against padding (0); whatever
sits on padding (even NaN or inf) never reaches a result.

    delta_t   r_t + gamma * V(s_{t+1}) - V(s_t)            V after the last real token is 0
    A_t       delta_t + gamma * lam * A_{t+1};  G_t = A_t + V(s_t)                      gae
    rho_t     pi(a_t|s_t) / pi_old(a_t|s_t)
    policy    mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - clip, 1 + clip))
    value     0.5 * mean_t max((V - G)^2, (V_old + clip(V - V_old, +-vf_clip) - G)^2)
    loss      policy - entropy_coef * entropy + vf_coef * value                     ppo_loss
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from tokenmdp import zero_padding


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lam) over each response: ``(advantages, returns)``, both ``[B, T]`` and 0
    on padding, from the token rewards ``r_t``, the values ``V(s_t)`` and the mask, all
    ``[B, T]``. The value after the last real token is 0 (the token MDP ends there)."""
    real = mask != 0
    rewards = torch.where(real, rewards, torch.zeros((), dtype=rewards.dtype))
    values = torch.where(real, values, torch.zeros((), dtype=values.dtype))
    mask = real.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


@attrs.frozen
class PPOLoss:
    """The terms of :func:`ppo_loss`, all 0-d tensors. ``policy``, ``value`` and ``entropy``
    carry gradients (``entropy`` only with an entropy bonus: without one it is only logged,
    and the backward pass need not run through a log-softmax for it); ``total`` is what is
    minimised. ``metrics``: the detached statistics the ``ppo`` updater logs, by metric key."""

    total: Tensor
    policy: Tensor
    value: Tensor
    entropy: Tensor
    metrics: dict[str, Tensor]


def ppo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    entropy: Tensor,
    mask: Tensor,
    num_tokens: Tensor,
    clip: float,
    vf_clip: float | None,
    vf_coef: float,
    entropy_coef: float,
) -> PPOLoss:
    """The clipped surrogate, the clipped value loss and the entropy bonus (CleanRL's PPO).

    Per-token ``[B, T]``: ``logprobs`` (``log pi(a_t|s_t)``, with grad), ``old_logprobs``
    (``log pi_old``, the rollout's), ``advantages`` ``A_t``, ``values`` (the critic's new
    ``V(s_t)``, with grad), ``old_values`` (the values the advantages were computed with),
    ``returns`` ``G_t``, ``entropy`` (the policy's at each position, with grad), and ``mask``. ``num_tokens``
    (0-d) is the number of real tokens every mean divides by: the whole minibatch's, so
    that the terms of a minibatch's micro-batches sum to the minibatch's token means.

    ``clip`` bounds the ratio ``pi/pi_old`` to ``[1 - clip, 1 + clip]``; ``vf_clip`` the new
    value to ``old +- vf_clip`` (None: no clipping). The metrics: ``policy/approxkl`` (the k3
    estimate of ``KL(pi_old || pi)``, ``mean_t (rho - 1) - log rho``), ``policy/clipfrac`` and
    ``val/clipfrac`` (the share of tokens whose ratio, or value loss, is clipped),
    ``val/vpred`` (``mean_t V``), ``val/error`` (``mean_t (V - G)^2``), and the three terms.
    """

    def token_mean(x: Tensor) -> Tensor:
        return (zero_padding(x, mask) * mask).sum() / num_tokens.clamp(min=1)

    # policy: clipped surrogate on the probability ratio pi / pi_old
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    approx_kl = token_mean((ratio - 1) - log_ratio).detach()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip, 1 + clip)
    pg_loss = token_mean(torch.max(pg_loss1, pg_loss2))
    # value: squared error to the GAE returns, with the new value clipped around the old
    v_loss1 = (values - returns) ** 2
    if vf_clip is None:
        v_loss2 = v_loss1
    else:
        v_loss2 = (old_values + (values - old_values).clamp(-vf_clip, vf_clip) - returns) ** 2
    v_loss = 0.5 * token_mean(torch.max(v_loss1, v_loss2))
    entropy = token_mean(entropy if entropy_coef else entropy.detach())
    total = pg_loss - entropy_coef * entropy + vf_coef * v_loss
    metrics = {
        "policy/approxkl": approx_kl,
        "policy/clipfrac": token_mean(((ratio - 1).abs() > clip).float()).detach(),
        "val/vpred": token_mean(values.detach()),
        "val/error": token_mean(v_loss1.detach()),
        "val/clipfrac": token_mean((v_loss2 > v_loss1).float()).detach(),
        "policy/entropy": entropy.detach(),
        "losses/policy": pg_loss.detach(),
        "losses/value": v_loss.detach(),
    }
    return PPOLoss(total=total, policy=pg_loss, value=v_loss, entropy=entropy, metrics=metrics)

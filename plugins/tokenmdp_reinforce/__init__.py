"""REINFORCE with a KL penalty: the smallest complete algorithm, as three components.

    token reward   r_t = R_t - beta * log(pi/pi_ref)(a_t|s_t)        (estimator)
    advantage      A_t = sum_{k>=t} r_k - b_t                         (advantage)
    loss           -sum_t A_t * log pi(a_t|s_t), averaged over responses (updater)
"""

from __future__ import annotations

import attrs
import torch

from tokenmdp import AdvantageConstructor, PolicyUpdater, Recipe, TrajectoryEstimator, hookimpl
from tokenmdp.ops import masked_mean, masked_whiten, suffix_sums
from tokenmdp.options import non_negative, one_of, positive


class KLPenalisedReward(TrajectoryEstimator):
    """Env reward minus ``beta * log pi_old/pi_ref`` on every token (k1 KL estimate)."""

    name = "kl-penalised-reward"
    requires = frozenset({"rewards"})
    provides = frozenset({"token_rewards"})

    def estimate(self, batch, ctx):
        kl = (batch.logprobs - batch.ref_logprobs) * batch.response_mask
        return {"token_rewards": batch.rewards - ctx.beta * kl}


class RewardToGo(AdvantageConstructor):
    """Reward-to-go (gamma = 1) minus an optional per-position batch-mean baseline."""

    name = "reward-to-go"
    requires = frozenset({"token_rewards"})
    provides = frozenset({"advantages", "returns"})

    @attrs.frozen
    class Options:
        baseline: str = attrs.field(default="position-mean", validator=one_of("position-mean", "none"))
        whiten: bool = False

    def construct(self, batch, signals, ctx):
        mask = batch.response_mask
        returns = suffix_sums(signals["token_rewards"], mask)
        advantages = returns
        if self.options.baseline == "position-mean":
            baseline = (returns * mask).sum(0) / mask.sum(0).clamp(min=1)
            advantages = (returns - baseline) * mask
        if self.options.whiten:
            advantages = masked_whiten(advantages, mask)
        return {"advantages": advantages, "returns": returns}


class PolicyGradient(PolicyUpdater):
    """One Adam step on ``-sum_t A_t log pi(a_t|s_t)`` per rollout, with gradient clipping."""

    name = "policy-gradient"

    @attrs.frozen
    class Options:
        lr: float = attrs.field(default=1e-2, validator=positive)
        max_grad_norm: float = attrs.field(default=1.0, validator=non_negative)
        #: Decay the learning rate linearly to 0 over ``train.steps`` (removes the noise floor).
        anneal_lr: bool = True

    def setup(self, ctx):
        self.optimizer = torch.optim.Adam(ctx.policy.parameters(), lr=self.options.lr)
        total = ctx.config.train.steps
        decay = (lambda i: max(0.0, 1 - i / total)) if self.options.anneal_lr else (lambda i: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, decay)

    def update(self, batch, signals, advantages, ctx):
        mask = batch.response_mask
        logp, logits = ctx.token_logprobs(ctx.policy, batch, return_logits=True)
        loss = -(advantages["advantages"].detach() * logp * mask).sum() / batch.size
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(ctx.policy.parameters(), self.options.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        logits = logits.detach()
        entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        return {
            "losses/policy": loss.item(),
            "policy/entropy": float(masked_mean(entropy, mask)),
            "policy/grad_norm": float(grad_norm),
            "objective/kl": float(((batch.logprobs - batch.ref_logprobs) * mask).sum(1).mean()),
            "charts/learning_rate": self.scheduler.get_last_lr()[0],
        }

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        if state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])


@hookimpl
def tokenmdp_trajectory_estimators():
    return [KLPenalisedReward]


@hookimpl
def tokenmdp_advantage_constructors():
    return [RewardToGo]


@hookimpl
def tokenmdp_policy_updaters():
    return [PolicyGradient]


@hookimpl
def tokenmdp_algorithms():
    return [
        Recipe(
            name="reinforce",
            estimator=KLPenalisedReward.name,
            advantage=RewardToGo.name,
            updater=PolicyGradient.name,
            description="REINFORCE with a k1 KL penalty to the reference (reference example)",
            supervision="reward",
        )
    ]

"""REINFORCE with a KL penalty: the smallest complete algorithm, as three components.

token reward   r_t = R_t - beta * log(pi/pi_ref)(a_t|s_t)        (estimator)
advantage      A_t = sum_{k>=t} r_k - b_t                         (advantage)
loss           -sum_t A_t * log pi(a_t|s_t), averaged over responses (updater)
"""

from __future__ import annotations

import attrs

from tokenmdp import (
    LM_LR,
    LORA_LR,
    AdvantageConstructor,
    GradientOptions,
    GradientUpdater,
    Recipe,
    TrajectoryEstimator,
    hookimpl,
    masked_mean,
    masked_whiten,
    one_of,
    positive,
    suffix_sums,
)


class KLPenalisedReward(TrajectoryEstimator):
    """Env reward minus ``beta * log pi_old/pi_ref`` on every token (k1 KL estimate)."""

    name = "kl-penalised-reward"
    requires = frozenset({"rewards", "ref_logprobs"})
    provides = frozenset({"token_rewards"})

    def estimate(self, batch, ctx):
        kl = batch.token_kl
        return {"token_rewards": batch.rewards - ctx.beta * kl}


class RewardToGo(AdvantageConstructor):
    """Reward-to-go (gamma = 1) minus an optional per-position batch-mean baseline."""

    name = "reward-to-go"
    requires = frozenset({"token_rewards"})
    provides = frozenset({"advantages", "returns"})

    @attrs.frozen
    class Options:
        #: "position-mean": subtract the batch's mean return at each position t; "none": no baseline.
        baseline: str = attrs.field(default="position-mean", validator=one_of("position-mean", "none"))
        #: Whiten A_t: mean 0, std 1 over the batch's real tokens (the returns are never whitened).
        whiten: bool = False

    def construct(self, batch, signals, ctx):
        mask = batch.response_mask
        returns = suffix_sums(signals["token_rewards"], mask)
        advantages = returns
        if self.options.baseline == "position-mean":
            baseline = masked_mean(returns, mask, dim=0)  # over every rank's batch under DDP
            advantages = (returns - baseline) * mask
        if self.options.whiten:
            advantages = masked_whiten(advantages, mask)
        return {"advantages": advantages, "returns": returns}


class PolicyGradient(GradientUpdater):
    """Adam steps on ``-sum_t A_t log pi(a_t|s_t)`` per rollout, with gradient clipping."""

    name = "policy-gradient"

    @attrs.frozen
    class Options(GradientOptions):
        #: Adam learning rate (this updater's default).
        lr: float = attrs.field(default=1e-2, validator=positive)

    def update(self, batch, signals, advantages, ctx):
        adv = advantages["advantages"].detach()

        def share(micro):
            mb = micro.batch
            logp, entropy = ctx.token_logprobs(ctx.policy, mb, return_entropy=True, entropy_grad=False)
            loss = -micro.row_mean(adv[micro.rows] * logp * mb.response_mask)
            return loss, {
                "losses/policy": loss.item(),
                "policy/entropy": micro.token_mean(entropy.detach(), mb.response_mask),
            }

        for rows in self.minibatches(batch, ctx):
            grad_norm, stats = self.accumulate(map(share, self.micro_batches(batch, rows)), ctx)
        return {**stats, "policy/grad_norm": grad_norm, **self.end_rollout()}


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
            # a pretrained LM: one update per batch at an LM's learning rate, KL weight 0.05
            lm_options={"updater": {"lr": LM_LR, "epochs": 1, "minibatches": 1}, "train": {"beta": 0.05}},
            lora_options={"updater": {"lr": LORA_LR}},
        )
    ]

"""The three PPO components: ``ppo-rewards`` (estimator), ``gae`` (advantage constructor)
and ``ppo`` (updater). See the package docstring for the maths, ``losses.py`` for the
functions they apply."""

from __future__ import annotations

import attrs
import torch

from tokenmdp import (
    AdvantageConstructor,
    ConfigError,
    GradientOptions,
    GradientUpdater,
    TrajectoryEstimator,
    distributed,
    load_pair_file,
    masked_mean,
    masked_sum,
    masked_whiten,
    non_negative,
    one_of,
    optional,
    positive,
    positive_int,
    probability,
    sample_pairs,
)

from .critics import ValueHead, value_network
from .kl import KLController
from .losses import gae, ppo_loss
from .reward_model import terminal_rewards, train_reward_model

#: What ``ppo-rewards`` reads: the rollout's log-probs under the reference (its KL penalty),
#: and, unless a learned reward model stands in for it, the env's reward.
LEARNED_REWARD_REQUIRES = frozenset({"ref_logprobs"})
ENV_REWARD_REQUIRES = LEARNED_REWARD_REQUIRES | {"rewards"}


class PPORewards(TrajectoryEstimator):
    """``r_t = R_t - beta * log(pi_old/pi_ref)(a_t|s_t)`` and the critic's ``V(s_t)``.

    It builds the critic, which the updater trains (``ctx.extras["critic"]``), and the KL
    controller; with ``reward = "learned"``, a reward model, fitted by :meth:`fit_reward_model`
    before the first rollout is rewarded."""

    name = "ppo-rewards"
    requires = ENV_REWARD_REQUIRES
    provides = frozenset({"token_rewards", "values"})
    #: the critic, trained by the updater; the KL coefficient this step's rewards used
    shares = frozenset({"critic", "kl_coef"})

    @attrs.frozen
    class Options:
        #: KL coefficient: "fixed" (stays at init_kl_coef) or "adaptive" (moved towards target; Ziegler et al.).
        kl_controller: str = attrs.field(default="fixed", validator=one_of("fixed", "adaptive"))
        #: Initial KL coefficient; unset = ``train.beta``.
        init_kl_coef: float | None = attrs.field(default=None, validator=non_negative)
        #: adaptive: the sequence KL to aim for, and the horizon (in responses) of the correction.
        target: float = attrs.field(default=6.0, validator=positive)
        #: adaptive: each step, beta *= 1 + clip((KL - target) / target, -0.2, 0.2) * responses / horizon.
        horizon: float = attrs.field(default=10000.0, validator=positive)
        #: V(s_t): "separate" (its own network, of the policy's kind) or "head" (a linear head on the
        #: GRU policy's hidden states; the value loss also trains the policy's trunk).
        critic: str = attrs.field(default="separate", validator=one_of("separate", "head"))
        #: R_t: "env" (the environment's reward, as an oracle reward model) or "learned" (a
        #: Bradley-Terry reward model fitted on preference pairs before RL; reward_model.py).
        reward: str = attrs.field(default="env", validator=one_of("env", "learned"))
        #: reward="learned": pairs sampled from pi_ref and labelled by the task's reward, or a
        #: JSONL file of {prompt, chosen, rejected} (then reward_pairs is the number read).
        reward_pairs: int = attrs.field(default=4000, validator=positive_int)
        #: reward="learned": JSONL file of {prompt, chosen, rejected}; unset = sample the pairs from pi_ref.
        reward_pairs_file: str | None = None
        #: Labels of sampled pairs: "bradley-terry" (y_1 preferred with probability
        #: sigmoid(R_1 - R_2), so r_phi learns R's scale) or "hard" (the higher R always wins:
        #: the ranking is right, but the fitted scale grows without bound and PPO over-optimises).
        reward_labels: str = attrs.field(default="bradley-terry", validator=one_of("bradley-terry", "hard"))
        #: reward="learned": passes over the pairs (less 10% held out) when fitting the reward model.
        reward_epochs: int = attrs.field(default=3, validator=positive_int)
        #: reward="learned": Adam learning rate of the reward model's fit.
        reward_lr: float = attrs.field(default=3e-3, validator=positive)
        #: critic="separate": hidden size of the value network; unset = the policy's.
        critic_hidden: int | None = attrs.field(default=None, validator=optional(positive_int))

    @classmethod
    def requires_for(cls, options):
        # a learned reward model replaces the env's reward, which is then never read (the
        # trainer skips computing it: Composition.needs_env_reward)
        return ENV_REWARD_REQUIRES if options.reward == "env" else LEARNED_REWARD_REQUIRES

    def __init__(self, options=None):
        super().__init__(options)
        self.reward_model, self.reward_report = None, None
        if self.options.reward == "env" and self.options.reward_pairs_file is not None:
            raise ConfigError('[estimator] (ppo-rewards): reward_pairs_file is read only with reward = "learned"')

    def setup(self, ctx):
        o, seed = self.options, ctx.config.train.seed
        if o.reward == "learned":  # unfitted: see fit_reward_model
            self.reward_model = ctx.place(value_network(ctx.config.policy, ctx.task, seed + 2))
        init = ctx.beta if o.init_kl_coef is None else o.init_kl_coef
        self.kl_controller = KLController(init, o.kl_controller == "adaptive", o.target, o.horizon)
        if o.critic == "head":
            critic = ValueHead(ctx.policy)
        else:
            critic = value_network(ctx.config.policy, ctx.task, seed, o.critic_hidden)
        self.critic = ctx.place(critic)  # on the run's device; it scores, so no dropout
        ctx.extras["critic"] = self.critic

    @torch.enable_grad()
    def fit_reward_model(self, ctx) -> None:
        """RLHF's step 2: the Bradley-Terry fit of the reward model on its preference pairs.

        :meth:`estimate` calls it once, before it rewards the first rollout, and not
        :meth:`setup`: setup runs before a resumed run (or ``tokenmdp explain``) loads the
        checkpoint, which restores the fitted model instead, so a fit there would be thrown
        away. Its report (``reward_model/*``) goes to ``summary.json``, and rank 0 says so."""
        o, seed = self.options, ctx.config.train.seed
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 0x4E3D)  # apart from every step's seed
        if o.reward_pairs_file is not None:
            pairs = load_pair_file(o.reward_pairs_file, ctx.task, o.reward_pairs)
        else:
            label_beta = 1.0 if o.reward_labels == "bradley-terry" else None
            pairs, _ = sample_pairs(ctx.reference, ctx.task, o.reward_pairs, generator, label_beta=label_beta)
        report = train_reward_model(
            self.reward_model, pairs, o.reward_epochs, o.reward_lr, batch_size=64, generator=generator
        )
        self.reward_report = {**report, "reward_model/pairs": pairs.size}
        if distributed.is_main():
            scores = ", ".join(f"{key.removeprefix('reward_model/')} {value:.3f}" for key, value in report.items())
            print(f"tokenmdp: {self.name}: fitted the reward model on {pairs.size} pairs ({scores})", flush=True)

    def report(self):
        return dict(self.reward_report or {})

    @torch.no_grad()
    def estimate(self, batch, ctx):
        mask = batch.response_mask
        kl = batch.token_kl
        beta = self.kl_controller.value
        if self.reward_model is not None and self.reward_report is None:  # unfitted, and not restored
            self.fit_reward_model(ctx)
        rewards = batch.rewards if self.reward_model is None else terminal_rewards(self.reward_model, batch)
        token_rewards = (rewards - beta * kl) * mask
        values = self.critic(ctx.policy, batch)
        ctx.extras["kl_coef"] = beta  # the coefficient this rollout was rewarded with
        # mean sequence KL over the responses (over every rank's, in a data-parallel run)
        responses = torch.ones_like(kl[:, 0])
        self.kl_controller.update(
            float(masked_mean(kl.sum(1), responses)), n_steps=int(masked_sum(responses, responses))
        )
        return {"token_rewards": token_rewards, "values": values}

    def state_dict(self):
        state = {"kl_controller": self.kl_controller.state_dict(), "critic": self.critic.state_dict()}
        if self.reward_model is not None:
            state["reward_model"] = self.reward_model.state_dict()
            state["reward_report"] = self.reward_report
        return state

    def load_state_dict(self, state):
        if state:
            self.kl_controller.load_state_dict(state["kl_controller"])
            self.critic.load_state_dict(state["critic"])
            if self.reward_model is not None:  # a fitted model is never fitted again
                self.reward_model.load_state_dict(state["reward_model"])
                self.reward_report = state["reward_report"]


class GAE(AdvantageConstructor):
    """Generalised advantage estimation with the critic's values; whitened by default."""

    name = "gae"
    requires = frozenset({"token_rewards", "values"})
    provides = frozenset({"advantages", "returns"})

    @attrs.frozen
    class Options:
        #: Discount of the next state's value and of later rewards (1 = undiscounted).
        gamma: float = attrs.field(default=1.0, validator=probability)
        #: GAE lambda: 0 = one-step TD error, 1 = Monte-Carlo return minus V(s_t).
        lam: float = attrs.field(default=0.95, validator=probability)
        #: Mean 0, std 1 over the batch's real tokens (the returns are never whitened).
        whiten: bool = True

    def construct(self, batch, signals, ctx):
        mask = batch.response_mask
        advantages, returns = gae(
            signals["token_rewards"], signals["values"], mask, self.options.gamma, self.options.lam
        )
        if self.options.whiten:
            advantages = masked_whiten(advantages, mask)
        return {"advantages": advantages, "returns": returns}


#: The metrics of :func:`ppo_loss` the ``ppo`` updater logs: their means over its updates.
LOSS_METRICS = (
    "policy/approxkl",
    "policy/clipfrac",
    "val/vpred",
    "val/error",
    "val/clipfrac",
    "policy/entropy",
    "losses/policy",
    "losses/value",
)


class PPO(GradientUpdater):
    """Several epochs of minibatch Adam steps on the PPO loss, for the policy and the critic."""

    name = "ppo"
    requires = frozenset({"advantages", "returns", "values"})
    uses = frozenset({"critic"})

    @attrs.frozen
    class Options(GradientOptions):
        #: 1e-3 learns the full-size toy tasks (V=6, H=5, GRU 96); 3e-3 is faster on Pattern but
        #: too noisy for SumMod's delayed reward, 3e-4 too slow (configs/ppo.toml).
        lr: float = attrs.field(default=1e-3, validator=positive)
        #: Learning rate of the critic's parameters; unset = ``lr``.
        vf_lr: float | None = attrs.field(default=None, validator=positive)
        #: Passes over each rollout (this updater's default).
        epochs: int = attrs.field(default=4, validator=positive_int)
        #: Minibatches per pass, one Adam step each (this updater's default).
        minibatches: int = attrs.field(default=4, validator=positive_int)
        #: Clip the ratio pi/pi_old to [1 - clip, 1 + clip] in the surrogate.
        clip: float = attrs.field(default=0.2, validator=positive)
        #: Clip the new value to old +- vf_clip in the value loss; unset = no clipping.
        vf_clip: float | None = attrs.field(default=0.2, validator=positive)
        #: Weight of the value loss in the total loss.
        vf_coef: float = attrs.field(default=0.5, validator=non_negative)
        #: Weight of the entropy bonus subtracted from the loss (0 = none).
        entropy_coef: float = attrs.field(default=0.0, validator=non_negative)
        #: Stop this rollout's updates when a minibatch's approximate KL exceeds it; unset = never.
        target_kl: float | None = attrs.field(default=None, validator=positive)

    def setup(self, ctx):
        self.critic = ctx.extras["critic"]  # declared: `uses`, checked at composition
        super().setup(ctx)

    def parameter_groups(self, ctx):
        """The policy and the critic (at ``vf_lr``), clipped together."""
        return [
            *super().parameter_groups(ctx),
            {"params": list(self.critic.parameters()), "lr": self.options.vf_lr or self.options.lr},
        ]

    def update(self, batch, signals, advantages, ctx):
        o = self.options
        adv = advantages["advantages"].detach()  # computed once per rollout
        returns = advantages["returns"].detach()
        old_values = signals["values"].detach()

        def share(micro):
            """One micro-batch's share of its minibatch's loss, and of its metrics."""
            mb, rows = micro.batch, micro.rows
            logp, entropy, values = self.critic.score_with_policy(ctx, mb, bool(self.options.entropy_coef))
            loss = ppo_loss(
                logprobs=logp,
                old_logprobs=mb.logprobs,
                advantages=adv[rows],
                values=values,
                old_values=old_values[rows],
                returns=returns[rows],
                entropy=entropy,
                mask=mb.response_mask,
                num_tokens=micro.tokens,
                clip=o.clip,
                vf_clip=o.vf_clip,
                vf_coef=o.vf_coef,
                entropy_coef=o.entropy_coef,
            )
            return loss.total, {key: value.item() for key, value in loss.metrics.items()}

        def too_far(metrics):
            # one decision for every rank (their KLs differ), or the ranks' steps fall out of step
            return o.target_kl is not None and distributed.all_mean(metrics["policy/approxkl"]) > o.target_kl

        stats, updates = dict.fromkeys(LOSS_METRICS, 0.0), 0
        for rows in self.minibatches(batch, ctx):
            # the early stop reads the whole minibatch's approximate KL before its step
            norm, shares = self.accumulate(map(share, self.micro_batches(batch, rows)), ctx, skip=too_far)
            if norm is None:
                break
            updates += 1
            for key in LOSS_METRICS:
                stats[key] += shares[key]
        stats = {k: v / max(updates, 1) for k, v in stats.items()}
        stats["policy/updates"] = updates
        stats["objective/kl_coef"] = float(ctx.extras.get("kl_coef", ctx.beta))
        return {**stats, **self.end_rollout()}

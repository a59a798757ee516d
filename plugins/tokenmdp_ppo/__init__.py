"""PPO with a learned critic and GAE (Ziegler et al. 2019; Ouyang et al. 2022), CleanRL style.

METHOD.md section 4, read top to bottom:

    beta            KL controller: "fixed", or "adaptive" (Ziegler et al.):
                    beta <- beta * (1 + clip((KL - target)/target, -0.2, 0.2) * n_steps/horizon)
    r_t             R_t - beta * (log pi_old - log pi_ref)(a_t|s_t)             estimator
                    (R_t = the env reward on that token: terminal or dense; or, with
                    reward = "learned", a reward model's r_phi(x, y) on the last token)
    V(s_t)          a critic: a separate network ("separate") or a head on the
                    policy's trunk ("head"); V after the last real token is 0    estimator
    delta_t         r_t + gamma * V(s_{t+1}) - V(s_t)
    A_t             delta_t + gamma * lam * A_{t+1};  returns G_t = A_t + V(s_t);
                    A whitened over the batch's real tokens                     advantage
    loss            clipped surrogate - entropy_coef * entropy
                    + vf_coef * clipped value loss, several epochs of minibatches,
                    early stop when the approximate KL to pi_old > target_kl    updater

The KL coefficient is ``train.beta`` and does not move by default (``kl_controller =
"fixed"``): every toy run is scored against the optimum for ``train.beta``, and an
adaptive coefficient optimises another objective. The critic is built by the estimator,
shared with the updater as ``ctx.extras["critic"]``, and trained by the updater together
with the policy (one Adam over both, as in CleanRL). Its parameters are checkpointed by
the estimator, its optimiser state by the updater.
"""

from __future__ import annotations

import types

import attrs
import torch
from torch import Tensor, nn

from tokenmdp import (
    LM_LR,
    LORA_LR,
    AdvantageConstructor,
    ConfigError,
    CreditView,
    GradientOptions,
    GradientUpdater,
    GRUPolicy,
    Recipe,
    TrajectoryEstimator,
    at_least_float32,
    build_policy,
    distributed,
    entropy_of,
    hookimpl,
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
    response_logits,
    sample_pairs,
)

from .reward_model import terminal_rewards, train_reward_model

# --- the KL controller ------------------------------------------------------------------


class KLController:
    """The KL coefficient beta. ``adaptive`` moves it towards a KL target (Ziegler et al.
    2019, eq. 2); otherwise it stays at its initial value."""

    def __init__(self, init: float, adaptive: bool, target: float, horizon: float):
        self.value, self.adaptive, self.target, self.horizon = init, adaptive, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.adaptive:
            error = min(max((kl - self.target) / self.target, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


# --- critics: V(s_t) on every response position -------------------------------------------


class ValueNetwork(nn.Module):
    """``critic = "separate"``: the policy's toy network class with one output, V(s_t)."""

    def __init__(self, policy_spec: dict, task, seed: int, hidden: int | None = None):
        super().__init__()
        spec = dict(policy_spec)
        self.lm = None
        if spec.get("kind", "gru") == "hf":
            # a separate copy of the causal LM (never its LoRA adapter) with a linear value head
            # on its last hidden state; the output layer is skipped
            spec.pop("lora", None)
            with torch.random.fork_rng():
                self.lm = build_policy(spec, task, seed=seed + 1)
            width = self.lm.model.get_input_embeddings().embedding_dim
            self.head = nn.Linear(width, 1)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            return
        if hidden is not None:
            spec["hidden"] = hidden
        one_output = types.SimpleNamespace(input_vocab_size=task.input_vocab_size, vocab_size=1)
        with torch.random.fork_rng():  # seeded, and leaves the global RNG alone
            self.net = build_policy(spec, one_output, seed=seed + 1)

    def forward(self, policy, batch) -> Tensor:
        if self.lm is not None:
            return at_least_float32(response_logits(self._hf_values, batch)[..., 0]) * batch.response_mask
        return at_least_float32(response_logits(self.net, batch)[..., 0]) * batch.response_mask

    def _hf_values(self, ids, mask=None):
        return self.head(self.lm.hidden_states(ids, mask).to(self.head.weight.dtype))


class ValueHead(nn.Module):
    """``critic = "head"``: a linear value head on the GRU policy's hidden states. The value
    loss also trains the shared trunk. The policy is passed in, not stored, so the head's
    ``state_dict`` and ``parameters`` are the head's alone."""

    def __init__(self, policy):
        super().__init__()
        if type(policy) is not GRUPolicy:
            raise ConfigError(
                f"[estimator] (ppo-rewards): critic='head' is available only for policy.kind='gru' "
                f"(got {type(policy).__name__}); use critic='separate'"
            )
        self.head = nn.Linear(policy.rnn.hidden_size, 1)

    def forward(self, policy, batch) -> Tensor:
        def trunk_values(ids, mask=None):
            return self.head(policy.hidden_states(ids, mask))

        return at_least_float32(response_logits(trunk_values, batch)[..., 0]) * batch.response_mask

    def score_with_policy(self, ctx, batch) -> tuple[Tensor, Tensor, Tensor]:
        """``(log-probs, logits)`` of the policy and the values on ``batch``'s responses from
        one pass of the shared trunk (the updater's minibatch forward: half the GRU work of
        scoring the policy and the values apart)."""
        policy, trunk = ctx.policy, {}

        def logits_keeping_the_trunk(ids, mask=None):
            trunk["hidden"] = policy.hidden_states(ids, mask)
            return policy.head(trunk["hidden"])

        logp, logits = ctx.token_logprobs(logits_keeping_the_trunk, batch, return_logits=True)
        # the same response positions of the same pass: response_logits slices this "model"'s
        # output exactly as it sliced the logits
        values = response_logits(lambda ids, mask=None: self.head(trunk["hidden"]), batch)[..., 0]
        return logp, logits, at_least_float32(values) * batch.response_mask


# --- estimator: KL-penalised token rewards and values ------------------------------------


class PPORewards(TrajectoryEstimator):
    """``r_t = R_t - beta * log(pi_old/pi_ref)(a_t|s_t)`` and the critic's ``V(s_t)``."""

    name = "ppo-rewards"
    requires = frozenset({"rewards"})
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

    def __init__(self, options=None):
        super().__init__(options)
        self.reward_model, self.reward_report = None, None
        if self.options.reward == "learned":  # the env's reward is never read in training
            self.requires = frozenset()
        elif self.options.reward_pairs_file is not None:
            raise ConfigError('[estimator] (ppo-rewards): reward_pairs_file is read only with reward = "learned"')

    def setup(self, ctx):
        o = self.options
        if o.reward == "learned":  # fitted at the first step, unless a checkpoint restores it
            self.reward_model = ctx.place(ValueNetwork(ctx.config.policy, ctx.task, ctx.config.train.seed + 2))
        init = ctx.beta if o.init_kl_coef is None else o.init_kl_coef
        self.kl_controller = KLController(init, o.kl_controller == "adaptive", o.target, o.horizon)
        if o.critic == "head":
            self.critic = ValueHead(ctx.policy)
        else:
            self.critic = ValueNetwork(ctx.config.policy, ctx.task, ctx.config.train.seed, o.critic_hidden)
        self.critic = ctx.place(self.critic)  # on the run's device; it scores, so no dropout
        ctx.extras["critic"] = self.critic

    @torch.enable_grad()
    def _fit_reward_model(self, ctx):
        o, seed = self.options, ctx.config.train.seed
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 0x4E3D)  # apart from every step's seed
        if o.reward_pairs_file is not None:
            pairs = load_pair_file(o.reward_pairs_file, ctx.task, o.reward_pairs)
        else:
            label_beta = 1.0 if o.reward_labels == "bradley-terry" else None
            pairs, _ = sample_pairs(ctx.reference, ctx.task, o.reward_pairs, generator, label_beta=label_beta)
        self.reward_report = train_reward_model(
            self.reward_model, pairs, o.reward_epochs, o.reward_lr, batch_size=64, generator=generator
        )
        self.reward_report["reward_model/pairs"] = pairs.size

    def report(self):
        return dict(self.reward_report or {})

    @torch.no_grad()
    def estimate(self, batch, ctx):
        mask = batch.response_mask
        kl = batch.token_kl
        beta = self.kl_controller.value
        if self.reward_model is not None and self.reward_report is None:
            self._fit_reward_model(ctx)
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


# --- advantage: generalised advantage estimation ----------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lam) over each response; padding (mask 0) never enters, and the value
    after the last real token is 0 (the token MDP ends there). Returns (advantages, returns)."""
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


# --- updater: clipped surrogate + clipped value loss ------------------------------------------


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

        def score(mb):
            """The policy's log-probs and logits and the critic's values on minibatch ``mb``."""
            if hasattr(self.critic, "score_with_policy"):  # ours: one trunk pass when shared
                return self.critic.score_with_policy(ctx, mb)
            return (*ctx.token_logprobs(ctx.policy, mb, return_logits=True), self.critic(ctx.policy, mb))

        def share(micro):
            mb, m, rows = micro.batch, micro.batch.response_mask, micro.rows
            mb_adv, mb_returns, mb_old_v = adv[rows], returns[rows], old_values[rows]
            logp, logits, v = score(mb)
            # policy: clipped surrogate on the probability ratio pi / pi_old
            log_ratio = (logp - mb.logprobs) * m
            ratio = log_ratio.exp()
            approx_kl = micro.token_mean((ratio - 1) - log_ratio, m).detach()  # k3 estimate of KL(pi_old || pi)
            pg_loss1 = -mb_adv * ratio
            pg_loss2 = -mb_adv * ratio.clamp(1 - o.clip, 1 + o.clip)
            pg_loss = micro.token_mean(torch.max(pg_loss1, pg_loss2), m)
            # value: squared error to the GAE returns, with the new value clipped around the old
            v_loss1 = (v - mb_returns) ** 2
            if o.vf_clip is None:
                v_loss2 = v_loss1
            else:
                v_loss2 = (mb_old_v + (v - mb_old_v).clamp(-o.vf_clip, o.vf_clip) - mb_returns) ** 2
            v_loss = 0.5 * micro.token_mean(torch.max(v_loss1, v_loss2), m)
            # without a bonus the entropy is only logged: kept out of the graph, the backward
            # pass has no log-softmax to run through for it (the gradients are the same)
            entropy = micro.token_mean(entropy_of(logits if o.entropy_coef else logits.detach()), m)
            loss = pg_loss - o.entropy_coef * entropy + o.vf_coef * v_loss
            return loss, {
                "policy/approxkl": approx_kl.item(),
                "policy/clipfrac": micro.token_mean(((ratio - 1).abs() > o.clip).float(), m).item(),
                "val/vpred": micro.token_mean(v.detach(), m).item(),
                "val/error": micro.token_mean(v_loss1.detach(), m).item(),
                "val/clipfrac": micro.token_mean((v_loss2 > v_loss1).float(), m).item(),
                "policy/entropy": entropy.item(),
                "losses/policy": pg_loss.item(),
                "losses/value": v_loss.item(),
            }

        def too_far(metrics):
            # one decision for every rank (their KLs differ), or the ranks' steps fall out of step
            return o.target_kl is not None and distributed.all_mean(metrics["policy/approxkl"]) > o.target_kl

        keys = (
            "policy/approxkl",
            "policy/clipfrac",
            "val/vpred",
            "val/error",
            "val/clipfrac",
            "policy/entropy",
            "losses/policy",
            "losses/value",
        )
        stats, updates = dict.fromkeys(keys, 0.0), 0
        for rows in self.minibatches(batch, ctx):
            # the early stop reads the whole minibatch's approximate KL before its step
            norm, shares = self.accumulate(map(share, self.micro_batches(batch, rows)), ctx, skip=too_far)
            if norm is None:
                break
            updates += 1
            for key in keys:
                stats[key] += shares[key]
        stats = {k: v / max(updates, 1) for k, v in stats.items()}
        stats["policy/updates"] = updates
        stats["objective/kl_coef"] = float(ctx.extras.get("kl_coef", ctx.beta))
        return {**stats, **self.end_rollout()}


@hookimpl
def tokenmdp_trajectory_estimators():
    return [PPORewards]


@hookimpl
def tokenmdp_advantage_constructors():
    return [GAE]


@hookimpl
def tokenmdp_policy_updaters():
    return [PPO]


#: TRL's PPOConfig on a pretrained LM: 4 PPO epochs over one minibatch, value-loss weight 0.1,
#: KL weight 0.05 (the learning rate: tokenmdp's LM_LR, see its comment).
LM_OPTIONS = {"updater": {"lr": LM_LR, "epochs": 4, "minibatches": 1, "vf_coef": 0.1}, "train": {"beta": 0.05}}
LORA_OPTIONS = {"updater": {"lr": LORA_LR}}


@hookimpl
def tokenmdp_algorithms():
    common = dict(estimator=PPORewards.name, advantage=GAE.name, updater=PPO.name)
    lm = dict(lm_options=LM_OPTIONS, lora_options=LORA_OPTIONS)
    return [
        Recipe(
            name="ppo",
            description="PPO: KL-penalised token rewards, a learned critic, GAE, clipped surrogate and value loss",
            supervision="reward",
            **common,
            **lm,
        ),
        Recipe(
            name="ppo-rm",
            options={"estimator": {"reward": "learned"}},
            description="PPO on a reward model fitted to preference pairs (RLHF); the env reward is never read",
            supervision="pairs",
            **common,
            **lm,
        ),
    ]


def _explain_rows(explain):
    """GAE with the run's trained critic, or, when the run trained none, the exact V^pi a
    perfect critic would learn (a best case)."""
    est = explain.like_run("estimator", PPORewards.name)
    adv = explain.like_run("advantage", GAE.name, whiten=False)
    est.setup(explain.ctx)
    if explain.run.estimator.name == PPORewards.name:  # the critic this run trained
        est.load_state_dict(explain.checkpoint_state("estimator"))
        values, short, where = None, "critic", "values: the run's trained critic"
    else:
        values = explain.exact_values(est.kl_controller.value)
        short, where = "exact V^pi", "values: exact V^pi of the KL-penalised reward (this run has no critic)"
    yield (
        f"GAE lambda={adv.options.lam:g} ({short})",
        f"ppo-rewards + gae, unwhitened; {where}",
        explain.credit_of(est, adv, values),
    )


@hookimpl
def tokenmdp_credit_views(explain):
    return [CreditView("gae", _explain_rows, order=20, shows=((PPORewards.name, GAE.name),))]

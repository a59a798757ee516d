"""Inverse-Q*: token-level RL with no reward model, no critic and no preference pairs.

METHOD.md section 3, read top to bottom:

    pi_hat*(a_t|s_t) = pi_phi(a_t | c + x, y_<t)                        estimator
    r_t = clip(beta * (log pi_hat*(a_t|s_t) - log pi_ref(a_t|s_t)), -kappa, kappa)
    A_t = r_t  (form="token")   or   sum_{k>=t} r_k  (form="return")  advantage
    PPO-clip on A_t with a KL penalty to pi_ref, or                     updater
    sum_t KL(pi_theta(.|s_t) || pi_hat*(.|s_t)) over visited states

With token reward beta*log(pi_hat/pi_ref) and KL coefficient beta the objective is
-beta * KL(pi || pi_hat), so both updaters have pi_hat* as their fixed point.
The paper's full text could not be read; every choice it may have made differently is an
option here (source, phi, form, whiten, kappa, KL estimator), never a constant.
"""

from __future__ import annotations

import attrs
import torch

from tokenmdp import (
    LM_LR,
    LORA_LR,
    AdvantageConstructor,
    ConfigError,
    CreditView,
    GradientOptions,
    GradientUpdater,
    Recipe,
    TrajectoryEstimator,
    at_least_float32,
    entropy_of,
    hookimpl,
    load_policy,
    masked_whiten,
    non_negative,
    one_of,
    positive,
    positive_int,
    response_logits,
    suffix_sums,
)


class ConditionalOptimal(TrajectoryEstimator):
    """Scores the policy's own responses under the conditionally optimal policy pi_hat*."""

    name = "conditional-optimal"
    provides = frozenset({"target_logprobs", "target_logits"})

    @attrs.frozen
    class Options:
        #: guide: pi_phi with the guide prefix; teacher: a separate model; oracle: the solver's pi*.
        source: str = attrs.field(default="guide", validator=one_of("guide", "teacher", "oracle"))
        #: Which network is conditioned on the guide: the frozen reference or the current policy.
        phi: str = attrs.field(default="reference", validator=one_of("reference", "policy"))
        #: Guide prefix as token ids or text; unset = the task's guide token.
        guide: tuple[int, ...] | str | None = None
        #: source=teacher: a run directory (its last checkpoint) or a model directory.
        teacher: str | None = None
        #: Also return full-vocabulary ``target_logits`` (needed by ``reverse-kl``).
        full_vocab: bool = True

    @classmethod
    def provides_for(cls, options):
        return cls.provides if options.full_vocab else frozenset({"target_logprobs"})

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.source == "teacher" and not self.options.teacher:
            raise ConfigError("[estimator] (conditional-optimal): source='teacher' needs teacher = <run or model dir>")

    def setup(self, ctx):
        if self.options.source == "oracle":
            if ctx.solution is None:
                raise ConfigError("[estimator] source='oracle' needs a toy env with an exact solution")
            self.target_model = ctx.solution.policy()
        elif self.options.source == "teacher":
            self.target_model = ctx.place(load_policy(self.options.teacher, ctx.task).requires_grad_(False).eval())
        else:
            self.target_model = None
            self.prefix = ctx.guide_prefix(self.options.guide)
        self.ceiling = self._score_target(ctx) if ctx.evaluator is not None else None

    def _score_target(self, ctx):
        """The RL phase can only reproduce pi_hat*, so its exact score is the ceiling."""
        if self.target_model is not None:
            return ctx.evaluator.evaluate(self.target_model)
        phi = ctx.reference if self.options.phi == "reference" else ctx.policy
        return ctx.evaluator.evaluate(phi, prefix_ids=self.prefix)

    def report(self):
        if not self.ceiling:
            return {}
        return {
            "ceiling": self.ceiling["closure"],
            "ceiling_kl_ref": self.ceiling["kl_ref"],
            "ceiling_true_reward": self.ceiling["true_reward"],
        }

    @torch.no_grad()
    def estimate(self, batch, ctx):
        if self.target_model is not None:
            logits = response_logits(self.target_model, batch)
        else:
            phi = ctx.reference if self.options.phi == "reference" else ctx.policy
            logits = response_logits(phi, batch, prefix_ids=self.prefix)  # one forward pass
        logp = torch.log_softmax(at_least_float32(logits), -1)
        taken = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask
        out = {"target_logprobs": taken}
        if self.options.full_vocab:
            out["target_logits"] = logp
        return out


class LogRatio(AdvantageConstructor):
    """``r_t = clip(beta * log(pi_hat*/pi_ref)(a_t|s_t), +-kappa)`` as token reward and advantage."""

    name = "log-ratio"
    requires = frozenset({"target_logprobs", "ref_logprobs"})
    provides = frozenset({"advantages", "token_rewards", "returns"})

    @attrs.frozen
    class Options:
        #: A_t: "token" (r_t itself) or "return" (sum_{k>=t} r_k, the reward-to-go).
        form: str = attrs.field(default="token", validator=one_of("token", "return"))
        #: Whiten A_t: mean 0, std 1 over the batch's real tokens (token_rewards and returns are not).
        whiten: bool = False
        #: Clip each token reward to [-kappa, kappa]; unset = no clipping.
        kappa: float | None = attrs.field(default=None, validator=positive)
        #: Scale of the log-ratio; unset = ``train.beta``.
        beta: float | None = attrs.field(default=None, validator=positive)
        #: Weight of the env's own per-token reward added to r_t (after clipping): a dense
        #: or step reward joins the log-ratio where it is paid; 0 = reward-free (the default).
        env_reward: float = attrs.field(default=0.0, validator=non_negative)

    @classmethod
    def requires_for(cls, options):
        return cls.requires | {"rewards"} if options.env_reward else cls.requires

    def construct(self, batch, signals, ctx):
        mask = batch.response_mask
        beta = self.options.beta or ctx.beta
        rewards = beta * (signals["target_logprobs"] - batch.ref_logprobs) * mask
        if self.options.kappa is not None:
            rewards = rewards.clamp(-self.options.kappa, self.options.kappa)
        if self.options.env_reward:
            rewards = rewards + self.options.env_reward * batch.rewards * mask
        returns = suffix_sums(rewards, mask)
        advantages = rewards if self.options.form == "token" else returns
        if self.options.whiten:
            advantages = masked_whiten(advantages, mask)
        return {"advantages": advantages, "token_rewards": rewards, "returns": returns}


class ClippedPG(GradientUpdater):
    """PPO-clip surrogate without a critic, plus a KL penalty to pi_ref.

    ``k1``: ``-kl_coef * log(pi_old/pi_ref)`` is added to each token's advantage (summed
    over the suffix when ``kl_returns``), the form whose fixed point is exactly pi_hat*.
    ``k3``: ``kl_coef * (ratio - 1 - log ratio)`` with ratio = pi_ref/pi is added to the
    loss (GRPO style; its fixed point differs).
    """

    name = "clipped-pg"
    requires = frozenset({"advantages", "ref_logprobs"})

    @attrs.frozen
    class Options(GradientOptions):
        #: Adam learning rate (this updater's default).
        lr: float = attrs.field(default=3e-3, validator=positive)
        #: Passes over each rollout (this updater's default).
        epochs: int = attrs.field(default=4, validator=positive_int)
        #: Minibatches per pass, one Adam step each (this updater's default).
        minibatches: int = attrs.field(default=4, validator=positive_int)
        #: Clip the ratio pi/pi_old to [1 - clip, 1 + clip] in the surrogate.
        clip: float = attrs.field(default=0.2, validator=positive)
        #: KL penalty: "k1": -kl_coef * log(pi_old/pi_ref) added to each token's advantage; "k3":
        #: kl_coef * (pi_ref/pi - 1 - log(pi_ref/pi)) added to the loss (GRPO style).
        kl_estimator: str = attrs.field(default="k1", validator=one_of("k1", "k3"))
        #: KL coefficient; unset = ``train.beta``; 0 = no penalty.
        kl_coef: float | None = attrs.field(default=None, validator=non_negative)
        #: k1: subtract the KL summed over the suffix (k >= t) instead of the token's own.
        kl_returns: bool = False
        #: Weight of the entropy bonus subtracted from the loss (0 = none).
        entropy_coef: float = attrs.field(default=0.0, validator=non_negative)

    @classmethod
    def requires_for(cls, options):
        # kl_coef = 0 (the group recipes: their KL is in the reward) never reads the reference
        return cls.requires - {"ref_logprobs"} if options.kl_coef == 0 else cls.requires

    def update(self, batch, signals, advantages, ctx):
        opts, mask = self.options, batch.response_mask
        kl_coef = ctx.beta if opts.kl_coef is None else opts.kl_coef
        adv = advantages["advantages"].detach()
        k3_penalty = opts.kl_estimator == "k3" and bool(kl_coef)
        if opts.kl_estimator == "k1" and kl_coef:
            k1 = batch.token_kl
            adv = adv - kl_coef * (suffix_sums(k1, mask) if opts.kl_returns else k1)

        def share(micro):
            mb, m = micro.batch, micro.batch.response_mask
            mb_adv = adv[micro.rows]
            logp, logits = ctx.token_logprobs(ctx.policy, mb, return_logits=True)
            log_ratio = (logp - mb.logprobs) * m
            ratio = log_ratio.exp()
            surrogate = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - opts.clip, 1 + opts.clip))
            policy_loss = micro.token_mean(surrogate, m)
            loss, kl_metric = policy_loss, {}
            if k3_penalty or ctx.logs_kl:
                ref_minus = (mb.ref_logprobs - logp) * m
                k3 = micro.token_mean(ref_minus.exp() - 1 - ref_minus, m)
                kl_metric = {"losses/kl": k3.item()}
                if k3_penalty:
                    loss = loss + kl_coef * k3
            if opts.entropy_coef:
                loss = loss - opts.entropy_coef * micro.token_mean(entropy_of(logits), m)
            return loss, {
                "losses/policy": policy_loss.item(),
                **kl_metric,
                "policy/clipfrac": micro.token_mean(((ratio - 1).abs() > opts.clip).float(), m).item(),
                # k3 estimate of KL(pi_old || pi), as ppo logs it
                "policy/approxkl": micro.token_mean((ratio - 1) - log_ratio, m).item(),
                "policy/entropy": micro.token_mean(entropy_of(logits.detach()), m).item(),
            }

        keys = ("losses/policy", "losses/kl", "policy/clipfrac", "policy/approxkl")
        keys = keys if k3_penalty or ctx.logs_kl else tuple(k for k in keys if k != "losses/kl")
        sums, n = dict.fromkeys(keys, 0.0), 0
        for rows in self.minibatches(batch, ctx):
            _, stats = self.accumulate(map(share, self.micro_batches(batch, rows)), ctx)
            n += 1
            for key in keys:
                sums[key] += stats[key]
        # minibatch means; the entropy is the last minibatch's
        return {**{k: v / n for k, v in sums.items()}, "policy/entropy": stats["policy/entropy"], **self.end_rollout()}


class ReverseKL(GradientUpdater):
    """Token-level distillation: minimise ``sum_t KL(pi_theta(.|s_t) || pi_hat*(.|s_t))``
    over the visited states, exactly, over the full vocabulary."""

    name = "reverse-kl"
    requires = frozenset({"target_logits"})

    @attrs.frozen
    class Options(GradientOptions):
        #: Adam learning rate (this updater's default).
        lr: float = attrs.field(default=3e-3, validator=positive)
        #: Passes over each rollout (this updater's default).
        epochs: int = attrs.field(default=4, validator=positive_int)
        #: Minibatches per pass, one Adam step each (this updater's default).
        minibatches: int = attrs.field(default=4, validator=positive_int)

    def update(self, batch, signals, advantages, ctx):
        target = signals["target_logits"].detach()

        def share(micro):
            mb, m = micro.batch, micro.batch.response_mask
            _, logits = ctx.token_logprobs(ctx.policy, mb, return_logits=True)
            logp = torch.log_softmax(logits, -1)
            kl = (logp.exp() * (logp - target[micro.rows])).sum(-1)
            loss = micro.token_mean(kl, m)
            return loss, {
                "losses/reverse_kl": loss.item(),
                "policy/entropy": micro.token_mean(entropy_of(logits.detach()), m).item(),
            }

        for rows in self.minibatches(batch, ctx):
            grad_norm, stats = self.accumulate(map(share, self.micro_batches(batch, rows)), ctx)
        return {
            "losses/reverse_kl": stats["losses/reverse_kl"],
            "policy/grad_norm": grad_norm,
            "policy/entropy": stats["policy/entropy"],
            **self.end_rollout(),
        }


@hookimpl
def tokenmdp_trajectory_estimators():
    return [ConditionalOptimal]


@hookimpl
def tokenmdp_advantage_constructors():
    return [LogRatio]


@hookimpl
def tokenmdp_policy_updaters():
    return [ClippedPG, ReverseKL]


@hookimpl
def tokenmdp_algorithms():
    common = dict(
        estimator=ConditionalOptimal.name,
        advantage=LogRatio.name,
        supervision="none",
        # one update per batch, as the reward recipes on an LM; train.beta stays the paper's 1
        lm_options={"updater": {"lr": LM_LR, "epochs": 1, "minibatches": 1}},
        lora_options={"updater": {"lr": LORA_LR}},
    )
    return [
        Recipe(
            name="inverse-q",
            updater=ClippedPG.name,
            description="Inverse-Q*: guide-conditioned log-ratio advantages, PPO-clip, no critic",
            **common,
        ),
        Recipe(
            name="inverse-q-distill",
            updater=ReverseKL.name,
            description="Inverse-Q* target, full-vocabulary reverse-KL distillation",
            **common,
        ),
    ]


def _explain_rows(explain):
    """Inverse-Q*'s token and return forms. The target is the run's own if it trained with
    one; else ``explain --guide``'s text guide; else the guide, if the reference learned
    what the guide means (guide-tagged SFT data); else the solver's exact pi* (oracle), which
    a text run does not have."""
    run, config, ctx = explain.run, explain.config, explain.ctx
    overrides = {"full_vocab": False}
    if run.estimator.name != ConditionalOptimal.name:
        if explain.guide is not None:
            overrides.update(source="guide", guide=explain.guide)
        elif config.reference.tagged_samples > 0:
            overrides["source"] = "guide"
        elif explain.exact:
            overrides["source"] = "oracle"
        else:
            raise ConfigError(
                "this run trained no Inverse-Q* target and its env has no exact pi*: give the guide of the "
                'Inverse-Q* row with explain --guide "..."'
            )
    est = explain.like_run("estimator", ConditionalOptimal.name, **overrides)
    source = est.options.source
    target = {
        "guide": f"the guide-conditioned {est.options.phi}",
        "oracle": "the solver's exact pi*",
        "teacher": f"the teacher {est.options.teacher}",
    }[source]
    est.setup(ctx)
    signals = dict(est.estimate(explain.batch, ctx))
    for form in ("token", "return"):
        adv = explain.like_run("advantage", LogRatio.name, form=form, whiten=False)
        formula = "beta*log(pi_hat/pi_ref)" + (" summed over k >= t" if form == "return" else "")
        yield (
            f"Inverse-Q* {form} ({source})",
            f"log-ratio form={form}: {formula}; pi_hat = {target}",
            adv.construct(explain.batch, signals, ctx)["advantages"] * explain.batch.response_mask,
        )


@hookimpl
def tokenmdp_credit_views(explain):
    return [CreditView("inverse-q", _explain_rows, order=10, shows=((ConditionalOptimal.name, LogRatio.name),))]

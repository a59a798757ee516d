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
    distributed,
    hookimpl,
    load_policy,
    masked_whiten,
    non_negative,
    one_of,
    positive,
    positive_int,
    suffix_sums,
    zero_padding,
)


class ConditionalOptimal(TrajectoryEstimator):
    """Scores the policy's own responses under the conditionally optimal policy pi_hat*."""

    name = "conditional-optimal"
    provides = frozenset({"target_logprobs", "target_distribution", "target_logits"})

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
        #: Also return the whole ``[B, T, V]`` ``target_logits``, when a later component reads
        #: them (none built in: ``reverse-kl`` reads ``target_distribution``, given either
        #: way, which an HF model keeps as hidden states under ``train.logit_chunk``).
        full_vocab: bool = True

    @classmethod
    def provides_for(cls, options):
        return cls.provides if options.full_vocab else frozenset({"target_logprobs", "target_distribution"})

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

    def guide(self):
        return self.options.guide if self.options.source == "guide" else None

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
            model, prefix = self.target_model, None
        else:
            model = ctx.reference if self.options.phi == "reference" else ctx.policy
            prefix = self.prefix
        # one forward pass; an HF model's distribution stays hidden states (train.logit_chunk)
        taken, target = ctx.token_distribution(model, batch, prefix_ids=prefix)
        out = {"target_logprobs": taken, "target_distribution": target}
        if self.options.full_vocab and (self.read_later is None or "target_logits" in self.read_later):
            out["target_logits"] = target.whole()
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


#: ``updater.loss_type`` of clipped-pg: how the token losses of a minibatch become its loss
#: (TRL GRPOConfig's names; :func:`aggregate_token_losses`).
LOSS_TYPES = ("bnpo", "grpo", "dr_grpo", "dapo")


def clipped_token_losses(logp, old_logp, advantages, mask, clip, epsilon_high=None, level="token"):
    """The PPO-clip loss of each token, TRL ``GRPOTrainer._compute_loss``'s ``per_token_loss``
    (before any KL term and before aggregation).

    Shapes: ``logp`` (with gradient), ``old_logp``, ``mask``: ``[B, T]``, ``mask`` 1 on the
    tokens that get a loss; ``advantages``: ``[B, T]`` or ``[B, 1]``. ``clip`` is TRL's
    ``epsilon``, ``epsilon_high`` its ``epsilon_high`` (None = ``clip``): the ratio is
    clipped to ``[1 - clip, 1 + epsilon_high]``. ``level`` is TRL's
    ``importance_sampling_level``: ``"token"``, ratio ``r_t = pi/pi_old`` per token; or
    ``"sequence"`` (GSPO), one ratio per response, ``s_i = exp(mean over its tokens of
    log(pi/pi_old))``, ``[B, 1]``, the same on each of its tokens.

    Returns ``(losses [B, T], ratio [B, T] or [B, 1])`` with ``losses = -min(ratio * A,
    clip(ratio) * A)``, padding not zeroed (:func:`aggregate_token_losses` leaves it out)."""
    log_ratio = (logp - old_logp) * mask
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    ratio = log_ratio.exp()
    high = clip if epsilon_high is None else epsilon_high
    return torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + high)), ratio


def aggregate_token_losses(losses, mask, loss_type, tokens, rows, horizon):
    """One slice's share of a minibatch's loss from its per-token ``losses`` (``[b, T]``)
    where ``mask`` (``[b, T]``) is 1; summed over the minibatch's slices (micro-batches) it
    is the loss of TRL's ``loss_type`` on the whole minibatch (an optimizer step):

    - ``"bnpo"``: ``sum / tokens``, ``tokens`` the minibatch's masked tokens on this rank;
    - ``"dapo"``: the same sum over ``tokens`` = the masked tokens of every rank's
      minibatch over the number of ranks, so that the averaged gradient is the global mean;
    - ``"grpo"``: each row's mean over its own tokens, summed, over ``rows``, the
      minibatch's rows (a row with no token counts as 0);
    - ``"dr_grpo"``: ``sum / (rows * horizon)``, ``horizon`` TRL's ``max_completion_length``.
    """
    x = zero_padding(losses, mask) * mask
    if loss_type == "grpo":
        return (x.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / rows
    if loss_type == "dr_grpo":
        return x.sum() / (rows * horizon)
    return x.sum() / tokens.clamp(min=1)


def truncated_rows(batch, task):
    """``[B]`` bool: the responses cut at the length limit, as TRL's
    ``mask_truncated_completions`` sees them: ``task.horizon`` tokens long and the last is
    not the task's EOS (a response a stop string ended is shorter: not truncated)."""
    mask = batch.response_mask
    lengths = mask.sum(1).long()
    last = batch.response_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    return (lengths >= task.horizon) & (last != task.eos_token)


class ClippedPG(GradientUpdater):
    """PPO-clip surrogate without a critic, plus a KL penalty to pi_ref.

    ``k1``: ``-kl_coef * log(pi_old/pi_ref)`` is added to each token's advantage (summed
    over the suffix when ``kl_returns``), the form whose fixed point is exactly pi_hat*.
    ``k3``: ``kl_coef * (ratio - 1 - log ratio)`` with ratio = pi_ref/pi is added to the
    loss (GRPO style; its fixed point differs): TRL's ``beta`` with the same per-token
    formula, aggregated as ``loss_type`` aggregates the surrogate.

    The GRPO family's options are TRL 1.16 ``GRPOConfig``'s (docs/grpo_family.md):
    ``loss_type``, ``epsilon_high`` (``clip`` is TRL's ``epsilon``),
    ``importance_sampling_level``, ``mask_truncated_completions``; the loss of one
    minibatch is :func:`clipped_token_losses` aggregated by :func:`aggregate_token_losses`.
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
        #: Clip the ratio pi/pi_old to [1 - clip, 1 + clip] in the surrogate (TRL's
        #: ``epsilon``; the upper bound is ``epsilon_high`` when set).
        clip: float = attrs.field(default=0.2, validator=positive)
        #: KL penalty: "k1": -kl_coef * log(pi_old/pi_ref) added to each token's advantage; "k3":
        #: kl_coef * (pi_ref/pi - 1 - log(pi_ref/pi)) added to the loss (GRPO style; TRL's
        #: ``beta`` is kl_estimator = "k3" with kl_coef = beta).
        kl_estimator: str = attrs.field(default="k1", validator=one_of("k1", "k3"))
        #: KL coefficient; unset = ``train.beta``; 0 = no penalty.
        kl_coef: float | None = attrs.field(default=None, validator=non_negative)
        #: k1: subtract the KL summed over the suffix (k >= t) instead of the token's own.
        kl_returns: bool = False
        #: Weight of the entropy bonus subtracted from the loss (0 = none).
        entropy_coef: float = attrs.field(default=0.0, validator=non_negative)
        #: How a minibatch's token losses become its loss (TRL GRPOConfig's ``loss_type``):
        #: "bnpo": summed over its tokens and divided by their number on this rank (the
        #: default, the token mean tokenmdp always took); "grpo": each response's mean over
        #: its own tokens, then the mean over responses (GRPO, Shao et al. 2024: favours short
        #: right and long wrong answers); "dr_grpo": the sum over (responses x env.horizon),
        #: a constant (Dr. GRPO, Liu et al. 2025); "dapo": the sum over the tokens of every
        #: rank's minibatch (DAPO's token-level loss, Yu et al. 2025; TRL's default). With one
        #: process "dapo" and "bnpo" are the same loss. Each counts the whole minibatch, however
        #: ``micro_batch_size`` splits it.
        loss_type: str = attrs.field(default="bnpo", validator=one_of(*LOSS_TYPES))
        #: Upper clip of the ratio, 1 + epsilon_high, with the lower bound 1 - clip (DAPO's
        #: clip-higher, Yu et al. 2025, who use 0.28 with clip = 0.2); unset = ``clip``.
        epsilon_high: float | None = attrs.field(default=None, validator=positive)
        #: "token": a ratio pi/pi_old per token (PPO, GRPO); "sequence": one per response,
        #: exp of the mean of its tokens' log ratios, clipped as one (GSPO, Zheng et al.
        #: 2025; TRL's ``importance_sampling_level``). Per-token advantages are then averaged
        #: over the response, so a k1 KL (in the advantage) with kl_coef > 0 is refused: use "k3".
        importance_sampling_level: str = attrs.field(default="token", validator=one_of("token", "sequence"))
        #: No loss on the responses cut at the length limit: ``env.horizon`` tokens without
        #: the task's EOS (DAPO's overlong filtering, Yu et al. 2025; TRL's
        #: ``mask_truncated_completions``); they leave the token counts too. Needs an EOS.
        mask_truncated_completions: bool = False

        def __attrs_post_init__(self):
            super().__attrs_post_init__()
            if self.epsilon_high is not None and self.epsilon_high < self.clip:
                raise ValueError(
                    f"epsilon_high must be >= clip (got epsilon_high = {self.epsilon_high!r} < clip = "
                    f"{self.clip!r}): the upper clip 1 + epsilon_high is DAPO's clip-higher; unset, it is clip"
                )

    @classmethod
    def requires_for(cls, options):
        # kl_coef = 0 (the group recipes: their KL is in the reward) never reads the reference
        return cls.requires - {"ref_logprobs"} if options.kl_coef == 0 else cls.requires

    def check(self, config, task):
        super().check(config, task)
        opts = self.options
        kl_coef = config.train.beta if opts.kl_coef is None else opts.kl_coef
        if opts.importance_sampling_level == "sequence" and opts.kl_estimator == "k1" and kl_coef:
            raise ConfigError(
                "updater.importance_sampling_level = 'sequence' (GSPO) weighs every token of a response by one "
                "ratio, so the k1 KL that updater.kl_estimator = 'k1' puts into each token's advantage would be "
                f"averaged over the response, which is not the KL's gradient (kl_coef = {kl_coef:g}"
                f"{' from train.beta' if opts.kl_coef is None else ''}); set updater.kl_estimator = 'k3' (TRL's "
                "beta: a per-token KL in the loss), or updater.kl_coef = 0"
            )
        if opts.mask_truncated_completions and task.eos_token is None:
            raise ConfigError(
                "updater.mask_truncated_completions masks the responses that reach env.horizon without EOS, but "
                "this task has no EOS token, so every response would be masked: set env.eos_token (or "
                "env.stop_at_eos = true for text), or unset updater.mask_truncated_completions"
            )

    def update(self, batch, signals, advantages, ctx):
        opts, mask = self.options, batch.response_mask
        kl_coef = ctx.beta if opts.kl_coef is None else opts.kl_coef
        adv = advantages["advantages"].detach()
        k3_penalty = opts.kl_estimator == "k3" and bool(kl_coef)
        if opts.kl_estimator == "k1" and kl_coef:
            k1 = batch.token_kl
            adv = adv - kl_coef * (suffix_sums(k1, mask) if opts.kl_returns else k1)
        # the rows that get a loss: all, or those not cut at the length limit
        keep = (~truncated_rows(batch, ctx.task)).to(mask.dtype) if opts.mask_truncated_completions else None
        loss_mask = mask if keep is None else mask * keep[:, None]
        horizon = ctx.task.horizon

        def share(micro, tokens, local):
            mb, m = micro.batch, micro.batch.response_mask
            lm = m if keep is None else loss_mask[micro.rows]
            mb_adv = adv[micro.rows]
            logp, entropy = ctx.token_logprobs(
                ctx.policy, mb, return_entropy=True, entropy_grad=bool(opts.entropy_coef)
            )
            log_ratio = (logp - mb.logprobs) * m
            surrogate, ratio = clipped_token_losses(
                logp, mb.logprobs, mb_adv, lm, opts.clip, opts.epsilon_high, opts.importance_sampling_level
            )

            def aggregate(x):
                return aggregate_token_losses(x, lm, opts.loss_type, tokens, micro.size, horizon)

            policy_loss = aggregate(surrogate)
            loss, kl_metric = policy_loss, {}
            if k3_penalty or ctx.logs_kl:
                ref_minus = (mb.ref_logprobs - logp) * m
                k3_tokens = ref_minus.exp() - 1 - ref_minus
                # the metric is a token mean (TRL's "kl" too); the penalty is aggregated as the surrogate
                k3 = aggregate_token_losses(k3_tokens, lm, "bnpo", local, micro.size, horizon)
                kl_metric = {"losses/kl": k3.item()}
                if k3_penalty:
                    loss = loss + kl_coef * (k3 if opts.loss_type == "bnpo" else aggregate(k3_tokens))
            if opts.entropy_coef:  # a token mean whatever the loss_type, as TRL's entropy bonus
                bonus = aggregate_token_losses(entropy, lm, "bnpo", local, micro.size, horizon)
                loss = loss - opts.entropy_coef * bonus
            if opts.epsilon_high is None:
                clipped = (ratio - 1).abs() > opts.clip
            else:
                clipped = (ratio < 1 - opts.clip) | (ratio > 1 + opts.epsilon_high)
            return loss, {
                "losses/policy": policy_loss.item(),
                **kl_metric,
                "policy/clipfrac": micro.token_mean(clipped.expand_as(m).float(), m).item(),
                # k3 estimate of KL(pi_old || pi), as ppo logs it
                "policy/approxkl": micro.token_mean((log_ratio.exp() - 1) - log_ratio, m).item(),
                "policy/entropy": micro.token_mean(entropy.detach(), m).item(),
            }

        keys = ("losses/policy", "losses/kl", "policy/clipfrac", "policy/approxkl")
        keys = keys if k3_penalty or ctx.logs_kl else tuple(k for k in keys if k != "losses/kl")
        sums, n = dict.fromkeys(keys, 0.0), 0
        for rows in self.minibatches(batch, ctx):
            tokens = local = loss_mask[rows].sum()
            if opts.loss_type == "dapo" and distributed.world_size() > 1:
                # every rank's tokens of this optimizer step, over the ranks that average the gradients
                tokens = distributed.all_sum(local)[0] / distributed.world_size()
            shares = (share(micro, tokens, local) for micro in self.micro_batches(batch, rows))
            _, stats = self.accumulate(shares, ctx)
            n += 1
            for key in keys:
                sums[key] += stats[key]
        # minibatch means; the entropy is the last minibatch's
        return {**{k: v / n for k, v in sums.items()}, "policy/entropy": stats["policy/entropy"], **self.end_rollout()}


class ReverseKL(GradientUpdater):
    """Token-level distillation: minimise ``sum_t KL(pi_theta(.|s_t) || pi_hat*(.|s_t))``
    over the visited states, exactly, over the full vocabulary."""

    name = "reverse-kl"
    requires = frozenset({"target_distribution"})

    @attrs.frozen
    class Options(GradientOptions):
        #: Adam learning rate (this updater's default).
        lr: float = attrs.field(default=3e-3, validator=positive)
        #: Passes over each rollout (this updater's default).
        epochs: int = attrs.field(default=4, validator=positive_int)
        #: Minibatches per pass, one Adam step each (this updater's default).
        minibatches: int = attrs.field(default=4, validator=positive_int)

    def update(self, batch, signals, advantages, ctx):
        target = signals["target_distribution"]

        def share(micro):
            mb, m = micro.batch, micro.batch.response_mask
            # over the whole vocabulary; an HF output layer a chunk of positions at a time
            kl, entropy = ctx.token_kl(ctx.policy, mb, target[micro.rows])
            loss = micro.token_mean(kl, m)
            return loss, {
                "losses/reverse_kl": loss.item(),
                "policy/entropy": micro.token_mean(entropy, m).item(),
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

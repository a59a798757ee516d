"""RLOO and GRPO: group-relative sequence advantages over k samples per prompt.

A *group* is the responses to one draw of a prompt (``batch.groups``). With
``train.samples_per_prompt = G`` each step draws ``batch_size / G`` prompts and samples G
responses to each, so every group holds exactly G (as TRL's ``num_generations``). With
G = 1 (the default) the env draws a prompt for every response and a group is every
response that happens to share a prompt: a batch of 64 on a 4-prompt toy task holds about
16 per prompt. Each response's sequence reward is the env reward minus the k1 estimate of
its sequence KL to the reference:

    r_i  = sum_t R_t - kl_coef * sum_t (log pi_old - log pi_ref)(a_t|s_t)   (kl_coef = train.beta)
    RLOO   A_i = r_i - mean_{j != i} r_j                 (Ahmadian et al. 2024)
    GRPO   A_i = (r_i - mean_j r_j) / (std_j r_j + eps)  (Shao et al. 2024; sample std)

A group of one has nothing to compare with: its A_i is 0 (no gradient) under both rules.

``scale_rewards`` (TRL's ``GRPOConfig.scale_rewards``) divides the centred advantage by a
spread: ``"group"`` by the group's std (GRPO, Shao et al. 2024; grpo's default),
``"batch"`` by the std of every reward of the batch (all ranks' under torchrun, as TRL
gathers them), ``"none"`` not at all (Dr. GRPO, Liu et al. 2025: the std favours the
questions that are too easy or too hard; rloo's default, RLOO as Ahmadian et al. 2024
wrote it). Both rules take it: RLOO's leave-one-out advantage is the centred one times
``G / (G - 1)``, so rloo with ``"group"`` is grpo's advantage times ``G / (G - 1)`` (eps
aside) and rloo with ``"batch"`` is Dr. GRPO's centring at a batch-wide scale. Every std is
the sample std (Bessel), plus ``eps`` (TRL adds 1e-4; tokenmdp's default is 1e-6).

The sequence credit A_i is placed on every real token of response i: the estimator returns
it as ``token_rewards``, and advantage ``sequence-credit`` passes it on as ``advantages``.
The recipes update with ``clipped-pg`` (tokenmdp_inverse_q) with ``kl_coef = 0``, since the
KL penalty is already inside r_i.

With G = 1 on a task with many prompts most groups would have one member and learn
nothing, so such a run (more prompts than half the batch) fails at start-up and asks for
``train.samples_per_prompt``. In a data-parallel run each rank samples and groups its own
rows: a group never spans ranks.
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
    Recipe,
    TrajectoryEstimator,
    hookimpl,
    masked_mean,
    masked_sum,
    masked_whiten,
    non_negative,
    one_of,
    positive,
    suffix_sums,
)


class GroupRelative(TrajectoryEstimator):
    """Sequence rewards, grouped by prompt; subclasses turn a group into advantages."""

    requires = frozenset({"rewards", "ref_logprobs"})
    provides = frozenset({"token_rewards"})

    @attrs.frozen
    class Options:
        #: Weight of the sequence KL in r_i; unset = ``train.beta``.
        kl_coef: float | None = attrs.field(default=None, validator=non_negative)
        #: "sequence": A_i on every token of response i (the env reward's sum, however it
        #: was paid); "reward-to-go": token t gets the group-relative advantage of what
        #: response i earns from t on, G_it = sum_{k>=t} r_ik, against the group's G_jt at
        #: the same position, so a dense or step reward credits the tokens before it only.
        credit: str = attrs.field(default="sequence", validator=one_of("sequence", "reward-to-go"))

    @classmethod
    def requires_for(cls, options):
        # kl_coef = 0 leaves the reward as it is: the reference is never read
        return cls.requires - {"ref_logprobs"} if options.kl_coef == 0 else cls.requires

    def check(self, config, task):
        prompts, size = int(task.prompts.shape[0]), config.train.batch_size
        if config.train.samples_per_prompt == 1 and prompts > size / 2:
            raise ConfigError(
                f"estimator {self.name!r} compares the responses to one prompt, but with "
                f"train.samples_per_prompt = 1 a batch of {size} over {prompts} prompts is mostly groups of one "
                "(no gradient); set train.samples_per_prompt = G (e.g. 8): each step then samples G responses "
                "to each of batch_size / G prompts"
            )

    @torch.no_grad()
    def estimate(self, batch, ctx):
        mask = batch.response_mask
        kl_coef = ctx.beta if self.options.kl_coef is None else self.options.kl_coef
        group = torch.unique(batch.groups, return_inverse=True)[1]
        if self.options.credit == "reward-to-go":
            per_token = batch.rewards * mask
            if kl_coef:
                per_token = per_token - kl_coef * batch.token_kl
            # every position t at once: G_t against the group's G_t (0 after a response ended)
            to_go = suffix_sums(per_token, mask).T  # [T, B]
            size = torch.bincount(group).to(to_go.dtype)
            total = torch.zeros(to_go.shape[0], size.numel(), dtype=to_go.dtype).index_add_(1, group, to_go)
            # one scale per group, from the whole returns G_i0 = r_i, as the sequence rule's
            scale = self.group_scale(to_go[0], group, size, total[0])
            centred = torch.stack([self.group_centre(g, group, size, s) for g, s in zip(to_go, total)])
            return {"token_rewards": (centred / scale).T * mask}
        r = batch.sequence_rewards
        if kl_coef:  # with 0 the reference is never scored (r - 0 * kl is r exactly)
            r = r - kl_coef * batch.token_kl.sum(1)
        size = torch.bincount(group).to(r.dtype)
        total = torch.zeros_like(size).index_add_(0, group, r)
        return {"token_rewards": self.group_advantage(r, group, size, total)[:, None] * mask}

    def group_advantage(self, r, group, size, total):
        """``A_i``: the rule's centred reward (:meth:`group_centre`), divided by the spread
        ``scale_rewards`` names (:meth:`group_scale`)."""
        centre = self.group_centre(r, group, size, total)
        if self.options.scale_rewards == "none":
            return centre
        return centre / self.group_scale(r, group, size, total)

    def group_scale(self, r, group, size, total):
        """``[batch]``: each response's divisor, ``std + eps`` of its group's rewards
        (``"group"``) or of the whole batch's (``"batch"``); 1 for ``"none"``."""
        if self.options.scale_rewards == "none":
            return torch.ones_like(r)
        if self.options.scale_rewards == "batch":
            return batch_std(r).expand_as(r) + self.options.eps
        centred = r - (total / size)[group]
        var = torch.zeros_like(size).index_add_(0, group, centred**2) / (size - 1).clamp(min=1)
        return var[group].sqrt() + self.options.eps


def batch_std(r):
    """The sample std (Bessel-corrected, as TRL's ``nanstd``) of the rewards ``r``
    (``[batch]``) of the whole batch: of every rank's while the trainer holds the global
    batch (``estimate`` runs inside it), as TRL's ``scale_rewards = "batch"`` takes the
    std of the rewards gathered from every process; 0 for a batch of one."""
    ones = torch.ones_like(r)
    mean = masked_mean(r, ones)
    return (masked_sum((r - mean) ** 2, ones) / (masked_sum(ones, ones) - 1).clamp(min=1)).sqrt()


class RLOO(GroupRelative):
    """``A_i = r_i - mean_{j != i} r_j`` over the other responses to the same prompt."""

    name = "rloo"

    @attrs.frozen
    class Options(GroupRelative.Options):
        #: Divide A_i by a spread of the rewards (TRL GRPOConfig's ``scale_rewards``): "none"
        #: (RLOO as Ahmadian et al. 2024 wrote it), "group": the group's std, which makes it
        #: GRPO's advantage (Shao et al. 2024) times G/(G-1), "batch": the std of every
        #: reward of the batch (all ranks').
        scale_rewards: str = attrs.field(default="none", validator=one_of("none", "group", "batch"))
        #: Added to the std when ``scale_rewards`` divides by one.
        eps: float = attrs.field(default=1e-6, validator=positive)

    def group_centre(self, r, group, size, total):
        n = size[group]
        leave_one_out = (total[group] - r) / (n - 1).clamp(min=1)
        return torch.where(n > 1, r - leave_one_out, torch.zeros_like(r))


class GRPO(GroupRelative):
    """``A_i = (r_i - mean_j r_j) / (std_j r_j + eps)`` within the prompt's group."""

    name = "grpo"

    @attrs.frozen
    class Options(GroupRelative.Options):
        #: Added to the group's std. With scale_rewards = "batch", to the batch's; TRL adds 1e-4.
        eps: float = attrs.field(default=1e-6, validator=positive)
        #: Divide the centred reward by (TRL GRPOConfig's ``scale_rewards``): "group": the
        #: group's std (GRPO, Shao et al. 2024); "batch": the std of every reward of the
        #: batch (all ranks'); "none": nothing, centred only (Dr. GRPO, Liu et al. 2025: the
        #: group's std biases the update towards too easy and too hard questions).
        scale_rewards: str = attrs.field(default="group", validator=one_of("group", "batch", "none"))

    def group_centre(self, r, group, size, total):
        return torch.where(size[group] > 1, r - (total / size)[group], torch.zeros_like(r))


class SequenceCredit(AdvantageConstructor):
    """``A_t = token_rewards_t``: the response's sequence credit on each of its tokens."""

    name = "sequence-credit"
    requires = frozenset({"token_rewards"})
    provides = frozenset({"advantages"})

    @attrs.frozen
    class Options:
        #: Whiten A_t: mean 0, std 1 over the batch's real tokens.
        whiten: bool = False

    def construct(self, batch, signals, ctx):
        advantages = signals["token_rewards"] * batch.response_mask
        if self.options.whiten:
            advantages = masked_whiten(advantages, batch.response_mask)
        return {"advantages": advantages}


@hookimpl
def tokenmdp_trajectory_estimators():
    return [RLOO, GRPO]


@hookimpl
def tokenmdp_advantage_constructors():
    return [SequenceCredit]


#: TRL's KL weights: RLOOConfig's, and GRPOConfig's before TRL 0.19 (now 0, which drops the
#: reference; tokenmdp's objective always keeps a KL term).
LM_BETA = {"rloo": 0.05, "grpo": 0.04}


@hookimpl
def tokenmdp_algorithms():
    updater = {"kl_coef": 0.0}  # the KL is in the sequence reward
    return [
        Recipe(
            name=cls.name,
            estimator=cls.name,
            advantage=SequenceCredit.name,
            updater="clipped-pg",
            options={"updater": updater},
            description=(cls.__doc__ or "").strip(),
            supervision="reward",
            # TRL's GRPOConfig/RLOOConfig: one optimizer step per generation batch
            # (num_iterations = 1), KL weight 0.04 (GRPO before TRL 0.19) and 0.05 (RLOO)
            lm_options={"updater": {"lr": LM_LR, "epochs": 1, "minibatches": 1}, "train": {"beta": LM_BETA[cls.name]}},
            lora_options={"updater": {"lr": LORA_LR}},
        )
        for cls in (RLOO, GRPO)
    ]


def _explain_rows(cls, title):
    def rows(explain):
        est = explain.like_run("estimator", cls.name)
        adv = explain.like_run("advantage", SequenceCredit.name, whiten=False)
        est.setup(explain.ctx)
        yield (
            title,
            f"{cls.name} + sequence-credit: the response's group-relative credit on each token",
            explain.credit_of(est, adv),
        )

    return rows


@hookimpl
def tokenmdp_credit_views(explain):
    return [
        CreditView(cls.name, _explain_rows(cls, title), order=order, shows=((cls.name, SequenceCredit.name),))
        for cls, title, order in ((RLOO, "RLOO", 40), (GRPO, "GRPO", 50))
    ]

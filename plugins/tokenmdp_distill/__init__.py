"""Context distillation: supervised fine-tuning of the unguided policy on the guided
reference's own samples. The baseline for Inverse-Q*, whose only supervision is the same
guide ``c`` (docs/distill.md).

Supervision: **none** (``Recipe.supervision = "none"``): no reward, no pairs; the guide
and a reference that knows what it means. Read top to bottom:

    x ~ the step's prompts;  y ~ pi_ref(. | c + x)                     estimator
    A_t = 0   (SFT weighs every target token alike)                   advantage
    loss = -(1/N) sum_{i,t} log pi_theta(y_it | x_i, y_i,<t)          updater
           (N = real tokens of the minibatch; the policy never sees c)

In expectation the loss is ``KL(pi_ref(.|c + x) || pi_theta(.|x))`` plus a constant
(the forward KL, mass-covering), where Inverse-Q*'s ``reverse-kl`` minimises
``KL(pi_theta(.|x) || pi_ref(.|c + x))`` on the policy's own states. Both have the
guided reference as their optimum; its exact score is reported as ``ceiling`` on toy envs.

The trainer samples a rollout from the policy every step regardless: it supplies the
prompts (and ``env_tokens`` counts it). The guided samples are counted in
``distill/sample_tokens``, which ``tokenmdp compare`` adds to the run's data tokens.
"""

from __future__ import annotations

from tokenmdp import LM_LR, LORA_LR, Recipe, hookimpl

from .components import (
    DISTILL_SIGNALS,
    GuidedSamples,
    SFTUpdater,
    ZeroAdvantage,
    distill_batch,
)

__all__ = [
    "DISTILL_SIGNALS",
    "GuidedSamples",
    "SFTUpdater",
    "ZeroAdvantage",
    "distill_batch",
]


@hookimpl
def tokenmdp_trajectory_estimators():
    return [GuidedSamples]


@hookimpl
def tokenmdp_advantage_constructors():
    return [ZeroAdvantage]


@hookimpl
def tokenmdp_policy_updaters():
    return [SFTUpdater]


@hookimpl
def tokenmdp_algorithms():
    return [
        Recipe(
            name="context-distill",
            estimator=GuidedSamples.name,
            advantage=ZeroAdvantage.name,
            updater=SFTUpdater.name,
            description="context distillation: SFT of the unguided policy on pi_ref(.|guide + x)'s samples",
            supervision="none",
            # one pass, one step per batch, as the other recipes on an LM
            lm_options={"updater": {"lr": LM_LR, "epochs": 1, "minibatches": 1}},
            lora_options={"updater": {"lr": LORA_LR}},
        )
    ]

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

With ``reward = "learned"`` (recipe ``ppo-rm``) the estimator fits its reward model
(``PPORewards.fit_reward_model``) when it rewards its first rollout, before any policy
update, and says so; a resumed run restores the fitted model from the checkpoint instead.

The package, one job per module: ``losses.py`` (GAE and the PPO loss, functions of
tensors), ``critics.py`` (the critics), ``kl.py`` (the KL controller), ``reward_model.py``
(the learned reward model), ``components.py`` (the estimator, the advantage constructor
and the updater); here, the hooks, the recipes and the ``explain`` view.
"""

from __future__ import annotations

from tokenmdp import LM_LR, LORA_LR, CreditView, Recipe, hookimpl

from .components import GAE, PPO, PPORewards
from .critics import Critic, LMValueNetwork, ValueHead, ValueNetwork, value_network
from .kl import KLController
from .losses import PPOLoss, gae, ppo_loss

__all__ = [
    "Critic",
    "GAE",
    "KLController",
    "LMValueNetwork",
    "LM_OPTIONS",
    "LORA_OPTIONS",
    "PPO",
    "PPOLoss",
    "PPORewards",
    "ValueHead",
    "ValueNetwork",
    "gae",
    "ppo_loss",
    "value_network",
]


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

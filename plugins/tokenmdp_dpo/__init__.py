"""DPO, IPO, online DPO and TDPO, composed from the same three slots as every algorithm.

Supervision: **preference pairs** (``Recipe.supervision = "pairs"``). Sampled pairs are
labelled by the task's reward ``R(x, y) = sum_t r(s_t, y_t)`` (the oracle reward model),
so DPO does use reward information, as labels: it never reads the rollout's env reward,
which is why its runs report ``used_env_reward = false``.

Read top to bottom (METHOD.md section 4):

    pairs        x ~ prompts, y_1, y_2 ~ pi_ref(.|x) (online: the current pi_theta);
                 y_w = the one with the higher R, y_l the other; ties dropped     estimator
                 (or read from a JSONL file of prompt/chosen/rejected)
    logratio(y|x) = sum_t log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t)
    h            = logratio(y_w|x) - logratio(y_l|x)
    loss         sigmoid: -log sigmoid(beta * h)      ipo: (h - 1/(2 beta))^2       updater
                 tdpo:    -log sigmoid(beta * h - delta), delta from sequence KLs
    token reward r_t = beta * log(pi_theta/pi_ref)(a_t|s_t) on the rollout           estimator
    advantage    A_t = r_t  (the implicit reward, = A* at pi_theta = pi*)             advantage

The trainer samples a rollout from the policy every step regardless. DPO's loss does not
use it: its implicit token reward is exported as ``token_rewards`` so that ``credit_corr``
scores DPO's credit assignment against the exact ``A*`` ("From r to Q*", Rafailov et al.
2024), and the rollout's tokens are what ``env_tokens`` counts. The pairs' own tokens are
counted in ``dpo/pair_tokens``.

Steps and budget (``N = estimator.num_pairs``, ``E = estimator.epochs``, ``S = train.steps``):

* offline (``dpo``): the ``N`` pairs are drawn once at set-up (seeded from ``train.seed``)
  and read as ``E`` shuffled passes; each trainer step takes the next ``E*N/S`` of them,
  so training ends after exactly ``E`` epochs (never more), whatever ``S`` is;
* online (``dpo-online``): the steps are split into ``R = estimator.rounds`` rounds (unset:
  one per step); each round samples ``N/R`` fresh pairs from the current policy at its
  first step and reads them ``E`` times over its steps. The same ``N`` labelled pairs and
  ``E*N`` pair presentations in total.

Each step's pairs are split, in order, into minibatches of ``updater.minibatch_size``
pairs, one Adam step each. The pairs travel from estimator to updater as the signal
``preference_pairs``, a :class:`PairBatch` (not a per-token tensor, so ``check_finite``
skips it); the ``dpo``/``tdpo`` updaters require it, so a composition without a pair
estimator fails at start-up.
"""

from __future__ import annotations

from tokenmdp import LM_LR, LORA_LR, CreditView, Recipe, hookimpl, load_pair_file, sample_pairs, sequence_rewards

from .components import DPOUpdater, ImplicitReward, PairBatch, PreferencePairs
from .losses import dpo_loss, sequence_logratio
from .tdpo import TDPOUpdater, sequence_kl, tdpo_loss

__all__ = [
    "DPOUpdater",
    "ImplicitReward",
    "PairBatch",
    "PreferencePairs",
    "TDPOUpdater",
    "dpo_loss",
    "load_pair_file",
    "sample_pairs",
    "sequence_kl",
    "sequence_logratio",
    "sequence_rewards",
    "tdpo_loss",
]


@hookimpl
def tokenmdp_trajectory_estimators():
    return [PreferencePairs]


@hookimpl
def tokenmdp_advantage_constructors():
    return [ImplicitReward]


@hookimpl
def tokenmdp_policy_updaters():
    return [DPOUpdater, TDPOUpdater]


@hookimpl
def tokenmdp_algorithms():
    common = dict(
        estimator=PreferencePairs.name,
        advantage=ImplicitReward.name,
        supervision="pairs",
        # TRL's DPOConfig: beta 0.1, in the loss and in the objective the run is scored by
        lm_options={"updater": {"lr": LM_LR, "beta": 0.1}, "train": {"beta": 0.1}},
        lora_options={"updater": {"lr": LORA_LR}},
    )
    return [
        Recipe(
            name="dpo",
            updater=DPOUpdater.name,
            description="DPO on a fixed set of reward-labelled pairs from pi_ref (or a file); loss sigmoid or ipo",
            **common,
        ),
        Recipe(
            name="dpo-online",
            updater=DPOUpdater.name,
            options={"estimator": {"online": True}},
            description="online DPO: pairs re-sampled from the current policy each round, same pair budget",
            **common,
        ),
        Recipe(
            name="tdpo",
            updater=TDPOUpdater.name,
            description="TDPO: DPO margin with sequence-KL terms (variant tdpo1/tdpo2)",
            **common,
        ),
    ]


def _explain_rows(explain):
    """DPO's implicit reward of the run's policy. Its pairs are not used: one pair, the
    fewest its set-up accepts for one step."""
    est = explain.like_run(
        "estimator", PreferencePairs.name, pairs="sampled", path=None, num_pairs=1, epochs=1, online=False, rounds=None
    )
    adv = explain.like_run("advantage", ImplicitReward.name)
    est.setup(explain.ctx)
    yield (
        "DPO implicit",
        "preference-pairs + implicit-reward: beta*log(pi_theta/pi_ref) of this run's policy",
        explain.credit_of(est, adv),
    )


@hookimpl
def tokenmdp_credit_views(explain):
    return [CreditView("dpo", _explain_rows, order=30, shows=((PreferencePairs.name, ImplicitReward.name),))]

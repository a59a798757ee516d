"""Scoring against the exact optimum: every toy run reports these every evaluation step."""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from .ops import masked_correlation
from .policies.base import TokenPolicy
from .rollout import RolloutBatch
from .solver import Solution, solve, tree_logprobs


class ExactEvaluator:
    """Holds the solver's answer for (task, reference, beta) and scores policies exactly."""

    def __init__(self, task, reference: TokenPolicy, beta: float):
        self.task = task
        self.solution: Solution = solve(task, reference, beta)
        self.start = self.solution.evaluate(self.solution.ref_logp)
        #: ``J* - J(pi_ref)``: what there is to gain; regret is also reported as a fraction of it.
        self.start_gap = self.start["regret"]

    def evaluate(self, policy: TokenPolicy, prefix_ids: Tensor | None = None) -> dict[str, float]:
        """Exact scores of ``policy`` (conditioned on ``prefix_ids`` if given).

        ``closure = (J(pi) - J(pi_ref)) / (J* - J(pi_ref)) = 1 - regret_frac``."""
        scores = self.solution.evaluate(tree_logprobs(policy, self.task, prefix_ids=prefix_ids))
        scores["regret_frac"] = scores["regret"] / self.start_gap if self.start_gap > 0 else 0.0
        scores["closure"] = 1.0 - scores["regret_frac"]
        scores["j_star"] = self.solution.j_star
        return scores

    def credit(self, batch: RolloutBatch, signals: Mapping[str, Tensor], advantages: Mapping[str, Tensor]) -> dict:
        """``credit_corr``: correlation of the per-token credit with the true A* on the
        sampled tokens (``token_rewards`` when the estimator provides them, else the
        advantages); ``credit_corr_advantages`` always uses the advantages."""
        true = self.solution.token_advantages(batch.prompt_index, batch.response_ids, batch.response_mask)
        credit = signals.get("token_rewards", advantages["advantages"])
        return {
            "credit_corr": masked_correlation(credit.detach(), true, batch.response_mask),
            "credit_corr_advantages": masked_correlation(advantages["advantages"].detach(), true, batch.response_mask),
        }

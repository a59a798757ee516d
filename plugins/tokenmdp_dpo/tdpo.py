"""TDPO (Zeng et al. 2024, "Token-level Direct Preference Optimization"): DPO's margin
minus a difference of sequential KL terms, on the same pairs as DPO.

    SeqKL(x, y; pi_ref || pi) = sum_t KL(pi_ref(.|s_t) || pi_theta(.|s_t))   (full vocabulary)
    u      = beta * (logratio(y_w|x) - logratio(y_l|x))
    TDPO1: -log sigmoid(u - beta * (SeqKL(x, y_l) - SeqKL(x, y_w)))
    TDPO2: -log sigmoid(u - alpha * beta * (SeqKL(x, y_l) - sg(SeqKL(x, y_w))))

As in the paper (delta_2 = beta*SeqKL_l - sg(beta*SeqKL_w)) and the authors' code
(``beta * (h - alpha * (kl_l - kl_w.detach()))``), TDPO2's KL term is scaled by beta too;
at beta = 1 it is ``u - alpha * (SeqKL_l - sg(SeqKL_w))``.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from tokenmdp import one_of, positive

from .components import DPOUpdater, PairOptions, PairScores, pair_metrics


def sequence_kl(ref_logits: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
    """``[N]``: ``sum_t KL(pi_ref(.|s_t) || pi(.|s_t))`` over the real tokens, from whole
    logits: the formula, which the updater computes through ``ctx.token_kl`` instead
    (``score_pairs(..., kl=True)``; tests/test_dpo.py checks the two agree)."""
    ref_logp, logp = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
    per_token = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return torch.where(mask > 0, per_token, 0.0).sum(1)


def tdpo_loss(
    chosen_logratio: Tensor,
    rejected_logratio: Tensor,
    chosen_kl: Tensor,
    rejected_kl: Tensor,
    beta: float,
    variant: str = "tdpo2",
    alpha: float = 0.5,
) -> Tensor:
    """Per-pair TDPO loss from sequence log-ratios and sequence KLs."""
    u = beta * (chosen_logratio - rejected_logratio)
    if variant == "tdpo1":
        delta = beta * (rejected_kl - chosen_kl)
    else:
        delta = alpha * beta * (rejected_kl - chosen_kl.detach())
    return -torch.nn.functional.logsigmoid(u - delta)


class TDPOUpdater(DPOUpdater):
    """DPO's updater with the TDPO loss; every other step (pairs, minibatches, metrics) is DPO's."""

    name = "tdpo"
    scores_kl = True

    @attrs.frozen
    class Options(PairOptions):
        #: Margin offset delta: "tdpo1": beta * (KL_l - KL_w); "tdpo2": alpha * beta * (KL_l - KL_w), KL_w
        #: not differentiated (KL_w, KL_l: sequence KL(pi_ref || pi) of the chosen and rejected response).
        variant: str = attrs.field(default="tdpo2", validator=one_of("tdpo1", "tdpo2"))
        #: Weight of the KL term in TDPO2.
        alpha: float = attrs.field(default=0.5, validator=positive)

    def pair_loss(self, scores: PairScores, beta: float):
        kl = scores.sequence_kl  # SeqKL(pi_ref || pi) of each response, a chunk at a time on an LM
        m = scores.chosen.shape[0]
        kl_w, kl_l = kl[:m], kl[m:]
        loss = tdpo_loss(scores.chosen, scores.rejected, kl_w, kl_l, beta, self.options.variant, self.options.alpha)
        return loss, {
            **pair_metrics(scores, beta),
            "tdpo/seq_kl_chosen": kl_w.detach(),
            "tdpo/seq_kl_rejected": kl_l.detach(),
        }

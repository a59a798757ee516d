"""The pair losses as plain functions of per-pair sequence log-ratios (testable on their own).

logratio(y|x) = log pi_theta(y|x) - log pi_ref(y|x) = sum_t log(pi_theta/pi_ref)(y_t|s_t)
h             = logratio(y_w|x) - logratio(y_l|x)
sigmoid (DPO, Rafailov et al. 2023):  -log sigmoid(beta * h)
ipo     (IPO, Azar et al. 2023):      (h - 1/(2 beta))^2
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSSES = ("sigmoid", "ipo")


def sequence_logratio(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """``[N]``: ``sum_t (log pi - log pi_ref)(y_t|s_t)`` over real tokens."""
    return torch.where(mask > 0, logp - ref_logp, 0.0).sum(1)


def dpo_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float, kind: str = "sigmoid") -> Tensor:
    """Per-pair loss on ``h = logratio_w - logratio_l``."""
    h = chosen_logratio - rejected_logratio
    if kind == "sigmoid":
        return -torch.nn.functional.logsigmoid(beta * h)
    if kind == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {kind!r}; choose one of {', '.join(LOSSES)}")

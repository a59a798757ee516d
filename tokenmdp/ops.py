"""Masked tensor helpers shared by every plugin (one obvious place, as in SB3)."""

from __future__ import annotations

import math
import numbers
from typing import Mapping

import torch
from torch import Tensor

from .errors import NonFiniteError


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with padded positions set to 0, so that garbage there (even NaN/inf, or values
    whose square overflows) cannot leak into results through ``0 * garbage``."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    return (_zero_padding(x, mask) * mask).sum()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (_zero_padding(x, mask) * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Mean 0, std 1 over real tokens only; padding stays 0."""
    x = _zero_padding(x, mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def suffix_sums(x: Tensor, mask: Tensor) -> Tensor:
    """``out[:, t] = sum_{k >= t} x[:, k]`` over real tokens (reward-to-go, gamma = 1)."""
    x = _zero_padding(x, mask) * mask
    return (x.flip(1).cumsum(1).flip(1)) * mask


def masked_correlation(a: Tensor, b: Tensor, mask: Tensor) -> float:
    """Pearson correlation over real tokens; NaN when either side is constant."""
    m = mask.bool()
    x, y = a[m].double(), b[m].double()
    if x.numel() < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def check_finite(values: Mapping[str, object], who: str, step: int) -> None:
    """Stop the run on NaN/inf, naming the component and step."""
    for key, value in values.items():
        bad = (not bool(torch.isfinite(value).all())) if isinstance(value, Tensor) else (
            isinstance(value, numbers.Real) and not math.isfinite(value))
        if bad:
            raise NonFiniteError(f"{who} produced a non-finite {key!r} at step {step}; run stopped")

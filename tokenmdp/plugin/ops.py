"""Masked tensor helpers shared by every plugin (one obvious place, as in SB3).

Under data-parallel training the batch statistics here (``masked_sum``, ``masked_mean``,
``masked_whiten``, ``masked_correlation``) are taken over the union of every rank's batch
while the trainer holds :func:`tokenmdp.distributed.global_batch` (around ``estimate``,
``construct`` and the credit metrics): the sums and counts are all-reduced, so the result
equals the one on the concatenated global batch. In a single process nothing changes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from .. import distributed
from ..errors import NonFiniteError


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with padded positions set to 0, so that garbage there (even NaN/inf, or values
    whose square overflows) cannot leak into results through ``0 * garbage``."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is in a half type (bf16/fp16 logits of an autocast forward),
    else unchanged: losses, log-softmax and KL never run in half precision, and a float64
    model stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    total = (zero_padding(x, mask) * mask).sum()
    return distributed.all_sum(total)[0] if distributed.reducing() else total


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over real tokens; with ``dim`` (e.g. 0: a per-position mean over the batch),
    only along that dimension. A slice with no real token gives 0."""
    if dim is None:
        total, count = (zero_padding(x, mask) * mask).sum(), mask.sum()
    else:
        total, count = (zero_padding(x, mask) * mask).sum(dim), mask.sum(dim)
    if distributed.reducing():
        total, count = distributed.all_sum(total, count)
    return total / count.clamp(min=1)


def _statistics_dtype(x: Tensor) -> torch.dtype:
    """float64 for batch statistics, except where the device has none (MPS: float32)."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Mean 0, std ``sqrt(var / (var + eps))`` (1 unless the spread is tiny) over real
    tokens only; padding stays 0; the result has ``x``'s dtype.

    The mean, the variance and the centring are computed in float64: in float32, the
    rounding error of the mean (about 6e-8 * |mean|) is divided by the std, so a batch with
    a small spread around a large mean would come out with a mean far from 0 (1e-5 for a
    spread of 1e-3 around 1). In float64 the only error left is the final rounding of each
    whitened value to ``x``'s dtype."""
    wide = zero_padding(x, mask).to(_statistics_dtype(x))
    wide_mask = mask.to(wide.dtype)
    mean = masked_mean(wide, wide_mask)
    var = masked_mean((wide - mean) ** 2, wide_mask)
    out = (wide - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return (out * wide_mask).to(x.dtype)


def suffix_sums(x: Tensor, mask: Tensor) -> Tensor:
    """``out[:, t] = sum_{k >= t} x[:, k]`` over real tokens (reward-to-go, gamma = 1)."""
    x = zero_padding(x, mask) * mask
    return (x.flip(1).cumsum(1).flip(1)) * mask


def masked_correlation(a: Tensor, b: Tensor, mask: Tensor) -> float:
    """Pearson correlation over real tokens; NaN when either side is constant."""
    m = mask.bool()
    x, y = a[m].double(), b[m].double()
    if distributed.reducing():
        return _global_correlation(x, y)
    if x.numel() < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


def _global_correlation(x: Tensor, y: Tensor) -> float:
    """Pearson correlation over every rank's real tokens, from all-reduced float64 moments."""
    moments = torch.stack(
        [
            torch.tensor(float(x.numel()), dtype=torch.float64),
            x.sum(),
            y.sum(),
            (x * x).sum(),
            (y * y).sum(),
            (x * y).sum(),
        ]
    )
    n, sx, sy, sxx, syy, sxy = distributed.all_sum(moments)[0].tolist()
    if n < 2:
        return float("nan")
    vx, vy = sxx - sx * sx / n, syy - sy * sy / n
    if vx <= 1e-12 * sxx or vy <= 1e-12 * syy:  # constant on one side (up to rounding)
        return float("nan")
    return (sxy - sx * sy / n) / math.sqrt(vx * vy)


def check_finite(values: Mapping[str, object], who: str, step: int) -> None:
    """Stop the run on NaN/inf, naming the component and step.

    Float tensors are tested together first, by one float64 sum each: a sum is finite
    exactly when every element is (float32/bf16 values cannot overflow a float64 sum), and
    it reads each tensor once instead of writing a mask of it (a Gemma-3 270M's
    parameters: 1.3 s a step before, docs/performance.md). Only a failing test looks
    for the offending entry. float64 tensors, whose sum could overflow, are tested
    elementwise."""
    floats = [v for v in values.values() if isinstance(v, Tensor) and v.is_floating_point() and v.numel()]
    summed = [v for v in floats if v.dtype != torch.float64 and v.device.type != "mps"]  # MPS: no float64
    if summed and len(summed) == len(floats) == len(values):
        total = torch.stack([v.detach().sum(dtype=torch.float64) for v in summed])
        if bool(torch.isfinite(total).all()):
            return
    for key, value in values.items():
        bad = (
            (not bool(torch.isfinite(value).all()))
            if isinstance(value, Tensor)
            else (isinstance(value, numbers.Real) and not math.isfinite(value))
        )
        if bad:
            raise NonFiniteError(f"{who} produced a non-finite {key!r} at step {step}; run stopped")


def correlation_interval(
    a: Tensor, b: Tensor, mask: Tensor, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A percentile-bootstrap confidence interval of :func:`masked_correlation` of ``[B, T]``
    ``a`` and ``b`` over ``mask``, resampling whole rows (responses), not tokens: the tokens
    of one response are not independent. ``(nan, nan)`` with fewer than two rows that hold
    a real token. Deterministic for ``seed``."""
    real = mask.double()
    keep = real.sum(1) > 0
    a, b, real = a.double()[keep], b.double()[keep], real[keep]
    n = a.shape[0]
    if n < 2:
        return float("nan"), float("nan")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for start in range(0, resamples, 100):  # memory: 100 resamples x B x T at a time
        picks = torch.randint(0, n, (min(100, resamples - start), n), generator=generator)
        counts = torch.zeros(picks.shape[0], n, dtype=torch.float64).scatter_add_(
            1, picks, torch.ones_like(picks, dtype=torch.float64)
        )
        w = counts[:, :, None] * real[None]
        total = w.sum((1, 2))
        da = a[None] - ((w * a[None]).sum((1, 2)) / total)[:, None, None]
        db = b[None] - ((w * b[None]).sum((1, 2)) / total)[:, None, None]
        cov, va, vb = ((w * da * db).sum((1, 2)), (w * da * da).sum((1, 2)), (w * db * db).sum((1, 2)))
        values.append(cov / (va * vb).sqrt())
    r = torch.cat(values)
    r = r[torch.isfinite(r)]
    if r.numel() == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    low, high = torch.quantile(r, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high

"""The inverse-CDF draw (``train.sampler = "inverse-cdf"``): one uniform per row, placed in
the row's cumulative distribution, summed in float64.

A large vocabulary is searched in two levels: the float64 sums of blocks of
:data:`BLOCK` entries say which block the uniform falls in, and only that block's
cumulative sum is made. One float64 cumulative sum over the whole row (16 MiB for 8 rows of
Gemma-3's 262,144 entries, a fresh allocation per token) took 8.5-10.6 ms a token in the
sampling loop against 1.4 ms for the two levels (docs/performance.md, section 11). Both
levels sum the same float32 probabilities in float64, so the boundaries agree to ~1e-14 and
the same uniform draws the same token but for that sliver (tested against the one-level
search). A token of probability 0 is never drawn: a block of mass 0 is never entered, and
within a block the search skips entries that add nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Entries per block of the two-level search.
BLOCK = 1024
#: Rows at least this long are searched in two levels; shorter ones in one.
TWO_LEVELS_FROM = 4 * BLOCK


def draw(probs: Tensor, uniform: Tensor) -> Tensor:
    """``[B]`` token ids for ``probs`` (``[B, V]``, unnormalised, non-negative) and one
    ``uniform`` in [0, 1) per row (``[B, 1]``, float64). A row whose scaled uniform rounds
    up to its total (probability ~2^-53) gets ``V``: the caller's fallback."""
    if probs.shape[1] < TWO_LEVELS_FROM:
        cdf = torch.cumsum(probs, -1, dtype=torch.float64)  # no float64 copy of probs first
        return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(1)
    return _two_levels(probs, uniform)


def _two_levels(probs: Tensor, uniform: Tensor) -> Tensor:
    rows, v = probs.shape
    whole = v // BLOCK * BLOCK
    sums = probs[:, :whole].reshape(rows, -1, BLOCK).sum(-1, dtype=torch.float64)
    if whole < v:
        sums = torch.cat([sums, probs[:, whole:].sum(-1, keepdim=True, dtype=torch.float64)], dim=1)
    ends = sums.cumsum(-1)  # [B, blocks]: the cumulative mass at each block's end
    point = uniform * ends[:, -1:]
    block = torch.searchsorted(ends, point, right=True)  # [B, 1]; = blocks only if point rounds up to the total
    past = block >= sums.shape[1]
    block = block.clamp(max=sums.shape[1] - 1)
    start = block * BLOCK
    index = start + torch.arange(BLOCK, device=probs.device)  # [B, BLOCK]
    inside = index < v
    entries = probs.gather(1, index.clamp(max=v - 1)) * inside
    before = torch.where(block > 0, ends.gather(1, (block - 1).clamp(min=0)), 0.0)
    within = torch.searchsorted(torch.cumsum(entries, -1, dtype=torch.float64), point - before, right=True)
    over = within >= inside.sum(-1, keepdim=True)  # the block's own sum rounded above its sum (~1e-16)
    if bool(over.any()):
        last = torch.where(entries > 0, torch.arange(BLOCK, device=probs.device), -1).amax(-1, keepdim=True)
        within = torch.where(over, last, within)
    return torch.where(past, v, start + within).squeeze(1)

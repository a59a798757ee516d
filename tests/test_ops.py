"""Property tests for the masked tensor helpers in tokenmdp/plugin/ops.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tokenmdp import NonFiniteError
from tokenmdp.plugin.ops import check_finite, masked_correlation, masked_mean, masked_sum, masked_whiten, suffix_sums

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def masked_batches(draw, min_real: int = 0, prefix_masks: bool | None = None):
    """``(x, mask, garbage)``: float64 values, a 0/1 float mask and finite padding garbage."""
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-2, 1.0, 1e3]))
    x = rng.normal(size=(b, t)) * scale + draw(st.floats(-100, 100))
    if prefix_masks if prefix_masks is not None else draw(st.booleans()):
        lengths = rng.integers(0, t + 1, size=b)  # response masks: 1s then 0s
        mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
    else:
        mask = (rng.random((b, t)) < draw(st.floats(0.2, 1.0))).astype(np.float64)
    assume(mask.sum() >= min_real)
    garbage = rng.normal(size=(b, t)) * draw(st.sampled_from([1.0, 1e3, 1e6]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return torch.tensor(x, dtype=dtype), torch.tensor(mask, dtype=dtype), torch.tensor(garbage, dtype=dtype)


def assume_well_spread(x, real):
    """Spread far above eps (1e-8 on the variance) and float32 rounding of the mean."""
    values = x[real].double()
    assume(float(values.std(unbiased=False)) > max(0.03, 1e-3 * float(values.abs().max())))


def with_garbage(x, mask, garbage):
    return torch.where(mask.bool(), x, garbage)


def tol(x):
    return dict(rtol=1e-4, atol=1e-4) if x.dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)


# --- masked_whiten --------------------------------------------------------------------------


@SETTINGS
@given(masked_batches(min_real=2))
def test_masked_whiten_mean_zero_std_one_on_real_tokens(batch):
    x, mask, _ = batch
    real = mask.bool()
    assume_well_spread(x, real)
    out = masked_whiten(x, mask)
    assert out.shape == x.shape and out.dtype == x.dtype
    values = out[real].double()
    # The statistics are float64, so the only float32 error left is each output's final
    # rounding (about 6e-8 * |value|, values at most sqrt(24) here); float64 inputs keep
    # eps64 * |mean| / std, below 1e-11 for this strategy's means and spreads.
    atol = 1e-6 if x.dtype == torch.float32 else 1e-9
    assert abs(float(values.mean())) < atol
    # eps in rsqrt(var + eps) makes the std sqrt(var / (var + eps)), not exactly 1: below 1
    # by about eps / (2 var), i.e. up to 6e-6 at this test's smallest spread.
    var = float(x[real].double().var(unbiased=False))
    assert abs(float(values.std(unbiased=False)) - math.sqrt(var / (var + 1e-8))) < atol
    assert abs(float(values.std(unbiased=False)) - 1.0) < 1e-8 / (2 * var) + atol
    assert (out[~real] == 0).all()
    # Same as whitening the real values alone.
    ref = x[real].double()
    expected = (ref - ref.mean()) / torch.sqrt(ref.var(unbiased=False) + 1e-8)
    assert torch.allclose(values, expected, **tol(x))


@SETTINGS
@given(masked_batches(min_real=1), st.booleans())
def test_masked_whiten_ignores_padding_garbage(batch, shift_mean):
    x, mask, garbage = batch
    clean = masked_whiten(torch.where(mask.bool(), x, 0), mask, shift_mean=shift_mean)
    dirty = masked_whiten(with_garbage(x, mask, garbage), mask, shift_mean=shift_mean)
    assert torch.equal(clean, dirty) or torch.allclose(clean, dirty, rtol=1e-12, atol=1e-12)
    assert (dirty[~mask.bool()] == 0).all()
    assert torch.isfinite(dirty).all()


@SETTINGS
@given(masked_batches(min_real=2))
def test_masked_whiten_without_shift_keeps_the_mean(batch):
    x, mask, _ = batch
    real = mask.bool()
    assume_well_spread(x, real)
    out = masked_whiten(x, mask, shift_mean=False)
    ref = x[real].double()
    expected = (ref - ref.mean()) / torch.sqrt(ref.var(unbiased=False) + 1e-8) + ref.mean()
    assert torch.allclose(out[real].double(), expected, **tol(x))
    assert (out[~real] == 0).all()


NONFINITE_GARBAGE = [float("nan"), float("inf"), -float("inf"), 1e30, -3e38]


@SETTINGS
@given(masked_batches(min_real=1), st.lists(st.sampled_from(NONFINITE_GARBAGE), min_size=1, max_size=4))
def test_padding_garbage_that_is_not_finite_or_overflows_is_ignored(batch, bad_values):
    """NaN/inf (or values whose square overflows) at padded positions must not leak in."""
    x, mask, garbage = batch
    pad = (mask == 0).nonzero()
    assume(pad.shape[0] > 0)
    garbage = garbage.clone()
    for i, value in enumerate(bad_values):
        r, c = pad[i % pad.shape[0]].tolist()
        garbage[r, c] = value
    clean_x = torch.where(mask.bool(), x, 0)
    dirty_x = with_garbage(x, mask, garbage)
    # bit-equal: padding is replaced by exact zeros before any arithmetic, so both sides run
    # the same operations on the same real values
    assert torch.equal(masked_whiten(clean_x, mask), masked_whiten(dirty_x, mask))
    assert torch.equal(suffix_sums(clean_x, mask), suffix_sums(dirty_x, mask))
    assert torch.equal(masked_mean(clean_x, mask), masked_mean(dirty_x, mask))
    assert torch.equal(masked_sum(clean_x, mask), masked_sum(dirty_x, mask))
    assert torch.isfinite(masked_whiten(dirty_x, mask)).all()


def test_masked_whiten_constant_input_is_finite():
    x = torch.full((2, 3), 5.0)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = masked_whiten(x, mask)
    assert torch.isfinite(out).all() and (out == 0).all()


def test_masked_whiten_all_padding_is_zero():
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    out = masked_whiten(x, torch.zeros(2, 3))
    assert torch.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("pad_value", [0.0, 1e6, float("inf"), float("nan")])
def test_masked_whiten_passes_gradients_only_to_real_tokens(pad_value):
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    x = torch.where(
        mask.bool(), torch.randn(2, 4, dtype=torch.float64, generator=generator), pad_value
    ).requires_grad_()
    weights = torch.randn(2, 4, dtype=torch.float64, generator=generator)
    ((masked_whiten(x, mask) * weights).sum() + (suffix_sums(x, mask) * weights).sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[mask == 0] == 0).all()
    assert (x.grad[mask == 1] != 0).any()


# --- masked_mean / masked_sum -------------------------------------------------------------


@SETTINGS
@given(masked_batches(min_real=1))
def test_masked_mean_and_sum(batch):
    x, mask, garbage = batch
    dirty = with_garbage(x, mask, garbage)
    real = x[mask.bool()].double()
    assert math.isclose(float(masked_sum(dirty, mask)), float(real.sum()), rel_tol=1e-4, abs_tol=1e-3)
    assert math.isclose(float(masked_mean(dirty, mask)), float(real.mean()), rel_tol=1e-4, abs_tol=1e-4)


def test_masked_mean_of_nothing_is_zero():
    assert float(masked_mean(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 3))) == 0.0


# --- suffix_sums ----------------------------------------------------------------------------


def loop_suffix_sums(x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    b, t = x.shape
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                out[i, j] = sum(float(x[i, k]) for k in range(j, t) if mask[i, k])
    return out


@SETTINGS
@given(masked_batches())
def test_suffix_sums_equals_loop(batch):
    x, mask, _ = batch
    out = suffix_sums(x, mask)
    assert out.shape == x.shape and out.dtype == x.dtype
    expected = torch.tensor(loop_suffix_sums(x, mask), dtype=torch.float64)
    scale = 1.0 + float(x.abs().sum())
    atol = 1e-5 * scale if x.dtype == torch.float32 else 1e-12 * scale
    assert torch.allclose(out.double(), expected, rtol=0, atol=atol)
    assert (out[mask == 0] == 0).all()


@SETTINGS
@given(masked_batches())
def test_suffix_sums_ignores_padding_garbage(batch):
    x, mask, garbage = batch
    clean = suffix_sums(torch.where(mask.bool(), x, 0), mask)
    dirty = suffix_sums(with_garbage(x, mask, garbage), mask)
    assert torch.equal(clean, dirty)  # bit-equal: padding is zeroed before the sums


def test_suffix_sums_small_example():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert suffix_sums(x, mask).tolist() == [[6.0, 5.0, 3.0, 0.0]]


# --- masked_correlation ---------------------------------------------------------------------


@SETTINGS
@given(masked_batches(min_real=2), st.integers(0, 2**31 - 1), st.floats(-1.0, 1.0))
def test_masked_correlation_equals_numpy(batch, seed, coupling):
    x, mask, garbage = batch
    rng = np.random.default_rng(seed)
    y = coupling * x + torch.tensor(rng.normal(size=tuple(x.shape)) * float(x.std() + 1), dtype=x.dtype)
    real = mask.bool()
    a, b = x[real].double().numpy(), y[real].double().numpy()
    assume(a.std() > 1e-6 * (1 + abs(a).max()) and b.std() > 1e-6 * (1 + abs(b).max()))
    expected = float(np.corrcoef(a, b)[0, 1])
    got = masked_correlation(with_garbage(x, mask, garbage), with_garbage(y, mask, -garbage), mask)
    assert isinstance(got, float)
    assert -1.0 - 1e-9 <= got <= 1.0 + 1e-9
    assert got == pytest.approx(expected, abs=1e-9)


def test_masked_correlation_perfect_and_degenerate():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_correlation(x, 2 * x + 1, mask) == pytest.approx(1.0)
    assert masked_correlation(x, -x, mask) == pytest.approx(-1.0)
    assert math.isnan(masked_correlation(x, torch.ones_like(x), mask))  # constant side
    assert math.isnan(masked_correlation(x, x, torch.tensor([[1.0, 0.0, 0.0, 0.0]])))  # one token
    assert math.isnan(masked_correlation(x, x, torch.zeros_like(mask)))


# --- check_finite ---------------------------------------------------------------------------


BAD = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize(
    "wrap",
    [
        lambda v: v,
        lambda v: torch.tensor([1.0, v, 2.0]),
        lambda v: torch.tensor(v, dtype=torch.float64),
        lambda v: torch.tensor([[0.0, 1.0], [v, 3.0]], dtype=torch.float16),
        lambda v: np.float64(v),
        lambda v: np.float32(v),
    ],
    ids=["float", "tensor", "scalar-tensor", "half-tensor", "np.float64", "np.float32"],
)
def test_check_finite_raises_naming_component_and_step(bad, wrap):
    values = {"loss": 1.5, "policy/kl": wrap(bad), "ok": torch.zeros(3)}
    with pytest.raises(NonFiniteError) as info:
        check_finite(values, "updater 'ppo'", 17)
    message = str(info.value)
    assert "updater 'ppo'" in message
    assert "17" in message
    assert "policy/kl" in message


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"loss": 0.0, "kl": -3.5, "n": 4, "flag": True},
        {
            "adv": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
            "mask": torch.ones(3, 4, dtype=torch.long),
            "b": torch.tensor(True),
        },
        {"big": 1e300, "tiny": -1e-300, "t": torch.tensor(3.4e38)},
        {"name": "not a number", "none": None, "list": [1, 2]},
        {"np": np.float32(2.0), "np64": np.float64(-1.0)},
    ],
)
def test_check_finite_passes_finite_values(values):
    check_finite(values, "estimator 'guide'", 3)


@SETTINGS
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=8), st.integers(0, 10**6))
def test_check_finite_raises_iff_some_value_is_not_finite(numbers, step):
    values = {f"v{i}": (torch.tensor([n]) if i % 2 else n) for i, n in enumerate(numbers)}
    # float32 tensors overflow to inf for huge floats; judge finiteness the way they are stored.
    finite = all(math.isfinite(float(v)) for v in values.values())
    if finite:
        check_finite(values, "advantage 'token'", step)
    else:
        with pytest.raises(NonFiniteError, match=rf"advantage 'token'.*\b{step}\b"):
            check_finite(values, "advantage 'token'", step)

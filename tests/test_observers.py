"""Calibration observers: streaming histogram, range selection methods and weight ranges."""

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.observers import (
    ActivationObserver,
    Histogram,
    kl_range,
    minmax_range,
    mse_range,
    percentile_range,
    weight_range,
)
from qcompiler.passes.scheme import QuantSpec

INT8_SYM = QuantSpec(8, signed=True, symmetric=True)
UINT8_ASYM = QuantSpec(8, signed=False, symmetric=False)
INT8_WEIGHT = QuantSpec(8, signed=True, symmetric=True, per_channel=True, narrow_range=True)


def growing_batches(rng):
    """Batches whose spread keeps growing, alternately towards the left and the right."""
    batches = [rng.uniform(-0.01, 0.01, 50)]
    for i in range(1, 40):
        spread = 1.3**i
        centre = spread * (0.5 if i % 2 else -0.5)
        batches.append(rng.normal(centre, spread / 4, 200))
    return batches


def fake_quant_mse(x, lo, hi, qmin, qmax):
    """Mean squared error of int8 symmetric quantize-dequantize of ``x`` over ``[lo, hi]``."""
    scale = max(-lo, hi) / qmax
    q = np.clip(np.rint(x / scale), qmin, qmax)
    return np.mean((q * scale - x) ** 2)


# --- Histogram -------------------------------------------------------------------------------


def test_merge_by_hand():
    hist = Histogram(bins=8)
    hist.update(np.arange(8) + 0.5)  # grid [0.5, 7.5], width 7/8; the top value in the last bin
    np.testing.assert_array_equal(hist.counts, np.ones(8))
    hist.update(np.array([14.0]))  # one doubling to width 1.75 covers [0.5, 14.5]
    assert hist.width == 1.75
    np.testing.assert_allclose(hist.edges, 0.5 + 1.75 * np.arange(9))
    np.testing.assert_array_equal(hist.counts, [2, 2, 2, 2, 0, 0, 0, 1])
    hist.update(np.array([-3.0]))  # extends left: old 8 bins merge into 4 at the top end
    assert hist.width == 3.5
    np.testing.assert_allclose(hist.edges, 0.5 - 14.0 + 3.5 * np.arange(9))
    np.testing.assert_array_equal(hist.counts, [0, 0, 0, 1, 4, 4, 0, 1])
    assert (hist.min, hist.max, hist.total) == (-3.0, 14.0, 10)


def test_growing_ranges_keep_counts_exact():
    rng = np.random.default_rng(1)
    batches = growing_batches(rng)
    hist = Histogram(bins=256)
    for batch in batches:
        hist.update(batch)
    data = np.concatenate(batches)
    assert hist.total == data.size == hist.counts.sum()
    assert (hist.min, hist.max) == (data.min(), data.max())
    assert hist.edges[0] <= data.min() and data.max() <= hist.edges[-1]
    # Merging nests old bins in new ones, so the streamed counts are those of one pass.
    np.testing.assert_array_equal(hist.counts, np.histogram(data, bins=hist.edges)[0])


def test_one_batch_and_many_batches_agree_on_percentiles():
    rng = np.random.default_rng(2)
    batches = growing_batches(rng)
    data = np.concatenate(batches)
    whole, streamed = Histogram(), Histogram()
    whole.update(data)
    for batch in batches:
        streamed.update(batch)
    assert streamed.total == whole.total == data.size
    for hist in (whole, streamed):
        for p in (60.0, 90.0, 99.0):
            lo, hi = percentile_range(hist, p)
            assert abs(hi - np.percentile(data, p)) <= hist.width
            assert abs(lo - np.percentile(data, 100.0 - p)) <= hist.width


def test_constant_tensor():
    hist = Histogram()
    hist.update(np.full(100, 3.0))
    assert hist.width > 0 and hist.counts.sum() == 100
    assert percentile_range(hist, 99.0) == (3.0, 3.0)
    assert kl_range(hist, INT8_SYM) == (3.0, 3.0)
    assert mse_range(hist, INT8_SYM) == (3.0, 3.0)
    hist.update(np.array([1.0, 5.0]))
    # The first real spread (4.0) sets the resolution: at most two doublings past the need.
    assert 4.0 / hist.bins <= hist.width <= 4 * 4.0 / hist.bins
    assert hist.counts.sum() == 102


def test_memory_does_not_grow():
    rng = np.random.default_rng(3)
    hist = Histogram(bins=512)
    for i in range(1000):
        hist.update(rng.normal(0.0, 1.0 + i / 100, 64))
    assert hist.counts.shape == (512,) and hist.edges.shape == (513,)
    assert hist.total == 64_000 == hist.counts.sum()


@settings(max_examples=60, deadline=None)
@given(
    data=hnp.arrays(
        np.float32,
        st.integers(1, 300),
        elements=st.floats(-1e6, 1e6, allow_nan=False, width=32),
    ),
    cuts=st.lists(st.integers(0, 300), max_size=8),
)
def test_chunking_keeps_total_and_extremes(data, cuts):
    hist = Histogram(bins=128)
    for chunk in np.split(data, sorted(c for c in cuts if c <= data.size)):
        hist.update(chunk)
    assert hist.total == data.size == hist.counts.sum()
    assert hist.min == float(data.min()) and hist.max == float(data.max())


# --- Activation range methods ----------------------------------------------------------------


def test_minmax_exact():
    rng = np.random.default_rng(4)
    obs = ActivationObserver("conv1_out")
    samples = [rng.normal(i, 1.0 + i, (4, 8, 8)).astype(np.float32) for i in range(5)]
    for s in samples:
        obs.update(s)
    assert obs.count == 5
    data = np.concatenate([s.ravel() for s in samples])
    assert obs.range("minmax", INT8_SYM) == (float(data.min()), float(data.max()))
    assert minmax_range(obs.hist) == (float(data.min()), float(data.max()))


def test_percentile_matches_numpy_on_gaussian():
    data = np.random.default_rng(5).standard_normal(200_000)
    obs = ActivationObserver("x")
    for chunk in np.array_split(data, 20):
        obs.update(chunk)
    for p in (99.0, 99.9, 99.99):
        lo, hi = obs.range("percentile", INT8_SYM, percentile=p)
        assert abs(hi - np.percentile(data, p)) <= obs.hist.width
        assert abs(lo - np.percentile(data, 100.0 - p)) <= obs.hist.width


def test_percentile_keeps_min_of_non_negative_tensor():
    data = np.abs(np.random.default_rng(6).standard_normal(50_000)) + 0.25
    hist = Histogram()
    hist.update(data)
    lo, hi = percentile_range(hist, 99.0)
    assert lo == data.min()
    assert abs(hi - np.percentile(data, 99.0)) <= hist.width


def test_kl_clips_huge_outliers():
    rng = np.random.default_rng(7)
    data = np.concatenate([rng.standard_normal(100_000), np.full(10, 1000.0)])
    obs = ActivationObserver("x")
    for chunk in np.array_split(rng.permutation(data), 10):
        obs.update(chunk)
    start = time.perf_counter()
    lo, hi = obs.range("kl", INT8_SYM)
    assert time.perf_counter() - start < 0.5
    # 2048 bins over [0, 1000] with 128 codes a side: thresholds below 128 bins (62.5) cannot be
    # told apart from the histogram, so this is the lowest the method can reach.
    assert 2.0 < hi <= 1000.0 * 128 / 2048 + 1e-9
    assert lo == data.min()


def test_kl_clips_moderate_outliers_near_the_gaussian_tail():
    rng = np.random.default_rng(8)
    data = np.concatenate([rng.standard_normal(100_000), np.full(10, 30.0)])
    hist = Histogram()
    hist.update(data)
    lo, hi = kl_range(hist, INT8_SYM)
    assert 2.0 < hi < 20.0 and -20.0 < lo < -2.0
    assert lo == -hi or lo == data.min()


@pytest.mark.parametrize("zero_share", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("signed", [False, True])
def test_kl_ignores_exact_zeros(zero_share, signed):
    # A ReLU output is mostly exact zeros. Zero is always representable (it is the zero point),
    # so those values lose nothing to any threshold and must not pull it down: the threshold
    # of the nonzero values alone is the reference.
    rng = np.random.default_rng(11)
    values = rng.standard_normal(100_000)
    if not signed:
        values = np.abs(values)
    spec = INT8_SYM if signed else UINT8_ASYM
    reference = Histogram()
    reference.update(values)
    ref_lo, ref_hi = kl_range(reference, spec)
    zeros = np.zeros(int(values.size * zero_share / (1.0 - zero_share)))
    with_zeros = Histogram()
    for chunk in np.array_split(rng.permutation(np.concatenate([values, zeros])), 7):
        with_zeros.update(chunk)
    lo, hi = kl_range(with_zeros, spec)
    assert abs(hi - ref_hi) <= 2 * with_zeros.width + 0.02 * ref_hi
    assert abs(lo - ref_lo) <= 2 * with_zeros.width + 0.02 * abs(ref_lo)


def test_kl_keeps_uniform_range():
    rng = np.random.default_rng(9)
    signed = Histogram()
    signed.update(rng.uniform(-1.0, 1.0, 100_000))
    lo, hi = kl_range(signed, INT8_SYM)
    assert hi >= 0.9 * signed.max and lo <= 0.9 * signed.min
    positive = Histogram()
    positive.update(rng.uniform(0.0, 1.0, 100_000))
    lo, hi = kl_range(positive, UINT8_ASYM)
    assert lo == positive.min and hi >= 0.9 * positive.max


def test_mse_keeps_uniform_range():
    rng = np.random.default_rng(10)
    hist = Histogram()
    hist.update(rng.uniform(-1.0, 1.0, 100_000))
    lo, hi = mse_range(hist, INT8_SYM)
    assert hi >= 0.95 * hist.max and lo <= 0.95 * hist.min


def test_mse_clips_laplacian_tails_and_lowers_the_error():
    data = np.random.default_rng(11).laplace(0.0, 1.0, 100_000)
    obs = ActivationObserver("x")
    for chunk in np.array_split(data, 10):
        obs.update(chunk)
    start = time.perf_counter()
    lo, hi = obs.range("mse", INT8_SYM)
    assert time.perf_counter() - start < 0.5
    assert hi < data.max()
    mse_error = fake_quant_mse(data, lo, hi, -128, 127)
    minmax_error = fake_quant_mse(data, data.min(), data.max(), -128, 127)
    assert mse_error < 0.9 * minmax_error


def test_mse_non_negative_keeps_lo():
    data = np.random.default_rng(12).exponential(1.0, 50_000) + 0.1
    hist = Histogram()
    hist.update(data)
    lo, hi = mse_range(hist, UINT8_ASYM)
    assert lo == data.min() and hi < data.max()


# --- Weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 3, -1])
def test_weight_minmax_per_channel(axis):
    w = np.random.default_rng(13).normal(0.0, 1.0, (3, 3, 4, 5))  # HWIO for axis 3
    lo, hi = weight_range(w, axis)
    others = tuple(a for a in range(4) if a != axis % 4)
    np.testing.assert_array_equal(lo, w.min(axis=others))
    np.testing.assert_array_equal(hi, w.max(axis=others))


def test_weight_minmax_per_tensor():
    w = np.random.default_rng(14).normal(0.0, 1.0, (8, 3, 3, 3))
    lo, hi = weight_range(w, None)
    assert lo.shape == () and hi.shape == ()
    assert (float(lo), float(hi)) == (w.min(), w.max())


def test_weight_mse_within_minmax_and_better():
    rng = np.random.default_rng(15)
    w = rng.laplace(0.0, 0.1, (3, 3, 16, 6))
    w[..., 2] = np.abs(w[..., 2])  # one non-negative channel
    lo, hi = weight_range(w, 3, "mse", INT8_WEIGHT)
    mlo, mhi = weight_range(w, 3)
    assert np.all(hi <= mhi) and np.all(lo >= mlo)
    assert lo[2] == mlo[2]
    for c in range(6):
        x = w[..., c].ravel()
        assert fake_quant_mse(x, lo[c], hi[c], -127, 127) <= fake_quant_mse(
            x, mlo[c], mhi[c], -127, 127
        )


# --- Errors ----------------------------------------------------------------------------------


def test_nan_in_update_names_tensor_and_count():
    obs = ActivationObserver("conv1_out")
    x = np.ones(10, dtype=np.float32)
    x[[1, 4]] = np.nan
    x[7] = np.inf
    with pytest.raises(QCompilerError, match=r"3 NaN/Inf.*'conv1_out'"):
        obs.update(x)
    assert obs.count == 0 and obs.hist.total == 0


def test_range_before_update_raises():
    with pytest.raises(QCompilerError, match="'relu3'"):
        ActivationObserver("relu3").range("minmax", INT8_SYM)


def test_unknown_method_lists_candidates():
    obs = ActivationObserver("x")
    obs.update(np.arange(4.0))
    with pytest.raises(QCompilerError, match=r"'entropy'.*minmax.*percentile.*kl.*mse"):
        obs.range("entropy", INT8_SYM)


def test_weight_errors():
    w = np.ones((2, 3))
    w[0, 1] = np.nan
    with pytest.raises(QCompilerError, match="1 NaN/Inf"):
        weight_range(w, 0)
    with pytest.raises(QCompilerError, match="minmax.*mse"):
        weight_range(np.ones((2, 3)), 0, "kl")
    with pytest.raises(QCompilerError, match="QuantSpec"):
        weight_range(np.ones((2, 3)), 0, "mse")

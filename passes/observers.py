"""Calibration statistics: streaming activation observers and weight ranges, in numpy.

Calibration pushes many activation tensors (one per sample) through an
:class:`ActivationObserver` per tensor. Each observer keeps the exact minimum and maximum and a
:class:`Histogram` of fixed size, so memory does not grow with the number of samples, and one
calibration pass serves every range-selection method: the method is chosen only when the range is
asked for.

Range selection methods
-----------------------
minmax
    The exact observed ``[min, max]``. Nothing is clipped; one outlier stretches the scale for
    every other value.
percentile
    ``[P(100 - p), P(p)]`` read off the histogram (linear inside a bin). Drops a fixed share of
    extreme values whatever their cost. A non-negative tensor keeps ``min`` as its low end, so
    that the ReLU floor stays exact.
kl
    TensorRT's entropy calibration: the threshold whose clipped-and-quantized distribution ``Q``
    is closest (Kullback-Leibler) to the clipped distribution ``P``. Signed tensors search one
    symmetric threshold on the histogram of ``|x|`` with half of the codes on each side.
mse
    The range, among ``[min, max]`` shrunk by factors in ``[0.2, 1]``, that minimizes the expected
    squared error of quantize-then-dequantize (rounding inside the range, clipping outside), with
    the values represented by the histogram's bin centres weighted by their counts.

Why the histogram merges bins
-----------------------------
The range of a tensor is unknown until every sample has been seen, and re-binning a histogram
onto a new grid smears counts. The grid therefore only ever grows by doubling its bin width:
neighbouring bins merge into one, so every old bin lies inside exactly one new bin and counts
stay exact. The merged bins are placed towards the side the new data needs, and doubling repeats
until the batch fits. A bin is at worst four times (typically twice) as wide as one pass over all
the data would make it.

Weights are available whole, so :func:`weight_range` works on the values themselves, per output
channel.
"""

from __future__ import annotations

import numpy as np

from qcompiler.passes import qmath
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.scheme import CALIBRATION_METHODS, QuantSpec

WEIGHT_METHODS = ("minmax", "mse")

# Shrink factors tried by the MSE search, widest first so that ties keep the wider range.
_MSE_ALPHAS = np.linspace(1.0, 0.2, 100)
# The KL search evaluates at most this many thresholds; a finer stride changes the pick by
# less than the stride while costing time linearly.
_KL_MAX_CANDIDATES = 256
# Smoothing (in counts, as in TensorRT/MXNet) for bins where P has mass and Q has none, so that
# clipping everything a bucket held costs a large but finite divergence.
_KL_EPS = 1e-4
# A batch that passes the grid by less than this share of a bin goes into the edge bin instead of
# doubling the bin width: float rounding of the top edge must not cost half the resolution.
_EDGE_SLACK = 1e-6


class Histogram:
    """Streaming histogram with a fixed number of bins whose range grows by merging bins.

    Parameters
    ----------
    bins : int
        Number of bins; the grid is ``bins`` equal bins.

    Attributes
    ----------
    counts : numpy.ndarray
        ``int64[bins]``; sums to :attr:`total` at all times.
    total : int
        Number of values seen.
    zeros : int
        How many of them were exactly 0.0 (ReLU's floor, padding): zero is always representable,
        so range searches that weigh rounding loss (KL) can leave them out.
    min, max : float or None
        Exact observed extremes (``None`` before any value).
    """

    def __init__(self, bins: int = 2048):
        if bins < 2:
            raise QCompilerError(f"Histogram needs at least 2 bins, got {bins}")
        self.bins = int(bins)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.total = 0
        self.zeros = 0
        self.min: float | None = None
        self.max: float | None = None
        self._lo = 0.0
        self._width = 0.0

    @property
    def width(self) -> float:
        """Bin width (0.0 before any value)."""
        return self._width

    @property
    def edges(self) -> np.ndarray | None:
        """``float64[bins + 1]`` bin edges (``None`` before any value)."""
        if self.total == 0:
            return None
        return self._lo + self._width * np.arange(self.bins + 1, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """Add the values of ``x`` (finite; the caller checks)."""
        x = np.asarray(x, dtype=np.float64).ravel()
        if x.size == 0:
            return
        xmin, xmax = float(x.min()), float(x.max())
        if self.total == 0:
            self._lo = xmin
            span = xmax - xmin
            if span == 0.0:
                # Constant tensors happen (a padding channel, a bias-only output). A tiny width
                # keeps the grid valid and lets the first batch with real spread set the
                # resolution, since growth doubles from here.
                span = max(abs(xmin) * 2.0**-20, float(np.finfo(np.float32).tiny))
            self._width = span / self.bins
            self.min, self.max = xmin, xmax
        else:
            slack = _EDGE_SLACK * self._width
            top = self._lo + self.bins * self._width
            if xmin < self._lo - slack or xmax > top + slack:
                self._grow(min(xmin, self._lo), max(xmax, top))
            self.min, self.max = min(self.min, xmin), max(self.max, xmax)
        index = np.floor((x - self._lo) / self._width)
        # Values within float rounding of the outer edges land one bin outside.
        index = np.clip(index, 0, self.bins - 1).astype(np.int64)
        self.counts += np.bincount(index, minlength=self.bins)
        self.total += x.size
        self.zeros += x.size - int(np.count_nonzero(x))

    def _grow(self, need_lo: float, need_hi: float) -> None:
        """Merge bins by ``2**m`` (smallest ``m`` that fits) so the grid covers the needed range.

        Old bin ``j`` goes to new bin ``k + j // 2**m``; ``k`` (how many new bins lie below the
        old grid) puts the free bins on the side that needed them, both when both did.
        """
        n, lo, width = self.bins, self._lo, self._width
        m = max(1, int(np.ceil(np.log2((need_hi - need_lo) / (n * width)))))
        while True:
            new_width = width * 2.0**m
            # Shifts past 62 would overflow; every old bin maps to new bin k + 0 long before.
            shift = min(m, 62)
            used = ((n - 1) >> shift) + 1
            k_min = max(0, int(np.ceil((lo - need_lo) / new_width)))
            k_max = min(int(np.floor((lo + n * new_width - need_hi) / new_width)), n - used)
            if k_min <= k_max:
                break
            m += 1
        grow_left, grow_right = need_lo < lo, need_hi > lo + n * width
        if grow_left and grow_right:
            k = (k_min + k_max) // 2
        elif grow_left:
            k = k_max
        else:
            k = k_min
        merged = np.zeros(n, dtype=np.int64)
        np.add.at(merged, k + (np.arange(n) >> shift), self.counts)
        self.counts = merged
        self._lo = lo - k * new_width
        self._width = new_width


def _support(hist: Histogram, drop_zeros: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise-linear CDF of the histogram: values ``xp`` and cumulative counts ``fp``.

    Only the occupied bins are kept and the outer ones are cut to the exact ``[min, max]``, so
    interpolation never puts mass where no value was seen. ``drop_zeros`` leaves the exact zeros
    out (the caller makes sure some nonzero value exists).
    """
    counts = hist.counts
    if drop_zeros and hist.zeros:
        counts = counts.copy()
        counts[min(int(np.floor(-hist._lo / hist._width)), hist.bins - 1)] -= hist.zeros
    occupied = np.flatnonzero(counts)
    first, last = occupied[0], occupied[-1]
    xp = hist.edges[first : last + 2].copy()
    fp = np.concatenate(([0], np.cumsum(counts[first : last + 1]))).astype(np.float64)
    xp[0] = min(max(xp[0], hist.min), xp[1])
    xp[-1] = max(min(xp[-1], hist.max), xp[-2])
    return xp, fp


def _quantile(xp: np.ndarray, fp: np.ndarray, q: float) -> float:
    """Value below which a share ``q`` of the counts lies, linear inside a bin."""
    rank = q * fp[-1]
    if rank <= 0.0:
        return float(xp[0])
    i = min(int(np.searchsorted(fp, rank, side="left")), fp.size - 1)
    frac = (rank - fp[i - 1]) / (fp[i] - fp[i - 1])
    return float(xp[i - 1] + frac * (xp[i] - xp[i - 1]))


def _check_data(hist: Histogram) -> None:
    if hist.total == 0:
        raise QCompilerError("the histogram is empty: no calibration values were observed")


def minmax_range(hist: Histogram) -> tuple[float, float]:
    """The exact observed ``(min, max)``."""
    _check_data(hist)
    return float(hist.min), float(hist.max)


def percentile_range(hist: Histogram, p: float = 99.99) -> tuple[float, float]:
    """``(P(100 - p), P(p))`` from the histogram, clamped to ``[min, max]``.

    A non-negative tensor keeps ``lo = min``. Symmetrizing for a symmetric spec is the caller's.
    """
    _check_data(hist)
    if not 50.0 < p <= 100.0:
        raise QCompilerError(f"percentile must be in (50, 100], got {p}")
    xp, fp = _support(hist)
    hi = _quantile(xp, fp, p / 100.0)
    lo = hist.min if hist.min >= 0.0 else _quantile(xp, fp, (100.0 - p) / 100.0)
    return float(lo), float(hi)


def _kl_best_bin(h: np.ndarray, levels: int) -> int:
    """TensorRT's search: the number of leading bins of ``h`` whose threshold minimizes KL(P||Q).

    For a candidate ``i``: ``P = h[:i]`` with the clipped tail added to its last bin; ``Q``
    spreads the counts of ``h[:i]`` (tail excluded, which is what makes clipping cost) evenly
    over the nonzero bins of ``P`` within each of ``levels`` buckets. All candidates are
    evaluated at once as rows of ``(candidates, bins)`` arrays.
    """
    n = h.size
    if levels >= n:
        # The histogram cannot resolve steps finer than a bin: no threshold beats the full range.
        return n
    stride = -(-(n - levels + 1) // _KL_MAX_CANDIDATES)
    cands = np.unique(np.append(np.arange(levels, n + 1, stride), n))
    csum = np.concatenate(([0.0], np.cumsum(h)))
    nzsum = np.concatenate(([0], np.cumsum(h > 0)))
    total = csum[-1]

    i = cands[:, None]
    j = np.arange(n)[None, :]
    tail = (total - csum[cands])[:, None]
    p = np.where(j < i, h, 0.0) + np.where(j == i - 1, tail, 0.0)
    merged = (cands // levels)[:, None]
    bucket = np.minimum(j // merged, levels - 1)
    start = bucket * merged
    stop = np.where(bucket == levels - 1, i, start + merged)
    nonzero = nzsum[stop] - nzsum[start]
    # The last bin of P can be nonzero only through the tail; it still receives a share of Q.
    tail_only = ((tail > 0) & (h[cands - 1] == 0)[:, None]) & (bucket == levels - 1)
    nonzero = nonzero + tail_only
    has_p = p > 0
    q = np.where(has_p, (csum[stop] - csum[start]) / np.maximum(nonzero, 1), 0.0)
    q = np.where(has_p & (q == 0), _KL_EPS, q)

    pn = np.where(has_p, p / total, 1.0)
    qn = np.where(has_p, q / q.sum(axis=1, keepdims=True), 1.0)
    divergence = np.sum(pn * np.log(pn / qn) * has_p, axis=1)
    return int(cands[np.argmin(divergence)])


def kl_range(hist: Histogram, spec: QuantSpec) -> tuple[float, float]:
    """Entropy (KL) calibration, TensorRT style.

    A non-negative tensor searches its upper threshold with every code available on ``[0, t]``
    (``qmax + 1`` codes for a symmetric spec, whose negative half stays unused, else
    ``qmax - qmin + 1``) and keeps ``lo = min``. A signed one searches a symmetric threshold ``t``
    on the histogram of ``|x|`` with ``(qmax - qmin + 1) // 2`` codes per side and returns
    ``(max(min, -t), min(max, t))``.

    Exact zeros are left out of the search. Zero is always a code (the zero point), so they lose
    nothing at any threshold, but inside the first bucket they make ``Q`` (which spreads a
    bucket's mass evenly) differ from ``P`` by a cost that shrinks with the bucket: a ReLU output
    that is 60 % zeros would otherwise be clipped to a quarter of its range.
    """
    _check_data(hist)
    if hist.min == hist.max:
        return float(hist.min), float(hist.max)
    xp, fp = _support(hist, drop_zeros=True)
    amax = max(-hist.min, hist.max)
    grid = np.linspace(0.0, amax, hist.bins + 1)
    # Folding around zero: count(|x| <= t) = F(t) - F(-t); for non-negative data F(-t) = 0 and
    # this is the histogram of x itself on [0, max].
    folded = np.diff(np.interp(grid, xp, fp) - np.interp(-grid, xp, fp))
    if hist.min >= 0.0:
        levels = spec.qmax + 1 if spec.symmetric else spec.qmax - spec.qmin + 1
    else:
        levels = (spec.qmax - spec.qmin + 1) // 2
    t = float(grid[_kl_best_bin(folded, levels)])
    if hist.min >= 0.0:
        return float(hist.min), min(float(hist.max), t)
    return max(float(hist.min), -t), min(float(hist.max), t)


def _shrunk_ranges(lo, hi):
    """Candidate ranges ``(lo, hi)`` for every shrink factor (rows) and channel (columns).

    A non-negative channel keeps its low end: zero is in the grid anyway and shrinking ``lo``
    towards it would change nothing.
    """
    lo, hi = np.atleast_1d(lo), np.atleast_1d(hi)
    alphas = _MSE_ALPHAS[:, None]
    return np.where(lo >= 0.0, lo, alphas * lo), alphas * hi


def mse_range(hist: Histogram, spec: QuantSpec) -> tuple[float, float]:
    """The shrink of ``[min, max]`` minimizing the expected squared quantization error.

    Each occupied bin stands for its count of values at its centre; rounding and clipping error
    are both measured by quantizing and dequantizing the centres with the candidate's qparams.
    """
    _check_data(hist)
    if hist.min == hist.max:
        return float(hist.min), float(hist.max)
    xp, fp = _support(hist)
    centres = (xp[:-1] + xp[1:]) / 2.0
    weights = np.diff(fp)
    lo, hi = _shrunk_ranges(hist.min, hist.max)
    scale, zero_point = qmath.qparams_from_range(lo, hi, spec)
    q = qmath.quantize(centres[None, :], scale, zero_point, spec)
    error = np.sum(weights * (qmath.dequantize(q, scale, zero_point) - centres) ** 2, axis=1)
    best = int(np.argmin(error))
    return float(lo[best, 0]), float(hi[best, 0])


class ActivationObserver:
    """Streaming statistics of one activation tensor over the calibration set.

    Parameters
    ----------
    name : str
        Tensor name, used in error messages.
    bins : int
        Histogram resolution.
    """

    def __init__(self, name: str, bins: int = 2048):
        self.name = name
        self.hist = Histogram(bins)
        self._count = 0

    @property
    def count(self) -> int:
        """Number of :meth:`update` calls that were accepted."""
        return self._count

    def update(self, x) -> None:
        """Add one calibration sample of the tensor."""
        x = np.asarray(x)
        bad = x.size - int(np.count_nonzero(np.isfinite(x)))
        if bad:
            raise QCompilerError(
                f"calibration produced {bad} NaN/Inf values in tensor {self.name!r}; check the "
                "calibration data and the float model"
            )
        self.hist.update(x)
        self._count += 1

    def range(self, method: str, spec: QuantSpec, percentile: float = 99.99) -> tuple[float, float]:
        """``(lo, hi)`` chosen by ``method``, one of ``minmax``, ``percentile``, ``kl``, ``mse``."""
        if method not in CALIBRATION_METHODS:
            raise QCompilerError(
                f"unknown calibration method {method!r} for tensor {self.name!r}, candidates are "
                f"{list(CALIBRATION_METHODS)}"
            )
        if self.hist.total == 0:
            raise QCompilerError(
                f"tensor {self.name!r} received no calibration values ({self._count} updates); "
                "its range cannot be chosen"
            )
        if method == "minmax":
            return minmax_range(self.hist)
        if method == "percentile":
            return percentile_range(self.hist, percentile)
        if method == "kl":
            return kl_range(self.hist, spec)
        return mse_range(self.hist, spec)


def weight_range(
    w: np.ndarray, axis: int | None, method: str = "minmax", spec: QuantSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(lo, hi)`` of a weight tensor.

    Parameters
    ----------
    w : numpy.ndarray
        The weights.
    axis : int or None
        Output-channel axis (every other axis is reduced); ``None`` for one range per tensor,
        returned as 0-d arrays.
    method : str
        ``minmax`` or ``mse`` (per channel, the shrink of ``[min, max]`` with the least squared
        quantize-dequantize error on the actual values).
    spec : QuantSpec, optional
        Required by ``mse``.
    """
    if method not in WEIGHT_METHODS:
        raise QCompilerError(
            f"unknown weight range method {method!r}, candidates are {list(WEIGHT_METHODS)}"
        )
    if method == "mse" and spec is None:
        raise QCompilerError("weight_range(method='mse') needs the weight QuantSpec")
    w = np.asarray(w, dtype=np.float64)
    if w.size == 0:
        raise QCompilerError(f"cannot choose the range of an empty weight tensor {w.shape}")
    bad = w.size - int(np.count_nonzero(np.isfinite(w)))
    if bad:
        raise QCompilerError(f"weight tensor {w.shape} holds {bad} NaN/Inf values")
    if axis is None:
        flat = w.reshape(1, -1)
    else:
        if not -w.ndim <= axis < w.ndim:
            raise QCompilerError(f"channel axis {axis} is out of range for weights {w.shape}")
        flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    if method == "mse":
        lo, hi = _weight_mse(flat, lo, hi, spec)
    if axis is None:
        return lo.reshape(()), hi.reshape(())
    return lo, hi


def _weight_mse(flat: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec):
    """Per-row shrink search on ``flat[channels, values]``.

    One shrink factor at a time, all channels together: a (factors x weights) array would not
    fit in memory for large layers.
    """
    cand_lo, cand_hi = _shrunk_ranges(lo, hi)
    best_error = np.full(lo.shape, np.inf)
    best_lo, best_hi = lo.copy(), hi.copy()
    for c_lo, c_hi in zip(cand_lo, cand_hi):
        scale, zero_point = qmath.qparams_from_range(c_lo, c_hi, spec)
        q = qmath.quantize(flat, scale, zero_point, spec, axis=0)
        error = np.sum((qmath.dequantize(q, scale, zero_point, axis=0) - flat) ** 2, axis=1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_lo = np.where(better, c_lo, best_lo)
        best_hi = np.where(better, c_hi, best_hi)
    return best_lo, best_hi


def quantization_sqnr(observer: ActivationObserver, lo: float, hi: float, spec: QuantSpec) -> float:
    """Expected signal-to-quantization-noise ratio (dB) of the observed tensor quantized with
    ``spec`` over ``[lo, hi]``: the histogram's bin centres, weighted by their counts, sent
    through quantize/dequantize (clipping and rounding both count)."""
    hist = observer.hist
    edges = hist.edges
    if edges is None:
        return float("inf")
    centres = (edges[:-1] + edges[1:]) / 2
    scale, zero_point = qmath.qparams_from_range(lo, hi, spec)
    codes = qmath.quantize(centres, scale, zero_point, spec)
    error = centres - qmath.dequantize(codes, scale, zero_point).astype(np.float64)
    noise = float(np.sum(hist.counts * error**2))
    signal = float(np.sum(hist.counts * centres**2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-300) / noise)

"""Weight rounding and bias correction from the statistics of each layer's input.

Rounding every weight to its nearest code minimizes the error of the *weights*; what matters is
the error of the layer's *output*. For a conv2d or matmul whose input patches ``x`` have second
moment ``H = E[x xᵀ]`` and mean ``μ = E[x]``, quantizing the weights of output channel ``o`` to
``ŵ`` adds the output error ``(ŵ - w)·x``, whose mean square is ``rᵀ H r`` and whose mean is
``r·μ``, with ``r = ŵ - w``. Both are known after calibration:

- :func:`round_weights` chooses the codes to reduce ``rᵀ H r`` (AdaRound's objective, which
  AdaRound minimizes by gradient descent on a relaxation): GPTQ's sequential rounding and
  coordinate descent, every output channel at once, in numpy, with no training framework.
  Where few patches were seen, ``H`` is shrunk toward its diagonal for 4-bit codes
  (:meth:`LayerStats.moment_for`); rounded against the raw estimate, they fit those patches.
- :func:`bias_shift` is ``r·μ`` per output channel, which bias correction subtracts from the
  bias (Nagel et al., "Data-Free Quantization", the empirical variant). What is left of the
  error is ``rᵀ Σ r``, with the covariance ``Σ = H - μμᵀ``: weights whose mean shift is
  removed are rounded against ``Σ`` (``centred``), leaving the mean to the bias.

:class:`LayerStats` accumulates ``H`` and ``μ`` over calibration samples from a bounded sample
of patch positions, so its cost and memory do not grow with the number of samples.
"""

from __future__ import annotations

import hashlib

import numpy as np

from qcompiler.passes.graph import op_name

# Patch positions sampled per calibration sample and layer: enough for H of a 1x1 conv with a
# thousand input channels after a few dozen samples, and a bounded cost per sample.
POSITIONS_PER_SAMPLE = 512
# Patches seen per value of a patch before a layer's weights are rounded against their raw
# second moment (else to nearest at 8 bits, and against the moment shrunk toward its diagonal
# with fewer levels: LayerStats.moment_for). EfficientNet-Lite0's 1x1 convs on 7x7 maps see 49
# patches of up to 1152 values per image, its classifier one of 1280.
PATCHES_PER_VALUE = 8
# Codes of at most this many levels (4 bits) are rounded against the shrunk moment below the
# bound: their steps are too coarse for nearest rounding.
SHRUNK_LEVELS = 16
# Longest patch whose second moment is gathered (3x3 over 256 channels; H is 42 MB): wider
# layers keep round-to-nearest.
MAX_PATCH = 2304


def _conv_attrs(call):
    attrs = call.attrs
    return {
        "data_layout": str(attrs.data_layout),
        "kernel_layout": str(attrs.kernel_layout),
        "strides": [int(s) for s in attrs.strides],
        "padding": [int(p) for p in attrs.padding],
        "dilation": [int(d) for d in attrs.dilation],
        "groups": int(attrs.groups),
    }


def supported(call, weight: np.ndarray | None) -> bool:
    """Whether ``call`` is a layer whose input statistics this module can gather."""
    if weight is None:
        return False
    name = op_name(call)
    if name == "relax.nn.conv2d":
        a = _conv_attrs(call)
        if a["data_layout"] not in ("NCHW", "NHWC") or a["kernel_layout"] not in ("OIHW", "OHWI"):
            return False
        return weight[0].size <= MAX_PATCH
    return name == "relax.matmul" and weight.ndim == 2 and weight.shape[0] <= MAX_PATCH


def weight_groups(call, weight: np.ndarray) -> np.ndarray:
    """The weights as ``(groups, out channels per group, patch length)``, patch order
    ``(input channel, kernel row, kernel column)``; :func:`from_groups` inverts it."""
    if op_name(call) == "relax.matmul":
        return weight.T[None]
    a = _conv_attrs(call)
    w = weight if a["kernel_layout"] == "OIHW" else weight.transpose(0, 3, 1, 2)
    groups = a["groups"]
    return w.reshape(groups, w.shape[0] // groups, -1)


def from_groups(call, grouped: np.ndarray, shape: tuple) -> np.ndarray:
    if op_name(call) == "relax.matmul":
        return grouped[0].T
    a = _conv_attrs(call)
    if a["kernel_layout"] == "OIHW":
        return grouped.reshape(shape)
    o, kh, kw, i = shape
    return grouped.reshape(o, i, kh, kw).transpose(0, 2, 3, 1)


def _channel_axis(call, ndim: int) -> int:
    if op_name(call) == "relax.matmul":
        return ndim - 1
    return 1 if _conv_attrs(call)["data_layout"] == "NCHW" else 3


def _patches(call, x: np.ndarray, weight_shape: tuple) -> np.ndarray:
    """Input patches as ``(positions, groups, patch length)``."""
    if op_name(call) == "relax.matmul":
        return x.reshape(-1, 1, x.shape[-1])
    a = _conv_attrs(call)
    if a["data_layout"] == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    kh, kw = weight_shape[2:] if a["kernel_layout"] == "OIHW" else weight_shape[1:3]
    top, left, bottom, right = a["padding"]
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (sh, sw), (dh, dw) = a["strides"], a["dilation"]
    win = np.lib.stride_tricks.sliding_window_view(
        x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3)
    )[:, :, ::sh, ::sw, ::dh, ::dw]
    n, c, oh, ow = win.shape[:4]
    groups = a["groups"]
    win = win.transpose(0, 2, 3, 1, 4, 5)  # N, OH, OW, C, kh, kw
    return win.reshape(n * oh * ow, groups, (c // groups) * kh * kw)


class LayerStats:
    """Running ``E[x]`` and ``E[x xᵀ]`` of one layer's input patches, per group.

    The first ``held_out`` samples are gathered apart, and :meth:`settle` drops them once as
    many others have been seen: weights rounded against the rest can be scored fairly on
    those samples (the weight probe's, :data:`~qcompiler.passes.pipeline.PROBE_HOLDOUT`);
    rounding fitted to the very patches it is scored on looks up to 4 dB better than it is.
    """

    def __init__(
        self,
        call,
        weight_shape: tuple,
        seed: int = 0,
        positions: int = POSITIONS_PER_SAMPLE,
        held_out: int = 0,
    ):
        self.call = call
        self.positions = positions  # patch positions sampled per sample
        self.weight_shape = tuple(weight_shape)
        self.held_out = held_out
        self.samples = 0
        self.count = 0
        self.sum = None
        self.outer = None
        self._held = None  # (sum, outer, count) of the held-out samples until settle()
        self.channel_max = None  # largest |x| per input channel
        self._rng = np.random.default_rng(seed)
        # Codes already optimized against these statistics (see optimized_codes): a bit-width
        # search builds many candidates that round the same layer the same way.
        self.rounded: dict[tuple, np.ndarray] = {}

    def update(self, x: np.ndarray) -> None:
        self.rounded.clear()
        x = np.asarray(x)
        channel = _channel_axis(self.call, x.ndim)
        peak = np.abs(x).max(axis=tuple(a for a in range(x.ndim) if a != channel))
        self.channel_max = peak if self.channel_max is None else np.maximum(self.channel_max, peak)
        # Index the positions on the (lazy) window view first: only the sample is copied.
        p = _patches(self.call, x, self.weight_shape)
        if p.shape[0] > self.positions:
            p = p[np.sort(self._rng.choice(p.shape[0], self.positions, replace=False))]
        p = np.ascontiguousarray(p, dtype=np.float64)
        # pᵀp per group as a batched matmul: BLAS, 5-13x faster than the einsum's own loops
        moments = (p.sum(axis=0), p.transpose(1, 2, 0) @ p.transpose(1, 0, 2), p.shape[0])
        self.samples += 1
        if self.samples <= self.held_out:
            held = self._held
            self._held = moments if held is None else tuple(a + b for a, b in zip(held, moments))
        else:
            self._add(moments)

    def _add(self, moments) -> None:
        total, outer, count = moments
        if self.sum is None:
            self.sum, self.outer = np.zeros_like(total), np.zeros_like(outer)
        self.sum += total
        self.outer += outer
        self.count += count

    def settle(self) -> None:
        """End of calibration: drop the held-out samples' statistics if at least as many
        samples followed them; else merge them in (too few samples to hold any out), and
        :attr:`held_out` becomes 0."""
        if self.samples < 2 * self.held_out:
            if self._held is not None:
                self._add(self._held)
            self.held_out = 0
        self._held = None

    @property
    def spans_patches(self) -> bool:
        """Whether enough patches were seen to round against: :data:`PATCHES_PER_VALUE` per
        value of a patch. With fewer, ``E[x xᵀ]`` is (near) singular, and the rounding fits
        those patches rather than the layer's inputs."""
        return self.sum is not None and self.count >= PATCHES_PER_VALUE * self.sum.shape[-1]

    def rounds(self, levels: int) -> bool:
        """Whether weights of ``levels`` codes are rounded against these statistics (see
        :meth:`moment_for`), not to nearest."""
        return self.spans_patches or (self.count > 0 and levels <= SHRUNK_LEVELS)

    def moment_for(self, levels: int, centred: bool = False) -> np.ndarray | None:
        """The second moment (the covariance if ``centred``: the bias takes the mean shift)
        to round weights of ``levels`` codes against, or None for nearest rounding. The raw
        estimate once it spans the patches; before that, at 8 bits, none (nearest rounding
        loses little there); with fewer levels, the estimate shrunk toward its diagonal
        (Ledoit-Wolf style, ``a = k / (k + n)`` for ``n`` patches of length ``k``): a step of
        4-bit codes is too coarse for nearest rounding, and the diagonal alone still weighs
        each weight by the power of its input."""
        if not self.rounds(levels):
            return None
        h = self.covariance if centred else self.second_moment
        if self.spans_patches:
            return h
        k = h.shape[-1]
        a = k / (k + self.count)
        return (1 - a) * h + a * np.einsum("gk,kl->gkl", np.einsum("gkk->gk", h), np.eye(k))

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def second_moment(self) -> np.ndarray:
        return self.outer / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        mean = self.mean
        return self.second_moment - np.einsum("gk,gl->gkl", mean, mean)


def grouped(call, weight, codes, scale) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``weight`` (float64), its per-output-channel ``scale`` and its ``codes`` in the
    ``(groups, out, k)`` layout of the layer's input patches (scales ``(groups, out)``)."""
    w = weight_groups(call, np.asarray(weight, dtype=np.float64))
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), (w.shape[0] * w.shape[1],))
    return w, s.reshape(w.shape[:2]), weight_groups(call, codes)


def optimized_codes(
    call, weight, codes, scale, qmin: int, qmax: int, stats, centred: bool = False
) -> np.ndarray:
    """``codes`` of ``weight`` re-chosen by :func:`round_weights` against the second moment of
    the layer's input patches (``stats``, a :class:`LayerStats`), or their covariance if
    ``centred`` (the caller removes the mean shift, :func:`bias_shift`); the same shape and
    dtype.
    ``codes`` themselves where they are rounded to nearest (:meth:`LayerStats.rounds`).
    Kept in ``stats`` by what was rounded: the same weights, codes and scale again (another
    candidate of a bit-width search) give a copy of the first result."""
    levels = qmax - qmin + 1
    if not stats.rounds(levels):
        return codes
    digest = hashlib.blake2b(digest_size=16)
    for array in (weight, codes, scale):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    key = (qmin, qmax, centred, digest.hexdigest())
    if key not in stats.rounded:
        w, s, _ = grouped(call, weight, codes, scale)
        q = round_weights(w, s, qmin, qmax, stats.moment_for(levels, centred))
        stats.rounded[key] = from_groups(call, q, codes.shape).astype(codes.dtype)
    return stats.rounded[key].copy()


def round_weights(w, scale, qmin: int, qmax: int, hessian, sweeps: int = 4) -> np.ndarray:
    """Integer codes of ``w`` (``(groups, out, k)``, symmetric scales ``(groups, out)``) that
    reduce the output error ``rᵀ H r`` of each output channel.

    Two starts, each polished by coordinate descent (moving single codes by ±1 while that
    lowers the error): round-to-nearest, and GPTQ's sequential rounding (round one weight,
    spread its error over the weights not yet rounded through the inverse of ``H``), which
    handles strongly correlated inputs where single moves stall. Per channel the better one
    is kept, so the result is never worse on ``H`` than nearest rounding.
    """
    w = np.asarray(w, dtype=np.float64)
    s = np.asarray(scale, dtype=np.float64)
    h = np.asarray(hessian, dtype=np.float64)
    nearest = np.clip(np.rint(w / s[..., None]), qmin, qmax)
    best = _descend(w, s, nearest, qmin, qmax, h, sweeps)
    sequential = _descend(w, s, _gptq(w, s, qmin, qmax, h), qmin, qmax, h, sweeps)
    better = output_error(w, sequential, s, h) < output_error(w, best, s, h)
    return np.where(better[..., None], sequential, best).astype(np.int64)


def _gptq(w, s, qmin, qmax, h, damping: float = 0.01) -> np.ndarray:
    k = w.shape[-1]
    diag = np.einsum("gkk->gk", h).mean(axis=-1)
    damped = h + (damping * np.maximum(diag, 1e-12))[:, None, None] * np.eye(k)
    # Upper Cholesky factor of H⁻¹ (GPTQ's formulation): row i holds the weights that
    # absorb the error of rounding weight i.
    upper = np.linalg.cholesky(np.linalg.inv(damped)).transpose(0, 2, 1)
    work = w.copy()
    q = np.zeros_like(w)
    for i in range(k):
        q[..., i] = np.clip(np.rint(work[..., i] / s), qmin, qmax)
        err = (work[..., i] - q[..., i] * s) / upper[:, None, i, i]
        work[..., i + 1 :] -= err[..., None] * upper[:, None, i, i + 1 :]
    return q


def _descend(w, s, q, qmin, qmax, h, sweeps) -> np.ndarray:
    """Coordinate descent on ``rᵀ H r``: move single codes by ±1 while the error drops."""
    q = q.copy()
    r = q * s[..., None] - w
    grad = r @ h  # H r (H symmetric), kept current as r changes
    diag = np.einsum("gkk->gk", h)[:, None, :]
    for _ in range(sweeps):
        changed = False
        for i in range(w.shape[-1]):
            for direction in (1.0, -1.0):
                step = direction * s
                gain = 2 * step * grad[..., i] + step * step * diag[..., i]
                moved = q[..., i] + direction
                take = (gain < -1e-12 * np.abs(step) * np.abs(grad[..., i]).max(initial=1.0)) & (
                    (moved >= qmin) & (moved <= qmax)
                )
                if not take.any():
                    continue
                changed = True
                g, o = np.nonzero(take)  # only the moved codes' rows of H r change
                delta = step[g, o]
                q[g, o, i] = moved[g, o]
                r[g, o, i] += delta
                grad[g, o] += delta[:, None] * h[g, i]
        if not changed:
            break
    return q


def bias_shift(w, codes, scale, mean) -> np.ndarray:
    """``r·μ`` per output channel, ``(groups, out)``: the mean output error the rounding adds."""
    r = codes * np.asarray(scale, dtype=np.float64)[..., None] - np.asarray(w, dtype=np.float64)
    return np.einsum("gok,gk->go", r, mean)


def output_error(w, codes, scale, hessian) -> np.ndarray:
    """``rᵀ H r`` per output channel: the mean squared output error of these codes."""
    r = codes * np.asarray(scale, dtype=np.float64)[..., None] - np.asarray(w, dtype=np.float64)
    return ((r @ np.asarray(hessian, dtype=np.float64)) * r).sum(axis=-1)

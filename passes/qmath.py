"""Integer quantization arithmetic in numpy: the reference every compiled kernel is checked against.

Conventions (see :mod:`qcompiler.passes.scheme`): ``r = s * (q - z)``.

Requantization turns an int32 accumulator ``acc`` with real scale ``s_acc`` into codes of scale
``s_out``. The ratio ``m = s_acc / s_out`` is written as an integer multiplier and a right shift,
``m ~= M0 * 2**-shift`` with ``2**30 <= M0 < 2**31`` (31 significant bits), and applied as::

    (acc * M0 + 2**(shift - 1)) >> shift        # int64, arithmetic shift: floor(acc*m + 1/2)

i.e. round to nearest, ties towards +inf, with a single rounding (no double rounding). The
product fits int64 because ``|acc| < 2**31`` and ``M0 < 2**31``.
"""

from __future__ import annotations

import numpy as np

from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.scheme import QuantSpec

# Largest right shift we emit: acc * M0 < 2**62, so shifts up to 62 keep the nudge in range.
MAX_SHIFT = 62
# Ratios at or above this would leave a right shift below 1 (after rounding M0 up).
MAX_MULTIPLIER = float(1 << 29)


def qparams_from_range(lo, hi, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point covering ``[lo, hi]`` (scalars or per-channel arrays).

    The range is first widened to contain 0 so that zero (padding, ReLU's floor) is exactly
    representable. A zero-width range (a constant-zero tensor) gets scale 1.0: every value is
    then exactly the zero point, which is what the tensor holds.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise QCompilerError(f"cannot quantize a non-finite range [{lo}, {hi}]")
    if spec.symmetric:
        amax = np.maximum(-lo, hi)
        scale = amax / spec.qmax
        zero_point = np.zeros_like(scale)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.rint(spec.qmin - lo / safe), spec.qmin, spec.qmax)
    scale = np.where(scale > 0, scale, 1.0)
    # Keep scales representable as float32, the dtype they take in the IR.
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    return scale.astype(np.float32), zero_point.astype(np.int32)


def quantize(x, scale, zero_point, spec: QuantSpec, axis: int | None = None) -> np.ndarray:
    """``clip(round_half_even(x / s) + z)`` (per-channel along ``axis`` when given)."""
    x = np.asarray(x, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    zero_point = np.asarray(zero_point, dtype=np.int64)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    q = np.rint(x / scale) + zero_point
    return np.clip(q, spec.qmin, spec.qmax).astype(np.int64)


def dequantize(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """``s * (q - z)`` as float32."""
    q = np.asarray(q, dtype=np.int64)
    scale = np.asarray(scale, dtype=np.float64)
    zero_point = np.asarray(zero_point, dtype=np.int64)
    if axis is not None and scale.ndim == 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (scale * (q - zero_point)).astype(np.float32)


def _check_ratios(m) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    bad = ~np.isfinite(m) | (m <= 0)
    if np.any(bad):
        raise QCompilerError(
            f"requantization ratio must be finite and > 0, got {m[bad].flat[0]:g}: a scale is "
            "zero, negative or not finite"
        )
    if np.any(m >= MAX_MULTIPLIER):
        raise QCompilerError(
            f"requantization ratio {np.max(m):g} is >= 2**29: the output scale is far too small "
            "for the input scale"
        )
    return m


def decompose_multiplier(m) -> tuple[np.ndarray, np.ndarray]:
    """Write each ratio ``m > 0`` as ``M0 * 2**-shift``, ``2**30 <= M0 < 2**31``.

    Ratios so small that the shift would pass :data:`MAX_SHIFT` keep ``shift = MAX_SHIFT`` and a
    smaller ``M0`` (possibly 0: the output is then the rounding of a value below 2**-31).
    """
    m = _check_ratios(m)
    mantissa, exponent = np.frexp(m)  # m = mantissa * 2**exponent, mantissa in [0.5, 1)
    multiplier = np.rint(mantissa * (1 << 31)).astype(np.int64)
    shift = (31 - exponent).astype(np.int64)
    # Rounding the mantissa up to 2**31 moves one bit into the exponent.
    carry = multiplier == (1 << 31)
    multiplier = np.where(carry, 1 << 30, multiplier)
    shift = np.where(carry, shift - 1, shift)
    deep = shift > MAX_SHIFT
    if np.any(deep):
        multiplier = np.where(deep, np.rint(m * 2.0**MAX_SHIFT).astype(np.int64), multiplier)
        shift = np.where(deep, MAX_SHIFT, shift)
    return multiplier, shift


def common_multipliers(ratios) -> tuple[np.ndarray, int]:
    """Integer multipliers ``M_i`` sharing one shift: ``ratio_i ~= M_i * 2**-shift``.

    Used where several terms are summed before a single rounding (an add of two quantized
    tensors). The largest ratio gets 31 significant bits; the others are exact to the same
    absolute precision.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    _, shifts = decompose_multiplier(np.max(ratios))
    shift = int(shifts)
    multipliers = np.rint(ratios * 2.0**shift).astype(np.int64)
    return multipliers, shift


def rounding_shift(x, shift) -> np.ndarray:
    """``floor(x / 2**shift + 1/2)`` for int64 ``x`` and shifts >= 1."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    return (x + (np.int64(1) << (shift - 1))) >> shift


def requantize(acc, multiplier, shift, zero_point, qmin: int, qmax: int, axis=None) -> np.ndarray:
    """Reference requantization of int32 accumulators (see the module docstring)."""
    acc = np.asarray(acc, dtype=np.int64)
    multiplier = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if axis is not None and multiplier.ndim == 1:
        shape = [1] * acc.ndim
        shape[axis] = -1
        multiplier, shift = multiplier.reshape(shape), shift.reshape(shape)
    out = rounding_shift(acc * multiplier, shift) + zero_point
    return np.clip(out, qmin, qmax)


# -- TFLite's integer arithmetic (for models quantized by TFLite) --------------------------------
def tflite_multiplier(m) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TFLite's ``QuantizeMultiplier``: ``m ~= M0 * 2**(left - right - 31)``.

    ``M0`` in ``[2**30, 2**31)`` from the mantissa rounded half away from zero; ``left`` is
    the left shift applied before the multiply (ratios >= 1), ``right`` the rounding right shift
    after it.
    """
    m = _check_ratios(m)
    mantissa, exponent = np.frexp(m)
    multiplier = np.floor(mantissa * (1 << 31) + 0.5).astype(np.int64)
    carry = multiplier == (1 << 31)
    multiplier = np.where(carry, 1 << 30, multiplier)
    exponent = np.where(carry, exponent + 1, exponent).astype(np.int64)
    # TFLite gives up on ratios below 2**-31: the product is then 0.
    tiny = exponent < -31
    multiplier = np.where(tiny, 0, multiplier)
    exponent = np.where(tiny, 0, exponent)
    return multiplier, np.maximum(exponent, 0), np.maximum(-exponent, 0)


def tflite_multiply(x, m) -> np.ndarray:
    """TFLite's ``MultiplyByQuantizedMultiplier(x, m)`` (gemmlowp's rounding doubling high
    multiply, then a rounding divide by a power of two, ties away from zero)."""
    multiplier, left, right = tflite_multiplier(m)
    x = np.asarray(x, dtype=np.int64) * (np.int64(1) << left)
    high = (x * multiplier + (1 << 30)) >> 31
    mask = (np.int64(1) << right) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + (remainder > threshold)


# -- int4 storage ---------------------------------------------------------------------------------
def pack_int4(codes) -> np.ndarray:
    """Two signed 4-bit codes per byte along the last axis, the even element in the low nibble.

    ``codes`` must lie in [-8, 7]; an odd last axis is padded with a zero code. Returns uint8
    of shape ``(..., ceil(n / 2))``.
    """
    codes = np.asarray(codes)
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        raise QCompilerError(
            f"int4 codes must lie in [-8, 7], got [{int(codes.min())}, {int(codes.max())}]"
        )
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), codes.dtype)], axis=-1)
    nibbles = codes.astype(np.int64) & 0xF
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed, n: int) -> np.ndarray:
    """The ``n`` int8 codes along the last axis of :func:`pack_int4`'s bytes (sign-extended)."""
    packed = np.asarray(packed, dtype=np.uint8)
    if not 0 <= n <= 2 * packed.shape[-1] or 2 * packed.shape[-1] - n > 1:
        raise QCompilerError(f"{packed.shape[-1]} packed bytes cannot hold {n} int4 codes")
    low = (packed & 0xF).astype(np.int8)
    high = (packed >> 4).astype(np.int8)
    both = np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)
    return np.where(both >= 8, both - 16, both).astype(np.int8)[..., :n]

"""TFLite's integer softmax, bit for bit, as integer Relax ops.

LiteRT's reference kernel for uint8/int8 SOFTMAX (``reference_ops::Softmax``) works in gemmlowp
fixed point: each input's difference to its row's maximum is rescaled by ``beta * s_x``
(``PreprocessSoftmaxScaling``), exponentiated by ``exp_on_negative_values`` (Q5.26 in, Q0.31
out), summed in Q12.19, the sum inverted by Newton-Raphson (``GetReciprocal``) and each
exponential scaled by the inverse into the output's 1/256 steps.

Everything before the sum depends on one 8-bit difference (256 values), so it is computed here,
in Python integers that follow gemmlowp's arithmetic operation by operation, into two tables.
What depends on the row -- the maximum, the sum, its reciprocal, the final scaling -- is emitted
as int64 Relax ops on the codes: no float anywhere at run time.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SCALED_DIFF_BITS = 5  # kScaledDiffIntegerBits: the rescaled differences are Q5.26
ACCUMULATION_BITS = 12  # kAccumulationIntegerBits: the sum of exponentials is Q12.19
# gemmlowp's fixed-point constants (exp_on_negative_values, one_over_one_plus_x_for_x_in_0_1)
_EXP_BARREL = [(-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308)]
_EXP_BARREL += [(2, 39332535), (3, 720401), (4, 242)]
_EXP_MINUS_ONE_EIGHTH, _ONE_THIRD = 1895147668, 715827883
_48_OVER_17, _MINUS_32_OVER_17 = 1515870810, -1010580540


# -- gemmlowp on numpy int64 (the tables, and the reference the Relax ops follow) ---------------
def srdhm(a, b):
    """``SaturatingRoundingDoublingHighMul``: ``round(a * b / 2**31)``, ties away from zero."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    total = a * b + np.where(a * b >= 0, 1 << 30, 1 - (1 << 30))
    quotient = np.where(total >= 0, total >> 31, -((-total) >> 31))  # C's truncating division
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, quotient)


def rounding_divide_by_pot(x, exponent):
    """``RoundingDivideByPOT``: ``x / 2**exponent``, ties away from zero."""
    x, exponent = np.asarray(x, np.int64), np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    return (x >> exponent) + ((x & mask) > (mask >> 1) + (x < 0))


def saturating_shift_left(x, exponent: int):
    """``SaturatingRoundingMultiplyByPOT<exponent>`` for ``exponent > 0``."""
    x = np.asarray(x, np.int64)
    threshold = (1 << (31 - exponent)) - 1
    shifted = x << exponent
    return np.where(x > threshold, INT32_MAX, np.where(x < -threshold, INT32_MIN, shifted))


def _exp_on_quarter_interval(a):
    """``exp_on_interval_between_negative_one_quarter_and_0_excl`` (Q0.31 in and out)."""
    x = a + (1 << 28)
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4_over_4 = rounding_divide_by_pot(srdhm(x2, x2), 2)
    polynomial = rounding_divide_by_pot(srdhm(x4_over_4 + x3, _ONE_THIRD) + x2, 1)
    return _EXP_MINUS_ONE_EIGHTH + srdhm(_EXP_MINUS_ONE_EIGHTH, x + polynomial)


def exp_on_negative_values(a):
    """gemmlowp's ``exp_on_negative_values`` of Q5.26 raws ``a <= 0``, as Q0.31 raws."""
    a = np.asarray(a, np.int64)
    fractional = 31 - SCALED_DIFF_BITS
    quarter = 1 << (fractional - 2)
    a_mod_quarter = (a & (quarter - 1)) - quarter
    result = _exp_on_quarter_interval(saturating_shift_left(a_mod_quarter, SCALED_DIFF_BITS))
    remainder = a_mod_quarter - a
    for exponent, multiplier in _EXP_BARREL:
        if exponent < SCALED_DIFF_BITS:
            bit = (remainder & (1 << (fractional + exponent))) != 0
            result = np.where(bit, srdhm(result, multiplier), result)
    return np.where(a == 0, INT32_MAX, result)


def input_scaling(input_scale: float, beta: float = 1.0) -> tuple[int, int, int]:
    """``PreprocessSoftmaxScaling`` + ``CalculateInputRadius``: (multiplier, left shift,
    diff_min) of the rescaling of the 8-bit differences into Q5.26."""
    real = min(beta * input_scale * (1 << (31 - SCALED_DIFF_BITS)), (1 << 31) - 1.0)
    mantissa, shift = math.frexp(real)
    multiplier = int(math.floor(mantissa * (1 << 31) + 0.5))  # TfLiteRound: half away from 0
    if multiplier == 1 << 31:
        multiplier, shift = multiplier // 2, shift + 1
    radius = ((1 << SCALED_DIFF_BITS) - 1) * (1 << (31 - SCALED_DIFF_BITS)) / (1 << shift)
    return multiplier, shift, -math.floor(radius)


def tables(input_scale: float, beta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """For each difference ``d = max - x`` in 0..255: the exponential (Q0.31 raw) and its Q12.19
    rescaling for the sum, both 0 where the difference is below ``diff_min`` (the reference
    kernel skips those, and a 0 exponential gives its output, the lowest code, exactly)."""
    multiplier, shift, diff_min = input_scaling(input_scale, beta)
    diffs = -np.arange(256, dtype=np.int64)
    used = diffs >= diff_min
    rescaled = srdhm(np.where(used, diffs, 0) * (1 << shift), multiplier)
    exps = np.where(used, exp_on_negative_values(rescaled), 0)
    return exps, rounding_divide_by_pot(exps, ACCUMULATION_BITS)


def reference(codes, input_scale: float, out_dtype: str, beta: float = 1.0) -> np.ndarray:
    """The whole kernel on numpy (last axis), for tests of the Relax lowering."""
    codes = np.asarray(codes, np.int64)
    exps, accumulated = tables(input_scale, beta)
    index = codes.max(axis=-1, keepdims=True) - codes
    total = accumulated[index].sum(axis=-1, keepdims=True)
    bits = np.vectorize(lambda t: int(t).bit_length(), otypes=[np.int64])(total)
    headroom = 32 - bits  # leading zeros of the int32 sum
    scale = _one_over_one_plus_x((total << headroom) - (1 << 31))
    unsaturated = rounding_divide_by_pot(
        srdhm(scale, exps[index]), ACCUMULATION_BITS - headroom + 31 - 8
    )
    info = np.iinfo(out_dtype)
    return np.clip(unsaturated + info.min, info.min, info.max).astype(out_dtype)


def _one_over_one_plus_x(a):
    """``one_over_one_plus_x_for_x_in_0_1`` (Q0.31 in and out)."""
    half_denominator = (a + INT32_MAX + 1) >> 1  # RoundingHalfSum(a, One), a >= 0
    x = _48_OVER_17 + srdhm(half_denominator, _MINUS_32_OVER_17)
    for _ in range(3):
        error = (1 << 29) - srdhm(half_denominator, x)
        x = x + saturating_shift_left(srdhm(x, error), 2)
    return saturating_shift_left(x, 1)


# -- the same on Relax --------------------------------------------------------------------------
class _Ops:
    """int64 Relax arithmetic mirroring the numpy functions above."""

    def __init__(self, emit):
        self.emit = emit

    def const(self, value):
        return relax.const(np.asarray(value, np.int64), "int64")

    def srdhm(self, a, b):
        """``(a * b + 2**30) >> 31``: the nudge ``1 - 2**30`` and the truncating division of
        negative products equal this floor division, so one form serves both signs (and
        reads each operand once: the fused kernel inlines every use)."""
        product = self.emit(relax.op.multiply(a, b))
        return self.emit(
            relax.op.right_shift(relax.op.add(product, self.const(1 << 30)), self.const(31))
        )

    def round_shift_nonnegative(self, x, exponent):
        """``RoundingDivideByPOT`` of ``x >= 0`` by ``exponent >= 1``: ``(x + half) >> e``."""
        half = self.emit(
            relax.op.left_shift(self.const(1), relax.op.subtract(exponent, self.const(1)))
        )
        return self.emit(relax.op.right_shift(relax.op.add(x, half), exponent))

    def saturating_shift_left(self, x, exponent: int):
        shifted = self.emit(relax.op.left_shift(x, self.const(exponent)))
        return self.emit(
            relax.op.clip(shifted, relax.prim_value(INT32_MIN), relax.prim_value(INT32_MAX))
        )


def lower(emit, codes, input_scale: float, out_dtype: str, beta: float = 1.0):
    """Relax expr of TFLite's softmax over the last axis of the 8-bit ``codes`` (already an
    emitted var), returning ``out_dtype`` codes with scale 1/256 and zero point at its minimum.
    ``emit`` binds an expr and returns its var."""
    ops, op = _Ops(emit), relax.op
    exps, accumulated = tables(input_scale, beta)
    wide = emit(op.astype(codes, "int64"))
    index = emit(op.subtract(op.max(wide, axis=[-1], keepdims=True), wide))
    total = emit(
        op.sum(
            op.take(ops.const(accumulated), index, axis=0, mode="clip"), axis=[-1], keepdims=True
        )
    )
    # GetReciprocal: the headroom of the sum (its leading zeros as an int32), from its bit length
    powers = ops.const(np.left_shift(np.int64(1), np.arange(32, dtype=np.int64)))
    bits = emit(
        op.sum(op.astype(op.greater_equal(total, powers), "int64"), axis=[-1], keepdims=True)
    )
    headroom = emit(op.subtract(ops.const(32), bits))
    normalized = emit(op.subtract(op.left_shift(total, headroom), ops.const(1 << 31)))
    half_denominator = emit(op.right_shift(op.add(normalized, ops.const(1 << 31)), ops.const(1)))
    x = emit(
        op.add(ops.const(_48_OVER_17), ops.srdhm(half_denominator, ops.const(_MINUS_32_OVER_17)))
    )
    for _ in range(3):
        error = emit(op.subtract(ops.const(1 << 29), ops.srdhm(half_denominator, x)))
        x = emit(op.add(x, ops.saturating_shift_left(ops.srdhm(x, error), 2)))
    scale = ops.saturating_shift_left(x, 1)
    exponentials = emit(op.take(ops.const(exps), index, axis=0, mode="clip"))
    shift = emit(op.subtract(ops.const(ACCUMULATION_BITS + 31 - 8), headroom))
    # both factors are >= 0 (a reciprocal and exponentials), so is their product
    unsaturated = ops.round_shift_nonnegative(ops.srdhm(scale, exponentials), shift)
    info = np.iinfo(out_dtype)
    shifted = emit(op.add(unsaturated, ops.const(int(info.min))))
    clipped = emit(
        op.clip(shifted, relax.prim_value(int(info.min)), relax.prim_value(int(info.max)))
    )
    return op.astype(clipped, out_dtype)

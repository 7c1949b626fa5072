"""Tests for qcompiler.passes.qmath, the integer arithmetic compiled kernels are checked against.

References are independent of the code under test: exact rationals (``fractions.Fraction``),
Python integers and float64 numpy.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qcompiler.passes import qmath
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.scheme import PRESETS, QuantSpec

INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)

ratios = st.floats(min_value=1e-9, max_value=1e4, allow_nan=False, allow_infinity=False)
int32s = st.integers(INT32_MIN, INT32_MAX)

SPECS = [
    QuantSpec(8, signed=False, symmetric=False),
    QuantSpec(8, signed=True, symmetric=False),
    QuantSpec(8, signed=True, symmetric=True),
    QuantSpec(8, signed=True, symmetric=True, narrow_range=True),
    QuantSpec(4, signed=True, symmetric=True),
    QuantSpec(16, signed=True, symmetric=False),
]
specs = st.sampled_from(SPECS)


def _exact_requantize(acc: int, multiplier: int, shift: int, zero_point: int, qmin, qmax) -> int:
    """``clamp(floor(acc * M0 / 2**shift + 1/2) + z)`` in exact rational arithmetic."""
    value = Fraction(acc) * Fraction(multiplier, 2**shift) + Fraction(1, 2)
    return min(max(math.floor(value) + zero_point, qmin), qmax)


# -- decompose_multiplier ------------------------------------------------------------------------


@given(ratios)
@example(1e-9)
@example(1e4)
@example(1.0)
@example(0.5)
@example(np.nextafter(1.0, 0.0))  # mantissa rounds up to 2**31: the carry into the exponent
@example(2.0**-20)
def test_decompose_multiplier_normalized_and_accurate(m):
    multiplier, shift = qmath.decompose_multiplier(m)
    multiplier, shift = int(multiplier), int(shift)
    if shift < qmath.MAX_SHIFT:
        assert 2**30 <= multiplier < 2**31
    assert 0 < shift <= qmath.MAX_SHIFT
    error = abs(Fraction(multiplier, 2**shift) - Fraction(m)) / Fraction(m)
    assert error <= Fraction(1, 2**30)


def test_decompose_multiplier_per_channel_matches_scalar():
    m = np.array([1e-6, 0.3, 0.75, 2.5, 1e3])
    multipliers, shifts = qmath.decompose_multiplier(m)
    assert multipliers.shape == shifts.shape == m.shape
    for i, r in enumerate(m):
        one_m, one_s = qmath.decompose_multiplier(r)
        assert (int(multipliers[i]), int(shifts[i])) == (int(one_m), int(one_s))


def test_decompose_multiplier_tiny_ratio_caps_the_shift():
    # 2**-70 needs shift 100 for 31 bits: capped at MAX_SHIFT with a small multiplier.
    multiplier, shift = qmath.decompose_multiplier(2.0**-70)
    assert int(shift) == qmath.MAX_SHIFT
    assert int(multiplier) == 0  # round(2**-70 * 2**62) = round(2**-8) = 0


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf"), 2.0**30, 1e12])
def test_decompose_multiplier_rejects(bad):
    with pytest.raises(QCompilerError, match="ratio"):
        qmath.decompose_multiplier(bad)


# -- requantize / rounding_shift -----------------------------------------------------------------

# Rounding truth table (round to nearest, ties towards +inf, i.e. floor(acc * m + 1/2)):
#
#   acc   m     acc*m   result   note
#     3   0.5    1.5      2      tie up
#    -3   0.5   -1.5     -1      tie up (towards +inf, not away from zero)
#     5   0.5    2.5      3      tie up (not to even)
#    -5   0.5   -2.5     -2
#     1   0.5    0.5      1
#    -1   0.5   -0.5      0
#     1   0.25   0.25     0
#    -1   0.25  -0.25     0
#     3   0.25   0.75     1
#    -3   0.25  -0.75    -1
TIES = [
    (3, 0.5, 2),
    (-3, 0.5, -1),
    (5, 0.5, 3),
    (-5, 0.5, -2),
    (1, 0.5, 1),
    (-1, 0.5, 0),
    (1, 0.25, 0),
    (-1, 0.25, 0),
    (3, 0.25, 1),
    (-3, 0.25, -1),
]


@pytest.mark.parametrize(("acc", "m", "expected"), TIES)
def test_requantize_rounding_truth_table(acc, m, expected):
    multiplier, shift = qmath.decompose_multiplier(m)
    got = qmath.requantize(acc, multiplier, shift, 0, INT32_MIN, INT32_MAX)
    assert int(got) == expected


@pytest.mark.parametrize(
    ("acc", "m", "zero_point", "qmin", "qmax", "expected"),
    [
        (INT32_MAX, 1.0, 0, 0, 255, 255),  # saturates high
        (-INT32_MAX, 1.0, 0, 0, 255, 0),  # saturates low
        (INT32_MIN, 0.999, 3, -128, 127, -128),
        (INT32_MAX, 1e4 - 1, -7, -128, 127, 127),  # acc * M0 near 2**62 must not wrap
        (-INT32_MAX, 1e4 - 1, -7, -128, 127, -128),
        (1000, 0.1, 120, 0, 255, 220),
        (1000, 0.1, 200, 0, 255, 255),  # the zero point pushes it over
        (-1000, 0.1, 50, 0, 255, 0),
        (7, 1.0, 0, 3, 5, 5),  # narrowed clamp (a fused ReLU6)
        (-7, 1.0, 4, 3, 5, 3),
    ],
)
def test_requantize_saturation(acc, m, zero_point, qmin, qmax, expected):
    multiplier, shift = qmath.decompose_multiplier(m)
    got = qmath.requantize(acc, multiplier, shift, zero_point, qmin, qmax)
    assert int(got) == expected


@settings(max_examples=300)
@given(
    acc=int32s,
    m=ratios,
    zero_point=st.integers(-(2**15), 2**15),
    bounds=st.tuples(int32s, int32s).map(sorted),
)
@example(acc=INT32_MAX, m=1e4, zero_point=0, bounds=[INT32_MIN, INT32_MAX])
@example(acc=-INT32_MAX, m=1e4, zero_point=0, bounds=[INT32_MIN, INT32_MAX])
@example(acc=INT32_MIN, m=1e4, zero_point=0, bounds=[INT32_MIN, INT32_MAX])
@example(acc=INT32_MAX, m=1e-9, zero_point=0, bounds=[INT32_MIN, INT32_MAX])
@example(acc=-INT32_MAX, m=0.5, zero_point=-128, bounds=[-128, 127])
def test_requantize_matches_exact_rational(acc, m, zero_point, bounds):
    qmin, qmax = bounds
    multiplier, shift = qmath.decompose_multiplier(m)
    got = qmath.requantize(acc, multiplier, shift, zero_point, qmin, qmax)
    expected = _exact_requantize(acc, int(multiplier), int(shift), zero_point, qmin, qmax)
    assert int(got) == expected


@given(acc=st.integers(-(2**20), 2**20), m=st.floats(1e-3, 1e2))
def test_requantize_close_to_the_real_ratio(acc, m):
    # One rounding of acc * m, plus the multiplier's relative error of 2**-30.
    multiplier, shift = qmath.decompose_multiplier(m)
    got = int(qmath.requantize(acc, multiplier, shift, 0, INT32_MIN, INT32_MAX))
    exact = Fraction(acc) * Fraction(m)
    assert abs(got - exact) <= Fraction(1, 2) + abs(exact) * Fraction(1, 2**30)


def test_requantize_per_axis():
    rng = np.random.default_rng(0)
    acc = rng.integers(-(2**24), 2**24, size=(2, 3, 4))
    m = np.array([1e-4, 3e-3, 0.2])
    multiplier, shift = qmath.decompose_multiplier(m)
    got = qmath.requantize(acc, multiplier, shift, 5, -128, 127, axis=1)
    assert got.shape == acc.shape
    for idx in np.ndindex(acc.shape):
        c = idx[1]
        expected = _exact_requantize(int(acc[idx]), int(multiplier[c]), int(shift[c]), 5, -128, 127)
        assert int(got[idx]) == expected


@given(x=st.integers(-(2**62), 2**62 - 1), shift=st.integers(1, qmath.MAX_SHIFT))
def test_rounding_shift_is_floor_half_up(x, shift):
    expected = math.floor(Fraction(x, 2**shift) + Fraction(1, 2))
    assert int(qmath.rounding_shift(x, shift)) == expected


# -- qparams_from_range / quantize / dequantize --------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@given(lo=finite, hi=finite, spec=specs)
def test_qparams_zero_is_exact(lo, hi, spec):
    lo, hi = min(lo, hi), max(lo, hi)
    scale, zero_point = qmath.qparams_from_range(lo, hi, spec)
    assert scale.dtype == np.float32 and zero_point.dtype == np.int32
    assert float(scale) > 0
    assert spec.qmin <= int(zero_point) <= spec.qmax
    assert int(qmath.quantize(0.0, scale, zero_point, spec)) == int(zero_point)
    assert float(qmath.dequantize(zero_point, scale, zero_point)) == 0.0


@given(lo=finite, hi=finite, spec=st.sampled_from([s for s in SPECS if s.symmetric]))
def test_qparams_symmetric(lo, hi, spec):
    lo, hi = min(lo, hi), max(lo, hi)
    scale, zero_point = qmath.qparams_from_range(lo, hi, spec)
    assert int(zero_point) == 0
    amax = max(-min(lo, 0.0), max(hi, 0.0))
    # A range so narrow that amax / qmax underflows to 0.0 is a zero range (scale 1.0, tested
    # apart).
    if amax / spec.qmax > 0:
        # amax / qmax, rounded to float32 (and never below float32's smallest normal).
        expected = max(np.float32(amax / spec.qmax), np.finfo(np.float32).tiny)
        assert scale == expected


@given(lo=finite, hi=finite, spec=st.sampled_from([s for s in SPECS if not s.symmetric]))
def test_qparams_asymmetric_covers_the_range(lo, hi, spec):
    lo, hi = min(lo, hi), max(lo, hi)
    scale, zero_point = qmath.qparams_from_range(lo, hi, spec)
    s, z = float(scale), int(zero_point)
    lowest = s * (spec.qmin - z)
    highest = s * (spec.qmax - z)
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    slack = s * (1 + 1e-6)
    assert lowest <= lo0 + slack
    assert highest >= hi0 - slack


@pytest.mark.parametrize("spec", SPECS)
def test_qparams_zero_width_range(spec):
    scale, zero_point = qmath.qparams_from_range(0.0, 0.0, spec)
    assert float(scale) == 1.0
    assert int(qmath.quantize(0.0, scale, zero_point, spec)) == int(zero_point)


def test_qparams_per_channel_arrays_match_scalars():
    spec = PRESETS["asymmetric"].weight
    lo = np.array([-1.0, 0.0, -3.0, 0.5, 0.0])
    hi = np.array([2.0, 0.0, -1.0, 4.0, 1e-3])
    scale, zero_point = qmath.qparams_from_range(lo, hi, spec)
    assert scale.shape == zero_point.shape == (5,)
    for i in range(5):
        s, z = qmath.qparams_from_range(lo[i], hi[i], spec)
        assert scale[i] == s and zero_point[i] == z
    # Channel 0 by hand: [-1, 2] over 255 steps, zero at round(1 / (3/255)) = 85.
    assert scale[0] == np.float32(3.0 / 255)
    assert zero_point[0] == 85
    assert scale[1] == 1.0  # the all-zero channel


@pytest.mark.parametrize(
    ("lo", "hi"),
    [
        (float("nan"), 1.0),
        (0.0, float("nan")),
        (-float("inf"), 1.0),
        (0.0, float("inf")),
        (np.array([0.0, -1.0]), np.array([1.0, float("inf")])),
    ],
)
def test_qparams_non_finite_range_raises(lo, hi):
    with pytest.raises(QCompilerError, match="non-finite"):
        qmath.qparams_from_range(lo, hi, PRESETS["hybrid"].activation)


@given(
    lo=st.floats(-1e4, 0.0),
    hi=st.floats(0.0, 1e4),
    t=st.floats(0.0, 1.0),
    spec=specs,
)
def test_quantize_dequantize_round_trip(lo, hi, t, spec):
    scale, zero_point = qmath.qparams_from_range(lo, hi, spec)
    x = lo + t * (hi - lo)
    q = qmath.quantize(x, scale, zero_point, spec)
    assert spec.qmin <= int(q) <= spec.qmax
    back = float(qmath.dequantize(q, scale, zero_point))
    # Half a step, plus float32 rounding of the scale and of the dequantized value.
    bound = float(scale) / 2 * (1 + 1e-6) + abs(x) * 2.0**-22
    assert abs(back - x) <= bound


def test_quantize_per_channel_axis():
    spec = PRESETS["hybrid"].weight
    scale = np.array([0.5, 0.25], dtype=np.float32)
    x = np.array([[1.0, -1.0, 0.3], [1.0, -1.0, 0.3]])
    q = qmath.quantize(x, scale, np.zeros(2, np.int32), spec, axis=0)
    np.testing.assert_array_equal(q, [[2, -2, 1], [4, -4, 1]])
    back = qmath.dequantize(q, scale, np.zeros(2, np.int32), axis=0)
    np.testing.assert_array_equal(back, np.array([[1.0, -1.0, 0.5], [1.0, -1.0, 0.25]], np.float32))


def test_quantize_rounds_half_to_even_and_saturates():
    spec = QuantSpec(8, signed=True, symmetric=True)
    q = qmath.quantize([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0], 1.0, 0, spec)
    np.testing.assert_array_equal(q, [0, 2, 2, 0, -2, 127, -128])


# -- common_multipliers --------------------------------------------------------------------------


@given(st.lists(ratios, min_size=1, max_size=5))
@example([1.0, 1.0])
@example([1e-9, 1e4])
@example([0.3, np.nextafter(1.0, 0.0)])
def test_common_multipliers_exactness(rs):
    multipliers, shift = qmath.common_multipliers(rs)
    assert multipliers.shape == (len(rs),)
    assert 0 < shift <= qmath.MAX_SHIFT
    top = int(multipliers[int(np.argmax(rs))])
    if shift < qmath.MAX_SHIFT:
        assert 2**30 <= top < 2**31  # the largest ratio gets 31 significant bits
    for r, m in zip(rs, multipliers):
        # Every ratio to the same absolute precision: half a unit of 2**-shift.
        assert abs(Fraction(int(m), 2**shift) - Fraction(r)) <= Fraction(1, 2 ** (shift + 1))
    # So the sum of terms sum((q_i - z_i) * r_i) is off by at most sum(|q_i - z_i|) / 2**(shift+1).
    assert abs(Fraction(top, 2**shift) - Fraction(max(rs))) / Fraction(max(rs)) <= Fraction(
        1, 2**30
    )


# -- TFLite's arithmetic, against gemmlowp's definitions transcribed on Python ints -------------
def _srdhm(a: int, b: int) -> int:
    """gemmlowp SaturatingRoundingDoublingHighMul (C++ division truncates towards zero)."""
    if a == b == -(2**31):
        return 2**31 - 1
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    total = ab + nudge
    return abs(total) // (1 << 31) * (1 if total >= 0 else -1)


def _rdbpot(x: int, exponent: int) -> int:
    """gemmlowp RoundingDivideByPOT."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def _tflite_quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplier: (q_fixed, shift) with m = q_fixed * 2**(shift - 31)."""
    q, shift = math.frexp(m)
    q_fixed = int(math.floor(q * (1 << 31) + 0.5))  # TfLiteRound: half away from zero, q > 0
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    return q_fixed, shift


def _tflite_reference(x: int, m: float) -> int:
    q_fixed, shift = _tflite_quantize_multiplier(m)
    left, right = max(shift, 0), max(-shift, 0)
    return _rdbpot(_srdhm(x * (1 << left), q_fixed), right)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 1e-3, 0.0123456, 0.999999, 1.75, 3.1, 2.0**-20])
def test_tflite_multiply_matches_gemmlowp(ratio):
    rng = np.random.default_rng(int(ratio * 1e6) % 2**32)
    xs = np.concatenate(
        [rng.integers(-(2**20), 2**20, 2000), np.arange(-300, 301), [2**24, -(2**24)]]
    )
    if ratio > 1:
        xs = xs // 4  # keep x * 2**left within int32, as TFLite requires
    got = qmath.tflite_multiply(xs, ratio)
    expected = [_tflite_reference(int(x), ratio) for x in xs]
    np.testing.assert_array_equal(got, expected)


# -- int4 packing, against a bit-by-bit reference on Python ints ------------------------------
def _pack_reference(row: list[int]) -> list[int]:
    row = row + [0] * (len(row) % 2)
    two = [(c + 16) % 16 for c in row]  # two's complement nibble
    return [two[i] + 16 * two[i + 1] for i in range(0, len(row), 2)]


@given(st.lists(st.lists(st.integers(-8, 7), min_size=1, max_size=9), min_size=1, max_size=4))
@example([[-8, 7, 0, -1, 1]])
def test_pack_int4_matches_reference_and_round_trips(rows):
    n = len(rows[0])
    rows = [(r * n)[:n] for r in rows]  # equal lengths
    codes = np.array(rows, dtype=np.int8)
    packed = qmath.pack_int4(codes)
    assert packed.dtype == np.uint8 and packed.shape == (len(rows), (n + 1) // 2)
    assert packed.tolist() == [_pack_reference(r) for r in rows]
    np.testing.assert_array_equal(qmath.unpack_int4(packed, n), codes)


def test_pack_int4_refuses_codes_out_of_range():
    with pytest.raises(QCompilerError, match=r"\[-8, 7\], got \[-9, 3\]"):
        qmath.pack_int4(np.array([-9, 3]))
    with pytest.raises(QCompilerError, match="cannot hold"):
        qmath.unpack_int4(np.zeros(2, np.uint8), 7)


# -- TFLite's arithmetic over the whole ratio range, including left shifts ---------------------
@settings(max_examples=300)
@given(
    x=st.integers(-(2**24), 2**24),
    m=st.floats(min_value=1e-8, max_value=1e4, allow_nan=False),
)
@example(x=-(2**24), m=1e4)
@example(x=2**24 - 1, m=1e-8)
@example(x=3, m=0.5)  # ties: 1.5 rounds away from zero on both signs
@example(x=-3, m=0.5)
def test_tflite_multiply_matches_gemmlowp_over_the_range(x, m):
    _, shift = _tflite_quantize_multiplier(m)
    if shift > 0:
        x = x >> min(shift, 30)  # TFLite needs x * 2**left to fit int32
    assert int(qmath.tflite_multiply(x, m)) == _tflite_reference(x, m)

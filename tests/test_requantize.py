"""The fused requantize epilogue (targets.requantize) against exact integer arithmetic.

The chain is written the way integerize writes it (int64 Relax ops), compiled by qcompiler's
build (which fuses it into one int32-multiplier computation) and compared with Python's
arbitrary-precision integers, at the edges: multipliers near 2**31, shifts up to 62, int32
extremes, biases, zero points at the dtype ends.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from qcompiler.passes import qmath
from qcompiler.passes.graph import bindings
from qcompiler.targets.boards import resolve_target
from qcompiler.targets.build import build, fused_module
from qcompiler.targets.requantize import fuse_requantize

HOST = resolve_target("x86")


def _c(value, dtype):
    return relax.const(np.asarray(value, dtype=dtype), dtype)


def chain_module(shape, bias, multiplier, shift, zero_point, lo, hi, dtype):
    """``astype(clip(((int64(acc + bias) * M + 2**(s-1)) >> s) + z, lo, hi), dtype)``."""
    bb = relax.BlockBuilder()
    acc = relax.Var("acc", relax.TensorType(shape, "int32"))
    with bb.function("main", [acc]):
        with bb.dataflow():
            x = bb.emit(relax.op.add(acc, _c(bias, "int32")))
            x = bb.emit(relax.op.astype(x, "int64"))
            x = bb.emit(relax.op.multiply(x, _c(multiplier, "int64")))
            x = bb.emit(relax.op.add(x, _c(np.left_shift(1, np.asarray(shift) - 1), "int64")))
            x = bb.emit(relax.op.right_shift(x, _c(shift, "int64")))
            if zero_point:
                x = bb.emit(relax.op.add(x, _c(zero_point, "int64")))
            x = bb.emit(relax.op.clip(x, relax.prim_value(lo), relax.prim_value(hi)))
            out = bb.emit_output(relax.op.astype(x, dtype))
        bb.emit_func_output(out)
    return bb.get()


def exact(acc, bias, multiplier, shift, zero_point, lo, hi):
    """The same arithmetic on Python ints (floor division is the arithmetic shift)."""
    acc, bias = np.broadcast_arrays(acc, np.asarray(bias))
    multiplier = np.broadcast_to(multiplier, acc.shape)
    shift = np.broadcast_to(shift, acc.shape)
    out = np.empty(acc.shape, dtype=np.int64)
    for i in np.ndindex(acc.shape):
        a, b, m, s = int(acc[i]), int(bias[i]), int(multiplier[i]), int(shift[i])
        value = ((a + b) * m + (1 << (s - 1))) // (1 << s) + zero_point
        out[i] = min(max(value, lo), hi)
    return out


def fused(mod) -> bool:
    """Whether fuse_requantize turned ``mod``'s chain into a kernel call."""
    ops = [
        b.value.op.name for b in bindings(fuse_requantize(mod)["main"]) if hasattr(b.value, "op")
    ]
    return "relax.call_tir" in ops


def run(mod, acc):
    vm = relax.VirtualMachine(build(mod, HOST), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(acc)).numpy()


CASES = [
    # (multiplier, shift, zero_point, lo, hi, dtype)
    pytest.param(2**31 - 1, 62, 0, 0, 255, "uint8", id="M-near-2^31-shift-62"),
    pytest.param(2**30, 31, 128, 0, 255, "uint8", id="ratio-0.5-zp-128"),
    pytest.param(1_500_000_000, 40, -128, -128, 127, "int8", id="int8-zp-at-min"),
    pytest.param(1_234_567_890, 33, 127, -128, 127, "int8", id="int8-zp-at-max"),
    pytest.param(2**31 - 1, 31, 0, -32768, 32767, "int16", id="int16"),
    pytest.param(1_073_741_825, 36, 3, 3, 58, "uint8", id="relu6-clamp"),
]


@pytest.mark.parametrize("multiplier, shift, zero_point, lo, hi, dtype", CASES)
def test_fused_chain_matches_exact_integers(multiplier, shift, zero_point, lo, hi, dtype):
    rng = np.random.default_rng(shift)
    shape = (2, 5, 3, 24)
    acc = rng.integers(-(2**24), 2**24, size=shape, dtype=np.int32)
    # int32 extremes and rounding ties: (a * M) mod 2**s == 2**(s-1) for a = 2**(s-1) / M ...
    acc.flat[:4] = [2**31 - 2**29, -(2**31) + 2**29, 0, -1]
    bias = rng.integers(-(2**28), 2**28, size=(1, 1, 1, 24), dtype=np.int32)
    mod = chain_module(shape, bias, multiplier, shift, zero_point, lo, hi, dtype)
    assert fused(mod)
    got = run(mod, acc)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, exact(acc, bias, multiplier, shift, zero_point, lo, hi))


@pytest.mark.parametrize("zero_point", [0, 7])
def test_per_channel_multipliers_and_shifts(zero_point):
    rng = np.random.default_rng(0)
    channels = 32
    shape = (1, 4, 4, channels)
    acc = rng.integers(-(2**20), 2**20, size=shape, dtype=np.int32)
    multiplier = rng.integers(2**30, 2**31, size=(1, 1, 1, channels), dtype=np.int64)
    shift = rng.integers(31, 63, size=(1, 1, 1, channels), dtype=np.int64)
    # small shifts make half the outputs saturate, large ones round towards 0: both ends covered
    shift[..., :8] = rng.integers(10, 20, size=8)
    bias = rng.integers(-1000, 1000, size=(1, 1, 1, channels), dtype=np.int32)
    mod = chain_module(shape, bias, multiplier, shift, zero_point, 0, 255, "uint8")
    # 7 << 62 leaves int64: that chain must stay unfused (and still be right).
    assert fused(mod) == (zero_point == 0)
    expected = exact(acc, bias, multiplier, shift, zero_point, 0, 255)
    np.testing.assert_array_equal(run(mod, acc), expected)


def test_ties_round_towards_plus_infinity():
    # acc * M / 2**s = k + 1/2 exactly: the rounding must go up on both signs.
    acc = np.array([[1, 3, -1, -3, 5, -5]], dtype=np.int32)
    # per-tensor: every constant a scalar
    mod = chain_module(acc.shape, np.int32(0), 2**30, 31, 0, -128, 127, "int8")
    assert fused(mod)
    np.testing.assert_array_equal(run(mod, acc), [[1, 2, 0, -1, 3, -2]])


def test_chain_is_fused_into_one_function():
    mod = chain_module((1, 8), np.zeros((1, 8), np.int32), 2**30, 31, 0, 0, 255, "uint8")
    rewritten = fuse_requantize(mod)
    ops = [str(b.value.op.name) for b in bindings(rewritten["main"]) if hasattr(b.value, "op")]
    assert ops == ["relax.call_tir"], ops
    # ... and the multiplier reaches the kernel as int32, the property the rewrite exists for.
    kernels = [
        f for f in fused_module(mod, HOST).functions.values() if isinstance(f, tvm.tirx.PrimFunc)
    ]
    dtypes = {str(p.ty.dtype) for f in kernels for p in f.params}
    assert "int32" in dtypes


def test_shared_intermediate_is_not_fused():
    """A chain value that has a second user must stay as written (fusing would duplicate it)."""
    bb = relax.BlockBuilder()
    acc = relax.Var("acc", relax.TensorType((1, 8), "int32"))
    with bb.function("main", [acc]):
        with bb.dataflow():
            wide = bb.emit(relax.op.astype(acc, "int64"))
            x = bb.emit(relax.op.multiply(wide, _c(2**30, "int64")))
            x = bb.emit(relax.op.add(x, _c(2**30, "int64")))
            x = bb.emit(relax.op.right_shift(x, _c(31, "int64")))
            x = bb.emit(relax.op.clip(x, relax.prim_value(0), relax.prim_value(255)))
            y = bb.emit(relax.op.astype(x, "uint8"))
            out = bb.emit_output(relax.Tuple([y, wide]))
        bb.emit_func_output(out)
    mod = bb.get()
    assert not fused(mod)


DTYPES = {"uint8": (0, 255), "int8": (-128, 127), "int16": (-32768, 32767)}


@settings(max_examples=12, deadline=None)
@given(
    ratios=st.lists(st.floats(1e-8, 1e4), min_size=16, max_size=16),
    dtype=st.sampled_from(sorted(DTYPES)),
    zero_point_at=st.sampled_from(["min", "max", "zero"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_compiled_requantize_matches_exact_rationals(ratios, dtype, zero_point_at, seed):
    """Ratios over the full range of scales (per channel, from decompose_multiplier), zero
    points at the dtype's ends, int32 accumulators: the compiled kernel equals
    ``clamp(floor(acc * M0 / 2**shift + 1/2) + z)`` computed with Fractions, and stays within
    half a step (plus M0's 2**-30 relative error) of the real ``acc * ratio``."""
    lo, hi = DTYPES[dtype]
    zero_point = {"min": lo, "max": hi, "zero": 0}[zero_point_at]
    multiplier, shift = qmath.decompose_multiplier(ratios)
    shape = (1, 3, 16)
    acc = np.random.default_rng(seed).integers(-(2**31), 2**31, shape, dtype=np.int64)
    acc[0, 0, :4] = [2**31 - 1, -(2**31), 1, -1]
    acc = acc.astype(np.int32)
    m, s = multiplier.reshape(1, 1, 16), shift.reshape(1, 1, 16)
    got = run(chain_module(shape, np.int32(0), m, s, zero_point, lo, hi, dtype), acc)
    for (_, c, k), a in np.ndenumerate(acc):
        value = Fraction(int(a) * int(m[0, 0, k]), 2 ** int(s[0, 0, k])) + Fraction(1, 2)
        expected = min(max(math.floor(value) + zero_point, lo), hi)
        assert int(got[0, c, k]) == expected, (int(a), ratios[k])
        real = Fraction(int(a)) * Fraction(ratios[k]) + zero_point
        if lo <= real <= hi:
            assert abs(expected - real) <= Fraction(1, 2) + abs(real - zero_point) / 2**30

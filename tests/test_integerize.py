"""Tests for qcompiler.passes.integerize: QDQ Relax functions lowered to integer-only arithmetic.

Each numeric test builds a QDQ function by hand (integerize's input contract), lowers and compiles
it with TVM, and compares the output codes exactly with a numpy reference written here from the
quantization conventions (``r = s * (q - z)``), :func:`qmath.decompose_multiplier` /
:func:`qmath.common_multipliers` and int64 arithmetic. Inputs are float tensors on the input's
quantization grid, so the entry ``quantize`` reproduces known codes exactly.
"""

import warnings

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from qcompiler.passes import qmath
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import bindings, op_name
from qcompiler.passes.integerize import FALLBACK_ATTR, integerize
from qcompiler.passes.verify import verify_integer_only
from qcompiler.targets.boards import resolve_target
from qcompiler.targets.build import build

TARGET = tvm.target.Target({"kind": "llvm"})
HOST = resolve_target("x86")
F32 = np.float32


# -- building and running ------------------------------------------------------------------------


def _c(value, dtype):
    return relax.const(np.asarray(value, dtype=dtype), dtype)


def _quantize(x, s, z, dtype="uint8", axis=-1):
    return relax.op.quantize(x, _c(s, "float32"), _c(z, "int32"), axis=axis, out_dtype=dtype)


def _dequantize(q, s, z, axis=-1):
    return relax.op.dequantize(q, _c(s, "float32"), _c(z, "int32"), axis=axis)


def _qdq_function(inputs, body):
    """``main(*inputs)``: each float input quantized then dequantized, then ``body(bb, *dq)``.

    ``inputs`` is a list of ``(name, shape, scale, zero_point, dtype)``; ``body`` returns the
    function's output expr (emitted as the output).
    """
    bb = relax.BlockBuilder()
    params = [relax.Var(name, relax.TensorType(shape, "float32")) for name, shape, *_ in inputs]
    with bb.function("main", params):
        with bb.dataflow():
            dqs = []
            for param, (_, _, s, z, dtype) in zip(params, inputs):
                q = bb.emit(_quantize(param, s, z, dtype))
                dqs.append(bb.emit(_dequantize(q, s, z)))
            out = bb.emit_output(body(bb, *dqs))
        bb.emit_func_output(out)
    return bb.get()


def _on_grid(rng, shape, s, z, dtype="uint8"):
    """Random codes and the float32 values they dequantize to."""
    info = np.iinfo(dtype)
    q = rng.integers(int(info.min), int(info.max) + 1, size=shape).astype(np.int64)
    x = (np.float64(F32(s)) * (q - z)).astype(F32)
    return x, q


def _run(mod, *args):
    """Run ``mod`` built by TVM's plain pipeline and by qcompiler's (fused requantize epilogues,
    int8 kernels, default schedules); both must give the same integers."""
    inputs = [np.ascontiguousarray(a) for a in args]
    outs = []
    for executable in (tvm.compile(mod, target=TARGET), build(mod, HOST)):
        vm = relax.VirtualMachine(executable, tvm.cpu())
        outs.append(vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy())
    np.testing.assert_array_equal(outs[1], outs[0])
    return outs[0]


def _float_bindings(mod):
    """``(var name, op name)`` of every binding of ``main`` producing a float tensor."""
    found = []
    for binding in bindings(mod["main"]):
        ty = binding.var.ty
        if isinstance(ty, relax.TensorType) and str(ty.dtype).startswith("float"):
            found.append((binding.var.name, op_name(binding.value)))
    return found


def _accumulator_dtypes(mod, op):
    """The output dtype of every ``op`` binding of ``main``."""
    return [str(b.var.ty.dtype) for b in bindings(mod["main"]) if op_name(b.value) == op]


def _op_names(mod):
    return [op_name(b.value) for b in bindings(mod["main"])]


def _integerize_strict(mod, rounding="half_up"):
    """integerize + verify, failing on any fallback warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = integerize(mod, rounding=rounding)
    verify_integer_only(out)
    assert list(out["main"].attrs[FALLBACK_ATTR]) == []
    return out


def _assert_integer_only(mod):
    """No binding of ``main`` produces a float tensor (the entry quantize reads the float input)."""
    floats = _float_bindings(mod)
    assert floats == [], f"float bindings left: {floats}"


# -- numpy references ----------------------------------------------------------------------------


def _requant_ref(acc, ratio, z_out, qlo, qhi, axis=None):
    """``clamp(floor(acc * M0 / 2**shift + 1/2) + z)``, int64, per channel along ``axis``."""
    acc = np.asarray(acc, dtype=np.int64)
    multiplier, shift = qmath.decompose_multiplier(ratio)
    multiplier = np.asarray(multiplier, np.int64)
    shift = np.asarray(shift, np.int64)
    if axis is not None:
        shape = [1] * acc.ndim
        shape[axis] = -1
        multiplier, shift = multiplier.reshape(shape), shift.reshape(shape)
    out = ((acc * multiplier + (np.int64(1) << (shift - 1))) >> shift) + z_out
    return np.clip(out, qlo, qhi)


def _code(r, s, z, dtype):
    """The saturated code of the real value ``r``."""
    info = np.iinfo(dtype)
    return int(np.clip(np.rint(r / np.float64(F32(s))) + z, info.min, info.max))


def _conv_ref(xc, w, strides, padding, groups):
    """int64 NCHW/OIHW conv of centred codes ``xc`` (zero padding == the real value 0)."""
    top, left, bottom, right = padding
    xp = np.pad(xc, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, _, h, wd = xp.shape
    o, cg, kh, kw = w.shape
    sh, sw = strides
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    og = o // groups
    out = np.zeros((n, o, oh, ow), np.int64)
    for g in range(groups):
        xs = xp[:, g * cg : (g + 1) * cg]
        ws = w[g * og : (g + 1) * og].astype(np.int64)
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
                out[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out


# -- conv2d --------------------------------------------------------------------------------------

CONV_CASES = {
    # name: (layout, stride, padding, groups, z_x, clamp, out dtype, z_y)
    "nchw_pad1_relu": ("NCHW", 1, [1, 1, 1, 1], 1, 7, "relu", "uint8", 3),
    "nhwc_stride2_asym_pad_relu6": ("NHWC", 2, [0, 0, 1, 1], 1, 120, "relu6", "uint8", 0),
    "nchw_depthwise_zx_border": ("NCHW", 1, [1, 1, 1, 1], 4, 200, None, "int8", -5),
    "nhwc_depthwise_clip": ("NHWC", 1, [2, 1, 0, 1], 4, 31, "clip", "uint8", 10),
    "nchw_no_pad_zx0": ("NCHW", 1, [0, 0, 0, 0], 1, 0, None, "uint8", 128),
}


# The real interval each clamp keeps.
CLAMP_BOUNDS = {
    None: (-np.inf, np.inf),
    "relu": (0.0, np.inf),
    "relu6": (0.0, 6.0),
    "clip": (0.0, 6.0),
}


def _clamp(bb, y, clamp):
    if clamp == "relu":
        return bb.emit(relax.op.nn.relu(y))
    if clamp == "relu6":
        return bb.emit(relax.op.nn.relu6(y))
    if clamp == "clip":
        return bb.emit(relax.op.clip(y, relax.prim_value(0.0), relax.prim_value(6.0)))
    return y


@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_conv2d_bias_clamp_matches_integer_reference(case):
    layout, stride, padding, groups, z_x, clamp, out_dtype, z_y = CONV_CASES[case]
    rng = np.random.default_rng(list(CONV_CASES).index(case))
    c_in, c_out, k = 4, 4, 3
    s_x, s_y = F32(0.02), F32(0.12)
    # Weights in OIHW for the reference, per-output-channel symmetric int8.
    w_oihw = rng.integers(-127, 128, size=(c_out, c_in // groups, k, k)).astype(np.int8)
    s_w = rng.uniform(2e-3, 2e-2, size=c_out).astype(F32)
    bias = rng.normal(scale=0.5, size=c_out).astype(F32)
    nchw_shape = (1, c_in, 7, 7)
    if layout == "NCHW":
        x_shape, kernel_layout, w_codes, w_axis = nchw_shape, "OIHW", w_oihw, 0
        bias_shape = (1, c_out, 1, 1)
    else:
        x_shape, kernel_layout, w_axis = (1, 7, 7, c_in), "HWIO", 3
        w_codes = w_oihw.transpose(2, 3, 1, 0)
        bias_shape = (1, 1, 1, c_out)

    def body(bb, x_dq):
        w_dq = bb.emit(
            relax.op.dequantize(
                _c(w_codes, "int8"), _c(s_w, "float32"), _c(np.zeros(c_out), "int32"), axis=w_axis
            )
        )
        y = bb.emit(
            relax.op.nn.conv2d(
                x_dq,
                w_dq,
                strides=stride,
                padding=padding,
                groups=groups,
                data_layout=layout,
                kernel_layout=kernel_layout,
            )
        )
        y = bb.emit(relax.op.add(y, _c(bias.reshape(bias_shape), "float32")))
        y = _clamp(bb, y, clamp)
        return _quantize(y, s_y, z_y, out_dtype)

    mod = _qdq_function([("x", x_shape, s_x, z_x, "uint8")], body)
    lowered = _integerize_strict(mod)
    _assert_integer_only(lowered)
    assert _accumulator_dtypes(lowered, "relax.nn.conv2d") == ["int32"]

    x, q_x = _on_grid(rng, x_shape, s_x, z_x)
    got = _run(lowered, x)
    assert got.dtype == np.dtype(out_dtype)

    q_x_nchw = q_x if layout == "NCHW" else q_x.transpose(0, 3, 1, 2)
    acc = _conv_ref(q_x_nchw - z_x, w_oihw, (stride, stride), padding, groups)
    acc_scale = np.float64(s_x) * s_w.astype(np.float64)
    bias_q = np.rint(bias.astype(np.float64) / acc_scale).astype(np.int64)
    acc = acc + bias_q.reshape(1, -1, 1, 1)
    lo, hi = CLAMP_BOUNDS[clamp]
    info = np.iinfo(out_dtype)
    qlo = int(info.min) if np.isinf(lo) else max(int(info.min), _code(lo, s_y, z_y, out_dtype))
    qhi = int(info.max) if np.isinf(hi) else min(int(info.max), _code(hi, s_y, z_y, out_dtype))
    expected = _requant_ref(acc, acc_scale / np.float64(s_y), z_y, qlo, qhi, axis=1)
    if layout == "NHWC":
        expected = expected.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, expected)


def test_conv2d_folded_zero_point_equals_explicit_fold():
    """The fold integerize relies on, in numpy: a conv of raw codes padded with z_x, minus
    z_x * sum(q_w), equals the conv of centred codes padded with 0 (the reference used above).
    """
    rng = np.random.default_rng(5)
    q_x = rng.integers(0, 256, size=(1, 3, 5, 5))
    w = rng.integers(-127, 128, size=(2, 3, 3, 3))
    z_x = 77
    raw = _conv_ref(
        np.pad(q_x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=z_x),
        w,
        (1, 1),
        [0, 0, 0, 0],
        1,
    )
    folded = raw - z_x * w.sum(axis=(1, 2, 3)).reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(folded, _conv_ref(q_x - z_x, w, (1, 1), [1, 1, 1, 1], 1))


# -- matmul --------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["int8_symmetric", "uint8_zero_points"])
def test_matmul_per_channel_bias_matches_integer_reference(weights):
    rng = np.random.default_rng(1)
    k, n = 16, 8
    s_x, z_x, s_y, z_y = F32(0.03), 101, F32(0.04), 90
    if weights == "int8_symmetric":
        w = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
        z_w = np.zeros(n, np.int64)
    else:  # the "asymmetric" preset: q_w - z_w spans [-255, 255], beyond int8
        w = rng.integers(0, 256, size=(k, n)).astype(np.uint8)
        z_w = rng.integers(0, 256, size=n)
    s_w = rng.uniform(1e-3, 1e-2, size=n).astype(F32)
    bias = rng.normal(size=n).astype(F32)

    def body(bb, x_dq):
        w_dq = bb.emit(
            relax.op.dequantize(_c(w, str(w.dtype)), _c(s_w, "float32"), _c(z_w, "int32"), axis=1)
        )
        y = bb.emit(relax.op.matmul(x_dq, w_dq))
        y = bb.emit(relax.op.add(y, _c(bias, "float32")))
        return _quantize(y, s_y, z_y)

    lowered = _integerize_strict(_qdq_function([("x", (1, k), s_x, z_x, "uint8")], body))
    _assert_integer_only(lowered)
    assert _accumulator_dtypes(lowered, "relax.matmul") == ["int32"]
    x, q_x = _on_grid(rng, (1, k), s_x, z_x)
    got = _run(lowered, x)

    acc_scale = np.float64(s_x) * s_w.astype(np.float64)
    acc = (q_x - z_x) @ (w.astype(np.int64) - z_w)
    acc = acc + np.rint(bias.astype(np.float64) / acc_scale).astype(np.int64)
    expected = _requant_ref(acc, acc_scale / np.float64(s_y), z_y, 0, 255, axis=1)
    np.testing.assert_array_equal(got, expected)


def test_matmul_of_two_activations():
    a_in = ("a", (1, 3, 6), F32(0.05), 100, "uint8")
    b_in = ("b", (1, 6, 5), F32(0.02), 20, "uint8")
    s_y, z_y = F32(0.3), 50
    rng = np.random.default_rng(9)

    def body(bb, a, b):
        return _quantize(bb.emit(relax.op.matmul(a, b)), s_y, z_y)

    lowered = _integerize_strict(_qdq_function([a_in, b_in], body))
    _assert_integer_only(lowered)
    a, q_a = _on_grid(rng, a_in[1], a_in[2], a_in[3])
    b, q_b = _on_grid(rng, b_in[1], b_in[2], b_in[3])
    got = _run(lowered, a, b)
    acc = (q_a - a_in[3]) @ (q_b - b_in[3])
    ratio = np.float64(a_in[2]) * np.float64(b_in[2]) / np.float64(s_y)
    np.testing.assert_array_equal(got, _requant_ref(acc, ratio, z_y, 0, 255))


def test_tflite_rounding_of_a_rescale_and_an_add():
    """rounding="tflite": a requantization is TFLite's doubling high multiply + rounding shift
    (qmath.tflite_multiply, itself checked against gemmlowp's definitions), an add is TFLite's
    ADD: both inputs << 20, rescaled to half the larger scale, summed, rescaled."""
    a_in = ("a", (2, 64), F32(0.05), -7, "int8")
    b_in = ("b", (2, 64), F32(0.02), 3, "int8")
    s_y, z_y = F32(0.07), -2
    rng = np.random.default_rng(12)
    a, q_a = _on_grid(rng, a_in[1], a_in[2], a_in[3], "int8")
    b, q_b = _on_grid(rng, b_in[1], b_in[2], b_in[3], "int8")

    def rescale(bb, x, _):
        return _quantize(x, s_y, z_y, "int8")

    got = _run(_integerize_strict(_qdq_function([a_in, b_in], rescale), "tflite"), a, b)
    ratio = np.float64(a_in[2]) / np.float64(s_y)
    expected = np.clip(qmath.tflite_multiply(q_a - a_in[3], ratio) + z_y, -128, 127)
    np.testing.assert_array_equal(got, expected)

    def add(bb, x, y):
        return _quantize(bb.emit(relax.op.add(x, y)), s_y, z_y, "int8")

    got = _run(_integerize_strict(_qdq_function([a_in, b_in], add), "tflite"), a, b)
    twice = 2 * max(float(a_in[2]), float(b_in[2]))
    scaled = [
        qmath.tflite_multiply((q - z) * (1 << 20), float(s) / twice)
        for q, z, s in ((q_a, a_in[3], a_in[2]), (q_b, b_in[3], b_in[2]))
    ]
    out_ratio = twice / float(np.float32((1 << 20) * s_y))
    expected = np.clip(qmath.tflite_multiply(scaled[0] + scaled[1], out_ratio) + z_y, -128, 127)
    np.testing.assert_array_equal(got, expected)


def test_conv2d_add_broadcast_along_width_is_not_a_channel_bias():
    # Output (1, 4, 4, 4): a (4,)-shaped constant is added along W, not along C.
    rng = np.random.default_rng(10)
    c = 4
    w = rng.integers(-127, 128, size=(c, 2, 3, 3)).astype(np.int8)
    s_w = np.full(c, 0.01, F32)
    width_bias = np.array([-3.0, -1.0, 1.0, 3.0], F32)
    s_x, z_x, s_y, z_y = F32(0.05), 128, F32(0.1), 128

    def body(bb, x_dq):
        w_dq = bb.emit(
            relax.op.dequantize(_c(w, "int8"), _c(s_w, "float32"), _c(np.zeros(c), "int32"), axis=0)
        )
        y = bb.emit(relax.op.nn.conv2d(x_dq, w_dq, padding=[1, 1, 1, 1]))
        y = bb.emit(relax.op.add(y, _c(width_bias, "float32")))
        return _quantize(y, s_y, z_y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a float fallback would be a correct outcome too
        lowered = integerize(_qdq_function([("x", (1, 2, c, c), s_x, z_x, "uint8")], body))
    x, q_x = _on_grid(rng, (1, 2, c, c), s_x, z_x)
    got = _run(lowered, x).astype(np.int64)
    real = _conv_ref(q_x - z_x, w, (1, 1), [1, 1, 1, 1], 1) * (np.float64(s_x) * 0.01)
    real = real + width_bias.astype(np.float64)  # numpy broadcasting == Relax broadcasting
    expected = np.clip(np.rint(real / np.float64(s_y)) + z_y, 0, 255)
    # Any correct lowering lands within one code of the float result.
    assert np.max(np.abs(got - expected)) <= 1


# -- add / subtract / multiply -------------------------------------------------------------------

A = ("a", (1, 3, 4, 4), F32(0.05), 120, "uint8")
B = ("b", (1, 3, 4, 4), F32(0.013), 30, "uint8")


@pytest.mark.parametrize(("op", "relu"), [("add", False), ("add", True), ("subtract", False)])
def test_add_of_two_scales_matches_common_multiplier_reference(op, relu):
    s_y, z_y = F32(0.06), 100
    rng = np.random.default_rng(2)

    def body(bb, a, b):
        y = bb.emit(getattr(relax.op, op)(a, b))
        if relu:
            y = bb.emit(relax.op.nn.relu(y))
        return _quantize(y, s_y, z_y)

    lowered = _integerize_strict(_qdq_function([A, B], body))
    _assert_integer_only(lowered)
    a, q_a = _on_grid(rng, A[1], A[2], A[3])
    b, q_b = _on_grid(rng, B[1], B[2], B[3])
    got = _run(lowered, a, b)

    ratios = [np.float64(A[2]) / np.float64(s_y), np.float64(B[2]) / np.float64(s_y)]
    (m_a, m_b), shift = qmath.common_multipliers(ratios)
    m_b = -m_b if op == "subtract" else m_b
    total = (q_a - A[3]) * m_a + (q_b - B[3]) * m_b + (np.int64(1) << (shift - 1))
    expected = np.clip((total >> shift) + z_y, z_y if relu else 0, 255)
    np.testing.assert_array_equal(got, expected)


def test_multiply_of_two_quantized_tensors_with_dequantized_output():
    s_y, z_y = F32(0.2), 64
    rng = np.random.default_rng(3)

    def body(bb, a, b):
        y_q = bb.emit(_quantize(bb.emit(relax.op.multiply(a, b)), s_y, z_y))
        return _dequantize(y_q, s_y, z_y)

    lowered = _integerize_strict(_qdq_function([A, B], body))
    # The model's exit: one float op, the final dequantize.
    assert [op for _, op in _float_bindings(lowered)] == ["relax.dequantize"]
    a, q_a = _on_grid(rng, A[1], A[2], A[3])
    b, q_b = _on_grid(rng, B[1], B[2], B[3])
    got = _run(lowered, a, b)
    product = (q_a - A[3]) * (q_b - B[3])
    ratio = np.float64(A[2]) * np.float64(B[2]) / np.float64(s_y)
    codes = _requant_ref(product, ratio, z_y, 0, 255)
    np.testing.assert_allclose(got, np.float64(s_y) * (codes - z_y), rtol=1e-6, atol=0)


def test_multiply_of_uint16_codes_does_not_wrap():
    a_in = ("a", (1, 4), F32(0.01), 0, "uint16")
    b_in = ("b", (1, 4), F32(0.01), 0, "uint16")
    s_y, z_y = F32(100.0), 0

    def body(bb, a, b):
        return _quantize(bb.emit(relax.op.multiply(a, b)), s_y, z_y, "uint16")

    lowered = _integerize_strict(_qdq_function([a_in, b_in], body))
    q_a = np.array([[60000, 40000, 1000, 65535]])
    q_b = np.array([[60000, 60000, 3000, 65535]])
    a = (np.float64(F32(0.01)) * q_a).astype(F32)
    b = (np.float64(F32(0.01)) * q_b).astype(F32)
    got = _run(lowered, a, b)
    ratio = np.float64(F32(0.01)) * np.float64(F32(0.01)) / np.float64(s_y)
    expected = _requant_ref(q_a * q_b, ratio, z_y, 0, 65535)
    # By hand: 600 * 600 / 100 = 3600, 400 * 600 / 100 = 2400, 10 * 30 / 100 = 3 (no overflow
    # there), 655.35**2 / 100 = 4294.8.
    np.testing.assert_array_equal(expected, [[3600, 2400, 3, 4295]])
    np.testing.assert_array_equal(got, expected)


# -- concat / mean -------------------------------------------------------------------------------


def test_concat_rescales_each_input():
    s_y, z_y = F32(0.04), 110
    rng = np.random.default_rng(4)
    b_in = ("b", (1, 2, 4, 4), F32(0.013), 30, "uint8")

    def body(bb, a, b):
        return _quantize(bb.emit(relax.op.concat([a, b], axis=1)), s_y, z_y)

    lowered = _integerize_strict(_qdq_function([A, b_in], body))
    _assert_integer_only(lowered)
    a, q_a = _on_grid(rng, A[1], A[2], A[3])
    b, q_b = _on_grid(rng, b_in[1], b_in[2], b_in[3])
    got = _run(lowered, a, b)
    parts = [
        _requant_ref(q - z, np.float64(s) / np.float64(s_y), z_y, 0, 255)
        for q, s, z in [(q_a, A[2], A[3]), (q_b, b_in[2], b_in[3])]
    ]
    np.testing.assert_array_equal(got, np.concatenate(parts, axis=1))


@pytest.mark.parametrize("op", ["mean", "avg_pool2d"])
def test_global_average_pool(op):
    s_x, z_x, s_y, z_y = F32(0.1), 17, F32(0.07), 5
    shape = (1, 8, 5, 6)
    rng = np.random.default_rng(6)

    def body(bb, x):
        if op == "mean":
            y = bb.emit(relax.op.mean(x, axis=[2, 3], keepdims=True))
        else:
            y = bb.emit(relax.op.nn.avg_pool2d(x, pool_size=(5, 6)))
        return _quantize(y, s_y, z_y)

    lowered = _integerize_strict(_qdq_function([("x", shape, s_x, z_x, "uint8")], body))
    _assert_integer_only(lowered)
    x, q_x = _on_grid(rng, shape, s_x, z_x)
    got = _run(lowered, x)
    count = 30
    total = (q_x - z_x).sum(axis=(2, 3), keepdims=True)
    ratio = np.float64(s_x) / (count * np.float64(s_y))
    expected = _requant_ref(total, ratio, z_y, 0, 255)
    assert got.shape == (1, 8, 1, 1)
    np.testing.assert_array_equal(got, expected)


# -- lookup tables -------------------------------------------------------------------------------


LUT_FUNCS = {
    "sigmoid": (relax.op.sigmoid, lambda v: 1.0 / (1.0 + np.exp(-v))),
    "tanh": (relax.op.tanh, np.tanh),
    "times_3": (lambda x: relax.op.multiply(x, _c(3.0, "float32")), lambda v: v * 3.0),
}


@pytest.mark.parametrize(
    ("func", "in_dtype", "z_x", "out_dtype", "s_y", "z_y"),
    [
        ("sigmoid", "uint8", 128, "uint8", 1 / 256, 0),
        ("tanh", "int8", -3, "int8", 1 / 128, 0),
        ("times_3", "uint8", 40, "int8", 0.1, -20),
    ],
)
def test_elementwise_lookup_table(func, in_dtype, z_x, out_dtype, s_y, z_y):
    s_x = F32(0.05)
    shape = (2, 128)
    relax_func, np_func = LUT_FUNCS[func]

    def body(bb, x):
        return _quantize(bb.emit(relax_func(x)), s_y, z_y, out_dtype)

    lowered = _integerize_strict(_qdq_function([("x", shape, s_x, z_x, in_dtype)], body))
    _assert_integer_only(lowered)
    assert "relax.take" in _op_names(lowered)
    # Every input code, so the whole table is checked.
    info = np.iinfo(in_dtype)
    q_x = np.arange(int(info.min), int(info.max) + 1, dtype=np.int64).reshape(shape)
    x = (np.float64(s_x) * (q_x - z_x)).astype(F32)
    got = _run(lowered, x)

    # The table is the reference semantic: the float function of each dequantized (float32)
    # input code, rounded to the nearest output code (np.rint: half to even) and saturated.
    real = np_func((np.float64(s_x) * (q_x - z_x)).astype(F32).astype(np.float64))
    out_info = np.iinfo(out_dtype)
    expected = np.clip(np.rint(real / np.float64(F32(s_y))) + z_y, out_info.min, out_info.max)
    np.testing.assert_array_equal(got, expected.astype(np.int64))


# -- pass-through ops ----------------------------------------------------------------------------


def test_max_pool_and_reshape_move_codes():
    s_x, z_x = F32(0.07), 9
    shape = (1, 2, 6, 6)
    rng = np.random.default_rng(7)

    def body(bb, x):
        y = bb.emit(relax.op.nn.max_pool2d(x, pool_size=(2, 2), strides=(2, 2)))
        y = bb.emit(relax.op.reshape(y, (1, 18)))
        return _quantize(y, s_x, z_x)

    lowered = _integerize_strict(_qdq_function([("x", shape, s_x, z_x, "uint8")], body))
    _assert_integer_only(lowered)
    names = _op_names(lowered)
    assert "relax.nn.max_pool2d" in names and "relax.reshape" in names
    x, q_x = _on_grid(rng, shape, s_x, z_x)
    got = _run(lowered, x)
    expected = q_x.reshape(1, 2, 3, 2, 3, 2).max(axis=(3, 5)).reshape(1, 18)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("op", ["reshape", "relu"])
def test_requantize_after_pass_through_or_clamp_with_new_params(op):
    # dequantize(q, 0.1, 100) -> reshape / relu -> quantize(., 0.05, 3): the output scale differs,
    # so the codes must be rescaled by 0.1 / 0.05 = 2.
    s_x, z_x, s_y, z_y = F32(0.1), 100, F32(0.05), 3

    def body(bb, x):
        if op == "reshape":
            y = bb.emit(relax.op.reshape(x, (8,)))
        else:
            y = bb.emit(relax.op.nn.relu(x))
        return _quantize(y, s_y, z_y)

    lowered = _integerize_strict(_qdq_function([("x", (1, 8), s_x, z_x, "uint8")], body))
    q_x = np.array([[0, 50, 99, 100, 101, 120, 150, 255]])
    x = (np.float64(s_x) * (q_x - z_x)).astype(F32)
    got = _run(lowered, x).reshape(1, 8)
    qlo = z_y if op == "relu" else 0
    expected = _requant_ref(q_x - z_x, np.float64(s_x) / np.float64(s_y), z_y, qlo, 255)
    # By hand: real = 0.1 * (q - 100) -> codes round(real / 0.05) + 3 = 2 * (q - 100) + 3.
    np.testing.assert_array_equal(expected, np.clip(2 * (q_x - z_x) + 3, qlo, 255))
    np.testing.assert_array_equal(got, expected)


# -- the int32 accumulator exit ------------------------------------------------------------------


@pytest.mark.parametrize("head", ["conv2d", "matmul"])
def test_unquantized_output_dequantizes_the_accumulator(head):
    rng = np.random.default_rng(8)
    s_x, z_x = F32(0.02), 60
    if head == "conv2d":
        x_shape, w_shape, w_axis, c = (1, 3, 5, 5), (4, 3, 3, 3), 0, 4
        bias_shape = (1, c, 1, 1)
    else:
        x_shape, w_shape, w_axis, c = (1, 12), (12, 5), 1, 5
        bias_shape = (c,)
    w = rng.integers(-127, 128, size=w_shape).astype(np.int8)
    s_w = rng.uniform(1e-3, 1e-2, size=c).astype(F32)
    bias = rng.normal(size=bias_shape).astype(F32)

    def body(bb, x_dq):
        w_dq = bb.emit(
            relax.op.dequantize(
                _c(w, "int8"), _c(s_w, "float32"), _c(np.zeros(c), "int32"), axis=w_axis
            )
        )
        if head == "conv2d":
            y = bb.emit(relax.op.nn.conv2d(x_dq, w_dq, padding=[1, 1, 1, 1]))
        else:
            y = bb.emit(relax.op.matmul(x_dq, w_dq))
        return relax.op.add(y, _c(bias, "float32"))

    lowered = _integerize_strict(_qdq_function([("x", x_shape, s_x, z_x, "uint8")], body))
    # The only float ops left: the accumulator's conversion to real values at the exit.
    assert [op for _, op in _float_bindings(lowered)] == ["relax.astype", "relax.multiply"]
    for binding in bindings(lowered["main"]):
        if op_name(binding.value) in ("relax.nn.conv2d", "relax.matmul"):
            assert str(binding.var.ty.dtype) == "int32"
    x, q_x = _on_grid(rng, x_shape, s_x, z_x)
    got = _run(lowered, x)
    assert got.dtype == np.float32

    acc_scale = np.float64(s_x) * s_w.astype(np.float64)
    if head == "conv2d":
        acc = _conv_ref(q_x - z_x, w, (1, 1), [1, 1, 1, 1], 1)
        acc_scale = acc_scale.reshape(1, -1, 1, 1)
    else:
        acc = (q_x - z_x) @ w.astype(np.int64)
    acc = acc + np.rint(bias.astype(np.float64) / acc_scale).astype(np.int64)
    assert np.all(np.abs(acc) < 2**31)
    np.testing.assert_allclose(got, acc * acc_scale, rtol=1e-5, atol=0)


# -- float fallback ------------------------------------------------------------------------------


def _softmax_between_qdq():
    def body(bb, x):
        y = bb.emit(relax.op.nn.softmax(x, axis=-1), "probs")
        return _quantize(y, F32(1 / 256), 0)

    return _qdq_function([("x", (1, 10), F32(0.1), 128, "uint8")], body)


def test_op_without_lowering_stays_float_and_is_declared():
    with pytest.warns(UserWarning, match="stay float") as record:
        lowered = integerize(_softmax_between_qdq())
    assert "relax.nn.softmax" in str(record[0].message)
    func = lowered["main"]
    assert list(func.attrs[FALLBACK_ATTR]) == ["probs"]
    assert ("probs", "relax.nn.softmax") in _float_bindings(lowered)
    verify_integer_only(lowered)  # declared, so allowed

    undeclared = tvm.IRModule({"main": func.without_attr(FALLBACK_ATTR)})
    with pytest.raises(QCompilerError, match=r"relax\.nn\.softmax"):
        verify_integer_only(undeclared)

    # The fallback still computes quantize(softmax(dequantize(q_x))).
    x = (0.1 * (np.arange(10, dtype=np.float64) - 4)).astype(F32).reshape(1, 10)
    got = _run(lowered, x)
    e = np.exp(x.astype(np.float64) - x.max())
    expected = np.clip(np.rint(e / e.sum() * 256), 0, 255)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1)  # a float path: within a code


def test_entry_float_op_is_not_a_fallback():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 10), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.softmax(x), "probs")
            q = bb.emit(_quantize(y, F32(1 / 256), 0))
            out = bb.emit_output(_dequantize(q, F32(1 / 256), 0))
        bb.emit_func_output(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowered = integerize(bb.get())
    assert list(lowered["main"].attrs[FALLBACK_ATTR]) == []


# -- structure -----------------------------------------------------------------------------------


def test_reshape_between_equal_qdq_becomes_integer_reshape():
    # fmt: off
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 3), "float32")) -> R.Tensor((6,), "uint8"):
            with R.dataflow():
                q = R.quantize(x, R.const(0.5, "float32"), R.const(3, "int32"), axis=-1,
                               out_dtype="uint8")
                d = R.dequantize(q, R.const(0.5, "float32"), R.const(3, "int32"), axis=-1,
                                 out_dtype="float32")
                r = R.reshape(d, R.shape([6]))
                gv = R.quantize(r, R.const(0.5, "float32"), R.const(3, "int32"), axis=-1,
                                out_dtype="uint8")
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 2, 3), "float32")) -> R.Tensor((6,), "uint8"):
            R.func_attr({"qc.float_fallback": []})
            with R.dataflow():
                q = R.quantize(x, R.const(0.5, "float32"), R.const(3, "int32"), axis=-1,
                               out_dtype="uint8")
                r = R.reshape(q, R.shape([6]))
                gv = r
                R.output(gv)
            return gv
    # fmt: on

    # integerize ends with DeadCodeElimination: the dequantize and the float reshape are gone; the
    # alias binding of the output to the integer reshape stays.
    after = _integerize_strict(Before)
    tvm.ir.assert_structural_equal(after, Expected)


def _onnx_resize(x, size, mode):
    """onnxruntime's float Resize (linear) of NCHW ``x`` to ``size`` (H, W)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    out_shape = [*x.shape[:2], *size]
    node = helper.make_node(
        "Resize",
        ["x", "", "", "sizes"],
        ["y"],
        mode="linear",
        coordinate_transformation_mode=mode,
    )
    graph = helper.make_graph(
        [node],
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [helper.make_tensor("sizes", TensorProto.INT64, [4], out_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "mode, size, dtype",
    [
        ("half_pixel", (8, 10), "uint8"),
        ("half_pixel", (7, 3), "int8"),
        ("align_corners", (9, 13), "uint8"),
        ("asymmetric", (6, 15), "uint8"),
        ("pytorch_half_pixel", (1, 8), "uint8"),
        ("half_pixel", (11, 10), "int16"),
    ],
)
def test_bilinear_resize_on_codes_matches_onnxruntime(mode, size, dtype):
    """Integer bilinear resizing (fixed-point taps, one requantize) against onnxruntime's float
    Resize of the dequantized input, rounded to the output's codes: off by at most one code
    (the fixed-point taps; 16-bit codes are rounded twice), and 8-bit codes exact almost
    everywhere."""
    s_x, z_x = F32(0.03), {"uint8": 100, "int8": -5, "int16": 7}[dtype]
    s_y, z_y = F32(0.035), {"uint8": 90, "int8": 3, "int16": -20}[dtype]
    x_in = ("x", (1, 3, 4, 5), s_x, z_x, dtype)

    def body(bb, x):
        y = bb.emit(
            relax.op.image.resize2d(
                x, size, layout="NCHW", method="linear", coordinate_transformation_mode=mode
            )
        )
        return _quantize(y, s_y, z_y, dtype)

    lowered = _integerize_strict(_qdq_function([x_in], body))
    _assert_integer_only(lowered)
    x, _ = _on_grid(np.random.default_rng(7), x_in[1], s_x, z_x, dtype)
    got = _run(lowered, x).astype(np.int64)
    real = _onnx_resize(x, size, mode).astype(np.float64)
    info = np.iinfo(dtype)
    want = np.clip(np.rint(real / np.float64(s_y)) + z_y, info.min, info.max)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1
    assert np.mean(got == want) >= (0.95 if dtype != "int16" else 0.6)


def _conv_transpose_ref(xc, w, strides, padding, output_padding):
    """int64 NCHW/IOHW transposed conv of centred codes ``xc``: every input pixel scatters
    ``x * w`` onto the output, which is then cropped by the padding."""
    n, c, h, wd = xc.shape
    _, o, kh, kw = w.shape
    sh, sw = strides
    top, left, bottom, right = padding
    full_h = (h - 1) * sh + kh + output_padding[0]
    full = np.zeros((n, o, full_h, (wd - 1) * sw + kw + output_padding[1]), np.int64)
    for i in range(h):
        for j in range(wd):
            full[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw] += np.einsum(
                "nc,cokl->nokl", xc[:, :, i, j], w.astype(np.int64)
            )
    return full[:, :, top : full.shape[2] - bottom, left : full.shape[3] - right]


@pytest.mark.parametrize(
    "stride, padding, output_padding, z_x, in_dtype",
    [
        ((2, 2), (0, 0, 0, 0), (0, 0), 100, "uint8"),
        ((3, 3), (0, 0, 0, 0), (0, 0), -9, "int16"),
        ((2, 1), (1, 0, 0, 1), (1, 0), -20, "int8"),
        ((3, 3), (1, 1, 1, 1), (0, 0), 1000, "int16"),
    ],
)
def test_conv2d_transpose_matches_integer_reference(stride, padding, output_padding, z_x, in_dtype):
    """A transposed conv with a per-channel bias, on an input with a zero point: exact against
    numpy's scatter of the centred codes and the requantize reference."""
    rng = np.random.default_rng(11)
    c_in, c_out = 5, 3
    k = 3 if stride != (2, 2) else 2  # stride = kernel: MediaPipe's upsampling head, a matmul
    s_x, s_y, z_y = F32(0.02), F32(0.09), 7
    w_iohw = rng.integers(-127, 128, size=(c_in, c_out, k, k)).astype(np.int8)
    s_w = rng.uniform(2e-3, 2e-2, size=c_out).astype(F32)
    bias = rng.normal(scale=0.5, size=c_out).astype(F32)
    x_shape = (1, c_in, 4, 5)

    def body(bb, x_dq):
        w_dq = bb.emit(
            relax.op.dequantize(
                _c(w_iohw, "int8"), _c(s_w, "float32"), _c(np.zeros(c_out), "int32"), axis=1
            )
        )
        y = bb.emit(
            relax.op.nn.conv2d_transpose(
                x_dq,
                w_dq,
                strides=stride,
                padding=padding,
                output_padding=output_padding,
                kernel_layout="IOHW",
            )
        )
        y = bb.emit(relax.op.add(y, _c(bias.reshape(1, c_out, 1, 1), "float32")))
        return _quantize(y, s_y, z_y, "uint8")

    lowered = _integerize_strict(_qdq_function([("x", x_shape, s_x, z_x, in_dtype)], body))
    _assert_integer_only(lowered)
    op = "relax.matmul" if stride == (k, k) and not any(padding) else "relax.nn.conv2d_transpose"
    assert _accumulator_dtypes(lowered, op) == ["int32"]
    x, q_x = _on_grid(rng, x_shape, s_x, z_x, in_dtype)
    got = _run(lowered, x)
    acc = _conv_transpose_ref(q_x - z_x, w_iohw, stride, padding, output_padding)
    acc_scale = np.float64(s_x) * s_w.astype(np.float64)
    acc += np.rint(bias.astype(np.float64) / acc_scale).astype(np.int64).reshape(1, -1, 1, 1)
    expected = _requant_ref(acc, acc_scale / np.float64(s_y), z_y, 0, 255, axis=1)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)

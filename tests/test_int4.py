"""W4A8: 4-bit weights stored two per byte, unpacked in registers by the dot-product kernel or
by a kernel of their own before it.

The kernels are checked, both ways, for exact int32 equality with numpy's int64 convolution /
matmul, for really storing the weights packed (no int8 copy of them among the library's
constants) and for multiplying on the dot-product instruction; a
whole model with every layer at W4A8 against MNIST's labels and against its own W8A8 size.
"""

import numpy as np
import pytest
import tvm
from tvm import relax

import qcompiler
from qcompiler.passes.annotate import INT4_ATTR
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import (
    CONV_OPS,
    LAYER_NAMES_ATTR,
    MATMUL_OPS,
    bindings,
    const_value,
    op_name,
)
from qcompiler.passes.pipeline import prepare
from qcompiler.passes.scheme import QuantConfig
from qcompiler.targets import kernels
from qcompiler.targets.boards import resolve_target
from qcompiler.targets.build import build, fused_module
from qcompiler.targets.kernels import has_vnni

HOST = resolve_target("x86")
needs_vnni = pytest.mark.skipif(not has_vnni(HOST), reason="the host CPU has no AVX-512 VNNI")


def int4_module(x, w, op):
    """``main(x) = op(x, w)`` with the layer marked as holding 4-bit weights."""
    bb = relax.BlockBuilder()
    var = relax.Var("x", relax.TensorType(x.shape, str(x.dtype)))
    with bb.function("main", [var]):
        with bb.dataflow():
            if op == "conv":
                y = relax.op.nn.conv2d(
                    var, relax.const(w), padding=[1, 1, 1, 1], data_layout="NHWC",
                    kernel_layout="OHWI", out_dtype="int32",
                )  # fmt: skip
            else:
                y = relax.op.matmul(var, relax.const(w), out_dtype="int32")
            layer = bb.emit(y, "layer")
            out = bb.emit_output(layer)
        bb.emit_func_output(out)
    mod = bb.get()
    main = mod["main"].with_attr(INT4_ATTR, ["layer"]).with_attr(LAYER_NAMES_ATTR, {})
    mod["main"] = main
    return mod


def stored_constants(mod) -> list[np.ndarray]:
    found = []

    def visit(expr):
        value = const_value(expr)
        if value is not None:
            found.append(value)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


@needs_vnni
@pytest.mark.parametrize("in_registers", [True, False], ids=["in-registers", "unpack-kernel"])
@pytest.mark.parametrize("op", ["conv", "dense"])
def test_w4a8_kernels_are_exact_and_store_half_bytes(op, in_registers, monkeypatch):
    monkeypatch.setattr(kernels, "IN_REGISTER_MAX_PIXELS", 10**6 if in_registers else 0)
    rng = np.random.default_rng(21)
    if op == "conv":
        x = rng.integers(0, 256, (1, 9, 9, 24)).astype(np.uint8)
        w = rng.integers(-7, 8, (32, 3, 3, 24)).astype(np.int8)
    else:
        x = rng.integers(0, 256, (3, 200)).astype(np.uint8)
        w = rng.integers(-7, 8, (200, 48)).astype(np.int8)
    mod = int4_module(x, w, op)
    fused = fused_module(mod, HOST)
    names = [gv.name_hint for gv in fused.get_global_vars()]
    assert any("int4" in n for n in names)
    assert ("qc_unpack_int4" in names) != in_registers
    constants = stored_constants(fused)
    assert not any(c.dtype == np.int8 and c.size >= w.size for c in constants)
    packed = [c for c in constants if c.dtype == np.uint8]
    assert len(packed) == 1 and w.size / 2 <= packed[0].size <= w.size  # tiles are padded
    executable = build(mod, HOST)
    assert "vpdpbusd" in executable.mod.imports[0].inspect_source("asm")
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
    if op == "conv":
        xp = np.pad(x.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))
        expected = np.einsum("nhwcij,oijc->nhwo", windows, w.astype(np.int64))
    else:
        expected = x.astype(np.int64) @ w.astype(np.int64)
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.fixture(scope="module")
def mnist(shared):
    data = np.load(shared / "data" / "mnist_test.npz")
    images = data["images"].astype(np.float32).reshape(-1, 1, 1, 28, 28)
    model = qcompiler.api.load_model(str(shared / "models" / "mnist_cnn" / "mnist_cnn.onnx"))
    layers = [
        b.var.name
        for b in bindings(prepare(model.mod)["main"])
        if op_name(b.value) in CONV_OPS | MATMUL_OPS
    ]
    return model, images, data["labels"], layers


def test_mnist_at_w4a8(mnist):
    model, images, labels, layers = mnist
    calib = [{"Input3": x} for x in images[:50]]
    eight = qcompiler.quantize(model, calib).build("x86")
    four = qcompiler.quantize(model, calib, QuantConfig(int4_weights=layers)).build("x86")
    assert [layer["precision"] for layer in four.manifest["layers"]] == ["w4a8"] * len(layers)
    assert [layer["layer"] for layer in four.manifest["layers"]] == layers
    assert four.manifest["weight_bytes"] == pytest.approx(eight.manifest["weight_bytes"] / 2, 0.01)

    def top1(artifact):
        scores = [next(iter(artifact.run({"Input3": x}).values())) for x in images[100:400]]
        return np.mean(np.argmax(np.concatenate(scores), axis=1) == labels[100:400])

    assert top1(four) >= top1(eight) - 0.02


def test_unknown_int4_layer_is_a_clear_error(mnist):
    model, images, _, layers = mnist
    with pytest.raises(
        QCompilerError,
        match=r"int4_weights/float_layers/nearest_weights name \['conv9'\].*" + layers[0],
    ):
        qcompiler.quantize(
            model, [{"Input3": x} for x in images[:10]], QuantConfig(int4_weights=["conv9"])
        )


def test_4_bit_scales_clip_where_that_lowers_the_rounding_error():
    """Per channel, the 4-bit scale is the best of a grid of clipped max-abs scales (an
    exhaustive numpy search here) and never worse than max-abs; 8-bit scales stay max-abs."""
    import dataclasses

    from qcompiler.passes.annotate import quantize_constant

    rng = np.random.default_rng(5)
    w = rng.normal(size=(6, 3, 3, 8)).astype(np.float32)
    w[0, 0, 0, 0] = 12.0  # an outlier: clipping it pays
    w[1] = rng.uniform(-1, 1, size=(3, 3, 8))  # flat: max-abs is about right
    eight = qcompiler.QuantConfig().scheme.weight
    four = dataclasses.replace(eight, bits=4, narrow_range=True)

    def error(channel, scale, spec):
        q = np.clip(np.rint(channel / scale), spec.qmin, spec.qmax)
        return float(((q * scale - channel.astype(np.float64)) ** 2).sum())

    codes, scale, _, axis = quantize_constant(w, four, 0)
    assert axis == 0 and codes.min() >= -7 and codes.max() <= 7
    for c in range(6):
        peak = np.abs(w[c]).max() / 7
        grid = [peak * f for f in np.linspace(0.5, 1.0, 26)]
        best = min(error(w[c], s, four) for s in grid)
        assert error(w[c], float(scale[c]), four) == pytest.approx(best, rel=1e-5)
        assert error(w[c], float(scale[c]), four) <= error(w[c], peak, four) + 1e-9
    assert scale[0] < 0.9 * np.abs(w[0]).max() / 7  # the outlier is clipped
    _, scale8, _, _ = quantize_constant(w, eight, 0)
    np.testing.assert_allclose(scale8, np.abs(w).reshape(6, -1).max(axis=1) / 127, rtol=1e-6)

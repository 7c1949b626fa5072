"""Cross-layer equalization (qcompiler.passes.equalize) against onnxruntime's float answer and
numpy's weight ranges."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.passes.equalize import equalize_module, find_pairs
from qcompiler.passes.graph import bindings, const_value, op_name
from qcompiler.passes.pipeline import prepare

ort = pytest.importorskip("onnxruntime")


def unbalanced_cnn():
    """x[1,4,12,12] -> Conv 3x3 -> Relu -> depthwise 3x3 -> Relu -> Conv 1x1 -> y, whose middle
    channels span three decades (the next conv makes up for it): a per-tensor 8-bit scale
    leaves the small channels a few codes."""
    rng = np.random.default_rng(0)
    spread = 10.0 ** np.linspace(-2, 1, 8)
    w1 = rng.normal(size=(8, 4, 3, 3)) * spread[:, None, None, None]
    b1 = np.abs(rng.normal(size=8)) * spread
    w2 = rng.normal(size=(8, 1, 3, 3))
    w3 = rng.normal(size=(4, 8, 1, 1)) / spread[None, :, None, None]
    tensors = {"w1": w1, "b1": b1, "w2": w2, "b2": np.zeros(8), "w3": w3, "b3": np.zeros(4)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def onnxruntime_session(onnx_model):
    return ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_equalized_pairs_keep_the_float_answer_and_match_their_ranges():
    """Both pairs (conv -> depthwise, depthwise -> 1x1) are found; the equalized float model
    still computes onnxruntime's answer, and each middle channel's largest weight is now the
    same in the conv that makes it and in the conv that reads it."""
    onnx_model = unbalanced_cnn()
    model = qcompiler.api.load_model(onnx_model)
    prepared = prepare(model.mod)
    assert len(find_pairs(prepared["main"])) == 2
    equalized, count = equalize_module(prepared)
    assert count == 2
    convs = [b.value for b in bindings(equalized["main"]) if op_name(b.value) == "relax.nn.conv2d"]
    w1, w2, w3 = (const_value(c.args[1]) for c in convs)  # OHWI
    assert [str(c.attrs.kernel_layout) for c in convs] == ["OHWI"] * 3
    r1 = np.abs(w1).reshape(8, -1).max(axis=1)
    r2 = np.abs(w2).reshape(8, -1).max(axis=1)  # depthwise: one filter per channel
    r3 = np.abs(w3).reshape(4, 8).max(axis=0)  # the 1x1 conv's weights on each channel
    np.testing.assert_allclose(r1, r2, rtol=1e-4)
    np.testing.assert_allclose(r2, r3, rtol=1e-4)
    before = np.abs(numpy_helper.to_array(onnx_model.graph.initializer[0])).reshape(8, -1)
    assert before.max(axis=1).max() / before.max(axis=1).min() > 100  # it was unbalanced
    rng = np.random.default_rng(1)
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    built = qcompiler.compile_float(dataclasses.replace(model, mod=equalized))
    for _ in range(3):
        x = rng.normal(size=(1, 4, 12, 12)).astype(np.float32)
        expected = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(built.run({"x": x})["output"], expected, rtol=1e-4, atol=1e-4)


def test_equalization_brings_the_int8_model_closer_to_onnxruntime():
    """Every activation at 8 bits (per tensor), weights to nearest: the equalized model's
    output is far closer to onnxruntime's float answer on held-out inputs than the plain one's,
    and a config that asks for equalization of a plain calibration is refused."""
    onnx_model = unbalanced_cnn()
    rng = np.random.default_rng(2)
    calib = [{"x": rng.normal(size=(1, 4, 12, 12)).astype(np.float32)} for _ in range(12)]
    held = [{"x": rng.normal(size=(1, 4, 12, 12)).astype(np.float32)} for _ in range(4)]
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    expected = np.stack([session.run(None, s)[0] for s in held])
    errors = {}
    for equalize in (False, True):
        config = qcompiler.QuantConfig(
            int16_activations=(), weight_rounding="nearest", equalize=equalize
        )
        model, calibration = qcompiler.calibrate(
            qcompiler.api.load_model(onnx_model), calib, equalize=equalize
        )
        assert calibration.equalized == (2 if equalize else None)
        quantized = qcompiler.quantize(model, None, config, calibration=calibration)
        assert quantized.float_fallbacks == []
        artifact = quantized.build()
        got = np.stack([artifact.run(s)["output"] for s in held])
        errors[equalize] = float(np.mean((got - expected) ** 2) / np.mean(expected**2))
    assert errors[True] < 0.25 * errors[False], errors
    _, plain = qcompiler.calibrate(qcompiler.api.load_model(onnx_model), calib)
    with pytest.raises(qcompiler.QCompilerError, match="calibrate with equalize=True"):
        plain.quantize(qcompiler.QuantConfig(equalize=True))


def test_qc_compile_equalize(tmp_path):
    """``qc compile --equalize`` records it in the manifest, and its artifact answers closer to
    onnxruntime than the plain one (every activation at 8 bits)."""
    onnx_model = unbalanced_cnn()
    (tmp_path / "m.onnx").write_bytes(onnx_model.SerializeToString())
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(12, 1, 4, 12, 12)).astype(np.float32))
    held = rng.normal(size=(4, 1, 4, 12, 12)).astype(np.float32)
    session = onnxruntime_session(onnx_model)
    errors = {}
    for flags in ([], ["--equalize"]):
        out = tmp_path / f"out{len(flags)}"
        cmd = [sys.executable, "-m", "qcompiler.cli", "compile", str(tmp_path / "m.onnx"),
               "--calib", str(tmp_path / "c.npz"), "--int16", "none",
               "--weight-rounding", "nearest", "-o", str(out), *flags]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["quantization"]["equalize"] is bool(flags)
        artifact = qcompiler.load(out)
        errors[bool(flags)] = np.mean(
            [(artifact.run({"x": x})["output"] - session.run(None, {"x": x})[0]) ** 2 for x in held]
        )
    assert errors[True] < 0.25 * errors[False], errors

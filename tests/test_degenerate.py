"""Degenerate tensors: each has a defined behaviour (README, "Degenerate tensors").

- all-zero and denormal weight channels: quantized with scale 1 (zero range) or the smallest
  float32 normal scale; the channel's output is its bias, as in the float model;
- NaN/Inf in weights (ONNX initializers, TFLite float buffers): refused at import, naming the
  tensor;
- quantization parameters of an already-quantized model that no arithmetic can honour (a scale
  that is zero, negative or not finite, an int32 bias whose scale is not input x weight scale):
  refused at import naming the tensor or operator;
- a requantization ratio out of range (>= 2**29): refused naming the layer.

Constant activations and NaN in calibration data are covered in test_errors.py.
"""

import struct

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

import qcompiler
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.integerize import integerize

ort = pytest.importorskip("onnxruntime")

BIAS = np.array([0.5, -0.25, 0.1, 0.0], np.float32)


def conv_model(w: np.ndarray):
    """x[1,4,6,6] -> Conv(1x1, weights ``w``, bias BIAS) -> y."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(BIAS, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def calib(n=12):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(1, 4, 6, 6)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("value", [0.0, 1e-41, -1e-44], ids=["zero", "denormal", "min-denormal"])
def test_degenerate_weight_channel_outputs_its_bias(value):
    w = np.random.default_rng(1).normal(size=(4, 4, 1, 1)).astype(np.float32)
    w[1] = value
    model = conv_model(w)
    artifact = qcompiler.quantize(model, calib()).build()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in calib(3):
        (expected,) = session.run(None, x)
        got = artifact.run(x)["output"]
        step = np.ptp(expected) / 255  # about the output's quantization step
        np.testing.assert_allclose(got, expected, atol=4 * step)
        # The degenerate channel: the bias alone, to the output's rounding.
        np.testing.assert_allclose(got[0, 1], BIAS[1], atol=step)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_onnx_weight_is_named(bad):
    w = np.ones((4, 4, 1, 1), np.float32)
    w[2, 3] = bad
    with pytest.raises(QCompilerError, match=r"initializer 'w' holds 1 NaN/Inf"):
        qcompiler.quantize(conv_model(w), calib())


@pytest.mark.parametrize("bad", [0.0, -0.5, np.nan])
def test_bad_qdq_scale_is_named(bad):
    """A QDQ model whose weight DequantizeLinear has a scale that is not finite and > 0."""
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="dq_w"),
            helper.make_node("Conv", ["x", "w"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [
            numpy_helper.from_array(np.ones((4, 4, 1, 1), np.int8), "wq"),
            numpy_helper.from_array(np.array(bad, np.float32), "ws"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    match = r"NaN/Inf" if np.isnan(bad) else r"dq_w has scale 'ws'.*finite and > 0"
    with pytest.raises(QCompilerError, match=match):
        qcompiler.quantize(model, calib())


# -- TFLite: values patched in the shipped models' bytes ---------------------------------------
def patched(data: bytes, old: float, new: float) -> bytes:
    """``data`` with the one float32 ``old`` replaced by ``new``."""
    before, after = struct.pack("<f", np.float32(old)), struct.pack("<f", np.float32(new))
    assert data.count(before) == 1, f"{old} is not unique in the file"
    return data.replace(before, after)


def tensor_details(path):
    from ai_edge_litert.interpreter import Interpreter

    return {d["name"]: d for d in Interpreter(model_path=str(path)).get_tensor_details()}


@pytest.fixture(scope="module")
def resnet8_int8(shared):
    path = shared / "models" / "resnet8_cifar10" / "pretrainedResnet_quant.tflite"
    return path, tensor_details(path)


@pytest.mark.parametrize("bad", [0.0, -0.07, np.inf, np.nan])
@pytest.mark.parametrize("tensor", ["model/conv2d_1/Conv2D", "Identity_int8"])
def test_bad_tflite_scale_is_named(resnet8_int8, tensor, bad):
    path, details = resnet8_int8
    old = details[tensor]["quantization_parameters"]["scales"][0]
    data = patched(path.read_bytes(), old, bad)
    with pytest.raises(
        QCompilerError, match=rf"'{tensor}' has quantization scale .*finite and > 0"
    ):
        qcompiler.quantize(data, None)


def test_tflite_bias_scale_inconsistent_with_input_and_weight_is_named(resnet8_int8):
    path, details = resnet8_int8
    old = details["model/conv2d_1/Conv2D"]["quantization_parameters"]["scales"][0]
    data = patched(path.read_bytes(), old, old * 1e3)  # the weight's scale, not the bias's
    with pytest.raises(QCompilerError, match=r"operator 1 \(CONV_2D\) has bias tensor 4 .*scale"):
        qcompiler.quantize(data, None)


def test_non_finite_tflite_float_weight_is_named(shared):
    path = shared / "models" / "resnet8_cifar10" / "pretrainedResnet.tflite"
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    data = path.read_bytes()
    for d in interpreter.get_tensor_details():
        if d["dtype"] == np.float32 and d["shape"].size == 4 and d["shape"][0] > 1:
            values = interpreter.get_tensor(d["index"]).ravel()
            unique = next(v for v in values if data.count(struct.pack("<f", v)) == 1)
            break
    with pytest.raises(QCompilerError, match=rf"'{d['name']}' holds 1 NaN/Inf"):
        qcompiler.quantize(patched(data, unique, np.inf), calib())


def test_out_of_range_requantization_names_the_layer():
    """An output scale 2**40 times smaller than the accumulator's: no multiplier and shift can
    express the ratio, and the error says which layer."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    f32, i32 = "float32", "int32"
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(
                relax.op.quantize(x, relax.const(1.0, f32), relax.const(0, i32), -1, "int8")
            )
            dq = bb.emit(relax.op.dequantize(q, relax.const(1.0, f32), relax.const(0, i32)))
            w = bb.emit(
                relax.op.dequantize(
                    relax.const(np.ones((4, 4), np.int8)),
                    relax.const(1.0, f32),
                    relax.const(0, i32),
                )
            )
            y = bb.emit(relax.op.matmul(dq, w))
            out = bb.emit_output(
                relax.op.quantize(y, relax.const(2.0**-40, f32), relax.const(0, i32), -1, "int8")
            )
        bb.emit_func_output(out)
    with pytest.raises(
        QCompilerError, match=r"\(relax\.quantize\): requantization ratio .*2\*\*29"
    ):
        integerize(bb.get())

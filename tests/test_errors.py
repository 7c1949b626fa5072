"""Bad input gets a clear QCompilerError naming the problem; constant tensors have a safe path."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler import QCompilerError


def tiny_onnx(op="Relu", extra_nodes=()):
    """x[1,2,4,4] -> Conv(1x1) -> op -> y, with deterministic weights."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2, 1, 1], [1.0, 0.5, -0.5, 1.0])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node(op, ["c"], ["y"]),
        *extra_nodes,
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def samples(n=4, value=None):
    rng = np.random.default_rng(0)
    for _ in range(n):
        x = rng.normal(size=(1, 2, 4, 4)).astype(np.float32)
        yield {"x": x if value is None else np.full_like(x, value)}


def test_missing_model_file(tmp_path):
    with pytest.raises(QCompilerError, match="does not exist"):
        qcompiler.quantize(tmp_path / "nope.onnx", list(samples()))


def test_empty_model_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(QCompilerError, match="empty.onnx.*empty"):
        qcompiler.quantize(path, list(samples()))


def test_corrupt_onnx_file(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x08\x07garbage-not-a-protobuf\xff\xff")
    with pytest.raises(QCompilerError, match="bad.onnx"):
        qcompiler.quantize(path, list(samples()))


def test_truncated_tflite_file(tmp_path, shared):
    data = (shared / "models" / "resnet8_cifar10" / "pretrainedResnet.tflite").read_bytes()
    path = tmp_path / "cut.tflite"
    path.write_bytes(data[:64])
    with pytest.raises(QCompilerError, match="cut.tflite"):
        qcompiler.quantize(path, [])


def test_unsupported_op_is_named(tmp_path):
    model = tiny_onnx(op="Relu")
    model.graph.node[1].op_type = "NotARealOp"
    path = tmp_path / "odd.onnx"
    onnx.save(model, path)
    with pytest.raises(QCompilerError, match="NotARealOp"):
        qcompiler.quantize(path, list(samples()))


def test_an_opset_from_the_future_is_refused(tmp_path):
    model = tiny_onnx()
    model.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    onnx.save(model, path)
    with pytest.raises(QCompilerError, match=r"future\.onnx: the model uses ONNX opset 99"):
        qcompiler.quantize(path, list(samples()))


def test_calibration_wrong_shape_names_input():
    bad = [{"x": np.zeros((1, 3, 4, 4), np.float32)}]
    with pytest.raises(QCompilerError, match="'x'.*shape"):
        qcompiler.quantize(tiny_onnx(), bad)


def test_empty_calibration_set():
    with pytest.raises(QCompilerError, match="no samples"):
        qcompiler.quantize(tiny_onnx(), [])


def test_nan_in_calibration_data():
    data = list(samples())
    data[2]["x"][0, 0, 0, 0] = np.nan
    with pytest.raises(QCompilerError, match="NaN"):
        qcompiler.quantize(tiny_onnx(), data)


def test_too_few_calibration_samples_warn_with_the_count():
    with pytest.warns(UserWarning, match=r"calibrated on 3 sample\(s\)"):
        qcompiler.quantize(tiny_onnx(), list(samples())[:3])


def test_missing_calibration_file(tmp_path):
    with pytest.raises(QCompilerError, match="missing.npz"):
        qcompiler.quantize(tiny_onnx(), tmp_path / "missing.npz")


def test_constant_input_is_a_safe_fallback():
    """A zero-range tensor gets scale 1 (documented in qmath): outputs stay exact."""
    quant = qcompiler.quantize(tiny_onnx(), list(samples(value=0.0)))
    out = quant.build().run({"x": np.zeros((1, 2, 4, 4), np.float32)})
    np.testing.assert_array_equal(next(iter(out.values())), np.zeros((1, 2, 4, 4), np.float32))


def test_unknown_scheme_lists_candidates():
    with pytest.raises(QCompilerError, match="candidates are"):
        qcompiler.QuantConfig("int3-magic")


def test_unlowered_op_warns_and_stays_float():
    """Softmax has no integer lowering. Followed by a ReLU on the way out, it and the ReLU run
    in float after the integers (nothing is requantized after it), named like a fallback."""
    model = tiny_onnx(op="Softmax", extra_nodes=[])
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
    model.graph.output[0].name = "z"
    with pytest.warns(UserWarning, match="in float after the integers.*softmax"):
        quant = qcompiler.quantize(model, list(samples()))
    assert len(quant.float_fallbacks) == 1


def test_a_symbolic_batch_dimension_is_bound_to_one():
    ort = pytest.importorskip("onnxruntime")
    model = tiny_onnx()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    artifact = qcompiler.quantize(model, list(samples(12))).build()
    assert artifact.manifest["inputs"][0]["shape"] == [1, 2, 4, 4]
    x = next(samples(1))["x"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x})
    got = next(iter(artifact.run({"x": x}).values()))
    np.testing.assert_allclose(got, expected, atol=0.05 * np.abs(expected).max())


def test_onnx_with_missing_external_data_names_the_file_and_tensor(tmp_path):
    model = tiny_onnx()
    weight = numpy_helper.to_array(model.graph.initializer[0])
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "w"))  # raw bytes
    path = tmp_path / "m.onnx"
    onnx.save_model(
        model, path, save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(QCompilerError, match=r"m\.onnx.*tensor name: w.*weights\.bin"):
        qcompiler.quantize(path, list(samples(12)))

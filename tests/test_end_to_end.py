"""Real models from ../shared, end to end: float model + calibration data -> integer library.

The float baseline is the same model compiled by TVM, itself checked against onnxruntime /
LiteRT; the quantized model must stay within one point of top-1 of it on held-out samples. The
evaluation windows are large enough (1,000+ images) that one point is not sampling noise: on 300
CIFAR images even TFLite's own int8 model moves +-2 points against its float model.
"""

import numpy as np
import pytest

import qcompiler
from qcompiler.passes.graph import bindings, op_name
from qcompiler.passes.verify import float_ops_in_integer_regions

EVAL = 1500


def top1(artifact, name, images, labels, shape):
    hits = 0
    for image, label in zip(images, labels):
        out = artifact.run({name: image.astype(np.float32).reshape(shape)})
        hits += int(np.argmax(next(iter(out.values()))) == label)
    return hits / len(labels)


@pytest.fixture(scope="module")
def mnist(shared):
    data = np.load(shared / "data" / "mnist_test.npz")
    return shared / "models" / "mnist_cnn" / "mnist_cnn.onnx", data["images"], data["labels"]


@pytest.fixture(scope="module")
def cifar(shared):
    data = np.load(shared / "data" / "cifar10_test_half.npz")
    model = shared / "models" / "resnet8_cifar10" / "pretrainedResnet.tflite"
    return model, data["images"], data["labels"]


def test_mnist_float_matches_onnxruntime(mnist):
    ort = pytest.importorskip("onnxruntime")
    path, images, _ = mnist
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    art = qcompiler.compile_float(path)
    for image in images[:5]:
        x = image.astype(np.float32).reshape(1, 1, 28, 28)
        expected = session.run(None, {"Input3": x})[0]
        np.testing.assert_allclose(art.run({"Input3": x})["output"], expected, rtol=1e-4, atol=1e-3)


def test_mnist_int8_within_one_point(mnist):
    path, images, labels = mnist
    calib = [{"Input3": images[i].astype(np.float32).reshape(1, 1, 28, 28)} for i in range(100)]
    quant = qcompiler.quantize(path, calib)
    assert quant.float_fallbacks == []
    assert float_ops_in_integer_regions(quant.mod["main"]) == []
    window = slice(1000, 2000)
    shape = (1, 1, 28, 28)
    fp32 = top1(qcompiler.compile_float(path), "Input3", images[window], labels[window], shape)
    int8 = top1(quant.build(), "Input3", images[window], labels[window], shape)
    assert fp32 > 0.95
    assert int8 >= fp32 - 0.01, (fp32, int8)


def test_resnet8_tflite_float_matches_litert(cifar):
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    path, images, _ = cifar
    interp = litert.Interpreter(model_path=str(path))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    art = qcompiler.compile_float(path)
    for image in images[:5]:
        x = image.astype(np.float32)[None]
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        np.testing.assert_allclose(
            art.run({"input_1": x})["output"], interp.get_tensor(out["index"]), rtol=1e-4, atol=1e-5
        )


def test_resnet8_tflite_int8_within_one_point(cifar):
    path, images, labels = cifar
    calib = [{"input_1": images[i].astype(np.float32)[None]} for i in range(200)]
    quant = qcompiler.quantize(path, calib)
    # the one float op: the softmax on the dequantized logits, on the way out (no integer
    # softmax yet), counted with the fallbacks
    (name,) = quant.float_fallbacks
    ops = {b.var.name: op_name(b.value) for b in bindings(quant.mod["main"])}
    assert ops[name] == "relax.nn.softmax"
    window = slice(200, 200 + EVAL)
    shape = (1, 32, 32, 3)
    fp32 = top1(qcompiler.compile_float(path), "input_1", images[window], labels[window], shape)
    int8 = top1(quant.build(), "input_1", images[window], labels[window], shape)
    assert fp32 > 0.5
    assert int8 >= fp32 - 0.01, (fp32, int8)

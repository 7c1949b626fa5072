"""What keeps a detector accurate: SiLU as one function, outputs that leave the integers without
a shared 8-bit scale, and 16-bit activations where 8 bits are too coarse.

References are onnxruntime on the same float model.
"""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.passes.graph import bindings, op_name
from qcompiler.passes.pipeline import prepare

ort = pytest.importorskip("onnxruntime")


def head_model():
    """x[1,8,6,6] -> Conv -> SiLU (x * Sigmoid(x)) -> two 1x1 convs: boxes (4 channels, range
    of tens) and scores (Sigmoid of 2 logits) -> Concat -> y[1,6,6,6]: a YOLOX head in small."""
    rng = np.random.default_rng(0)
    w = rng.normal(scale=0.3, size=(8, 8, 3, 3)).astype(np.float32)
    box = rng.normal(scale=4.0, size=(4, 8, 1, 1)).astype(np.float32)
    cls = rng.normal(scale=0.5, size=(2, 8, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["a"]),
        helper.make_node("Conv", ["a", "box"], ["b"]),
        helper.make_node("Conv", ["a", "cls"], ["l"]),
        helper.make_node("Sigmoid", ["l"], ["p"]),
        helper.make_node("Concat", ["b", "p"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 6, 6])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (box, "box"), (cls, "cls"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def samples(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 8, 6, 6)).astype(np.float32)} for _ in range(n)]


def reference(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, x)[0]


def test_x_times_sigmoid_x_becomes_one_silu():
    model = qcompiler.api.load_model(head_model())
    ops = [op_name(b.value) for b in bindings(prepare(model.mod)["main"])]
    assert ops.count("relax.nn.silu") == 1
    assert ops.count("relax.sigmoid") == 1  # the scores' sigmoid is not x * sigmoid(x)


def test_scores_and_boxes_do_not_share_one_8_bit_scale():
    """The boxes span tens, the scores [0, 1]: quantized together, a score would move in
    steps of about 0.3. Kept apart to the output, each is as precise as its own input."""
    model = head_model()
    quantized = qcompiler.quantize(model, samples(16))
    assert quantized.float_fallbacks == []
    artifact = quantized.build()
    for x in samples(4, seed=9):
        expected = reference(model, x)
        got = artifact.run(x)["output"]
        boxes, scores = expected[:, :4], expected[:, 4:]
        assert np.abs(boxes).max() > 5  # the premise: a range far beyond the scores'
        # scores: the 8-bit rounding of the logits and of the SiLU before them, through the
        # sigmoid's slope (<= 1/4): a few hundredths, against ~0.3 for steps shared with boxes
        np.testing.assert_allclose(got[:, 4:], scores, atol=0.05)
        np.testing.assert_allclose(got[:, :4], boxes, atol=0.03 * np.abs(boxes).max())


def test_int16_activations_by_name_and_by_share():
    model = head_model()
    model_in = qcompiler.api.load_model(model)
    model_in, calibration = qcompiler.calibrate(model_in, samples(16))
    names = [p.name for p in calibration.plan.points]
    errors = {}
    for wide in ((), 1.0):
        config = qcompiler.QuantConfig(int16_activations=wide)
        quantized = qcompiler.quantize(model_in, None, config, calibration=calibration)
        dtypes = {str(b.var.ty.dtype) for b in bindings(quantized.mod["main"])
                  if op_name(b.value) == "relax.astype"}  # fmt: skip
        assert ("int16" in dtypes) == (wide == 1.0)
        artifact = quantized.build()
        recorded = artifact.manifest["quantization"]["int16_activations"]
        assert sorted(recorded) == (sorted(names) if wide == 1.0 else [])
        x = samples(1, seed=5)[0]
        errors[wide] = np.abs(artifact.run(x)["output"] - reference(model, x)).max()
    assert errors[1.0] < errors[()] / 2  # finer activations; the int8 weights stay
    with pytest.raises(qcompiler.QCompilerError, match=r"\['nope'\].*not activation tensors"):
        qcompiler.quantize(
            model_in,
            None,
            qcompiler.QuantConfig(int16_activations=("nope", names[0])),
            calibration=calibration,
        )


@pytest.mark.parametrize("outliers", [False, True])
def test_expected_sqnr_from_the_histogram_matches_quantizing_the_data(outliers):
    """The estimate the int16 choice ranks tensors by, against quantizing the raw values."""
    from qcompiler.passes import qmath
    from qcompiler.passes.observers import ActivationObserver, quantization_sqnr

    rng = np.random.default_rng(3)
    batches = [rng.normal(size=4096) for _ in range(8)]
    if outliers:
        batches[2][:3] = [40.0, -35.0, 50.0]
    observer = ActivationObserver("t")
    for b in batches:
        observer.update(b)
    spec = qcompiler.QuantConfig().scheme.activation
    lo, hi = observer.range("minmax", spec)
    values = np.concatenate(batches)
    scale, zero_point = qmath.qparams_from_range(lo, hi, spec)
    error = values - qmath.dequantize(qmath.quantize(values, scale, zero_point, spec), scale,
                                      zero_point)  # fmt: skip
    direct = 10 * np.log10(np.sum(values**2) / np.sum(error.astype(np.float64) ** 2))
    assert quantization_sqnr(observer, lo, hi, spec) == pytest.approx(direct, abs=0.5)
    # outliers stretch the range: ~20 dB worse than the 8-bit ~35 dB of a clean Gaussian
    assert (direct < 25) == outliers


def hard_swish_model():
    """x -> Conv -> hard-swish as TFLite's importer writes it, x * clip(x + 3, 0, 6) / 6 ->
    Conv -> y."""
    rng = np.random.default_rng(4)
    w1 = rng.normal(scale=0.6, size=(6, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(scale=0.4, size=(4, 6, 1, 1)).astype(np.float32)
    scalars = {"three": 3.0, "zero": 0.0, "six": 6.0}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "three"], ["c3"]),
        helper.make_node("Clip", ["c3", "zero", "six"], ["r6"]),
        helper.make_node("Mul", ["c", "r6"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["h"]),
        helper.make_node("Conv", ["h", "w2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars.items()]
    graph = helper.make_graph(
        nodes,
        "hswish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_hard_swish_steps_are_one_table_not_four_roundings():
    """The add, clip, multiply and divide of hard-swish depend on one tensor: one lookup table
    over its codes, so only the conv output and the hard-swish output are quantized."""
    model = hard_swish_model()
    rng = np.random.default_rng(6)
    data = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    imported, calibration = qcompiler.calibrate(qcompiler.api.load_model(model), data)
    ops = {p.name: op_name(b.value) for b in bindings(calibration.mod["main"])
           for p in calibration.plan.points if b.var.same_as(p)}  # fmt: skip
    # the input, the conv output, the hard-swish output (the divide); nothing in between
    assert sorted(ops.values()) == ["relax.divide", "relax.nn.conv2d"]
    quantized = qcompiler.quantize(imported, None, calibration=calibration)
    assert quantized.float_fallbacks == []
    takes = [b for b in bindings(quantized.mod["main"]) if op_name(b.value) == "relax.take"]
    assert len(takes) == 1
    artifact = quantized.build()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for sample in data[:4]:
        expected = session.run(None, sample)[0]
        got = artifact.run(sample)["output"]
        assert np.abs(got - expected).max() < 0.03 * np.abs(expected).max()


def test_transposed_conv_head_is_integer():
    """Conv -> ConvTranspose -> Sigmoid -> y (the selfie segmentation model's head): the
    transposed conv runs on integers (an int32 accumulator, no float fallback), its logits go
    through the sigmoid's table, and the result matches onnxruntime's float model."""
    rng = np.random.default_rng(7)
    w = rng.normal(scale=0.5, size=(4, 3, 3, 3)).astype(np.float32)
    wt = rng.normal(scale=2.0, size=(4, 1, 2, 2)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("ConvTranspose", ["c", "wt"], ["t"], strides=[2, 2]),
            helper.make_node("Sigmoid", ["t"], ["y"]),
        ],
        "up",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 12, 12])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(wt, "wt")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    data = [{"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)} for _ in range(16)]
    quantized = qcompiler.quantize(model, data)
    assert quantized.float_fallbacks == []
    # stride = kernel: one tap per output pixel, lowered to an int8 matmul + depth-to-space
    accumulators = [
        str(b.var.ty.dtype)
        for b in bindings(quantized.mod["main"])
        if op_name(b.value) == "relax.matmul"
    ]
    assert accumulators == ["int32"]
    assert "relax.dequantize" not in [op_name(b.value) for b in bindings(quantized.mod["main"])]
    artifact = quantized.build()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for sample in data[:4]:
        expected = session.run(None, sample)[0]
        np.testing.assert_allclose(artifact.run(sample)["output"], expected, atol=0.05)


def test_nearest_upsampling_moves_codes():
    """Conv -> Resize(nearest, x2) -> Conv (YOLOX's upsampling): the resize only repeats values,
    so it runs on the codes, with no float fallback; the result against onnxruntime's float
    model."""
    rng = np.random.default_rng(8)
    w1 = rng.normal(scale=0.4, size=(6, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(scale=0.4, size=(4, 6, 1, 1)).astype(np.float32)
    scales = np.array([1, 1, 2, 2], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Resize", ["c", "", "scales"], ["u"], mode="nearest"),
            helper.make_node("Conv", ["u", "w2"], ["y"]),
        ],
        "upsample",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (scales, "scales"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    data = [{"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)} for _ in range(16)]
    quantized = qcompiler.quantize(model, data)
    assert quantized.float_fallbacks == []
    ops = [op_name(b.value) for b in bindings(quantized.mod["main"])]
    assert ops.count("relax.image.resize2d") == 1 and ops.count("relax.quantize") == 1
    artifact = quantized.build()
    for sample in data[:4]:
        got, expected = next(iter(artifact.run(sample).values())), reference(model, sample)
        # 2x2 blocks repeat: the resize moved values, nothing interpolated them
        np.testing.assert_array_equal(got[..., ::2, ::2], got[..., 1::2, 1::2])
        sqnr = 10 * np.log10(np.sum(expected**2) / np.sum((got - expected) ** 2))
        assert sqnr > 30, sqnr

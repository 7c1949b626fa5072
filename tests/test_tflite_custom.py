"""MediaPipe's ``Convolution2DTransposeBias`` custom op against LiteRT's builtin TRANSPOSE_CONV.

Each case writes two flatbuffers with the same weights: one with the custom op (what MediaPipe
ships, which LiteRT cannot run) for qcompiler, one with the builtin TRANSPOSE_CONV + bias for
LiteRT, the reference.
"""

import struct

import numpy as np
import pytest
from tflite_builder import Op, Tensor, build

import qcompiler
from qcompiler.frontend import load_model
from qcompiler.passes.errors import QCompilerError

litert = pytest.importorskip("ai_edge_litert.interpreter")

_TRANSPOSE_CONV, _TRANSPOSE_CONV_OPTIONS = 67, 49
_SAME, _VALID = 1, 2  # TfLitePadding in the custom options
_SCHEMA_PADDING = {_SAME: 0, _VALID: 1}  # tflite.Padding in the builtin's options


def _models(size, channels, kernel, stride, padding, seed=0):
    rng = np.random.default_rng(seed)
    c_in, c_out = channels
    if padding == _SAME:
        out = size * stride
    else:
        out = (size - 1) * stride + kernel
    weight = rng.normal(size=(c_out, kernel, kernel, c_in)).astype("float32")
    bias = rng.normal(size=(c_out,)).astype("float32")
    x = Tensor("x", (1, size, size, c_in))
    w, b = Tensor("w", weight.shape, value=weight), Tensor("b", bias.shape, value=bias)
    y = Tensor("y", (1, out, out, c_out))
    custom = build(
        [x, w, b, y],
        [Op([0, 1, 2], [3], custom_code="Convolution2DTransposeBias",
            custom_options=struct.pack("<3i", padding, stride, stride))],
        [0], [3],
    )  # fmt: skip
    shape = Tensor("shape", (4,), "int32", np.array([1, out, out, c_out], "int32"))
    options = {0: ("Int8", _SCHEMA_PADDING[padding]), 1: ("Int32", stride), 2: ("Int32", stride)}
    builtin = build(
        [shape, w, x, b, y],
        [Op([0, 1, 2, 3], [4], _TRANSPOSE_CONV, options_type=_TRANSPOSE_CONV_OPTIONS,
            options=options)],
        [2], [4],
    )  # fmt: skip
    return custom, builtin, rng.normal(size=x.shape).astype("float32")


def _litert(model: bytes, x: np.ndarray) -> np.ndarray:
    interpreter = litert.Interpreter(model_content=model)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.parametrize(
    "size, channels, kernel, stride, padding",
    [
        (5, (3, 4), 3, 2, _SAME),  # odd padding total: TFLite puts the extra row after
        (4, (16, 1), 2, 2, _SAME),  # the selfie segmentation head's shape
        (5, (3, 2), 4, 2, _SAME),
        (5, (2, 3), 3, 1, _VALID),
        (3, (2, 2), 3, 2, _VALID),
    ],
)
def test_transpose_conv_bias_matches_litert(size, channels, kernel, stride, padding):
    custom, builtin, x = _models(size, channels, kernel, stride, padding)
    expected = _litert(builtin, x)
    model = load_model(custom, name="tconv")
    got = qcompiler.compile_float(model).run({"x": x})
    (value,) = got.values()
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)


def test_unknown_custom_op_is_named():
    x, y = Tensor("x", (1, 4)), Tensor("y", (1, 4))
    model = build([x, y], [Op([0], [1], custom_code="MyFancyOp")], [0], [1])
    with pytest.raises(QCompilerError, match="'MyFancyOp' is not supported"):
        load_model(model, name="fancy")

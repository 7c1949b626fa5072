"""TFLite's integer SOFTMAX, compiled by qcompiler, against LiteRT's reference kernel.

One-op models written by :mod:`tflite_builder`: uint8 and int8 inputs at several scales and zero
points, on rows of logits-like codes, several rows at once. The output must be bit-exact (the
kernel is gemmlowp fixed point end to end, reproduced by :mod:`qcompiler.passes.softmax`), with
no float op left.
"""

import numpy as np
import pytest
from tflite_builder import Op, Tensor, build

import qcompiler
from qcompiler.passes import softmax
from qcompiler.passes.errors import QCompilerError

litert = pytest.importorskip("ai_edge_litert.interpreter")
SOFTMAX, SOFTMAX_OPTIONS = 25, 9  # tflite.BuiltinOperator / tflite.BuiltinOptions


def softmax_model(dtype: str, scale: float, zero_point: int, shape, beta: float = 1.0) -> bytes:
    lowest = int(np.iinfo(dtype).min)
    tensors = [
        Tensor("logits", shape, dtype, quantization=(scale, zero_point)),
        Tensor("probabilities", shape, dtype, quantization=(1 / 256, lowest)),
    ]
    op = Op([0], [1], SOFTMAX, options_type=SOFTMAX_OPTIONS, options={0: ("Float32", beta)})
    return build(tensors, [op], [0], [1])


def litert_reference(model: bytes, x: np.ndarray) -> np.ndarray:
    it = litert.Interpreter(
        model_content=model, experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF
    )
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).copy()


def logits_like(rng, dtype, zero_point, shape, spread):
    """Codes around the zero point with a few clear winners and ties at the top. (LiteRT's
    reference kernel aborts when more than ~256 entries of a row sit near its maximum: its
    final rounding shift passes 31 bits; real logits are far from that.)"""
    info = np.iinfo(dtype)
    x = rng.normal(zero_point, spread, shape)
    x[..., :3] += 3 * spread
    x[..., 7] = x[..., 3] = x.max()  # a tie at the maximum
    return np.clip(np.rint(x), info.min, info.max).astype(dtype)


@pytest.mark.parametrize(
    "dtype, scale, zero_point",
    [("uint8", 0.1, 128), ("int8", 0.0625, -3), ("uint8", 0.5, 0), ("int8", 0.21, 10)],
)
def test_softmax_is_bit_exact_against_litert(tmp_path, dtype, scale, zero_point):
    rng = np.random.default_rng(abs(zero_point) + 1)
    shape = (3, 1000)
    model = softmax_model(dtype, scale, zero_point, shape)
    path = tmp_path / "softmax.tflite"
    path.write_bytes(model)
    quantized = qcompiler.quantize(str(path), None)
    assert quantized.float_fallbacks == []
    artifact = quantized.build("x86")
    for spread in (5, 20, 60):
        x = logits_like(rng, dtype, zero_point, shape, spread)
        expected = litert_reference(model, x)
        assert len(np.unique(expected)) > 1  # not one code everywhere
        np.testing.assert_array_equal(softmax.reference(x, scale, dtype), expected)
        got = next(iter(artifact.run({artifact.input_names[0]: x}).values()))
        np.testing.assert_array_equal(got, expected)


def test_softmax_with_beta_is_refused(tmp_path):
    path = tmp_path / "beta.tflite"
    path.write_bytes(softmax_model("uint8", 0.1, 128, (1, 10), beta=0.5))
    with pytest.raises(QCompilerError, match="probabilities.*beta=0.5"):
        qcompiler.compile(str(path), target="x86")


def test_softmax_tables_are_read_with_clipped_indices(tmp_path):
    """The tuner measures every kernel on random inputs: a table lookup in TVM's "fast" mode
    (no bounds) crashed the RPC server there, so the lookups clip their indices."""
    from qcompiler.passes.graph import bindings, op_name

    path = tmp_path / "softmax.tflite"
    path.write_bytes(softmax_model("uint8", 0.1, 128, (1, 10)))
    quantized = qcompiler.quantize(str(path), None)
    takes = [b.value for b in bindings(quantized.mod["main"]) if op_name(b.value) == "relax.take"]
    assert len(takes) == 2 and all(str(t.attrs.mode) == "clip" for t in takes)

"""Tests for qcompiler.passes.verify: no float op may sit between a dequantize and a quantize."""

import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.integerize import FALLBACK_ATTR
from qcompiler.passes.verify import float_ops_in_integer_regions, verify_integer_only

# fmt: off


@I.ir_module
class EntryAndExitFloat:
    """Float preprocessing before the first quantize, float postprocessing after the last
    dequantize, integer ops in between: all allowed."""

    @R.function
    def main(x: R.Tensor((1, 8), "float32")) -> R.Tensor((8,), "float32"):
        with R.dataflow():
            scaled = R.multiply(x, R.const(2.0, "float32"))
            shifted = R.exp(scaled)
            q = R.quantize(shifted, R.const(0.1, "float32"), R.const(3, "int32"), axis=-1,
                           out_dtype="uint8")
            r = R.reshape(q, R.shape([8]))
            d = R.dequantize(r, R.const(0.1, "float32"), R.const(3, "int32"), axis=-1,
                             out_dtype="float32")
            probs = R.nn.softmax(d)
            gv = R.exp(probs)
            R.output(gv)
        return gv


@I.ir_module
class FloatExpInside:
    @R.function
    def main(x: R.Tensor((1, 8), "float32")) -> R.Tensor((1, 8), "float32"):
        with R.dataflow():
            q = R.quantize(x, R.const(0.1, "float32"), R.const(3, "int32"), axis=-1,
                           out_dtype="uint8")
            d = R.dequantize(q, R.const(0.1, "float32"), R.const(3, "int32"), axis=-1,
                             out_dtype="float32")
            e = R.exp(d)
            q2 = R.quantize(e, R.const(0.5, "float32"), R.const(0, "int32"), axis=-1,
                            out_dtype="uint8")
            gv = R.dequantize(q2, R.const(0.5, "float32"), R.const(0, "int32"), axis=-1,
                              out_dtype="float32")
            R.output(gv)
        return gv


@I.ir_module
class TwoFloatOpsInside:
    """exp then add: both on the way from a dequantize to a quantize; a side branch that only
    reaches the output is not."""

    @R.function
    def main(x: R.Tensor((1, 8), "uint8")) -> R.Tuple(R.Tensor((1, 8), "uint8"),
                                                        R.Tensor((1, 8), "float32")):
        with R.dataflow():
            d = R.dequantize(x, R.const(0.1, "float32"), R.const(3, "int32"), axis=-1,
                             out_dtype="float32")
            e = R.exp(d)
            s = R.add(e, R.const(1.0, "float32"))
            side = R.sigmoid(d)
            q = R.quantize(s, R.const(0.5, "float32"), R.const(0, "int32"), axis=-1,
                           out_dtype="uint8")
            gv = (q, side)
            R.output(gv)
        return gv


@I.ir_module
class EntryMeetsDequantized:
    """An add of a float input and a dequantized tensor that is quantized again: inside."""

    @R.function
    def main(x: R.Tensor((1, 8), "float32"), y: R.Tensor((1, 8), "uint8")) -> R.Tensor(
            (1, 8), "uint8"):
        with R.dataflow():
            d = R.dequantize(y, R.const(0.1, "float32"), R.const(3, "int32"), axis=-1,
                             out_dtype="float32")
            mixed = R.add(x, d)
            gv = R.quantize(mixed, R.const(0.5, "float32"), R.const(0, "int32"), axis=-1,
                            out_dtype="uint8")
            R.output(gv)
        return gv


@I.ir_module
class DequantizeThenQuantize:
    """A dequantize straight into a quantize has no float op in between."""

    @R.function
    def main(x: R.Tensor((1, 8), "uint8")) -> R.Tensor((1, 8), "int8"):
        with R.dataflow():
            d = R.dequantize(x, R.const(0.1, "float32"), R.const(3, "int32"), axis=-1,
                             out_dtype="float32")
            gv = R.quantize(d, R.const(0.2, "float32"), R.const(0, "int32"), axis=-1,
                            out_dtype="int8")
            R.output(gv)
        return gv


# fmt: on


@pytest.mark.parametrize(
    "mod", [EntryAndExitFloat, DequantizeThenQuantize], ids=["entry_exit", "dq_q"]
)
def test_float_outside_integer_regions_is_allowed(mod):
    assert float_ops_in_integer_regions(mod["main"]) == []
    verify_integer_only(mod)


def test_float_exp_between_dequantize_and_quantize_raises():
    with pytest.raises(QCompilerError, match=r"relax\.exp -> e\b"):
        verify_integer_only(FloatExpInside)


def test_every_float_op_on_the_path_is_named():
    assert float_ops_in_integer_regions(TwoFloatOpsInside["main"]) == [
        ("e", "relax.exp"),
        ("s", "relax.add"),
    ]
    with pytest.raises(QCompilerError, match=r"relax\.exp -> e.*relax\.add -> s"):
        verify_integer_only(TwoFloatOpsInside)


def test_entry_value_mixed_with_dequantized_value_is_inside():
    with pytest.raises(QCompilerError, match=r"relax\.add -> mixed"):
        verify_integer_only(EntryMeetsDequantized)


def test_declared_fallback_is_allowed_and_only_it():
    func = TwoFloatOpsInside["main"]
    declared = tvm.IRModule({"main": func.with_attr(FALLBACK_ATTR, ["e"])})
    assert float_ops_in_integer_regions(declared["main"]) == [("s", "relax.add")]
    with pytest.raises(QCompilerError, match=r"relax\.add -> s") as info:
        verify_integer_only(declared)
    assert "relax.exp" not in str(info.value)

    both = tvm.IRModule({"main": func.with_attr(FALLBACK_ATTR, ["e", "s"])})
    verify_integer_only(both)


# -- accumulator overflow ------------------------------------------------------------------------
def dense_module(k, weight, data_dtype="uint8"):
    """matmul(x[1, k], const w[k, 2]) accumulated in int32, as integerize writes it."""
    import numpy as np
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, k], data_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(np.full((k, 2), weight, np.int8))
            out = bb.emit_output(relax.op.matmul(x, w, out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize(
    "k, weight, data_dtype",
    [
        (66_000, 127, "uint8"),  # 2_137_410_000: just fits
        (67_000, 127, "uint8"),
        (131_000, -128, "int8"),  # 2_146_304_000: just fits
        (132_000, -128, "int8"),
        (5_000, 127, "uint8"),
    ],
)
def test_int32_accumulator_overflow_is_found_exactly(k, weight, data_dtype):
    from qcompiler.passes.verify import accumulator_overflows, verify_accumulators

    largest_code = 255 if data_dtype == "uint8" else 128
    worst = k * abs(weight) * largest_code  # Python ints: exact
    mod = dense_module(k, weight, data_dtype)
    if worst <= 2**31 - 1:
        assert accumulator_overflows(mod) == []
        verify_accumulators(mod)
        return
    out = mod["main"].body.body.name
    assert accumulator_overflows(mod) == [(out, "relax.matmul", k, worst)]
    with pytest.raises(QCompilerError, match=f"matmul -> .*K={k}, worst \\|sum\\| {worst}"):
        verify_accumulators(mod)


def test_a_float_model_with_a_huge_reduction_is_refused_by_name():
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import qcompiler

    k = 70_000
    weight = numpy_helper.from_array(np.full((k, 2), 0.5, np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    samples = [{"x": np.random.default_rng(i).random((1, k), np.float32)} for i in range(4)]
    with pytest.raises(QCompilerError, match=f"K={k}"):
        qcompiler.quantize(model, samples)

"""Models that arrive quantized (TFLite int8/uint8, ONNX QDQ): their own parameters, no calibration.

TVM's importers already write such a model in integerize's input form: each quantized op reads
``dequantize(q, s, z)`` and its result goes through ``quantize(y, s_y, z_y)``. What stands between
that and :func:`qcompiler.passes.integerize.integerize` is

* constant folding: :func:`qcompiler.passes.pipeline.prepare` folds ``dequantize(weights)`` into
  float constants, which loses the integer weights. Here the quantized constants are lifted into
  function parameters while the module is folded, and bound back afterwards; integer layout ops
  on constants (the importer's ``permute_dims`` of a fully-connected weight) are folded first
  with numpy so that every quantized weight is a plain constant under its dequantize;
* integer-valued pooling the importer writes directly on codes
  (``astype(avg_pool2d(astype(q, int32)), int8)``, which TVM legalizes to a truncating division):
  it is rewritten to the quantize/dequantize form so that integerize lowers it with the model's
  rounding;
* the channels-last layout for the int8 kernels, applied after integerize (on integer ops, whose
  constants may be folded freely).

The rounding of the reference runtime is a parameter of integerize (``rounding="tflite"`` for
TFLite's doubling high multiply and rounding shift); see :mod:`qcompiler.passes.qmath`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qcompiler.passes import qmath
from qcompiler.passes.canonicalize import canonicalize
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import CHANNELS_LAST, Dataflow, bindings, const_value, op_name
from qcompiler.passes.scheme import QuantSpec

QDQ_OPS = ("relax.quantize", "relax.dequantize")
_LAYOUT_OPS = {
    "relax.permute_dims": lambda x, call: np.transpose(
        x, None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
    ),
    "relax.reshape": lambda x, call: x.reshape([int(d) for d in call.ty.shape]),
}


def is_prequantized(mod: tvm.IRModule) -> bool:
    """Whether ``main`` already holds quantize/dequantize ops (a quantized model's import)."""
    return any(op_name(b.value) in QDQ_OPS for b in bindings(mod["main"]))


def check_supported(mod: tvm.IRModule, where: str) -> None:
    """Refuse dynamic-range (weight-only) models: float activations times int8 weights.

    Their import dequantizes constant weights but never quantizes an activation, so nothing
    would run on integers.
    """
    names = [op_name(b.value) for b in bindings(mod["main"])]
    if "relax.dequantize" in names and "relax.quantize" not in names:
        raise QCompilerError(
            f"{where} is a dynamic-range (weight-only) quantized model: its activations are "
            "float, so there is no integer model to import. Give the float model with "
            "calibration data, or a full-integer model."
        )


def _moved_axis(call, shape_in: list[int], axis: int) -> int | None:
    """Where the quantization ``axis`` of the input of a layout op lands in its output."""
    if op_name(call) == "relax.permute_dims":
        axes = call.attrs.axes
        axes = list(range(len(shape_in)))[::-1] if axes is None else [int(a) for a in axes]
        return axes.index(axis)
    shape_out = [int(d) for d in call.ty.shape]
    before = int(np.prod(shape_in[:axis]))
    for i, d in enumerate(shape_out):
        if d == shape_in[axis] and int(np.prod(shape_out[:i])) == before:
            return i
    return None  # the channels were split or merged: leave the float op


@mutator
class _FoldIntegerLayout(PyExprMutator):
    """Layout ops on quantized constants, computed with numpy at import.

    ``permute_dims``/``reshape`` of an integer constant becomes the constant; of
    ``dequantize(constant)`` (TVM's TFLite importer reshapes depthwise weights after
    dequantizing them) becomes ``dequantize(moved constant)`` with the channel axis moved.
    """

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if op_name(call) == "relax.quantize":
            return self._quantized_constant(call)
        fold = _LAYOUT_OPS.get(op_name(call))
        if fold is None:
            return call
        value = const_value(call.args[0])
        if value is not None and value.dtype.kind in "iu":
            return relax.const(np.ascontiguousarray(fold(value, call)), str(value.dtype))
        source = call.args[0]
        if isinstance(source, relax.Var):
            bound = self.lookup_binding(source)
            source = source if bound is None else bound
        if op_name(source) != "relax.dequantize":
            return call
        codes = const_value(source.args[0])
        if codes is None or codes.dtype.kind not in "iu":
            return call
        axis = int(source.attrs.axis) % codes.ndim
        scale = const_value(source.args[1])
        if scale is not None and scale.size > 1:
            axis = _moved_axis(call, list(codes.shape), axis)
            if axis is None:
                return call
        else:
            axis = -1
        moved = relax.const(np.ascontiguousarray(fold(codes, call)), str(codes.dtype))
        return relax.op.dequantize(
            moved, source.args[1], source.args[2], axis=axis, out_dtype=str(call.ty.dtype)
        )

    @staticmethod
    def _quantized_constant(call):
        """``quantize(float constant)`` (a weight onnxruntime left in float) as its codes."""
        values, scale, zero_point = (const_value(a) for a in call.args[:3])
        if values is None or scale is None or zero_point is None:
            return call
        axis = int(call.attrs.axis) % values.ndim if scale.size > 1 else None
        info = np.iinfo(str(call.ty.dtype))
        spec = QuantSpec(bits=info.bits, signed=info.min < 0, symmetric=False)
        codes = qmath.quantize(values, scale, zero_point, spec, axis=axis)
        return relax.const(codes.astype(str(call.ty.dtype)), str(call.ty.dtype))


@mutator
class _LiftQuantizedConstants(PyExprMutator):
    """``dequantize(const, ...)`` -> ``dequantize(param, ...)`` for 8/16-bit constants."""

    def __init__(self, mod):
        super().__init__(mod)
        self.lifted: dict[str, np.ndarray] = {}
        self.params: list[relax.Var] = []

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if op_name(call) != "relax.dequantize":
            return call
        data = call.args[0]
        if isinstance(data, relax.Var):
            bound = self.lookup_binding(data)
            data = data if bound is None else bound
        value = const_value(data)
        # int32 (biases) may fold to float: integerize recovers their codes exactly.
        if value is None or str(value.dtype) not in ("int8", "uint8", "int16"):
            return call
        name = f"qc_lifted_{len(self.lifted)}"
        self.lifted[name] = value
        param = relax.Var(name, relax.TensorType(list(value.shape), str(value.dtype)))
        self.params.append(param)
        return relax.Call(call.op, [param, *call.args[1:]], call.attrs)


def _lift(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict]:
    lifter = _LiftQuantizedConstants(mod)
    func = mod["main"]
    body = lifter.visit_expr(func.body)
    new_func = relax.Function(
        [*func.params, *lifter.params], body, func.ret_ty, func.is_pure, func.attrs
    )
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = new_func
    return out, lifter.lifted


def _bind(mod: tvm.IRModule, lifted: dict) -> tvm.IRModule:
    consts = {name: tvm.runtime.tensor(value) for name, value in lifted.items()}
    return relax.transform.BindParams("main", consts)(mod)


@mutator
class _PoolOnCodes(PyExprMutator):
    """``astype(avg_pool2d(astype(q, int32)), dt)`` -> the quantize/dequantize form."""

    def __init__(self, mod, flow: Dataflow):
        super().__init__(mod)
        self.flow = flow

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if op_name(call) != "relax.astype":
            return call
        pool = self.flow.producer.get(call.args[0]) if isinstance(call.args[0], relax.Var) else None
        if op_name(pool) != "relax.nn.avg_pool2d":
            return call
        widen = self.flow.producer.get(pool.args[0])
        if op_name(widen) != "relax.astype":
            return call
        codes = widen.args[0]
        params = self._params_of(codes)
        if params is None or str(codes.ty.dtype) != str(call.ty.dtype):
            return call
        scale, zero_point = params
        real = relax.op.dequantize(codes, scale, zero_point, axis=-1)
        pooled = relax.Call(pool.op, [self.builder_.emit(real)], pool.attrs)
        dtype = str(call.ty.dtype)
        return relax.op.quantize(self.builder_.emit(pooled), scale, zero_point, -1, dtype)

    def _params_of(self, codes):
        """Scale and zero point of ``codes``, from the quantize that made it."""
        node = codes
        while True:
            producer = self.flow.producer.get(node)
            if op_name(producer) == "relax.quantize":
                return producer.args[1], producer.args[2]
            if op_name(producer) in ("relax.clip", "relax.reshape") and isinstance(
                producer.args[0], relax.Var
            ):
                node = producer.args[0]
                continue
            return None


def _pool_on_codes(mod: tvm.IRModule) -> tvm.IRModule:
    func = mod["main"]
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = _PoolOnCodes(mod, Dataflow.of(func)).visit_expr(func)
    return relax.transform.DeadCodeElimination(["main"])(out)


def prepare_prequantized(mod: tvm.IRModule) -> tvm.IRModule:
    """The quantized import in integerize's input form (see the module docstring)."""
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    mod["main"] = _FoldIntegerLayout(mod).visit_expr(mod["main"])
    mod, lifted = _lift(mod)
    mod = tvm.transform.Sequential(
        [
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.FoldConstant(),
            canonicalize,
        ]
    )(mod)
    mod = _bind(mod, lifted)
    return _pool_on_codes(mod)


def channels_last(mod: tvm.IRModule) -> tvm.IRModule:
    """NHWC activations and OHWI weights for the integer convs, constants folded."""
    return tvm.transform.Sequential(
        [
            relax.transform.ConvertLayout(CHANNELS_LAST),
            relax.transform.FoldConstant(),
        ]
    )(mod)


def io_quantization(mod: tvm.IRModule) -> tuple[list, list]:
    """Scale and zero point of each integer input and output of an imported quantized model.

    Read from the dequantize that consumes each input and the quantize that makes each output,
    so a caller of the compiled model can quantize its inputs and dequantize its outputs:
    ``real = scale * (code - zero_point)``. None for a float input or output.
    """
    func = mod["main"]
    flow = Dataflow.of(func)

    def params(call) -> dict:
        return {
            "scale": np.atleast_1d(const_value(call.args[1])).astype(float).tolist(),
            "zero_point": np.atleast_1d(const_value(call.args[2])).astype(int).tolist(),
            "axis": int(call.attrs.axis),
        }

    inputs = []
    for param in func.params:
        found = [
            flow.producer[user]
            for user in flow.consumers.get(param, [])
            if op_name(flow.producer[user]) == "relax.dequantize"
        ]
        inputs.append(params(found[0]) if found else None)
    body = func.body.body
    results = list(body.fields) if isinstance(body, relax.Tuple) else [body]
    outputs = []
    for var in results:
        producer = flow.producer.get(var)
        outputs.append(params(producer) if op_name(producer) == "relax.quantize" else None)
    return inputs, outputs

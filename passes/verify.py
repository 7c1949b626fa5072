"""Verifier: no float op may sit inside an integer region.

A float binding is *inside* an integer region when its value is computed (through float ops) from
a dequantize and flows (through float ops) into a quantize: the program leaves the integers and
comes back. That is allowed only for the ops integerize declared as float fallbacks (function
attribute ``qc.float_fallback``). Float code before the first quantize (the model's entry) and
after the last dequantize (its exit) is fine.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import Dataflow, bindings, const_value, op_name
from qcompiler.passes.integerize import FALLBACK_ATTR


def _is_float(var) -> bool:
    ty = var.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype).startswith(("float", "bfloat"))


def float_ops_in_integer_regions(func: relax.Function) -> list[tuple[str, str]]:
    """``(var name, op name)`` of every float binding inside an integer region."""
    flow = Dataflow.of(func)
    order = [b.var for b in bindings(func)]
    from_int = set()
    for var in order:
        value = flow.producer[var]
        if not _is_float(var):
            continue
        if op_name(value) == "relax.dequantize" or any(
            v in from_int for v in relax.analysis.free_vars(value)
        ):
            from_int.add(var)
    to_int = flow.reaches_integers()
    allowed = {str(n) for n in (func.attrs or {}).get(FALLBACK_ATTR, [])}
    return [
        (var.name, op_name(flow.producer[var]) or type(flow.producer[var]).__name__)
        for var in order
        if var in from_int
        and var in to_int
        and op_name(flow.producer[var]) != "relax.dequantize"
        and var.name not in allowed
    ]


def verify_integer_only(mod: tvm.IRModule) -> None:
    """Raise :class:`QCompilerError` naming each float op found inside an integer region."""
    found = float_ops_in_integer_regions(mod["main"])
    if found:
        listed = ", ".join(f"{op} -> {name}" for name, op in found)
        raise QCompilerError(f"float ops inside integer regions: {listed}")


INT32_MAX = 2**31 - 1


def _code_bound(dtype: str) -> int:
    """The largest magnitude a value of an integer ``dtype`` can have."""
    info = np.iinfo(np.dtype(dtype))
    return max(abs(int(info.min)), int(info.max))


def accumulator_overflows(mod: tvm.IRModule) -> list[tuple[str, str, int, int]]:
    """``(var name, op, K, worst |sum|)`` of each int32 conv/matmul whose sum can overflow.

    The worst case of output channel ``c`` is ``sum_k |w[c, k]| * max|x|``, exact for the
    constant weights and the input's dtype (uint8 codes reach 255). Zero points and biases are
    added after the sum, by separate ops.
    """
    found = []
    for binding in bindings(mod["main"]):
        value = binding.value
        name = op_name(value)
        if name not in ("relax.nn.conv2d", "relax.matmul") or str(value.ty.dtype) != "int32":
            continue
        weight = const_value(value.args[1])
        data_dtype = str(value.args[0].ty.dtype)
        if weight is None or not data_dtype.startswith(("int", "uint")):
            continue
        if name == "relax.nn.conv2d":
            out_axis = str(value.attrs.kernel_layout).index("O")
        else:
            out_axis = weight.ndim - 1
        per_channel = np.abs(np.moveaxis(weight.astype(np.int64), out_axis, 0)).reshape(
            weight.shape[out_axis], -1
        )
        worst = int(per_channel.sum(axis=1).max()) * _code_bound(data_dtype)
        if worst > INT32_MAX:
            found.append((binding.var.name, name, per_channel.shape[1], worst))
    return found


def verify_accumulators(mod: tvm.IRModule) -> None:
    """Refuse a model whose int32 accumulators can overflow, naming each layer and its K."""
    found = accumulator_overflows(mod)
    if found:
        listed = "; ".join(
            f"{op.removeprefix('relax.')} -> {name}: K={k}, worst |sum| {worst} > 2^31-1"
            for name, op, k, worst in found
        )
        raise QCompilerError(
            f"int32 accumulators can overflow ({listed}); quantize these layers with fewer "
            "weight bits or split the reduction"
        )

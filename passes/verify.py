"""Verifier: no float op may sit inside an integer region.

A float binding is *inside* an integer region when its value is computed (through float ops) from
a dequantize and flows (through float ops) into a quantize: the program leaves the integers and
comes back. That is allowed only for the ops integerize declared as float fallbacks (function
attribute ``qc.float_fallback``). Float code before the first quantize (the model's entry) and
after the last dequantize (its exit) is fine.
"""

from __future__ import annotations

import tvm
from tvm import relax

from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import Dataflow, bindings, op_name
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
    to_int = set()
    for var in reversed(order):
        if not _is_float(var):
            continue
        for user in flow.consumers.get(var, []):
            if op_name(flow.producer[user]) == "relax.quantize" or user in to_int:
                to_int.add(var)
                break
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

"""Canonicalize: give the quantizer Relax ops where importers emitted opaque TIR calls.

TVM's ONNX importer lowers ``Clip`` with tensor bounds straight to TIR through
``emit_te(topi.maximum / topi.minimum)``, so the graph shows ``call_tir(maximum3, (x, c))``
instead of an op. This pass turns such calls back into ``R.maximum(x, c)`` / ``R.minimum(x, c)``
(scalar constant bound, output shaped like ``x``), which the quantizer folds into saturation
bounds. ``x * sigmoid(x)`` (how exporters write SiLU/Swish) becomes ``silu(x)``. Everything
else is left as it is.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qcompiler.passes.graph import is_scalar_const, op_name

_TOPI_BINARY = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}
_NAME = re.compile(r"^(maximum|minimum)\d*$")


@mutator
class _Canonicalizer(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if op_name(call) == "relax.multiply":
            return self._silu(call)
        if op_name(call) != "relax.call_tir":
            return call
        callee, args = call.args[0], call.args[1]
        match = _NAME.match(callee.name_hint) if isinstance(callee, tvm.ir.GlobalVar) else None
        if match is None or len(args.fields) != 2:
            return call
        data, bound = args.fields
        if not isinstance(data.ty, relax.TensorType) or not is_scalar_const(bound):
            return call
        same_shape = [int(d) for d in data.ty.shape] == [int(d) for d in call.ty.shape]
        if not (same_shape and data.ty.dtype == bound.ty.dtype):
            return call
        return _TOPI_BINARY[match.group(1)](data, bound)

    def _silu(self, call):
        """``x * sigmoid(x)`` -> ``silu(x)``: one function of ``x``'s codes (a single lookup
        table) instead of a sigmoid rounded to 8 bits and then a product rounded again."""
        a, b = call.args
        for x, s in ((a, b), (b, a)):
            bound = self.lookup_binding(s) if isinstance(s, relax.Var) else None
            if op_name(bound) == "relax.sigmoid" and bound.args[0].same_as(x):
                return relax.op.nn.silu(x)
        return call


@tvm.transform.module_pass(opt_level=0, name="QCCanonicalize")
def canonicalize(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite importer-emitted TIR clamps in ``main`` into Relax ops (see module docstring)."""
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = _Canonicalizer(mod).visit_expr(mod["main"])
    return relax.transform.DeadCodeElimination(["main"])(out)

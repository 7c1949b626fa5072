"""Float sigmoid and SiLU as polynomials the CPU evaluates in vector lanes.

TVM lowers ``sigmoid`` to ``1 / (1 + exp(-x))`` with LLVM's ``exp``, which, with no vector
math library, LLVM scalarizes into one ``expf`` call per element. On a detector whose every
conv ends in SiLU (YOLOX-Nano) that cost more than the convs: its float build took 36 ms with
them and 15.3 ms without (1 thread; onnxruntime 14.2). Here both are rewritten, before
legalization, onto TVM's ``fast_exp`` (range reduction to a power of two and a polynomial,
plain arithmetic that vectorizes): absolute error under 1e-7 on the sigmoid, measured against
numpy in ``tests/test_kernels.py``.

Integer models are untouched (their sigmoid and SiLU are lookup tables on the codes); this is
for float models and the float regions of quantized ones.
"""

from __future__ import annotations

import tvm
from tvm import te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from qcompiler.passes.graph import op_name
from qcompiler.targets.kernels import with_main


def fast_sigmoid(x: te.Tensor) -> te.Tensor:
    one = tvm.tirx.const(1.0, x.dtype)
    return topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(x))))


def fast_silu(x: te.Tensor) -> te.Tensor:
    return topi.multiply(x, fast_sigmoid(x))


_FAST = {"relax.sigmoid": fast_sigmoid, "relax.nn.silu": fast_silu}


@mutator
class _FastMath(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        fast = _FAST.get(op_name(call))
        if fast is None or str(call.ty.dtype) != "float32":
            return call
        return self.builder_.call_te(fast, call.args[0], primfunc_name_hint=fast.__name__)


@tvm.transform.module_pass(opt_level=0, name="QCFastSigmoid")
def fast_sigmoid_pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``main``'s float32 sigmoids and SiLUs on :func:`fast_sigmoid` and :func:`fast_silu`."""
    rewriter = _FastMath(mod)
    return with_main(rewriter, rewriter.visit_expr(mod["main"]))

"""One fused requantize epilogue per integer op, written so that the CPU multiplies in 32 bits.

Integerize (:mod:`qcompiler.passes.integerize`) writes a requantization as a chain of Relax ops
on int64 tensors::

    y = astype(clip(right_shift(multiply(astype(acc + bias, int64), M) + R, S) + z, lo, hi), dt)

which is exact and easy to check, but after legalization LLVM sees ``int64 x int64`` products of
values it cannot prove fit 32 bits and emits AVX-512's ``vpmullq`` (three uops) after an int64
bias add; on a 1x1 conv with few input channels that epilogue costs three times the dot products.
Here the chain is replaced by one TE computation with the same integer result::

    y = astype(clip((int64(acc) * int64(M32) + C) >> S, lo, hi), dt)
    C = bias * M + R + (z << S)                     # folded at compile time, int64

where ``acc`` and ``M32`` are int32, so LLVM proves both factors sign-extended from 32 bits and
uses ``vpmuldq`` (on ARM, ``smull``). ``(x + (z << S)) >> S == (x >> S) + z`` holds exactly for
arithmetic shifts, and ``(acc + bias) * M == acc * M + bias * M`` in int64, so the result is
bit-identical to the chain (and to :func:`qcompiler.passes.qmath.requantize`).

Only chains whose intermediate values have no other user, and whose folded constant cannot make
the int64 sum overflow for any int32 ``acc``, are fused; anything else is left as integerize
wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from qcompiler.passes.graph import Dataflow, const_value, op_name

REQUANTIZE_NAME = "qc_requantize"
_INT32 = np.iinfo(np.int32)


@dataclass
class _Chain:
    acc: relax.Var  # the int32 (or narrower) value being requantized
    multiplier: np.ndarray  # int32-representable, >= 0
    offset: np.ndarray  # int64, everything added before the shift
    shift: np.ndarray  # int64
    lo: int
    hi: int
    dtype: str


def requantize_compute(acc, multiplier, offset, shift, lo: int, hi: int, dtype: str):
    """TE: ``clip((int64(acc) * int64(multiplier) + offset) >> shift, lo, hi)`` as ``dtype``.

    The parameter tensors have ``acc``'s rank, with size-1 axes broadcast.
    """

    def at(tensor, index):
        return tensor[tuple(0 if int(d) == 1 else i for d, i in zip(tensor.shape, index))]

    def body(*index):
        wide = acc[index].astype("int64") * at(multiplier, index).astype("int64")
        value = (wide + at(offset, index)) >> at(shift, index)
        value = tirx.max(tirx.min(value, tirx.const(hi, "int64")), tirx.const(lo, "int64"))
        return value.astype(dtype)

    return te.compute(acc.shape, body, name=REQUANTIZE_NAME)


def _int_const(expr, dtype: str | None = None) -> np.ndarray | None:
    value = const_value(expr)
    if value is None or value.dtype.kind not in "iu":
        return None
    if dtype is not None and str(value.dtype) != dtype:
        return None
    return value.astype(np.int64)


def _prim_int(expr) -> int | None:
    # A scalar prim value is an IntImm in TVM 0.27.
    return int(expr) if isinstance(expr, tirx.IntImm) else None


def _match(var, flow: Dataflow) -> _Chain | None:
    """The requantize chain ending at ``var`` (see the module docstring), or None."""

    def single_use_producer(v):
        """The value of ``v``'s producer if ``v`` feeds only the chain's next op."""
        if v is not var and flow.sole_consumer(v) is None:
            return None
        return flow.producer.get(v)

    cast = flow.producer.get(var)
    if op_name(cast) != "relax.astype" or str(cast.ty.dtype) not in ("int8", "uint8", "int16"):
        return None
    clip = single_use_producer(cast.args[0])
    if op_name(clip) != "relax.clip":
        return None
    lo, hi = _prim_int(clip.args[1]), _prim_int(clip.args[2])
    if lo is None or hi is None:
        return None
    node = single_use_producer(clip.args[0])
    zero_point = np.int64(0)
    if op_name(node) == "relax.add" and _int_const(node.args[1], "int64") is not None:
        zero_point = _int_const(node.args[1])
        node = single_use_producer(node.args[0])
    if op_name(node) != "relax.right_shift":
        return None
    shift = _int_const(node.args[1], "int64")
    node = single_use_producer(node.args[0])
    if shift is None or op_name(node) != "relax.add":
        return None
    rounding = _int_const(node.args[1], "int64")
    node = single_use_producer(node.args[0])
    if rounding is None or op_name(node) != "relax.multiply":
        return None
    multiplier = _int_const(node.args[1], "int64")
    if multiplier is None or multiplier.min() < 0 or multiplier.max() > _INT32.max:
        return None
    node = single_use_producer(node.args[0])
    offset = np.int64(0)  # added before the multiply (a centring -z, a bias)
    if op_name(node) == "relax.add" and _int_const(node.args[1], "int64") is not None:
        offset = _int_const(node.args[1])
        node = single_use_producer(node.args[0])
    if op_name(node) != "relax.astype" or str(node.ty.dtype) != "int64":
        return None
    acc = node.args[0]
    if str(acc.ty.dtype) not in ("int32", "int16", "int8", "uint8"):
        return None
    bias = flow.producer.get(acc) if flow.sole_consumer(acc) is not None else None
    if (
        str(acc.ty.dtype) == "int32"
        and op_name(bias) == "relax.add"
        and _int_const(bias.args[1], "int32") is not None
        and str(bias.args[0].ty.dtype) == "int32"
    ):
        offset = offset + _int_const(bias.args[1])
        acc = bias.args[0]
    total = _fold(offset, multiplier, rounding, zero_point, shift)
    if total is None:
        return None
    return _Chain(acc, multiplier, total, shift, lo, hi, str(cast.ty.dtype))


def _fold(offset, multiplier, rounding, zero_point, shift) -> np.ndarray | None:
    """``offset * M + rounding + (z << shift)`` as int64, or None if some ``acc * M + that``
    could leave int64 (a zero point shifted by 60 bits, say): the chain then stays unfused."""
    arrays = np.broadcast_arrays(offset, multiplier, rounding, zero_point, shift)
    as_int = [a.astype(object) for a in arrays]
    offset, multiplier, rounding, zero_point, shift = as_int
    total = np.asarray(offset * multiplier + rounding + zero_point * (2**shift), dtype=object)
    worst = np.abs(total) + (2**31) * multiplier
    if max(np.asarray(worst, dtype=object).flat, default=0) >= 2**63:
        return None
    return total.astype(np.int64)


def _full_rank(values: np.ndarray, ndim: int, dtype: str) -> relax.Constant:
    values = np.asarray(values)
    shape = (1,) * (ndim - values.ndim) + values.shape
    return relax.const(values.reshape(shape).astype(dtype), dtype)


@mutator
class _FuseRequantize(PyExprMutator):
    def __init__(self, mod, chains: dict):
        super().__init__(mod)
        self.chains = chains

    def visit_var_binding_(self, binding):
        chain = self.chains.get(binding.var)
        if chain is None:
            super().visit_var_binding_(binding)
            return
        ndim = len(chain.acc.ty.shape)
        call = self.builder_.call_te(
            requantize_compute,
            self.visit_expr(chain.acc),
            _full_rank(chain.multiplier, ndim, "int32"),
            _full_rank(chain.offset, ndim, "int64"),
            _full_rank(chain.shift, ndim, "int64"),
            lo=chain.lo,
            hi=chain.hi,
            dtype=chain.dtype,
            primfunc_name_hint=REQUANTIZE_NAME,
        )
        output = self.builder_.current_block_is_dataflow() and not isinstance(
            binding.var, relax.DataflowVar
        )
        emit = self.builder_.emit_output if output else self.builder_.emit
        self.set_var_remap(binding.var, emit(call, binding.var.name))


def fuse_requantize(mod: tvm.IRModule) -> tvm.IRModule:
    """Replace ``main``'s requantize chains by one int32-multiplier computation each."""
    func = mod["main"]
    flow = Dataflow.of(func)
    chains = {}
    for var, value in flow.producer.items():
        if op_name(value) == "relax.astype":
            chain = _match(var, flow)
            if chain is not None:
                chains[var] = chain
    if not chains:
        return mod
    rewriter = _FuseRequantize(mod, chains)
    main = rewriter.visit_expr(func)
    out = rewriter.builder_.get()
    out["main"] = main
    return relax.transform.DeadCodeElimination(["main"])(out)

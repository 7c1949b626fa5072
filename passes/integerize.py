"""Integerize: lower a quantize/dequantize ("QDQ") function to integer-only arithmetic.

Input: a function where quantized tensors appear as ``dequantize(q, s, z)`` and each quantized
op's result goes through ``quantize(y, s_y, z_y)`` — what :mod:`annotate` writes, and what an ONNX
QDQ or TFLite quantized model imports to. Output: the same function computing on integers from the
first quantize to the last dequantize.

Every ``quantize(y)`` is an anchor. The float chain that computes ``y`` from dequantized inputs
(a head op, a folded bias, clamps) is replaced by integer ops that produce the codes directly:

* conv2d / matmul (``s_x * s_w[c]`` per output channel, int8 x int8 -> int32)::

      sum((q_x - z_x) * q_w) = sum(q_x * q_w) - z_x * sum(q_w)   # zero point folded into the bias
      b_q[c] = round(b[c] / (s_x * s_w[c])) - z_x * sum_k q_w[c, k]
      q_y = clamp(requant(acc + b_q, s_x * s_w[c] / s_y) + z_y)

  Padding of a non-zero-point input is made explicit with value ``z_x`` (the code of 0.0), so
  the fold stays exact at the borders.
* add / subtract: ``q_y = clamp(round(sum_i (q_i - z_i) * s_i / s_y) + z_y)``, one rounding with a
  shared shift; multiply: ``(q_a - z_a) * (q_b - z_b)`` rescaled by ``s_a * s_b / s_y``.
* mean / global average pool: int32 sum, ``- n * z_x``, rescaled by ``s_x / (n * s_y)``.
* concat: each input rescaled to the output's parameters.
* elementwise functions (sigmoid, tanh, ..., ``x * c``): a lookup table over all input codes.
* clamps (ReLU, ReLU6, clip): saturation bounds, ``clamp(quantize(x)) == quantize(clamp(x))``
  because rounding is monotonic.

``requant(acc, m)`` is the integer multiplier-and-shift of :mod:`qmath`: int64 multiply by
``M0``, add ``2**(shift-1)``, arithmetic right shift (round half up). Pass-through ops (reshape,
transpose, max-pool, slicing) are applied to the codes directly.

Anchors whose chain has no integer lowering stay float, bracketed by dequantize/quantize; they
are listed in a warning and in the function attribute ``qc.float_fallback`` (read by the
verifier).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst
from tvm.relax.expr_functor import PyExprMutator, mutator

from qcompiler.passes import qmath, softmax
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import (
    CONV_OPS,
    EXIT_MOVES,
    LAYER_NAMES_ATTR,
    LAYER_OPS,
    Dataflow,
    clamp_interval,
    const_value,
    constant_operands_only,
    elementwise_func,
    elementwise_region,
    layer_name,
    moves_codes,
    op_name,
)

FALLBACK_ATTR = "qc.float_fallback"


# Largest folded bias magnitude: half of int32, so the accumulation around it cannot overflow.
BIAS_LIMIT = float(1 << 30)


@dataclass(frozen=True)
class QTensor:
    """A float value known to equal ``dequantize(expr, scale, zero_point, axis)``."""

    expr: relax.Expr
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    @property
    def dtype(self) -> str:
        return str(self.expr.ty.dtype)

    @property
    def s(self) -> float:
        return float(self.scale.reshape(-1)[0])

    @property
    def z(self) -> int:
        return int(self.zero_point.reshape(-1)[0])


@dataclass(frozen=True)
class OutParams:
    """Where a lowered chain must land: scale, zero point, dtype and saturation codes."""

    scale: float
    zero_point: int
    dtype: str
    qlo: int
    qhi: int

    def clamped(self, lo: float, hi: float) -> OutParams:
        """Saturation narrowed to the codes of the real interval [lo, hi]."""

        def code(r, default):
            if math.isinf(r):
                return default
            return int(np.clip(np.rint(r / self.scale) + self.zero_point, self.qlo, self.qhi))

        return OutParams(
            self.scale,
            self.zero_point,
            self.dtype,
            max(self.qlo, code(lo, self.qlo)),
            min(self.qhi, code(hi, self.qhi)),
        )


class _NoLowering(Exception):
    """The chain has no integer lowering (the message says why)."""


def _qdq_params(call) -> tuple[np.ndarray, np.ndarray, int] | None:
    scale, zero_point = const_value(call.args[1]), const_value(call.args[2])
    if scale is None or zero_point is None:
        return None
    return scale.astype(np.float64), zero_point.astype(np.int64), int(call.attrs.axis)


def _const(value, dtype: str) -> GenericConst:
    return relax.const(np.asarray(value).astype(dtype), dtype)


# Fraction bits of the integer bilinear weights of 8-bit codes (TFLite's integer resize uses 10).
LERP_BITS = 10

# Source coordinate of output index ``i`` for an input of ``n`` and an output of ``m`` pixels,
# as ``topi.image.get_inx`` computes it.
_SOURCE_COORDINATE = {
    "half_pixel": lambda i, n, m: (i + 0.5) * (n / m) - 0.5,
    "pytorch_half_pixel": lambda i, n, m: (i + 0.5) * (n / m) - 0.5 if m > 1 else 0.0 * i,
    "align_corners": lambda i, n, m: i * ((n - 1) / (m - 1) if m > 1 else 0.0),
    "asymmetric": lambda i, n, m: i * (n / m),
}


def _lerp_taps(n: int, m: int, mode: str, bits: int):
    """For each of ``m`` outputs along an axis of ``n`` inputs: the two input indices (clamped
    to the edge) and their integer weights, which sum to ``2**bits``."""
    source = _SOURCE_COORDINATE[mode](np.arange(m, dtype=np.float64), n, m)
    floor = np.floor(source)
    high = np.rint((source - floor) * 2**bits).astype(np.int64)
    lo = np.clip(floor, 0, n - 1).astype(np.int64)
    hi = np.clip(floor + 1, 0, n - 1).astype(np.int64)
    return lo, hi, 2**bits - high, high


def _channel_shape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


@mutator
class _Integerizer(PyExprMutator):
    def __init__(self, mod, func, rounding: str = "half_up"):
        super().__init__(mod)
        self.tflite = rounding == "tflite"
        self.ort = rounding == "onnxruntime"
        self.flow = Dataflow.of(func)
        self.params = set(func.params)
        self.q: dict = {}
        self.from_int: dict = {}
        self.fallbacks: list[tuple[str, str, str]] = []
        self.fallback_vars: list[str] = []
        self.layer_names: dict[str, str] = {}  # integer conv/matmul var -> the float model's
        self.func = func

    # -- walking -----------------------------------------------------------------------------
    def visit_var_binding_(self, binding):
        try:
            self._visit_binding(binding.var, binding.value)
        except QCompilerError as err:
            name = op_name(binding.value) or type(binding.value).__name__
            raise QCompilerError(f"{binding.var.name} ({name}): {err}") from None

    def _visit_binding(self, var, value):
        emit = (
            self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
        )
        name = op_name(value)
        if name == "relax.quantize":
            lowered = self._lower_anchor(var, value)
            if lowered is not None:
                self.set_var_remap(var, emit(lowered, var.name))
                return
        exit_value = self._lower_exit(var, value)
        if exit_value is not None:
            self.set_var_remap(var, emit(exit_value, var.name))
            return
        new_value = self.visit_expr(value)
        if name == "relax.dequantize":
            params = _qdq_params(value)
            if params is not None:
                scale, zero_point, axis = params
                source = new_value.args[0]
                ndim = len(source.ty.shape)
                axis = axis % ndim if scale.size > 1 else None
                self.q[var] = QTensor(source, scale, zero_point, axis)
        elif moves_codes(value) and value.args[0] in self.q and self.q[value.args[0]].per_tensor:
            # op(dequantize(q)) == dequantize(op(q)): move the codes, keep their meaning. Float
            # users (a fallback, the model's exit) get the dequantized result.
            src = self.q[value.args[0]]
            int_call = relax.Call(value.op, [src.expr, *new_value.args[1:]], value.attrs)
            codes = self.builder_.emit(int_call)
            self.q[var] = QTensor(codes, src.scale, src.zero_point)
            new_value = relax.op.dequantize(
                codes, _const(src.scale, "float32"), _const(src.zero_point, "int32")
            )
        new_var = emit(new_value, var.name)
        self.set_var_remap(var, new_var)
        if name in LAYER_OPS:  # a float conv/matmul keeps its name in the layer table
            self.layer_names[new_var.name] = layer_name(self.func, var.name)

    def _lower_exit(self, var, call):
        """A conv2d/matmul (+ bias) whose result leaves the integers unquantized: dequantize its
        int32 accumulator directly, so the model's float outputs (logits, boxes) keep the
        accumulator's precision instead of 8 bits."""
        name = op_name(call)
        bias, layer = None, var
        if name in ("relax.add", "relax.subtract") and const_value(call.args[1]) is not None:
            head = self.flow.producer.get(call.args[0])
            if op_name(head) not in LAYER_OPS:
                return None
            bias = const_value(call.args[1]).astype(np.float64)
            bias = -bias if name == "relax.subtract" else bias
            call, layer = head, call.args[0]
        elif name in LAYER_OPS:
            nxt = self.flow.sole_consumer(var)
            if nxt is not None and op_name(self.flow.producer[nxt]) in (
                "relax.add",
                "relax.subtract",
            ):
                return None  # the bias add below takes the chain
        else:
            return self._float_table_exit(var, call)
        users = self.flow.consumers.get(var, [])
        if any(op_name(self.flow.producer[u]) == "relax.quantize" for u in users):
            return None
        try:
            acc, acc_scale, axis = self._accumulate(call, bias, layer.name)
        except _NoLowering:
            return None
        shape = _channel_shape(len(acc.ty.shape), axis)
        real = self._emit(relax.op.astype(acc, "float32"))
        return relax.op.multiply(real, _const(acc_scale.reshape(shape), "float32"))

    def _lower_anchor(self, var, call):
        params = _qdq_params(call)
        if params is None or params[0].size != 1:
            return None
        scale, zero_point, _ = params
        dtype = str(call.attrs.out_dtype)
        info = np.iinfo(dtype)
        out = OutParams(
            float(scale.reshape(())),
            int(zero_point.reshape(())),
            dtype,
            int(info.min),
            int(info.max),
        )
        y = call.args[0]
        if not self._from_integers(y):
            return None  # the model's entry: quantizing float inputs is quantize's job
        chain = []
        try:
            return self._lower_chain(y, out, chain)
        except _NoLowering as why:
            head = self.flow.producer.get(chain[-1]) if chain else None
            self.fallbacks.append((y.name, op_name(head) or "?", str(why)))
            # Names of the re-emitted float bindings: what the verifier will see.
            self.fallback_vars.extend(self.get_var_remap(v).name for v in chain)
            return None

    def _float_table_exit(self, var, call):
        """An elementwise function of integer codes whose result is not quantized again (a
        detector's sigmoid scores at the output): a table of its float values over all input
        codes, looked up by code -- exactly the float function of the dequantized input, with
        no float arithmetic at run time and no 8-bit rounding of the result."""
        func = elementwise_func(call)
        users = self.flow.consumers.get(var, [])
        if func is None or any(op_name(self.flow.producer[u]) == "relax.quantize" for u in users):
            return None
        x = next((self.q[a] for a in call.args if a in self.q), None)
        if x is None or not x.per_tensor or str(call.ty.dtype) != "float32":
            return None
        real, index = self._table_inputs(x, func)
        return relax.op.take(_const(real, "float32"), index, axis=0, mode="clip")

    def _table_inputs(self, x: QTensor, func) -> tuple[np.ndarray, relax.Expr]:
        """``func`` at every code of ``x``'s dtype (float64), and the index expr into it."""
        info = np.iinfo(x.dtype)
        codes = np.arange(int(info.min), int(info.max) + 1)
        with np.errstate(all="ignore"):
            real = func(qmath.dequantize(codes, x.s, x.z).astype(np.float64))
        index = self._emit(relax.op.astype(x.expr, "int32"))
        if info.min:
            index = self._emit(relax.op.add(index, _const(-int(info.min), "int32")))
        return real, index

    def _from_integers(self, var) -> bool:
        """Does ``var`` (old graph) depend on a dequantized value?"""
        if var not in self.from_int:
            call = self.flow.producer.get(var)
            self.from_int[var] = call is not None and (
                var in self.q or any(self._from_integers(v) for v in relax.analysis.free_vars(call))
            )
        return self.from_int[var]

    def _lower_chain(self, y, out: OutParams, chain: list):
        """Integer expr for the codes of ``y`` in ``out``; ``chain`` collects the float vars."""
        node, lo, hi = y, -math.inf, math.inf
        while True:
            if node in self.q:
                src = self.q[node]
                if not src.per_tensor:
                    raise _NoLowering(f"{node.name} is quantized per channel")
                return self._rescale([(src, src.s / out.scale)], out.clamped(lo, hi))
            call = self.flow.producer.get(node)
            if call is None:
                raise _NoLowering(f"{node.name} is not computed from quantized values")
            chain.append(node)
            interval = clamp_interval(call)
            if interval is None:
                break
            lo, hi = max(lo, interval[0]), min(hi, interval[1])
            node = call.args[0]
        out = out.clamped(lo, hi)
        bias = None
        name = op_name(call)
        layer = node
        if name in ("relax.add", "relax.subtract") and const_value(call.args[1]) is not None:
            producer = self.flow.producer.get(call.args[0])
            if op_name(producer) in LAYER_OPS:
                bias = const_value(call.args[1]).astype(np.float64)
                bias = -bias if name == "relax.subtract" else bias
                chain.append(call.args[0])
                layer = call.args[0]
                call, name = producer, op_name(producer)
        if name in LAYER_OPS:
            acc, acc_scale, axis = self._accumulate(call, bias, layer.name)
            # LiteRT's integer FULLY_CONNECTED rounds once (measured: its reference kernel
            # matches a single rounding on every output where the doubling-high-multiply
            # form misses 1 in 80); its convolutions round twice.
            twice = self.tflite and name in CONV_OPS
            if self.ort:  # QLinearConv / QGemm: float32(s_x * s_w) / s_y
                scale = acc_scale.astype(np.float32) / np.float32(out.scale)
                return self._float32_requantize(acc, scale, out, axis)
            return self._requantize(acc, acc_scale / out.scale, out, axis=axis, tflite=twice)
        region = elementwise_region(node, self.flow, lambda v: v in self.q)
        if region is not None:
            chain.extend(region.inner)
            return self._lookup_table(self.q[region.source], region.func, out, lo, hi)
        func = elementwise_func(call)
        if func is not None:
            (x,) = [self.q[a] for a in call.args if a in self.q][:1] or [None]
            return self._lookup_table(x, func, out, lo, hi)
        if name in ("relax.add", "relax.subtract"):
            a, b = self._inputs(call, 2)
            sign = -1.0 if name == "relax.subtract" else 1.0
            if self.tflite:
                return self._tflite_add(a, b, sign, out)
            if self.ort and sign > 0:
                return self._onnxruntime_add(a, b, out)
            return self._rescale([(a, a.s / out.scale), (b, sign * b.s / out.scale)], out)
        if name == "relax.multiply":
            a, b = self._inputs(call, 2)
            product = self._emit(
                relax.op.multiply(self._centered(a, "int64"), self._centered(b, "int64"))
            )
            return self._requantize(product, np.float64(a.s * b.s / out.scale), out)
        if name == "relax.concat":
            parts = self._inputs(call, len(call.args[0].fields))
            codes = [self._rescale([(p, p.s / out.scale)], out) for p in parts]
            return relax.op.concat(relax.Tuple([self._emit(c) for c in codes]), call.attrs.axis)
        if name in ("relax.mean", "relax.nn.avg_pool2d"):
            return self._mean(call, out)
        if name == "relax.nn.softmax" and self.tflite:
            return self._tflite_softmax(call, out)
        if name == "relax.image.resize2d":
            return self._bilinear(call, out)
        raise _NoLowering(f"no integer lowering for {name}")

    # -- helpers -------------------------------------------------------------------------------
    def _emit(self, expr):
        if isinstance(expr, relax.Var | GenericConst):
            return expr
        return self.builder_.emit(expr)

    def _input(self, arg) -> QTensor:
        if arg not in self.q:
            raise _NoLowering(f"operand {getattr(arg, 'name', arg)} is not quantized")
        if not self.q[arg].per_tensor:
            raise _NoLowering(f"operand {arg.name} is quantized per channel")
        return self.q[arg]

    def _inputs(self, call, count) -> list[QTensor]:
        args = call.args[0].fields if op_name(call) == "relax.concat" else call.args[:count]
        return [self._input(arg) for arg in args]

    def _centered(self, t: QTensor, dtype: str):
        """``q - z`` widened to ``dtype``."""
        wide = self._emit(relax.op.astype(t.expr, dtype))
        if t.z == 0:
            return wide
        return self._emit(relax.op.add(wide, _const(-t.z, dtype)))

    def _rescale(self, terms, out: OutParams):
        """``clamp(round(sum_i (q_i - z_i) * ratio_i) + z_out)`` with one shared shift."""
        if len(terms) == 1:
            t, ratio = terms[0]
            same_codes = t.dtype == out.dtype and t.z == out.zero_point
            if same_codes and math.isclose(ratio, 1.0, rel_tol=1e-9):
                info = np.iinfo(out.dtype)
                if (out.qlo, out.qhi) == (info.min, info.max):
                    return t.expr
                return relax.op.clip(t.expr, relax.prim_value(out.qlo), relax.prim_value(out.qhi))
            return self._requantize(self._centered(t, "int64"), np.float64(ratio), out)
        ratios = np.array([abs(r) for _, r in terms])
        multipliers, shift = qmath.common_multipliers(ratios)
        total = None
        for (t, ratio), m in zip(terms, multipliers):
            m = int(m) if ratio > 0 else -int(m)
            term = self._emit(relax.op.multiply(self._centered(t, "int64"), _const(m, "int64")))
            total = term if total is None else self._emit(relax.op.add(total, term))
        return self._round_shift(total, np.int64(shift), out)

    def _requantize(self, acc, ratio, out: OutParams, axis: int | None = None, tflite=None):
        """``clamp(requant(acc, ratio) + z_out)``; ``ratio`` per channel along ``axis``.

        ``tflite``: TFLite's two roundings (default: the module's rounding mode).
        """
        if self.tflite if tflite is None else tflite:
            x = self._tflite_multiply(acc, ratio, axis)
            return self._saturate(x, out)
        multiplier, shift = qmath.decompose_multiplier(ratio)
        if str(acc.ty.dtype) != "int64":
            acc = self._emit(relax.op.astype(acc, "int64"))
        if axis is not None:
            shape = _channel_shape(len(acc.ty.shape), axis)
            multiplier, shift = multiplier.reshape(shape), shift.reshape(shape)
        scaled = self._emit(relax.op.multiply(acc, _const(multiplier, "int64")))
        return self._round_shift(scaled, shift, out)

    # -- onnxruntime's arithmetic (x86 MLAS kernels) ------------------------------------------
    def _float32_requantize(self, acc, scale, out: OutParams, axis: int | None = None):
        """MLAS's ``MlasRequantizeOutput``, which onnxruntime's QLinearConv, QGemm and
        QLinearGlobalAveragePool share: the int32 value converted to float32, times a float32
        scale (per channel along ``axis``), clamped, rounded half to even, plus the zero point.
        Clamping before rounding is exact (the bounds are integers) and keeps the conversion
        back to int32 in range."""
        scale = np.asarray(scale, dtype=np.float32)
        if axis is not None and scale.size > 1:
            scale = scale.reshape(_channel_shape(len(acc.ty.shape), axis))
        real = self._emit(relax.op.astype(acc, "float32"))
        scaled = self._emit(relax.op.multiply(real, _const(scale, "float32")))
        return self._round_to_codes(scaled, out, offset=out.zero_point)

    def _round_to_codes(self, x, out: OutParams, offset: int = 0):
        """``clamp(rint(x) + offset)`` in ``out``'s dtype for a float32 ``x``: the clamp runs
        in float first, on bounds shifted by ``offset``, as MLAS does."""
        bounds = (
            relax.prim_value(float(out.qlo - offset)),
            relax.prim_value(float(out.qhi - offset)),
        )
        x = self._emit(relax.op.round(self._emit(relax.op.clip(x, *bounds))))
        x = self._emit(relax.op.astype(x, "int32"))
        if offset:
            x = self._emit(relax.op.add(x, _const(offset, "int32")))
        return relax.op.astype(x, out.dtype)

    def _fma32(self, codes, ratio: np.float32, addend):
        """float32 ``fma(float(codes), ratio, addend)`` (one rounding), as the AVX2 kernels
        compute it. Evaluated in float64, where the product of an 8- or 16-bit code and a
        float32 ratio is exact and so is its sum with a float32 of similar magnitude, then
        rounded once to float32 -- the same value on any target, FMA unit or not."""
        product = self._emit(
            relax.op.multiply(relax.op.astype(codes, "float64"), _const(ratio, "float64"))
        )
        if isinstance(addend, relax.Var):
            addend = self._emit(relax.op.astype(addend, "float64"))
        else:
            addend = _const(addend, "float64")
        return self._emit(relax.op.astype(relax.op.add(product, addend), "float32"))

    def _onnxruntime_add(self, a: QTensor, b: QTensor, out: OutParams):
        """onnxruntime's QLinearAdd on x86 (``MlasQLinearAddKernelAvx2Helper``)::

            r_a = f32(s_a / s_y)   r_b = f32(s_b / s_y)   k = z_y - fma(r_a, z_a, r_b z_b)
            y = clamp(rint(fma(q_a, r_a, fma(q_b, r_b, k))))

        on the raw codes (the zero points are in ``k``). Its ARM kernels compute in fixed
        point instead and can differ by one step: onnxruntime is not bit-identical across
        CPUs, and this reproduces the x86 one."""
        f32 = np.float32
        r_a, r_b = f32(f32(a.s) / f32(out.scale)), f32(f32(b.s) / f32(out.scale))
        # k as its compiler contracts it: z_y - fma(r_a, z_a, r_b * z_b) (measured: the plain
        # product sum misses about 1 output in 20000 that this matches).
        fused = np.float64(r_a) * a.z + np.float64(f32(r_b * f32(b.z)))  # exact in float64
        k = f32(f32(out.zero_point) - f32(fused))
        inner = self._fma32(b.expr, r_b, k)
        return self._round_to_codes(self._fma32(a.expr, r_a, inner), out)

    # -- TFLite's arithmetic ---------------------------------------------------------------
    def _tflite_multiply(self, x, ratio, axis: int | None = None):
        """TFLite's ``MultiplyByQuantizedMultiplier(x, ratio)`` on an int64 expr: a rounding
        doubling high multiply by ``M0`` (after a left shift for ratios >= 1), then a rounding
        right shift with ties away from zero (:func:`qmath.tflite_multiply`)."""
        multiplier, left, right = qmath.tflite_multiplier(ratio)
        if str(x.ty.dtype) != "int64":
            x = self._emit(relax.op.astype(x, "int64"))
        if axis is not None:
            shape = _channel_shape(len(x.ty.shape), axis)
            multiplier, left, right = (a.reshape(shape) for a in (multiplier, left, right))
        x = self._emit(relax.op.multiply(x, _const(multiplier << left, "int64")))
        x = self._emit(relax.op.add(x, _const(1 << 30, "int64")))
        high = self._emit(relax.op.right_shift(x, _const(31, "int64")))
        if not np.any(right):
            return high
        # (high + 2**(r-1) - [high < 0]) >> r: ties away from zero; r == 0 leaves high as is.
        negative = self._emit(relax.op.right_shift(high, _const(63, "int64")))
        if not np.all(right):
            negative = self._emit(relax.op.multiply(negative, _const(right > 0, "int64")))
        half = np.where(right > 0, np.left_shift(1, np.maximum(right, 1) - 1), 0)
        x = self._emit(relax.op.add(high, _const(half, "int64")))
        x = self._emit(relax.op.add(x, negative))
        return self._emit(relax.op.right_shift(x, _const(right, "int64")))

    def _tflite_softmax(self, call, out: OutParams):
        """TFLite's integer SOFTMAX over the last axis (:mod:`qcompiler.passes.softmax`)."""
        (x,) = self._inputs(call, 1)
        ndim = len(call.ty.shape)
        info = np.iinfo(out.dtype) if out.dtype in ("uint8", "int8") else None
        if int(call.attrs.axis) % ndim != ndim - 1:
            raise _NoLowering("softmax over an inner axis")
        if (
            info is None
            or x.dtype not in ("uint8", "int8")
            or not math.isclose(out.scale, 1 / 256, rel_tol=1e-6)
            or out.zero_point != info.min
            or (out.qlo, out.qhi) != (info.min, info.max)
        ):
            raise _NoLowering("an 8-bit softmax needs TFLite's output scale 1/256 and zero point")
        return softmax.lower(self._emit, x.expr, x.s, out.dtype)

    def _saturate(self, x, out: OutParams):
        """``clamp(x + z_out)`` in ``out``'s dtype."""
        if out.zero_point:
            x = self._emit(relax.op.add(x, _const(out.zero_point, "int64")))
        x = self._emit(relax.op.clip(x, relax.prim_value(out.qlo), relax.prim_value(out.qhi)))
        return relax.op.astype(x, out.dtype)

    def _tflite_add(self, a: QTensor, b: QTensor, sign: float, out: OutParams):
        """TFLite's int8/uint8 ADD/SUB: both inputs shifted left by 20 bits, each rescaled to
        half the larger input scale, summed, and rescaled to the output (three roundings)."""
        twice_max = 2.0 * max(a.s, b.s)
        terms = []
        for t, s in ((a, a.s), (b, b.s)):
            shifted = self._emit(
                relax.op.multiply(self._centered(t, "int64"), _const(1 << 20, "int64"))
            )
            terms.append(self._tflite_multiply(shifted, np.float64(s / twice_max)))
        combine = relax.op.subtract if sign < 0 else relax.op.add
        total = self._emit(combine(terms[0], terms[1]))
        output_ratio = twice_max / float(np.float32((1 << 20) * np.float32(out.scale)))
        return self._saturate(self._tflite_multiply(total, np.float64(output_ratio)), out)

    def _round_shift(self, x, shift, out: OutParams):
        shift = np.asarray(shift, dtype=np.int64)
        x = self._emit(relax.op.add(x, _const(np.left_shift(1, shift - 1), "int64")))
        x = self._emit(relax.op.right_shift(x, _const(shift, "int64")))
        return self._saturate(x, out)

    def _weight(self, arg, out_axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Zero-point-free integer weights and their per-channel scales (along ``out_axis``)."""
        w = self.q.get(arg)
        if w is None or const_value(w.expr) is None:
            raise _NoLowering("the weight is not a quantized constant")
        codes = const_value(w.expr).astype(np.int64)
        out_axis %= codes.ndim
        channels = codes.shape[out_axis]
        shape = _channel_shape(codes.ndim, out_axis)
        zero_point = (
            np.broadcast_to(w.zero_point.reshape(-1), (channels,))
            if w.zero_point.size > 1
            else np.full(channels, w.z)
        )
        scale = np.broadcast_to(w.scale.reshape(-1), (channels,)).astype(np.float64)
        if w.axis is not None and w.axis != out_axis:
            raise _NoLowering(f"weight quantized along axis {w.axis}, not the output channels")
        centered = codes - zero_point.reshape(shape)
        return centered, scale

    @staticmethod
    def _per_channel_bias(bias, channels, ndim: int, axis: int) -> np.ndarray:
        """The bias as one value per output channel, if it broadcasts along ``axis`` only."""
        if bias is None:
            return np.zeros(channels)
        shape = (1,) * (ndim - bias.ndim) + tuple(bias.shape)
        others = [d for i, d in enumerate(shape) if i != axis % ndim]
        if len(shape) != ndim or any(d != 1 for d in others) or shape[axis] not in (1, channels):
            raise _NoLowering(f"a constant of shape {bias.shape} is not a per-channel bias")
        return np.broadcast_to(bias.reshape(-1), (channels,))

    @staticmethod
    def _fit_bias(w, w_scale, bias, x_scale, axis):
        """Coarsen the weight scale of channels whose bias would overflow int32.

        Depthwise layers with batch norm folded in have channels with near-zero weights and an
        ordinary bias: ``b / (s_x * s_w)`` then passes 2**31. Such a channel's weights are
        negligible next to its bias, so its scale is raised until the bias fits (2**30, leaving
        room for the accumulation) and its codes are rounded to the new scale.
        """
        need = np.abs(bias) / (x_scale * BIAS_LIMIT)
        grow = need > w_scale
        if not grow.any():
            return w, w_scale
        new_scale = np.where(grow, need, w_scale)
        factor = (w_scale / new_scale).reshape(_channel_shape(w.ndim, axis))
        return np.rint(w * factor).astype(np.int64), new_scale

    def _bias_codes(self, b, acc_scale, zero_sum):
        """``round(b / (s_x s_w)) - z_x * sum(q_w)`` per channel, as int32."""
        codes = np.rint(b / acc_scale).astype(np.int64) - zero_sum
        if np.any(np.abs(codes) >= 2**31):
            raise _NoLowering("the folded bias does not fit int32")
        return codes.astype(np.int32)

    def _product(self, x_scale: float, w_scale: np.ndarray, weight) -> np.ndarray:
        """The accumulator's scale. TFLite multiplies a per-tensor weight scale by the input
        scale in float32 (``GetQuantizedConvolutionMultipler``), per-channel ones in double."""
        if self.tflite and weight in self.q and self.q[weight].per_tensor:
            return (np.float32(x_scale) * w_scale.astype(np.float32)).astype(np.float64)
        return x_scale * w_scale

    @staticmethod
    def _weight_dtype(centered: np.ndarray) -> str:
        return "int8" if centered.min() >= -128 and centered.max() <= 127 else "int16"

    # -- lowerings ----------------------------------------------------------------------------
    def _accumulate(self, call, bias, name: str = ""):
        """int32 accumulator (bias folded in), its per-channel scale and its channel axis.
        ``name``: the layer's tensor in the float model, kept for the integer op (the manifest's
        layer table and ``int4_weights`` use it)."""
        if op_name(call) in CONV_OPS:
            return self._conv2d(call, bias, name)
        if op_name(call) == "relax.nn.conv2d_transpose":
            return self._conv2d_transpose(call, bias)
        return self._matmul(call, bias, name)

    def _conv2d(self, call, bias, name: str = ""):
        (x,) = self._inputs(call, 1)
        attrs = call.attrs
        kernel_layout, out_layout = str(attrs.kernel_layout), str(attrs.out_layout)
        data_layout = str(attrs.data_layout)
        o_axis = kernel_layout.index("O")
        w, w_scale = self._weight(call.args[1], o_axis)
        c_axis = out_layout.index("C")
        bias = self._per_channel_bias(bias, w.shape[o_axis], len(call.ty.shape), c_axis)
        w, w_scale = self._fit_bias(w, w_scale, bias, x.s, o_axis)
        zero_sum = x.z * w.sum(axis=tuple(a for a in range(w.ndim) if a != o_axis))
        acc_scale = self._product(x.s, w_scale, call.args[1])
        data = x.expr
        padding = [int(p) for p in attrs.padding]
        if any(padding) and x.z != 0:
            # Pad with the code of 0.0 so that the zero-point fold is exact at the borders.
            top, left, bottom, right = padding
            widths = {"N": (0, 0), "C": (0, 0), "H": (top, bottom), "W": (left, right)}
            pad_width = [p for axis in data_layout for p in widths[axis]]
            data = self._emit(relax.op.nn.pad(data, pad_width, pad_value=float(x.z)))
            padding = [0, 0, 0, 0]
        acc = self.builder_.emit(
            relax.op.nn.conv2d(
                data,
                _const(w, self._weight_dtype(w)),
                strides=attrs.strides,
                padding=padding,
                dilation=attrs.dilation,
                groups=attrs.groups,
                data_layout=data_layout,
                kernel_layout=kernel_layout,
                out_layout=out_layout,
                out_dtype="int32",
            ),
            name,
        )
        self.layer_names[acc.name] = layer_name(self.func, name)
        bias_codes = self._bias_codes(bias, acc_scale, zero_sum)
        acc = self._emit(
            relax.op.add(acc, _const(bias_codes.reshape(_channel_shape(4, c_axis)), "int32"))
        )
        return acc, acc_scale, c_axis

    def _conv2d_transpose(self, call, bias):
        """int32 accumulator of a transposed conv2d (NCHW, IOHW), bias folded in.

        When the stride equals the kernel (no overlap, no padding: MediaPipe's upsampling
        head), every output pixel takes one kernel tap of one input pixel: a matmul of the
        ``(pixels, C)`` codes by the ``(C, O * kh * kw)`` weights, with the zero point folded
        into the bias as for a conv, then a depth-to-space reshape. Otherwise TVM's transposed
        conv on the centered codes ``q_x - z_x``, so that the zeros it inserts between input
        pixels and its padding are the code of 0.0."""
        (x,) = self._inputs(call, 1)
        attrs = call.attrs
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
        if layouts != ("NCHW", "IOHW", "NCHW") or int(attrs.groups) != 1:
            raise _NoLowering(f"transposed conv with layouts {layouts}, groups {attrs.groups}")
        w, w_scale = self._weight(call.args[1], 1)
        c, o, kh, kw = w.shape
        bias = self._per_channel_bias(bias, o, len(call.ty.shape), 1)
        w, w_scale = self._fit_bias(w, w_scale, bias, x.s, 1)
        info = np.iinfo(x.dtype)
        if c * kh * kw * (int(info.max) - int(info.min)) * int(np.abs(w).max()) >= 2**31:
            raise _NoLowering("the transposed conv's sums could overflow int32")
        acc_scale = self._product(x.s, w_scale, call.args[1])
        no_overlap = (
            [int(v) for v in attrs.strides] == [kh, kw]
            and not any(int(v) for v in attrs.padding)
            and not any(int(v) for v in attrs.output_padding)
            and all(int(v) == 1 for v in attrs.dilation)
        )
        if no_overlap:
            n, _, h, width = (int(d) for d in x.expr.ty.shape)
            rows = self._emit(relax.op.permute_dims(x.expr, [0, 2, 3, 1]))
            rows = self._emit(relax.op.reshape(rows, (n * h * width, c)))
            columns = w.reshape(c, o * kh * kw)
            dtype = self._weight_dtype(columns) if info.bits <= 8 else "int16"
            acc = self._emit(relax.op.matmul(rows, _const(columns, dtype), out_dtype="int32"))
            folded = self._bias_codes(
                np.repeat(bias, kh * kw), np.repeat(acc_scale, kh * kw), x.z * columns.sum(axis=0)
            )
            acc = self._emit(relax.op.add(acc, _const(folded, "int32")))
            acc = self._emit(relax.op.reshape(acc, (n, h, width, o, kh, kw)))
            acc = self._emit(relax.op.permute_dims(acc, [0, 3, 1, 4, 2, 5]))
            acc = self._emit(relax.op.reshape(acc, (n, o, h * kh, width * kw)))
            return acc, acc_scale, 1
        dtype = "int16" if info.bits <= 8 and np.abs(w).max() < 2**15 else "int32"
        acc = self._emit(
            relax.op.nn.conv2d_transpose(
                self._centered(x, dtype),
                _const(w, dtype),
                strides=attrs.strides,
                padding=attrs.padding,
                output_padding=attrs.output_padding,
                dilation=attrs.dilation,
                out_dtype="int32",
                kernel_layout="IOHW",
            )
        )
        bias_codes = self._bias_codes(bias, acc_scale, 0)
        acc = self._emit(relax.op.add(acc, _const(bias_codes.reshape(1, -1, 1, 1), "int32")))
        return acc, acc_scale, 1

    def _matmul(self, call, bias, name: str = ""):
        (x,) = self._inputs(call, 1)
        rhs = call.args[1]
        if rhs in self.q and const_value(self.q[rhs].expr) is not None:
            w, w_scale = self._weight(rhs, -1)
            if w.ndim != 2:
                raise _NoLowering("only 2-D constant matmul weights are lowered")
            bias = self._per_channel_bias(bias, w.shape[-1], len(call.ty.shape), -1)
            w, w_scale = self._fit_bias(w, w_scale, bias, x.s, 1)
            zero_sum = x.z * w.sum(axis=0)
            acc = self.builder_.emit(
                relax.op.matmul(x.expr, _const(w, self._weight_dtype(w)), out_dtype="int32"), name
            )
            self.layer_names[acc.name] = layer_name(self.func, name)
        else:
            b = self._input(rhs)
            w_scale = np.full(int(b.expr.ty.shape[-1]), b.s)
            bias = self._per_channel_bias(bias, len(w_scale), len(call.ty.shape), -1)
            zero_sum = 0
            acc = self._emit(
                relax.op.matmul(
                    self._centered(x, "int16"), self._centered(b, "int16"), out_dtype="int32"
                )
            )
            x = QTensor(x.expr, x.scale, np.zeros(1, np.int64))
        acc_scale = self._product(x.s, w_scale, rhs)
        bias_codes = self._bias_codes(bias, acc_scale, zero_sum)
        acc = self._emit(relax.op.add(acc, _const(bias_codes, "int32")))
        return acc, acc_scale, len(acc.ty.shape) - 1

    def _lookup_table(self, x: QTensor | None, func, out: OutParams, lo: float, hi: float):
        if x is None or not x.per_tensor:
            raise _NoLowering("the input of the elementwise function is not quantized per tensor")
        real, index = self._table_inputs(x, func)
        real = np.nan_to_num(
            np.clip(real, lo, hi),
            nan=0.0,
            posinf=np.finfo(np.float32).max,
            neginf=np.finfo(np.float32).min,
        )
        table = np.clip(np.rint(real / out.scale) + out.zero_point, out.qlo, out.qhi)
        return relax.op.take(_const(table, out.dtype), index, axis=0, mode="clip")

    def _bilinear(self, call, out: OutParams):
        """Bilinear resizing on the codes: along H, then W, each output is
        ``w_lo * x[lo] + w_hi * x[hi]`` with integer weights summing to ``2**bits`` (gathers and
        integer multiply-adds of the centered codes), then a requantize. The source coordinates
        and edge clamping are TVM's (``topi.image.resize2d``)."""
        attrs = call.attrs
        if str(attrs.method) != "linear":
            raise _NoLowering(f"no integer lowering for {attrs.method} resizing")
        mode = str(attrs.coordinate_transformation_mode)
        if mode not in _SOURCE_COORDINATE:
            raise _NoLowering(f"no integer lowering for {mode} coordinates")
        (x,) = self._inputs(call, 1)
        layout = str(attrs.layout)
        try:
            sizes = [int(d) for d in x.expr.ty.shape], [int(d) for d in call.ty.shape]
        except TypeError:
            raise _NoLowering("resizing with a dynamic shape") from None
        # 8-bit codes: |q - z| * 4**LERP_BITS stays within int32, and one requantize rounds.
        # 16-bit codes: 16-bit taps in int64, rounded back to input codes before the requantize
        # (whose 31-bit multiplier would overflow int64 on the wider sum).
        wide = np.iinfo(x.dtype).bits > 8
        bits, dtype = (16, "int64") if wide else (LERP_BITS, "int32")
        acc = self._centered(x, dtype)
        for axis in (layout.index("H"), layout.index("W")):
            lo, hi, w_lo, w_hi = _lerp_taps(sizes[0][axis], sizes[1][axis], mode, bits)
            shape = _channel_shape(len(sizes[0]), axis)
            pair = []
            for index, weight in ((lo, w_lo), (hi, w_hi)):
                tap = relax.op.take(acc, _const(index, "int32"), axis=axis, mode="clip")
                tap = self._emit(tap)
                weight = _const(weight.reshape(shape), dtype)
                pair.append(self._emit(relax.op.multiply(tap, weight)))
            acc = self._emit(relax.op.add(*pair))
        ratio = x.s / out.scale
        if wide:
            half = self._emit(relax.op.add(acc, _const(1 << (2 * bits - 1), dtype)))
            acc = self._emit(relax.op.right_shift(half, _const(2 * bits, dtype)))
        else:
            ratio /= 4.0**bits
        return self._requantize(acc, np.float64(ratio), out)

    def _mean(self, call, out: OutParams):
        (x,) = self._inputs(call, 1)
        shape = [int(d) for d in x.expr.ty.shape]
        attrs = call.attrs
        if op_name(call) == "relax.nn.avg_pool2d":
            layout = str(attrs.layout)
            axes = [layout.index("H"), layout.index("W")]
            window = [shape[a] for a in axes]
            if (
                [int(p) for p in attrs.pool_size] != window
                or any(int(p) for p in attrs.padding)
                or str(attrs.out_layout) != layout
            ):
                raise _NoLowering("only global average pooling is lowered to integers")
            keepdims = True
        else:
            axes = list(range(len(shape))) if attrs.axis is None else [int(a) for a in attrs.axis]
            keepdims = bool(attrs.keepdims)
        count = int(np.prod([shape[a] for a in axes]))
        total = self._emit(relax.op.sum(relax.op.astype(x.expr, "int32"), axes, keepdims))
        same_params = x.z == out.zero_point and math.isclose(x.s, out.scale, rel_tol=1e-6)
        if self.tflite and same_params and op_name(call) == "relax.nn.avg_pool2d":
            # TFLite's AveragePool: the sum of the raw codes divided by the count, ties away
            # from zero.
            total = self._emit(relax.op.astype(total, "int64"))
            half, n = _const(count // 2, "int64"), _const(count, "int64")
            up = self._emit(relax.op.floor_divide(relax.op.add(total, half), n))
            down = relax.op.floor_divide(relax.op.subtract(half, total), n)
            down = self._emit(relax.op.negative(self._emit(down)))
            positive = self._emit(relax.op.greater_equal(total, _const(0, "int64")))
            codes = self._emit(relax.op.where(positive, up, down))  # already output codes
            return self._saturate(codes, dataclasses.replace(out, zero_point=0))
        if self.ort:  # QLinearGlobalAveragePool: f32(s_x / f32(s_y * f32(count)))
            f32 = np.float32
            centered = self._emit(relax.op.add(total, _const(-count * x.z, "int32")))
            scale = f32(f32(x.s) / f32(f32(out.scale) * f32(count)))
            return self._float32_requantize(centered, scale, out)
        centered = self._emit(
            relax.op.add(relax.op.astype(total, "int64"), _const(-count * x.z, "int64"))
        )
        return self._requantize(centered, np.float64(x.s / (count * out.scale)), out)


ROUNDINGS = ("half_up", "tflite", "onnxruntime")


def integerize(mod: tvm.IRModule, rounding: str = "half_up") -> tvm.IRModule:
    """Lower every quantize/dequantize chain of ``mod["main"]`` to integer ops (see above).

    ``rounding``: ``"half_up"`` (qcompiler's own: one rounding, see :mod:`qmath`) or
    ``"tflite"`` (TFLite's integer kernels, for models quantized by TFLite: the doubling high
    multiply and rounding shift of each requantization, float32 products of input and weight
    scales, and its ADD/SUB and average-pool arithmetic), so that an imported model computes
    what LiteRT computes, or ``"onnxruntime"`` (for ONNX QDQ models: onnxruntime's x86 MLAS
    kernels, which requantize in float32 -- int32 to float32, times a float32 scale, rounded
    half to even -- and add with float32 FMAs).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    func = mod["main"]
    lowering = _Integerizer(mod, func, rounding)
    new_func = lowering.visit_expr(func)
    if lowering.fallbacks:
        listed = "; ".join(f"{op} -> {name} ({why})" for name, op, why in lowering.fallbacks)
        warnings.warn(f"{len(lowering.fallbacks)} op(s) stay float: {listed}", stacklevel=2)
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = new_func
    out = relax.transform.DeadCodeElimination(["main"])(out)
    tail = _float_compute_after_integers(out["main"])
    if tail:
        listed = "; ".join(f"{op} -> {name}" for name, op in tail)
        warnings.warn(f"{len(tail)} op(s) run in float after the integers: {listed}", stacklevel=2)
    fallbacks = lowering.fallback_vars + [name for name, _ in tail]
    out["main"] = out["main"].with_attr(FALLBACK_ATTR, fallbacks)
    if lowering.layer_names:
        out["main"] = out["main"].with_attr(LAYER_NAMES_ATTR, lowering.layer_names)
    return out


# Float ops after the integers end that are not float compute: the exit's dequantize and
# accumulator scaling, float tables looked up by code, data movement.
_EXIT_OPS = EXIT_MOVES | {"relax.dequantize", "relax.quantize", "relax.astype", "relax.take"}


def _is_int(var) -> bool:
    return str(getattr(var.ty, "dtype", "")).startswith(("int", "uint"))


def _float_compute_after_integers(func: relax.Function) -> list[tuple[str, str]]:
    """``(var, op)`` of float ops computed from integers that never return to them, doing more
    than move values or apply an elementwise function (a transposed conv with no integer
    lowering, say): outside any integer region, so the verifier allows them, but float all
    the same, so they are counted and reported with the fallbacks."""
    flow = Dataflow.of(func)
    to_int = flow.reaches_integers()
    from_int, found = set(), []
    for var in flow.producer:
        value = flow.producer[var]
        name = op_name(value)
        inputs = relax.analysis.free_vars(value)
        if name != "relax.dequantize" and not any(v in from_int or _is_int(v) for v in inputs):
            continue
        from_int.add(var)
        if (
            var not in to_int
            and name is not None
            and name not in _EXIT_OPS
            and not moves_codes(value)
            and not constant_operands_only(value)
            and str(getattr(var.ty, "dtype", "")).startswith("float")
        ):
            found.append((var.name, name))
    return found

"""Annotate: write the quantization decisions into the IR as quantize/dequantize pairs.

After this pass the float function computes exactly what the integer one will (up to the
rounding inside the integer ops): every quantization point ``v`` is followed by
``dequantize(quantize(v, s, z), s, z)``, every weight of conv2d/matmul becomes
``dequantize(W_q, s_w, z_w, axis=out_channel)`` over an integer constant, and constant operands of
other integer ops (not biases, not scalars) are quantized per tensor. This is the same
"QDQ" form an ONNX QDQ model imports to, so :mod:`integerize` serves both.

Activation ranges come from the calibration observers and the configured method; weight ranges
from the weights themselves (``r = s * (q - z)``, per output channel when the spec says so).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qcompiler.passes import qmath, rounding
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import (
    CONV_OPS,
    LAYER_NAMES_ATTR,
    LAYER_OPS,
    MATMUL_OPS,
    TRANSPOSED_CONV_OPS,
    QuantPlan,
    biased_layers,
    bindings,
    const_value,
    is_head,
    is_scalar_const,
    op_name,
)
from qcompiler.passes.observers import weight_range
from qcompiler.passes.scheme import QuantConfig, QuantSpec


def activation_qparams(observer, config: QuantConfig) -> tuple[float, int]:
    """Scale and zero point of one activation from its calibration statistics."""
    spec = config.activation_spec(observer.name)
    method = config.range_method(observer.name)
    lo, hi = observer.range(method, spec, percentile=config.calibration.percentile)
    scale, zero_point = qmath.qparams_from_range(lo, hi, spec)
    return float(scale), int(zero_point)


def weight_axis(call) -> int:
    """The output-channel axis of the weight (second operand) of a (transposed) conv2d or
    matmul."""
    if op_name(call) in CONV_OPS | TRANSPOSED_CONV_OPS:
        return str(call.attrs.kernel_layout).index("O")
    return -1


def quantize_constant(value: np.ndarray, spec: QuantSpec, axis: int | None):
    """Integer codes, scales and zero points of a constant tensor."""
    per_channel = spec.per_channel and axis is not None and value.ndim > 0
    axis = axis % value.ndim if per_channel else None
    lo, hi = weight_range(value, axis)
    scale, zero_point = qmath.qparams_from_range(lo, hi, spec)
    if spec.bits <= 4 and spec.symmetric and axis is not None:
        scale = _least_error_scale(value, axis, scale, spec)
    codes = qmath.quantize(value, scale, zero_point, spec, axis=axis)
    return codes.astype(spec.dtype), scale, zero_point, axis


CLIP_FACTORS = np.linspace(0.5, 1.0, 26)


def _least_error_scale(value: np.ndarray, axis: int, scale: np.ndarray, spec) -> np.ndarray:
    """Per channel, the scale among ``max|w| / qmax * f`` (``f`` in [0.5, 1]) with the least
    squared rounding error. With 15 levels, clipping a channel's few largest weights pays for
    the finer step everywhere else; at 8 bits it does not, and the max-abs scale stays."""
    w = np.moveaxis(np.asarray(value, dtype=np.float64), axis, 0).reshape(value.shape[axis], -1)
    base = np.asarray(scale, dtype=np.float64).reshape(-1, 1)
    best, best_error = base[:, 0].copy(), np.full(w.shape[0], np.inf)
    for factor in CLIP_FACTORS:
        s = base * factor
        error = ((np.clip(np.rint(w / s), spec.qmin, spec.qmax) * s - w) ** 2).sum(axis=1)
        better = error < best_error
        best[better], best_error[better] = s[better, 0], error[better]
    return best.astype(np.float32)


def qdq(bb: relax.BlockBuilder, value, scale, zero_point, dtype: str, axis: int = -1, emit=None):
    """Emit ``dequantize(quantize(value))`` with constant parameters; return the result."""
    emit = emit or bb.emit
    s = relax.const(np.asarray(scale, dtype="float32"), "float32")
    z = relax.const(np.asarray(zero_point), "int32")
    q = bb.emit(relax.op.quantize(value, s, z, axis=axis, out_dtype=dtype))
    return emit(relax.op.dequantize(q, s, z, axis=axis, out_dtype="float32"))


def dequantized_constant(codes, scale, zero_point, axis) -> relax.Expr:
    """``dequantize(codes)`` over an integer constant (per-channel along ``axis``)."""
    per_channel = axis is not None
    return relax.op.dequantize(
        relax.const(codes, str(codes.dtype)),
        relax.const(np.asarray(scale, dtype="float32"), "float32"),
        relax.const(np.asarray(zero_point), "int32"),
        axis=axis if per_channel else -1,
        out_dtype="float32",
    )


def refine_weights(
    stats, name: str, spec: QuantSpec, weight, codes, scale, config: QuantConfig, biased: bool
):
    """Optimized rounding and/or the bias shift of the conv/matmul layer called ``name``
    (symmetric ``codes`` and ``scale`` of ``weight`` in ``spec``; ``stats`` its input statistics, a
    :class:`~qcompiler.passes.rounding.LayerStats`): ``(codes, shift)``, the shift per output
    channel to subtract from the bias that follows (``biased``), or None. Where the shift is
    removed, the codes are rounded against the inputs' covariance (see :mod:`rounding`)."""
    if stats.count == 0:
        return codes, None
    call = stats.call
    centred = biased and config.corrects_bias(spec.bits, name)
    if config.optimized_rounding(spec.bits, name):
        codes = rounding.optimized_codes(
            call, weight, codes, scale, spec.qmin, spec.qmax, stats, centred
        )
    if not centred:
        return codes, None
    w, s, q = rounding.grouped(call, weight, codes, scale)
    return codes, rounding.bias_shift(w, q, s, stats.mean).reshape(-1)


# Function attribute: the conv/matmul layers whose weights are 4-bit codes (stored packed).
INT4_ATTR = "qc.int4_weights"


@mutator
class _Annotator(PyExprMutator):
    def __init__(self, mod, plan: QuantPlan, qparams: dict, config: QuantConfig, layers: dict):
        super().__init__(mod)
        self.layers = layers
        self.shifts = {}  # conv/matmul var -> mean output error of its rounded weights
        self.biased = biased_layers(mod["main"], plan)
        self.plan = plan
        self.points = set(plan.points)
        self.qparams = qparams
        self.config = config
        self.params = set(mod["main"].params)
        self.params_done = False
        self.int4: list[str] = []  # layers whose weights got 4 bits
        self.float_layers: list[str] = []  # layers whose weights stayed float
        self.names: dict[str, str] = {}  # conv/matmul var here -> its name in the float model

    def visit_var_binding_(self, binding):
        if not self.params_done:
            self.params_done = True
            for param in self.plan.points:
                if param in self.params:
                    self._insert_qdq(param, self.builder_.emit)
        value = binding.value
        if binding.var in self.plan.biases:
            value = self._corrected_bias(value)
        elif isinstance(value, relax.Call) and is_head(value):
            value = self._quantize_constant_operands(value, binding.var)
        new_value = self.visit_expr(value)
        var = binding.var
        emit = (
            self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
        )
        if var in self.points:
            new_var = self.builder_.emit(new_value, var.name)
            self.set_var_remap(var, new_var)
            self._insert_qdq(var, emit, new_var)
        else:
            new_var = emit(new_value, var.name)
            self.set_var_remap(var, new_var)
        if op_name(binding.value) in LAYER_OPS:
            self.names[new_var.name] = var.name

    def _insert_qdq(self, var, emit, value=None):
        scale, zero_point = self.qparams[var]
        dtype = self.config.activation_spec(var.name).dtype
        out = qdq(
            self.builder_,
            value if value is not None else var,
            scale,
            zero_point,
            dtype,
            emit=lambda e: emit(e, var.name + "_dq"),
        )
        self.set_var_remap(var, out)

    def _quantize_constant_operands(self, call, var):
        name = op_name(call)
        args = list(call.args)
        scheme = self.config.scheme
        if name in LAYER_OPS:
            weight = const_value(args[1])
            if weight is not None and var.name in self.config.float_layers:
                self.float_layers.append(var.name)  # float weights: integerize falls back
            elif weight is not None:
                # 4-bit weights are chosen for conv2d/matmul layers only
                spec = (
                    scheme.weight
                    if name in TRANSPOSED_CONV_OPS
                    else self.config.weight_spec(var.name)
                )
                codes, scale, zp, axis = quantize_constant(weight, spec, weight_axis(call))
                if spec.bits == 4:
                    self.int4.append(var.name)
                if var in self.layers and scheme.weight.symmetric:
                    codes = self._refine_weights(var, weight, codes, scale)
                args[1] = self.builder_.emit(dequantized_constant(codes, scale, zp, axis), "w_dq")
        elif name != "relax.concat":
            for i, arg in enumerate(args):
                value = const_value(arg)
                if value is not None and not is_scalar_const(arg):
                    codes, scale, zp, _ = quantize_constant(value, scheme.activation, None)
                    args[i] = self.builder_.emit(dequantized_constant(codes, scale, zp, None))
        return relax.Call(call.op, args, call.attrs, call.ty_args)

    def _refine_weights(self, var, weight, codes, scale):
        spec = self.config.weight_spec(var.name)
        codes, shift = refine_weights(
            self.layers[var], var.name, spec, weight, codes, scale, self.config, var in self.biased
        )
        if shift is not None:
            self.shifts[var] = shift
        return codes

    def _corrected_bias(self, call):
        """The bias add after a conv/matmul, less the mean error of its rounded weights."""
        shift = self.shifts.get(call.args[0])
        bias = const_value(call.args[1])
        if shift is None or bias is None or bias.size != shift.size:
            return call
        sign = 1.0 if op_name(call) == "relax.add" else -1.0
        fixed = (bias.astype(np.float64) - sign * shift.reshape(bias.shape)).astype(bias.dtype)
        return relax.Call(call.op, [call.args[0], relax.const(fixed)], call.attrs, call.ty_args)


def annotate(
    mod: tvm.IRModule,
    plan: QuantPlan,
    observers: dict,
    config: QuantConfig,
    layers: dict | None = None,
):
    """Insert the quantize/dequantize pairs of ``plan`` into ``mod["main"]``."""
    wide = config.int16_activations
    unknown = sorted(set(wide) - {p.name for p in plan.points}) if isinstance(wide, tuple) else []
    if unknown:
        raise QCompilerError(
            f"int16_activations names {unknown}, which are not activation tensors of the model "
            f"(those are {[p.name for p in plan.points][:8]} ...)"
        )
    qparams = {p: activation_qparams(observers[p], config) for p in plan.points}
    layers = (layers or {}) if config.needs_layer_inputs else {}
    annotator = _Annotator(mod, plan, qparams, config, layers)
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = annotator.visit_expr(mod["main"])
    found = [b.var.name for b in bindings(mod["main"]) if op_name(b.value) in CONV_OPS | MATMUL_OPS]
    missing = sorted(set(config.int4_weights) - set(annotator.int4))
    missing += sorted(set(config.float_layers) - set(annotator.float_layers))
    missing += sorted(set(config.nearest_weights) - set(found))
    if missing:
        raise QCompilerError(
            f"int4_weights/float_layers/nearest_weights name {missing}, which are not "
            f"conv/matmul layers with constant weights (those are {found[:8]} ...)"
        )
    if annotator.names:
        out["main"] = out["main"].with_attr(LAYER_NAMES_ATTR, annotator.names)
    if annotator.int4:
        out["main"] = out["main"].with_attr(INT4_ATTR, annotator.int4)
    return out

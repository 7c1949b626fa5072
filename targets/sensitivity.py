"""Which activations need 16 bits: measured on the model's outputs, not guessed per tensor.

A tensor's own 8-bit SQNR says little about what its rounding does to the answer: in MediaPipe's
selfie segmentation the first layers' activations, each fine on its own, decide the mask, while
YOLOX's box coordinates shrug off noise its scores cannot. So this module compiles the model once
with every activation fake-quantized behind a switch,

    p' = p + switch[k] * (dequantize(quantize(p)) - p)

(weights quantized as they will be), and measures on calibration samples the output error
when activation ``k`` alone is rounded to 8 bits (its *sensitivity*), or any set of them
(:meth:`SensitivityProbe.run`).

Activations kept out (``switch = 0``) stand for int16 ones: 16-bit rounding is ~48 dB below
8-bit, well under what is measured here. :func:`choose_activations` uses it to pick the int16
activations of the default build (``int16_activations="auto"``). Its rule, measured in output
PSNR (:func:`output_psnr`) on :data:`~qcompiler.passes.pipeline.PROBE_SAMPLES` samples:

- nothing needs 16 bits when the all-8-bit outputs are within :data:`TOLERANCE_DB` of the
  weights-only ones, or at least :data:`GOOD_DB` (two runs of the probe: EfficientNet-Lite0
  and ResNet-8 stop here);
- otherwise every activation is rounded alone, and those that alone cost at least
  :data:`ALONE_LOSS_DB` go to 16 bits, most costly first, at most :data:`MOST_SHARE` of them;
- if the share was cut by its cap (more tensors cost :data:`ALONE_LOSS_DB` alone than it
  holds) and the 8-bit activations left still add more output noise than the weights alone
  (PSNR more than :data:`WIDEN_DB` under the weights-only one), no share is enough: every
  activation gets 16 bits (W8A16), and the weights, now the larger error, are rounded against
  their inputs' statistics on the kept samples (``weight_rounding="auto"``,
  :mod:`~qcompiler.passes.rounding`). MediaPipe's selfie segmentation goes there (14-17
  costly tensors for a cap of 11, and 5-9 dB left, on four calibration subsets); YOLOX-Nano's
  5-8 costly tensors fit its cap of 23, so its share stays, although it leaves 2.7-4.7 dB
  (the gap alone widened YOLOX on two subsets of three, to 16.1 ms against 9.7);
- with ``CalibConfig(method="auto")``, each 8-bit tensor that alone costs at least
  :data:`RANGE_LOSS_DB` is rounded alone once more with the range of every other method
  (percentile, KL, MSE from its calibration histogram), and keeps the one that costs the
  outputs least: the range is chosen per tensor by the error it causes downstream. Not the
  default: on YOLOX, chosen on the two probe samples, the ranges took the default's mAP on
  other images from 0.999 to 0.955 (clipping that pays on two images costs on others).

Greedy rules that add tensors until the all-8-bit PSNR reaches a target did not work: on YOLOX
that PSNR moves by several dB, up or down, with any one tensor's rounding, while each tensor's
cost alone ranks the same on other samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qcompiler.passes import qmath
from qcompiler.passes.annotate import (
    activation_qparams,
    annotate,
    quantize_constant,
    refine_weights,
    weight_axis,
)
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import (
    CONV_OPS,
    MATMUL_OPS,
    biased_layers,
    bindings,
    const_value,
    op_name,
)
from qcompiler.passes.pipeline import ActivationChoice, choice_key
from qcompiler.passes.scheme import AUTO_METHOD, CALIBRATION_METHODS, QuantConfig
from qcompiler.targets.build import build as build_executable


def _columns(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]):
    """Per output: ``(reference, candidate)`` as float64 ``[values, columns]``, one list of
    output arrays per sample stacked. An output whose last axis holds columns of different
    meaning (a detector's box coordinates beside its scores: ``[..., rows, columns]`` with at
    least 64 rows) keeps them apart; any other output is one column."""
    for out in range(len(reference[0])):
        ref = np.stack([np.asarray(r[out], dtype=np.float64) for r in reference])
        got = np.stack([np.asarray(c[out], dtype=np.float64) for c in candidate])
        columns = ref.ndim >= 3 and ref.shape[-1] > 1 and ref[..., 0].size >= 64
        ref = ref.reshape(-1, ref.shape[-1]) if columns else ref.reshape(-1, 1)
        yield ref, got.reshape(ref.shape)


def output_sqnr(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """SQNR in dB of ``candidate`` against ``reference`` (one list of output arrays per
    sample), with each output column (last axis) measured against its own peak: a detector's
    box coordinates (hundreds) and scores (0 to 1) share one output tensor, and an error of 0.1
    is nothing in the first and much in the second. Outputs without such columns are taken
    whole, against their peak."""
    noise = output_noise(reference, candidate)
    return float("inf") if noise == 0 else float(-10.0 * np.log10(noise))


def output_noise(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """The noise power of ``candidate`` relative to the signal's, as :func:`output_sqnr`
    measures them (``10**(-SQNR/10)``)."""
    noise = signal = 0.0
    for ref, got in _columns(reference, candidate):
        peak = np.maximum(np.abs(ref).max(axis=0), 1e-20) ** 2
        noise += float((((ref - got) ** 2).mean(axis=0) / peak).sum())
        signal += float(((ref**2).mean(axis=0) / peak).sum())
    return noise / max(signal, 1e-30)


def output_psnr(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Peak SNR in dB of ``candidate`` against ``reference``: each output column's mean squared
    error relative to the column's squared peak, averaged over the columns of every output.

    Unlike :func:`output_sqnr` the error is not divided by the column's mean power, so a
    column that is nearly all zeros (the score of a class no sample shows, a background mask)
    does not outweigh the rest: on YOLOX that made the SQNR of the whole output swing by
    several dB with any one tensor's rounding."""
    noise = [
        ((ref - got) ** 2).mean(axis=0) / np.maximum(np.abs(ref).max(axis=0), 1e-20) ** 2
        for ref, got in _columns(reference, candidate)
    ]
    mean = float(np.concatenate(noise).mean())
    return float("inf") if mean == 0 else float(-10.0 * np.log10(mean))


@mutator
class _Switches(PyExprMutator):
    """Puts every activation's rounding behind ``switch[k]``, with its scale and zero point
    read from ``scale[k]`` and ``zero[k]``: any range can be tried without a new build."""

    def __init__(self, mod, names: list[str], params: list[relax.Var]):
        super().__init__(mod)
        self.index = {f"{n}_dq": k for k, n in enumerate(names)}
        self.switch, self.scale, self.zero = params
        self.quantized = {}

    def _take(self, vector, k):
        return self.builder_.emit(relax.op.take(vector, relax.const(k, "int64"), axis=0))

    def visit_var_binding_(self, binding):
        var, value = binding.var, binding.value
        if op_name(value) == "relax.quantize":
            self.quantized[var] = value
        k = self.index.get(var.name)
        if k is None or op_name(value) != "relax.dequantize" or value.args[0] not in self.quantized:
            return super().visit_var_binding_(binding)
        quantize = self.quantized[value.args[0]]
        info = np.iinfo(str(quantize.attrs.out_dtype))
        exact = self.visit_expr(quantize.args[0])
        scale, zero = self._take(self.scale, k), self._take(self.zero, k)
        codes = relax.op.add(relax.op.round(relax.op.divide(exact, scale)), zero)
        codes = relax.op.minimum(relax.op.maximum(codes, relax.const(float(info.min))),
                                 relax.const(float(info.max)))  # fmt: skip
        rounded = self.builder_.emit(relax.op.multiply(relax.op.subtract(codes, zero), scale))
        noise = self.builder_.emit(relax.op.subtract(rounded, exact))
        mixed = relax.op.add(exact, relax.op.multiply(self._take(self.switch, k), noise))
        emit = (
            self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
        )
        self.set_var_remap(var, emit(mixed, var.name))


SWITCHES = ("qc_switch", "qc_scale", "qc_zero")


def switchable(annotated: tvm.IRModule, names: list[str]) -> tvm.IRModule:
    """``annotated`` (quantize/dequantize pairs) with three extra last inputs, one float per
    name in ``names`` each (:data:`SWITCHES`): 1 to round that activation (0 leaves it exact),
    and the scale and zero point to round it with."""
    func = annotated["main"]
    params = [relax.Var(n, relax.TensorType((len(names),), "float32")) for n in SWITCHES]
    body = _Switches(annotated, names, params).visit_expr(func).body
    out = tvm.IRModule(dict(annotated.functions), attrs=annotated.attrs)
    out["main"] = relax.Function([*func.params, *params], body, func.ret_ty, attrs=func.attrs)
    return out


@dataclasses.dataclass
class Sensitivity:
    """Output SQNR (dB, against the float model) with each activation alone at 8 bits."""

    names: list[str]
    alone_db: dict[str, float]
    all_db: float  # every activation at 8 bits
    weights_db: float  # weights quantized, activations exact

    def ranked(self) -> list[str]:
        """Most sensitive first."""
        return sorted(self.names, key=lambda n: self.alone_db[n])


class SensitivityProbe:
    """One compiled fake-quantized model, run with any set of activations rounded
    (``reference``: the float model's outputs on ``samples``, if known already)."""

    def __init__(
        self,
        calibration,
        config: QuantConfig,
        samples: list[dict],
        target,
        metric=output_sqnr,
        reference: list | None = None,
    ):
        if not samples:
            raise QCompilerError("sensitivity needs at least one calibration sample")
        self.metric = metric
        config = dataclasses.replace(config, int16_activations=())
        self.names = [p.name for p in calibration.plan.points]
        annotated = annotate(
            calibration.mod, calibration.plan, calibration.observers, config, calibration.layers
        )
        self._probe = self._vm(switchable(annotated, self.names), target)
        self.params = {
            p.name: activation_qparams(o, config) for p, o in calibration.observers.items()
        }
        self._inputs = SensitivityProbe._tensors(calibration.mod["main"], samples)
        if reference is None:
            run = self._vm(calibration.mod, target)
            reference = [self._outputs(run(*args)) for args in self._inputs]
        self.reference = reference

    @staticmethod
    def _tensors(func, samples) -> list[list]:
        """Each sample's inputs in ``func``'s parameter order, as TVM tensors."""
        names = [p.name for p in func.params]
        return [[tvm.runtime.tensor(np.ascontiguousarray(s[n])) for n in names] for s in samples]

    @staticmethod
    def _vm(mod, target):
        vm = relax.VirtualMachine(build_executable(mod, target, None), tvm.cpu())
        return vm["main"]

    @staticmethod
    def _outputs(result) -> list[np.ndarray]:
        items = [result] if hasattr(result, "numpy") else list(result)
        return [r.numpy() for r in items]

    def run(self, eight_bit: set[str], params: dict | None = None) -> float:
        """Output SQNR (dB; or the probe's ``metric``) with the activations named in
        ``eight_bit`` rounded to 8 bits, with the config's scales and zero points or those in
        ``params`` (``{name: (scale, zero point)}``)."""
        params = {**self.params, **(params or {})}
        vectors = [
            [n in eight_bit for n in self.names],
            [params[n][0] for n in self.names],
            [params[n][1] for n in self.names],
        ]
        flags = [tvm.runtime.tensor(np.array(v, dtype="float32")) for v in vectors]
        got = [self._outputs(self._probe(*args, *flags)) for args in self._inputs]
        return self.metric(self.reference, got)

    def measure(self) -> Sensitivity:
        alone = {n: self.run({n}) for n in self.names}
        return Sensitivity(self.names, alone, self.run(set(self.names)), self.run(set()))


GOOD_DB = 30.0  # all-8-bit output PSNR that needs nothing more
TOLERANCE_DB = 1.0  # all-8-bit loss against weights-only that needs nothing more
ALONE_LOSS_DB = 1.0  # a tensor that alone costs this much gets 16 bits
MOST_SHARE = 0.1  # at most this share of the activations
RANGE_LOSS_DB = 0.25  # an 8-bit tensor that alone costs this much gets its least costly range
# Output noise the 8-bit activations left by the share may add, relative to the weights' alone,
# before every activation is widened: 3 dB is as much noise again as the weights'.
WIDEN_DB = 3.0


def choose_activations(calibration, config: QuantConfig, target) -> ActivationChoice:
    """The activations of ``calibration`` that get 16 bits under ``config`` (its own
    ``int16_activations`` and 4-bit weights ignored, see
    :func:`~qcompiler.passes.pipeline.choice_key`): the rule in this module's docstring, measured
    on the calibration's kept samples with one compiled probe."""
    config = choice_key(config)
    probe = SensitivityProbe(
        calibration, config, calibration.samples, target, output_psnr, calibration.float_outputs
    )
    everything = set(probe.names)
    weights_db, all_db = probe.run(set()), probe.run(everything)
    if all_db >= GOOD_DB or weights_db - all_db <= TOLERANCE_DB:
        return ActivationChoice((), weights_db, all_db, all_db, {})
    alone = {n: probe.run({n}) for n in probe.names}
    costly = [n for n in sorted(alone, key=alone.get) if weights_db - alone[n] >= ALONE_LOSS_DB]
    cap = max(1, int(MOST_SHARE * len(probe.names)))
    chosen = tuple(costly[:cap])
    methods = {}
    if config.calibration.method == AUTO_METHOD:
        feel = [n for n in alone if n not in chosen and weights_db - alone[n] >= RANGE_LOSS_DB]
        methods = {n: _least_costly_range(probe, calibration, config, n, alone[n]) for n in feel}
        methods = {n: m for n, m in methods.items() if m != config.range_method(n)}
    ranges = {n: _qparams(calibration, config, n, m) for n, m in methods.items()}
    chosen_db = probe.run(everything - set(chosen), ranges)
    if len(costly) > cap and weights_db - chosen_db > WIDEN_DB:
        return ActivationChoice(
            tuple(probe.names), weights_db, all_db, weights_db, alone, {}, True, chosen, chosen_db
        )
    return ActivationChoice(chosen, weights_db, all_db, chosen_db, alone, methods)


def _qparams(calibration, config: QuantConfig, name: str, method: str) -> tuple[float, int]:
    observer = next(o for p, o in calibration.observers.items() if p.name == name)
    return activation_qparams(
        observer, dataclasses.replace(config, tensor_methods=((name, method),))
    )


def _least_costly_range(probe, calibration, config, name: str, own_db: float) -> str:
    """The range method whose 8-bit rounding of ``name`` alone costs the outputs least."""
    best, best_db = config.range_method(name), own_db
    for method in CALIBRATION_METHODS:
        if method != best:
            db = probe.run({name}, {name: _qparams(calibration, config, name, method)})
            if db > best_db:
                best, best_db = method, db
    return best


# -- weights ------------------------------------------------------------------------------------
@mutator
class _LayerWeights(PyExprMutator):
    """Replaces the constant weights of chosen conv/matmul layers (``{binding var: k}``) by
    the expression ``weight(k, var, call)`` emits, and with ``bias``, the constant of their
    bias adds (``biases``: ``{bias add var: layer var}``) by what ``bias(k, call)`` emits."""

    def __init__(self, mod, layers, weight, bias=None, biases=None):
        super().__init__(mod)
        self.index = {var: k for k, var in enumerate(layers)}  # by var: names may repeat
        self.weight = weight
        self.bias = bias
        self.biases = biases or {}

    def visit_var_binding_(self, binding):
        k = self.index.get(binding.var)
        layer = self.biases.get(binding.var)
        if k is None and layer is None:
            return super().visit_var_binding_(binding)
        call = self.visit_expr(binding.value)
        if k is not None:
            operands = [call.args[0], self.weight(self.builder_, k, binding.var, call)]
        else:
            operands = [call.args[0], self.bias(self.builder_, self.index[layer], call)]
        new = relax.Call(call.op, [*operands, *call.args[2:]], call.attrs, call.ty_args)
        var = binding.var
        emit = (
            self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
        )
        self.set_var_remap(var, emit(new, var.name))


def _dequantized_weights(call, name: str, spec, config: QuantConfig, stats, biased: bool):
    """The weights of ``call`` (the layer called ``name``) rounded to ``spec`` as ``config``
    (resolved) rounds them, as :mod:`qcompiler.passes.annotate` does (against the layer's input
    statistics ``stats`` where it optimizes that bit-width and layer, else to nearest), and
    the shift per output channel their bias (``biased``) then loses, or zeros."""
    weight = const_value(call.args[1])
    codes, scale, zero_point, axis = quantize_constant(weight, spec, weight_axis(call))
    shift = None
    if stats is not None and spec.symmetric:
        codes, shift = refine_weights(stats, name, spec, weight, codes, scale, config, biased)
    dequantized = qmath.dequantize(codes, scale, zero_point, axis).astype(np.float32)
    return dequantized, np.zeros(scale.size) if shift is None else shift


def _rounded_weights(func, config: QuantConfig, layers, biased) -> dict:
    """``{binding var: ((8-bit, 4-bit, float weights), (8-bit, 4-bit, float bias shifts))}``
    of every conv/matmul layer of ``func`` with constant weights, rounded as
    :func:`_dequantized_weights` does (the shifts of layers not in ``biased`` are zeros)."""
    eight = config.scheme.weight
    four = dataclasses.replace(eight, bits=4, narrow_range=True)
    weights = {}
    for binding in bindings(func):
        call = binding.value
        if op_name(call) in CONV_OPS | MATMUL_OPS and const_value(call.args[1]) is not None:
            stats = (layers or {}).get(binding.var)
            name, exact = binding.var.name, const_value(call.args[1]).astype(np.float32)
            rounded = [
                _dequantized_weights(call, name, spec, config, stats, binding.var in biased)
                for spec in (eight, four)
            ]
            (w8, s8), (w4, s4) = rounded
            weights[binding.var] = ((w8, w4, exact), (s8, s4, np.zeros_like(s8)))
    return weights


class WeightProbe:
    """The float model with each conv/matmul layer's weights switchable between their 8-bit and
    4-bit roundings and their float values (activations exact), compiled once: the output SQNR
    with any set of layers at 4 bits or float, measured on ``samples`` -- what 4-bit weights in
    a layer do to the answer, and what keeping its weights float saves.

    With ``layers`` (input statistics per layer, as :meth:`Calibration.quantize` rounds with),
    the roundings that ``config`` (resolved) optimizes are optimized against them, as the
    build rounds them; the others to nearest.
    """

    def __init__(self, calibration, config: QuantConfig, samples: list[dict], target, layers=None):
        if not samples:
            raise QCompilerError("weight sensitivity needs at least one calibration sample")
        func = calibration.mod["main"]
        biased = biased_layers(func, calibration.plan)
        weights = _rounded_weights(func, config, layers, biased)
        self.names = [var.name for var in weights]
        switches = [
            relax.Var(name, relax.TensorType((len(weights),), "float32"))
            for name in ("qc_four_bit", "qc_float")
        ]

        def switched(builder, k, options, start=None):
            """``start + base + sum_i switch_i[k] * (alternative_i - base)`` of ``options``."""
            base, *alternatives = options
            value = relax.const(base.astype("float32"))
            if start is not None:
                value = builder.emit(relax.op.add(start, value))
            for switch, alternative in zip(switches, alternatives):
                on = builder.emit(relax.op.take(switch, relax.const(k, "int64"), axis=0))
                delta = relax.const((alternative - base).astype("float32"))
                value = builder.emit(relax.op.add(value, relax.op.multiply(on, delta)))
            return value

        def weight(builder, k, var, call):
            return switched(builder, k, weights[var][0])

        def bias(builder, k, call):  # the bias less the chosen rounding's shift
            constant = const_value(call.args[1])
            sign = -1.0 if op_name(call) == "relax.add" else 1.0
            shifts = [sign * s.reshape(constant.shape) for s in weights[layer_of[k]][1]]
            return switched(builder, k, shifts, relax.const(constant))

        layer_of = list(weights)
        biases = {
            add: layer
            for layer, add in biased.items()
            if layer in weights and any(np.any(s) for s in weights[layer][1])
        }
        body = _LayerWeights(calibration.mod, weights, weight, bias, biases).visit_expr(func).body
        probe = tvm.IRModule(dict(calibration.mod.functions), attrs=calibration.mod.attrs)
        probe["main"] = relax.Function(
            [*func.params, *switches], body, func.ret_ty, attrs=func.attrs
        )
        self._probe = SensitivityProbe._vm(probe, target)
        self._inputs = SensitivityProbe._tensors(func, samples)
        reference = SensitivityProbe._vm(calibration.mod, target)
        self.reference = [SensitivityProbe._outputs(reference(*args)) for args in self._inputs]

    def run(self, four_bit: set[str], floats: set[str] = frozenset()) -> float:
        """Output SQNR (dB) with the layers in ``four_bit`` at 4 bits, those in ``floats``
        float, the others at 8."""
        flags = [
            tvm.runtime.tensor(np.array([n in chosen for n in self.names], dtype="float32"))
            for chosen in (four_bit, floats)
        ]
        got = [SensitivityProbe._outputs(self._probe(*args, *flags)) for args in self._inputs]
        return output_sqnr(self.reference, got)

    def measure(self) -> tuple[dict[str, float], float]:
        """``({layer: SQNR with it alone at 4 bits}, SQNR with every layer at 8 bits)``."""
        return {n: self.run({n}) for n in self.names}, self.run(set())

    def measure_float(self) -> dict[str, float]:
        """``{layer: SQNR with it alone float, the others at 8 bits}``."""
        return {n: self.run(set(), {n}) for n in self.names}


# Random directions per layer in the Hutchinson estimate of a trace, each run on one sample.
HUTCHINSON_PROBES = 16
# The finite-difference step, relative to the RMS of the layer's weights: about the size of an
# 8-bit rounding, small enough for the quadratic term to dominate.
STEP = 2.0**-8


class HessianProbe:
    """HAWQ's second-order sensitivity of each conv/matmul layer (Dong et al., HAWQ-V2: the
    trace of the Hessian of the loss with respect to the layer's weights, times the squared
    norm of the weights' perturbation), from forward runs of the float model only.

    The loss is the output noise against the float model's own outputs, relative to their
    power (:func:`output_noise`: what the bit-width program budgets, and needs no labels). At
    the float weights it is 0 with zero gradient, so its Hessian there is the Gauss-Newton
    matrix ``G = JᵀJ`` (``J`` the Jacobian of the outputs, scaled as the noise is), which is
    positive semi-definite, and for a small perturbation ``εv`` of one layer's weights

        L(W + εv) ≈ ε² vᵀGv,

    one forward run. Hutchinson's estimator averages ``vᵀGv`` over random ±1 directions
    ``v``: ``E[vᵀGv] = Tr(G)``. Each direction runs on one of ``samples`` in turn (the mean of
    the samples' traces is the trace of their mean). Every layer's weights get a perturbation
    input, so one build serves every layer and direction.

    For a rounding error ``ΔW`` spread evenly over a layer's ``n`` weights (HAWQ's
    assumption), the predicted output noise is ``Tr(G) / n · ‖ΔW‖²``: :meth:`measure` predicts
    what :meth:`WeightProbe.measure` measures, with the weights rounded as ``config`` (resolved)
    rounds them (against ``layers``' statistics where it optimizes).
    """

    def __init__(
        self,
        calibration,
        config: QuantConfig,
        samples: list[dict],
        target,
        layers=None,
        probes: int = HUTCHINSON_PROBES,
        seed: int = 0,
    ):
        if not samples:
            raise QCompilerError("Hessian sensitivity needs at least one calibration sample")
        if probes < 1:
            raise QCompilerError(f"Hutchinson's estimate needs at least one probe, got {probes}")
        func = calibration.mod["main"]
        biased = biased_layers(func, calibration.plan)
        # weights rounded as the build rounds them; HAWQ's model has no term for the bias shift
        rounded = {var: w for var, (w, _) in _rounded_weights(func, config, layers, biased).items()}
        self.names = [var.name for var in rounded]
        self._weights = [float_weights for _, _, float_weights in rounded.values()]
        # squared norms of the 8-bit and 4-bit roundings' errors
        self.rounding_error = [
            (float(np.sum((eight - w) ** 2)), float(np.sum((four - w) ** 2)))
            for eight, four, w in rounded.values()
        ]
        deltas = [
            relax.Var(f"qc_delta{k}", relax.TensorType(w.shape, "float32"))
            for k, w in enumerate(self._weights)
        ]

        def perturbed(builder, k, var, call):
            return builder.emit(relax.op.add(call.args[1], deltas[k]))

        body = _LayerWeights(calibration.mod, rounded, perturbed).visit_expr(func).body
        probe = tvm.IRModule(dict(calibration.mod.functions), attrs=calibration.mod.attrs)
        probe["main"] = relax.Function([*func.params, *deltas], body, func.ret_ty, attrs=func.attrs)
        self._probe = SensitivityProbe._vm(probe, target)
        self._zeros = [tvm.runtime.tensor(np.zeros(w.shape, "float32")) for w in self._weights]
        self._inputs = SensitivityProbe._tensors(func, samples)
        # the same executable unperturbed: the differences are the perturbation's alone
        self.reference = [self._run(args, self._zeros) for args in self._inputs]
        self.probes, self.seed = probes, seed
        self._curvature = {}

    def _run(self, args, deltas) -> list[np.ndarray]:
        return SensitivityProbe._outputs(self._probe(*args, *deltas))

    def noise(self, k: int, delta: np.ndarray, sample: int | None = None) -> float:
        """Output noise (:func:`output_noise`) with layer ``k``'s weights moved by ``delta``,
        on every sample or on the one numbered ``sample`` (its share, scaled to the mean)."""
        deltas = list(self._zeros)
        deltas[k] = tvm.runtime.tensor(np.asarray(delta, dtype="float32"))
        chosen = range(len(self._inputs)) if sample is None else [sample]
        got = list(self.reference)
        for s in chosen:
            got[s] = self._run(self._inputs[s], deltas)
        return output_noise(self.reference, got) * len(got) / len(chosen)

    def curvature(self, k: int) -> float:
        """``Tr(G) / n`` of layer ``k``: Hutchinson's estimate of the mean diagonal of the loss's
        Hessian with respect to its ``n`` weights (computed once)."""
        if k not in self._curvature:
            w = self._weights[k]
            step = STEP * max(float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))), 1e-12)
            rng = np.random.default_rng((self.seed, k))  # the same directions in any order
            total = 0.0
            for j in range(self.probes):
                v = rng.choice(np.array([-1.0, 1.0]), size=w.shape)
                total += self.noise(k, step * v, j % len(self._inputs)) / step**2
            self._curvature[k] = total / self.probes / w.size
        return self._curvature[k]

    def predicted_noise(self, k: int, bits: int) -> float:
        """HAWQ's ``Tr(G) / n · ‖ΔW‖²`` for layer ``k``'s weights rounded to ``bits`` (8 or 4)."""
        eight, four = self.rounding_error[k]
        return self.curvature(k) * (four if bits == 4 else eight)

    def measure(self) -> tuple[dict[str, float], float]:
        """:meth:`WeightProbe.measure`'s ``({layer: SQNR with it alone at 4 bits}, SQNR with
        every layer at 8 bits)``, predicted: the layers' noises add up."""
        eight = [self.predicted_noise(k, 8) for k in range(len(self.names))]
        base = sum(eight)
        alone = {
            name: _decibels(base - eight[k] + self.predicted_noise(k, 4))
            for k, name in enumerate(self.names)
        }
        return alone, _decibels(base)


def _decibels(noise: float) -> float:
    return float("inf") if noise <= 0 else float(-10.0 * np.log10(noise))

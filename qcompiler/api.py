"""The Python API: ``quantize`` a float model with calibration data, ``compile`` it to a library.

>>> import qcompiler
>>> art = qcompiler.compile("model.onnx", calib="calib.npz", target="x86")
>>> outputs = art.run({"input": x})
>>> art.export("out/")

The compiled ``main`` takes the inputs of the original model and returns its outputs, in their
dtypes (float for a float model, int8/uint8 for a TFLite integer model); a float model is
quantized once at the entry and dequantized once at the exit, integers in between.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import tvm
from tvm import relax

from qcompiler import __version__, evaluate
from qcompiler.data import CalibrationSet, InputSpec, Preprocess, load_calibration
from qcompiler.deploy.artifact import (
    Artifact,
    check_cross_compiler,
    load_artifact,
    set_threads,
    why_not_here,
)
from qcompiler.deploy.remote import RemoteModel, RunInterrupted
from qcompiler.frontend import ImportedModel, load_model
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.pipeline import (
    PROBE_HOLDOUT,
    ActivationChoice,
    Calibration,
    choice_key,
    float_fallbacks,
    layer_table,
    lower_prequantized,
    prepare,
    run_calibration,
)
from qcompiler.passes.prequantized import check_supported, io_quantization, is_prequantized
from qcompiler.passes.scheme import (
    AUTO,
    AUTO_METHOD,
    OPTIMIZED_4BIT,
    CalibConfig,
    QuantConfig,
    QuantScheme,
    QuantSpec,
)
from qcompiler.targets.bitwidth import (
    Option,
    Plan,
    add_wider_options,
    choose_precisions,
    input_points,
    size_ladder,
    weight_layers,
    weight_options,
)
from qcompiler.targets.boards import Board, host_arch, resolve_board
from qcompiler.targets.build import build as build_executable
from qcompiler.targets.latency import LayerLatencies, attribute
from qcompiler.targets.sensitivity import (
    HUTCHINSON_PROBES,
    HessianProbe,
    SensitivityProbe,
    WeightProbe,
    choose_activations,
    output_psnr,
    output_sqnr,
)
from qcompiler.targets.tuning import LocalRPC, RPCEndpoint, TuneReport, load_database
from qcompiler.targets.tuning import tune as tune_kernels

__all__ = [
    "PROBE_HOLDOUT",
    "Artifact",
    "agreement",
    "CalibConfig",
    "InputSpec",
    "QuantConfig",
    "QuantScheme",
    "QuantSpec",
    "QuantizedModel",
    "RunInterrupted",
    "calibrate",
    "compile",
    "compile_float",
    "load",
    "quantize",
    "quantize_prequantized",
    "run",
    "top1",
    "tune",
]


@dataclass
class QuantizedModel:
    """An integer-only Relax module with the model it came from.

    ``config`` is None for a model that arrived quantized (its own parameters were used, with
    the arithmetic named by ``rounding``). ``activation_choice``: what was measured to choose the
    16-bit activations (``int16_activations="auto"``), else None.
    """

    mod: tvm.IRModule
    model: ImportedModel
    config: QuantConfig | None
    activation_params: dict
    activation_choice: ActivationChoice | None = None
    rounding: str = "half_up"

    @property
    def float_fallbacks(self) -> list[str]:
        return float_fallbacks(self.mod)

    def build(self, target="x86", tuning_records=None, cross_compiler=None) -> Artifact:
        """Compile for ``target`` (a board name, TVM tag or Target).

        ``tuning_records``: a directory written by :func:`tune`; ``cross_compiler``: the
        C++ compiler that links the library, instead of the board's.
        """
        return _build(
            self.mod, self.model, target, self._quant_manifest(), tuning_records, cross_compiler
        )

    def _quant_manifest(self) -> dict:
        if self.config is None:
            return {
                "source": f"the {self.model.format} model's own quantization",
                "rounding": self.rounding,
                "float_fallbacks": self.float_fallbacks,
            }
        return {
            "scheme": asdict(self.config.scheme),
            "calibration": asdict(self.config.calibration),
            "int16_activations": list(self.config.int16_activations),
            "tensor_methods": dict(self.config.tensor_methods),
            "activations_measured": self.activation_choice
            and {
                "weights_db": self.activation_choice.weights_db,
                "all_8_bit_db": self.activation_choice.all_db,
                "chosen_db": self.activation_choice.chosen_db,
                "widened": self.activation_choice.widened,
            },
            "weight_rounding": self.config.weight_rounding,
            "bias_correction": self.config.bias_correction,
            "equalize": self.config.equalize,
            "float_layers": list(self.config.float_layers),
            "nearest_weights": list(self.config.nearest_weights),
            "rounding": self.rounding,
            "float_fallbacks": self.float_fallbacks,
            "activations": {
                k: {"scale": s, "zero_point": z} for k, (s, z) in self.activation_params.items()
            },
        }


def _as_config(config, scheme=None, method=None) -> QuantConfig:
    config = config or QuantConfig()
    if isinstance(config, dict):
        config = QuantConfig(**config)
    if scheme is not None or method is not None:
        calib = (
            config.calibration
            if method is None
            else CalibConfig(method, config.calibration.percentile, config.calibration.bins)
        )
        config = QuantConfig(scheme or config.scheme, calib)
    return config


def _samples(model: ImportedModel, calib, preprocess, limit, offset) -> CalibrationSet:
    if isinstance(preprocess, str):
        preprocess = Preprocess.parse(preprocess)
    return load_calibration(calib, model.inputs, preprocess=preprocess, limit=limit, offset=offset)


def _by_param(model: ImportedModel, samples):
    """Calibration samples keyed by the Relax parameter names (the importer may rename)."""
    params = [p.name for p in model.mod["main"].params]
    for sample in samples:
        yield {p: sample[i.name] for p, i in zip(params, model.inputs)}


def calibration_samples(model, calib, preprocess=None, limit=None, offset=0) -> list[dict]:
    """Samples of ``calib`` as input dicts keyed like the compiled model's parameters (what
    the sensitivity probes take); ``limit`` of them, from ``offset``."""
    model = model if isinstance(model, ImportedModel) else load_model(model)
    return list(_by_param(model, _samples(model, calib, preprocess, limit, offset)))


def calibrate(
    model,
    calib,
    preprocess=None,
    limit=None,
    offset=0,
    bins=2048,
    layer_inputs=False,
    equalize=False,
) -> tuple:
    """Import ``model`` and collect calibration statistics once; see :meth:`Calibration.quantize`.

    ``layer_inputs``: also gather each conv/matmul's input statistics, which
    ``QuantConfig.weight_rounding="optimized"`` and ``bias_correction`` need (more time and
    memory: up to a few hundred MB on an EfficientNet). They leave out the first
    :data:`PROBE_HOLDOUT` samples where there are at least twice as many, so that the weight
    probe (:func:`weight_probe`) can score the rounding on samples it was not fitted to.

    ``equalize``: first equalize the conv pairs joined by a bias add and a ReLU
    (:mod:`qcompiler.passes.equalize`; ``QuantConfig(equalize=True)`` asks for it).

    Returns ``(ImportedModel, Calibration)``; one calibration serves every scheme and method.
    """
    model = model if isinstance(model, ImportedModel) else load_model(model)
    samples = _samples(model, calib, preprocess, limit, offset)
    return model, run_calibration(
        model.mod,
        _by_param(model, samples),
        bins=bins,
        layer_inputs=layer_inputs,
        equalize=equalize,
    )


def quantize(
    model,
    calib,
    config=None,
    *,
    preprocess=None,
    limit=None,
    offset=0,
    calibration: Calibration | None = None,
) -> QuantizedModel:
    """Quantize a float model (path, ``onnx.ModelProto`` or TFLite bytes) to integers.

    A model that is already quantized (TFLite int8/uint8, ONNX QDQ) keeps its own parameters:
    ``calib`` and ``config`` are not needed (and are ignored, with a warning).
    """
    if calibration is None:
        model = model if isinstance(model, ImportedModel) else load_model(model)
        if is_prequantized(model.mod):
            if calib is not None or config is not None:
                warnings.warn(
                    f"{model.name} is already quantized: its own scales are used, the "
                    "calibration data and quantization config are ignored",
                    stacklevel=2,
                )
            return quantize_prequantized(model)
    config = _as_config(config)
    if calibration is None:
        model, calibration = calibrate(
            model,
            calib,
            preprocess,
            limit,
            offset,
            bins=config.calibration.bins,
            layer_inputs=config.wants_layer_inputs(),
            equalize=config.equalize,
        )
    resolved = resolve(calibration, config)  # measured here, resolved again by quantize
    # what was done, for the manifest: an equalized calibration equalized the model
    resolved = replace(resolved, equalize=calibration.equalized is not None)
    mod = calibration.quantize(config)
    choice = calibration.activation_choices.get(choice_key(config))
    measured = choice if config.int16_activations == AUTO else None
    return QuantizedModel(mod, model, resolved, calibration.activation_params(resolved), measured)


def resolve(calibration: Calibration, config=None) -> QuantConfig:
    """``config`` with its 16-bit activations as tensor names. ``"auto"`` (the default) is
    measured once per config on the calibration's kept samples, on this host
    (:func:`~qcompiler.targets.sensitivity.choose_activations`); a share is looked up in the
    calibration histograms."""
    config = _as_config(config)
    if config.calibration.method == AUTO_METHOD and config.int16_activations != AUTO:
        raise QCompilerError("calibration method 'auto' is measured with int16_activations='auto'")
    if config.int16_activations == AUTO:
        key = choice_key(config)
        if key not in calibration.activation_choices:
            calibration.activation_choices[key] = choose_activations(
                calibration, key, _tvm_target("host")
            )
    return calibration.resolve(config)


def activation_sensitivity(calibration: Calibration, samples, config=None, target="x86"):
    """Output SQNR (dB, against the float model) with each activation alone rounded to 8 bits,
    measured on ``samples`` (input dicts) with one compiled fake-quantized model: which
    activations deserve ``int16_activations`` (see :mod:`qcompiler.targets.sensitivity`)."""
    probe = SensitivityProbe(calibration, _as_config(config), list(samples), _tvm_target(target))
    return probe.measure()


_REST = "(the rest of the model)"


PRECISIONS = ("w8a8", "w4a8", "w8a16", "float")
# How the bit-width program's layer errors are found: each layer rounded alone and the outputs
# measured (WeightProbe), or HAWQ's second-order proxy (HessianProbe).
SENSITIVITIES = ("measured", "hessian")


def _precision_latencies(
    calibration, config, records, target, rpc, threads, echo, precisions=PRECISIONS[:2]
):
    """``({precision: {layer: ms}}, rest ms)``: every conv/matmul layer's kernels measured on
    the board with the whole model at each of ``precisions`` in turn (``w8a16``: every
    activation at 16 bits; ``float``: every layer's weights float), the rest at ``w8a8``."""
    layers = weight_layers(calibration)
    changes = {
        "w8a8": {},
        "w4a8": {"int4_weights": layers},
        "w8a16": {"int16_activations": tuple(p.name for p in calibration.plan.points)},
        "float": {"float_layers": layers},
    }
    measured = {}
    with _board_endpoint(resolve_board(target), rpc, threads, "measuring layers") as endpoint:
        for precision in dict.fromkeys(("w8a8", *precisions)):
            variant = replace(config, **changes[precision])
            resolve(calibration, variant)
            measured[precision] = layer_latencies(
                calibration.quantize(variant), records, target, rpc=endpoint, echo=echo
            )
    return {p: m.layers for p, m in measured.items()}, measured["w8a8"].rest_ms


def _option_table(
    calibration, config, measured, latency, four_bit: bool = True
) -> dict[str, list[Option]]:
    """The program's table; with ``latency`` (see :func:`_precision_latencies`) the fixed rest
    of the model is a row of its own, so that latency totals are the whole model's."""
    table = weight_options(calibration, config, measured, latency and latency[0], four_bit)
    if latency is not None:
        table[_REST] = [Option("fixed", latency[1], 0.0, 0)]
    return table


def _resolved_for_4_bits(calibration: Calibration, config: QuantConfig) -> QuantConfig:
    """``config`` resolved as a build resolves it for layers chosen for 4 bits (``"auto"``
    rounding depends on there being some): how a bit-width search's 4-bit layers are rounded."""
    return resolve(calibration, replace(config, int4_weights=weight_layers(calibration)))


def weight_probe(calibration: Calibration, config, samples) -> WeightProbe:
    """The weight probe of ``config`` on ``samples``: its weights rounded as ``config``'s
    build rounds them (optimized against the layers' input statistics, or to nearest), so
    that each layer's 4-bit error is measured as it will be deployed. The probe runs on this
    host whatever the board: it measures numbers, not speed.

    The fair ``samples`` are the calibration's first :data:`PROBE_HOLDOUT`, which the layers'
    statistics leave out (with at least twice as many calibration samples): scored on samples
    the rounding was fitted to, 4-bit layers look better than they are."""
    resolved, layers = _as_rounded(calibration, config)
    return WeightProbe(calibration, resolved, list(samples), _tvm_target("x86"), layers=layers)


def hessian_probe(
    calibration: Calibration, config, samples, probes: int = HUTCHINSON_PROBES
) -> HessianProbe:
    """HAWQ's second-order proxy of each layer's sensitivity on ``samples``: the trace of the
    loss's Hessian with respect to its weights (Hutchinson's estimate with ``probes`` random
    directions, by finite differences of the float model's outputs) times the squared norm of
    their rounding error, the weights rounded as :func:`weight_probe` rounds them. Its
    :meth:`~qcompiler.targets.sensitivity.HessianProbe.measure` predicts what the weight
    probe's measures, from one forward run per direction instead of one per layer and
    sample."""
    resolved, layers = _as_rounded(calibration, config)
    return HessianProbe(
        calibration, resolved, list(samples), _tvm_target("x86"), layers=layers, probes=probes
    )


def _as_rounded(calibration: Calibration, config) -> tuple[QuantConfig, dict]:
    """``config`` resolved as a bit-width search's 4-bit layers are rounded, and the layer
    statistics they are rounded against (none when they are rounded to nearest)."""
    config = _as_config(config)
    resolved = _resolved_for_4_bits(calibration, config)
    layers = calibration.rounding_statistics(config) if resolved.optimized_rounding(4) else {}
    return resolved, layers


def choose_weight_precisions(
    calibration: Calibration,
    config=None,
    *,
    max_bytes=None,
    max_error=None,
    max_latency_ms=None,
    samples=None,
    target="x86",
    records=None,
    rpc: RPCEndpoint | None = None,
    threads: int | None = None,
    precisions=PRECISIONS[:2],
    sensitivity="measured",
    echo=print,
) -> tuple[QuantConfig, Plan]:
    """Each conv/matmul layer's precision: the integer program of
    :mod:`qcompiler.targets.bitwidth` over each layer's weight bytes, error and latency on the
    board at each of ``precisions`` (``w8a8`` and ``w4a8`` by default; also ``w8a16``, the
    layer's input at 16 bits, and ``float``, its weights float).

    With ``samples`` (input dicts, a few calibration samples), the error is measured on the
    model's outputs (:class:`~qcompiler.targets.sensitivity.WeightProbe`: each layer alone at
    4 bits), and the chosen configuration is run through the same probe
    (``plan.measured_sqnr_db``). Where ``config``'s automatic rounding optimizes the 4-bit
    layers, each is measured both ways and rounded the way its error measured lower
    (:func:`_measured_per_layer`; ``nearest_weights`` in the returned config). Without
    ``samples``, a per-layer proxy from the calibration's layer statistics
    (``layer_inputs=True``). ``sensitivity="hessian"`` takes the layers' errors
    from HAWQ's second-order proxy on ``samples`` instead (:func:`hessian_probe`); the
    chosen configuration is still measured by the weight probe.

    With ``records`` (a tuning-records directory), each layer's latency at either precision is
    measured on the board (``rpc``, or this host through a local tracker): the model is lowered
    once all at W8A8 and once all at W4A8, and each layer's kernels are read from the database
    (:func:`layer_latencies`). ``max_latency_ms`` is then a budget for the whole model (the
    layers' sum plus the rest, as measured at W8A8); ``plan.latency_ms`` is the model's
    predicted total.

    ``w8a16`` and ``float`` cost time, not bytes, and are priced by what they take off the
    outputs' noise: they need ``samples`` (a layer's ``w8a16`` error is minus the output noise
    power its input's 8-bit rounding adds alone, measured by a
    :class:`~qcompiler.targets.sensitivity.SensitivityProbe`; its ``float`` error is minus
    that of its 8-bit weights, measured by the weight probe) and ``records``. Among plans
    equally good by the objective, the fastest is taken. The chosen configuration is then
    built for this host and run on ``samples``: ``plan.measured_sqnr_db`` is its output SQNR
    against the float model's (with only ``w8a8``/``w4a8``, the weight probe's, activations
    exact).

    The budgets: the fewest bytes within ``max_error`` (a sum of noise powers); else the least
    error within ``max_bytes`` and/or ``max_latency_ms``. Returns ``config`` with
    ``int4_weights``, ``float_layers`` and ``int16_activations`` set, and the plan.
    """
    config = _as_config(config)
    if max_bytes is None and max_error is None and max_latency_ms is None:
        raise QCompilerError("give a budget: max_bytes, max_error or max_latency_ms")
    if max_latency_ms is not None and records is None:
        raise QCompilerError("a latency budget needs records=DIR to measure the layers into")
    precisions, wider = _checked_precisions(precisions, samples, records)
    if sensitivity not in SENSITIVITIES:
        raise QCompilerError(
            f"unknown sensitivity {sensitivity!r}, candidates are {list(SENSITIVITIES)}"
        )
    if sensitivity == "hessian" and samples is None:
        raise QCompilerError("sensitivity='hessian' is estimated on samples: give samples=")
    probe = measured = None
    if samples is not None:
        samples = list(samples)
        if sensitivity == "hessian":
            probe = weight_probe(calibration, config, samples)
            measured = hessian_probe(calibration, config, samples).measure()
        else:
            config, probe, measured = _measured_per_layer(
                calibration, config, samples, "w4a8" in precisions
            )
    latency = None
    if records is not None:
        latency = _precision_latencies(
            calibration, config, records, target, rpc, threads, echo, precisions
        )
    table = _option_table(calibration, config, measured, latency, "w4a8" in precisions)
    ties = []
    if wider:
        pricing = _wider_pricing(calibration, config, wider, samples, probe)
        ties = add_wider_options(table, calibration, latency=latency[0], **pricing)
    plan = choose_precisions(
        table,
        minimize="bytes" if max_error is not None else "error",
        max_bytes=max_bytes,
        max_error=max_error,
        max_latency_ms=max_latency_ms,
        precision_ties=ties,
        then="latency_ms" if latency is not None else None,
    )
    plan = _without_rest(plan)
    chosen = _with_plan(calibration, config, plan)
    if wider:
        resolve(calibration, chosen)  # measured once per config, cached
        integer = calibration.quantize(chosen)
        sqnr = output_sqnr_on(integer, calibration, samples, probe.reference)
        plan = replace(plan, measured_sqnr_db=sqnr)
    elif probe is not None:
        plan = replace(plan, measured_sqnr_db=probe.run(set(plan.int4_layers)))
    return chosen, plan


def _measured_per_layer(calibration: Calibration, config: QuantConfig, samples, four_bit: bool):
    """``(config, probe, errors)``: the weight probe of ``config`` on ``samples`` and each
    layer's 4-bit error it measures; where ``config``'s automatic rounding optimizes the
    4-bit layers, each layer rounded the way its 4-bit error measured lower, nearest or
    optimized (:func:`per_layer_rounding`, a second probe with nearest rounding), and the
    probe of that mix, which the chosen plan is measured with."""
    probe = weight_probe(calibration, config, samples)
    errors = probe.measure()
    if not four_bit or accuracy_search_roundings(calibration, config) != (AUTO, "nearest"):
        return config, probe, errors
    nearest = weight_probe(calibration, replace(config, weight_rounding="nearest"), samples)
    variant, best = per_layer_rounding(config, errors, nearest.measure())
    if not variant.nearest_weights:  # optimized rounding wins every layer
        return config, probe, errors
    if len(variant.nearest_weights) == len(best[0]):  # nearest rounding wins every layer
        return variant, nearest, best
    return variant, weight_probe(calibration, variant, samples), best


def _noise(sqnr_db: float) -> float:
    """Output noise power relative to the signal's, from an SQNR in dB."""
    return 10 ** (-sqnr_db / 10)


def _checked_precisions(precisions, samples, records) -> tuple[tuple, list]:
    """``precisions`` without repeats, and those of them that widen (``w8a16``, ``float``);
    a clear error unless they are known, include ``w8a8``, and the widening ones can be priced
    (they need ``samples`` and ``records``)."""
    precisions = tuple(dict.fromkeys(precisions))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or "w8a8" not in precisions:
        raise QCompilerError(
            f"precisions must include w8a8 and be among {list(PRECISIONS)}, got {list(precisions)}"
        )
    wider = [p for p in precisions if p in ("w8a16", "float")]
    if wider and (samples is None or records is None):
        raise QCompilerError(
            f"{' and '.join(wider)} layers are priced by measurement: they need samples= (the "
            "noise they remove) and records=DIR (the time they cost on the board)"
        )
    return precisions, wider


def _wider_pricing(calibration: Calibration, config, wider, samples, probe) -> dict:
    """The noise ``w8a16`` and ``float`` options take off the outputs, as
    :func:`~qcompiler.targets.bitwidth.add_wider_options` takes it: a layer's ``w8a16`` error
    is minus the output noise power its input's 8-bit rounding adds alone (a
    :class:`~qcompiler.targets.sensitivity.SensitivityProbe`), its ``float`` error minus that
    of its 8-bit weights (the weight ``probe``)."""
    pricing = {"widened": None, "floated": None}
    if "w8a16" in wider:
        pricing["widened"] = _widening_noise(calibration, config, samples, probe.reference)
    if "float" in wider:
        base = _noise(probe.run(set()))
        pricing["floated"] = {k: _noise(db) - base for k, db in probe.measure_float().items()}
    return pricing


def _without_rest(plan: Plan) -> Plan:
    """``plan`` without the row of the model's fixed rest (:func:`_option_table`)."""
    return replace(plan, precisions={k: v for k, v in plan.precisions.items() if k != _REST})


def _widening_noise(calibration: Calibration, config, samples, reference) -> dict[str, float]:
    """``{activation tensor: output noise power its 8-bit rounding alone adds}`` (weights at 8
    bits), measured on ``samples`` on this host; ``reference``: the float model's outputs on
    them."""
    config = choice_key(_as_config(config))
    probe = SensitivityProbe(calibration, config, samples, _tvm_target("host"), reference=reference)
    exact = _noise(probe.run(set()))
    return {name: max(_noise(probe.run({name})) - exact, 0.0) for name in probe.names}


def output_sqnr_on(
    integer: tvm.IRModule, calibration: Calibration, samples, reference=None
) -> float:
    """Output SQNR (dB) of the integer module against the float model on ``samples``, built
    for this host; ``reference``: the float model's outputs on them, if already known."""
    names = [p.name for p in calibration.mod["main"].params]

    def outputs(mod) -> list:
        vm = SensitivityProbe._vm(mod, _tvm_target("host"))
        args = ([tvm.runtime.tensor(np.ascontiguousarray(s[n])) for n in names] for s in samples)
        return [SensitivityProbe._outputs(vm(*a)) for a in args]

    expected = reference if reference is not None else outputs(calibration.mod)
    return output_sqnr(expected, outputs(integer))


@dataclass(frozen=True)
class Candidate:
    """A configuration tried against an accuracy budget: its weight bytes, the weight rounding
    it was built with, its top-1 on the samples searched and on those held out (None without)."""

    int4_weights: tuple[str, ...]
    bytes: int
    top1: float
    weight_rounding: str = AUTO
    held_out_top1: float | None = None
    nearest_weights: tuple[str, ...] = ()  # 4-bit layers rounded to nearest all the same
    w8a16_layers: tuple[str, ...] = ()  # layers whose input was widened to 16 bits
    float_layers: tuple[str, ...] = ()  # layers whose weights stayed float
    latency_ms: float | None = None  # predicted from the board's kernels, where measured

    @property
    def rounding(self) -> str:
        """How its 4-bit weights were rounded, in words."""
        if not self.nearest_weights:
            return self.weight_rounding
        return f"{self.weight_rounding}, {len(self.nearest_weights)} to nearest"


@dataclass(frozen=True)
class AccuracySearch:
    """What :func:`choose_within_accuracy_drop` chose: the config to build (``int4_weights``
    and ``weight_rounding`` set), its plan, the float model's top-1 on the searched and on the
    held-out samples, and every candidate built, in the order they were tried."""

    config: QuantConfig
    plan: Plan
    reference: float
    held_out_reference: float | None
    tried: list[Candidate]
    chosen: Candidate  # one of ``tried``
    searched: int  # samples the candidates were ranked on
    held_out: int  # samples the choice was confirmed on


class AccuracyBudgetError(QCompilerError):
    """An accuracy budget that not even the search's most accurate plan meets (all weights at
    8 bits, or with ``w8a16``/``float`` layers); ``tried`` holds every candidate built (each
    with its top-1s) and ``reference``/``held_out_reference`` the float model's, so that what
    the search measured is not lost with it."""

    def __init__(self, message, tried, reference, held_out_reference):
        super().__init__(message)
        self.tried, self.reference = tried, reference
        self.held_out_reference = held_out_reference


def within_drop(reference: float, accuracy: float, max_drop_points: float) -> bool:
    """Whether ``accuracy`` is at most ``max_drop_points`` (percentage points) below
    ``reference``, both shares of samples: a drop of exactly the budget counts as within
    (``100 * (0.875 - 0.865)`` is 1.0000000000000009 in floating point)."""
    return 100 * (reference - accuracy) <= max_drop_points + 1e-9


def accuracy_search_roundings(calibration: Calibration, config=None) -> tuple[str, ...]:
    """The weight roundings an accuracy-budget search tries, in order: ``config``'s own, and
    with ``"auto"`` that optimizes the 4-bit layers also ``"nearest"`` (and then each layer the
    way its 4-bit error measured lower, see :func:`per_layer_rounding`). Neither is better
    everywhere: rounding against the layers' inputs made ResNet-8's 4-bit layers far more
    accurate, while nearest rounding kept more of EfficientNet-Lite0's within the same drop
    (bench/mixed.py)."""
    config = _as_config(config)
    if config.weight_rounding != AUTO:
        return (config.weight_rounding,)
    resolved = _resolved_for_4_bits(calibration, config)
    return (AUTO, "nearest") if resolved.weight_rounding == OPTIMIZED_4BIT else (AUTO,)


def per_layer_rounding(config: QuantConfig, optimized: tuple, nearest: tuple):
    """``config`` with the layers whose 4-bit error measured lower rounded to nearest than
    optimized (``nearest_weights``), and each layer's 4-bit error as it will then be rounded:
    ``optimized`` and ``nearest`` are two :meth:`WeightProbe.measure` results on the same
    samples, of ``config`` and of it with nearest rounding (the 8-bit layers round to nearest
    in both). Measured per layer, the choice adds nothing to what each layer alone costs."""
    (four, base), (four_nearest, _) = optimized, nearest
    chosen = tuple(n for n in four if four_nearest[n] > four[n])
    best = {n: max(four[n], four_nearest[n]) for n in four}
    return replace(config, nearest_weights=chosen), (best, base)


def _rounding_ladders(
    calibration: Calibration,
    config: QuantConfig,
    samples,
    steps: int,
    precisions=PRECISIONS[:2],
    latency=None,
    minimize: str = "bytes",
):
    """``(variant, ladder, probe)`` for each rounding a budget search tries
    (:func:`accuracy_search_roundings`, then :func:`per_layer_rounding` where the two disagree
    by layer): ``config`` rounded that way, its :func:`size_ladder` of ``steps`` error budgets
    from all-4-bit's total down by sqrt(2) each (16 rungs span the 8 halvings: twice the plans,
    one more build), each layer's 4-bit error measured on ``samples`` as the build rounds it,
    and the weight probe of the first rounding (its ``reference``: the float model's outputs).

    ``precisions`` beyond ``w8a8``/``w4a8`` add their options to every table, priced once
    (:func:`_wider_pricing`) with ``latency`` (:func:`_precision_latencies`), and the ladder
    goes on past all-8-bit to plans that buy accuracy with those, the fastest of equal bytes
    at each rung. With ``minimize="latency_ms"`` each rung is the fastest plan within its
    budget (by ``latency``), the fewest bytes among equally fast ones."""
    four_bit = "w4a8" in precisions
    wider = [p for p in precisions if p in ("w8a16", "float")]
    measured, first, pricing = {}, None, {}

    def ladder(variant: QuantConfig, errors) -> list[Plan]:
        table = _option_table(calibration, variant, errors, latency, four_bit)
        ties = add_wider_options(table, calibration, latency=latency[0], **pricing) if wider else []
        then = "bytes" if minimize == "latency_ms" else None
        if minimize == "bytes" and latency is not None:
            then = "latency_ms"
        plans = size_ladder(table, steps, 2**0.5, minimize=minimize, precision_ties=ties, then=then)
        return [_without_rest(plan) for plan in plans]

    roundings = accuracy_search_roundings(calibration, config) if four_bit else (AUTO,)
    for rounding in roundings:
        variant = replace(config, weight_rounding=rounding) if four_bit else config
        probe = weight_probe(calibration, variant, samples)
        measured[rounding] = probe.measure()
        if first is None:
            first = probe
            if wider:
                pricing = _wider_pricing(calibration, variant, wider, samples, probe)
        yield variant, ladder(variant, measured[rounding]), first
    if len(measured) == 2:  # optimized and nearest: also each layer its better one
        variant, errors = per_layer_rounding(
            replace(config, weight_rounding=AUTO), measured[AUTO], measured["nearest"]
        )
        if 0 < len(variant.nearest_weights) < len(errors[0]):
            yield variant, ladder(variant, errors), first


def _smallest_fitting(ladders, fits, unreachable, minimize: str = "bytes"):
    """``(variant, plan, ladder)``: the smallest plan (least ``minimize``) of any ladder of
    ``ladders`` (as :func:`_rounding_ladders` yields) that ``fits(plan, variant)``, found by
    binary search over each ladder's plans better than the best so far (fewer bytes, or as few
    and faster; with ``"latency_ms"``, faster, or as fast and fewer bytes), on
    the assumption that a plan later in a ladder (a smaller error budget) never fits worse.
    The last plan (all 8-bit, or the least error the precisions allow) is tried first, and if
    it does not fit, ``unreachable(plan, variant)`` is raised."""
    best = None
    for variant, ladder, _ in ladders:
        if best is None:
            if not fits(ladder[-1], variant):  # the last resort
                raise unreachable(ladder[-1], variant)
            best = (variant, ladder[-1], ladder)
        better = [plan for plan in ladder if _cost(plan, minimize) < _cost(best[1], minimize)]
        low, high = 0, len(better)  # the first (smallest) plan that fits, if one does
        while low < high:
            middle = (low + high) // 2
            if fits(better[middle], variant):
                high = middle
            else:
                low = middle + 1
        if high < len(better):
            best = (variant, better[high], ladder)
    return best


def _cost(plan: Plan, minimize: str) -> tuple:
    """What a budget search minimizes, then what breaks its ties."""
    if minimize == "bytes":
        return plan.bytes, plan.latency_ms
    return plan.latency_ms, plan.bytes


def _with_plan(calibration: Calibration, variant: QuantConfig, plan: Plan) -> QuantConfig:
    """``variant`` with ``plan``'s precisions: its 4-bit layers (and only those among the
    nearest-rounded), its float layers, and the inputs of its ``w8a16`` layers at 16 bits
    beside the activations ``variant`` widens already."""
    int4 = plan.int4_layers
    chosen = replace(
        variant,
        int4_weights=int4,
        nearest_weights=tuple(n for n in variant.nearest_weights if n in int4),
        float_layers=plan.layers_at("float"),
    )
    widen = plan.layers_at("w8a16")
    if widen:
        resolved = resolve(calibration, chosen)  # measured once per config, cached
        points = input_points(calibration)
        wide = (*resolved.int16_activations, *(points[layer] for layer in widen))
        chosen = replace(chosen, int16_activations=tuple(dict.fromkeys(wide)))
    return chosen


def _build_key(config: QuantConfig) -> tuple:
    """What tells one candidate build of a budget search from another: its 4-bit layers and
    how they are rounded (all at 8 bits is one build whatever the rounding), its float layers
    and its 16-bit activations."""
    four = None
    if config.int4_weights:
        four = (config.weight_rounding, config.nearest_weights, config.int4_weights)
    return four, config.float_layers, config.int16_activations


def choose_within_accuracy_drop(
    model: ImportedModel,
    calibration: Calibration,
    labelled,
    max_drop_points: float,
    config=None,
    *,
    samples,
    target="x86",
    steps: int = 16,
    holdout: bool = True,
    minimize: str = "bytes",
    precisions=PRECISIONS[:2],
    records=None,
    rpc: RPCEndpoint | None = None,
    threads: int | None = None,
    echo=print,
) -> AccuracySearch:
    """The fewest weight bytes whose top-1 on ``labelled`` (``(inputs, label)`` pairs) stays
    within ``max_drop_points`` of the float model's, checked by running each candidate
    (``model`` and ``calibration`` as :func:`calibrate` returns them).

    For each weight rounding of :func:`accuracy_search_roundings`, each layer's 4-bit error is
    measured once (the weight probe on ``samples``, rounded as the build rounds); the integer
    program then gives, for ``steps`` error budgets from all-4-bit's total down by a factor
    sqrt(2) each, the fewest bytes within each. Those plans, ordered by size, are built and
    scored by binary search, on the assumption that a larger error budget never scores better;
    a later rounding only searches the plans smaller than the best found so far.

    ``precisions`` may add ``w8a16`` and ``float`` (with ``records``, as in
    :func:`choose_weight_precisions`): the program may then buy accuracy with time, and the
    ladder goes on past all-8-bit to the plans that do (:func:`_rounding_ladders`), so that a
    budget all-8-bit misses can still be met; of equal bytes, the faster plan is preferred.
    ``minimize="latency_ms"`` (with ``records``) chooses the plan predicted fastest on the
    board instead of the smallest: each layer's kernels measured there at each precision
    (:func:`_precision_latencies`), each rung of the ladder the fastest plan within its error
    budget, the fewest bytes among equally fast ones.

    With ``holdout`` every other labelled sample is held out of the search: the smallest plan
    within budget on the rest must also be within budget on those (each against the float
    model's top-1 on the same samples), else the next larger plan of its ladder is tried. A
    choice at the edge of the budget otherwise follows the noise of the samples it was picked
    on: on EfficientNet-Lite0, a plan chosen on 200 images at +0.00 lost 4 points on 200 others.
    """
    config = _as_config(config)
    labelled = list(labelled)
    searched, held = (labelled[0::2], labelled[1::2]) if holdout else (labelled, [])
    if not searched or (holdout and not held):
        raise QCompilerError(
            f"an accuracy budget needs labelled samples to score on ({len(labelled)} given; "
            f"{'2 or more to hold half out' if holdout else '1 or more'})"
        )
    precisions, wider = _checked_precisions(precisions, samples, records)
    latency = _search_latencies(
        calibration, config, precisions, minimize, records, target, rpc, threads, echo
    )
    fp32 = compile_float(model, target)
    reference = top1(fp32, searched)
    held_reference = top1(fp32, held) if held else None
    candidates: dict[tuple, Candidate] = {}

    def candidate(plan: Plan, variant: QuantConfig) -> Candidate:
        chosen = _with_plan(calibration, variant, plan)
        key = _build_key(chosen)
        if key not in candidates:
            built = quantize(model, None, chosen, calibration=calibration).build(target)
            candidates[key] = Candidate(
                chosen.int4_weights,
                plan.bytes,
                top1(built, searched),
                chosen.weight_rounding,
                top1(built, held) if held else None,
                chosen.nearest_weights,
                plan.layers_at("w8a16"),
                chosen.float_layers,
                plan.latency_ms if latency is not None else None,
            )
        return candidates[key]

    def fits(plan: Plan, variant: QuantConfig) -> bool:
        return within_drop(reference, candidate(plan, variant).top1, max_drop_points)

    def confirmed(plan: Plan, variant: QuantConfig) -> bool:
        if not held:
            return True
        return within_drop(held_reference, candidate(plan, variant).held_out_top1, max_drop_points)

    def unreachable(plan: Plan, score: float, against: float, count: int, which: str):
        drop = 100 * (against - score)
        return AccuracyBudgetError(
            f"top-1 drop <= {max_drop_points:g} points cannot be met: with "
            f"{_most_accurate(plan)} it is already {drop:.2f} points ({score:.4f} against the "
            f"float model's {against:.4f} on {count} {which}samples, where one sample is "
            f"{100 / count:.2g} points): score on more labelled samples or allow a larger drop"
            + ("; without holding half out (--no-holdout) the choice is unconfirmed" * holdout)
            + _wider_hint(wider),
            list(candidates.values()),
            reference,
            held_reference,
        )

    def searched_unreachable(plan: Plan, variant: QuantConfig) -> QCompilerError:
        score = candidate(plan, variant).top1
        return unreachable(plan, score, reference, len(searched), "searched " if holdout else "")

    ladders = _rounding_ladders(calibration, config, samples, steps, precisions, latency, minimize)
    variant, plan, ladder = _smallest_fitting(ladders, fits, searched_unreachable, minimize)
    # Step up the winner's ladder until a plan is within budget on both parts.
    for larger in ladder[ladder.index(plan) :]:
        if fits(larger, variant) and confirmed(larger, variant):
            plan = larger
            break
    else:
        score = candidate(larger, variant).held_out_top1
        raise unreachable(larger, score, held_reference, len(held), "held-out ")
    return AccuracySearch(
        _with_plan(calibration, variant, plan),
        plan,
        reference,
        held_reference,
        list(candidates.values()),
        candidate(plan, variant),
        len(searched),
        len(held),
    )


def _search_latencies(
    calibration, config, precisions, minimize, records, target, rpc, threads, echo
):
    """Each layer's latency at each of ``precisions`` (see :func:`_precision_latencies`),
    where a budget search needs them: to price ``w8a16`` and ``float`` layers, or to minimize
    latency; else None. Checks ``minimize`` and that ``records`` are given where needed."""
    if minimize not in ("bytes", "latency_ms"):
        raise QCompilerError(f"a budget search minimizes bytes or latency_ms, not {minimize!r}")
    if minimize == "bytes" and not set(precisions) & {"w8a16", "float"}:
        return None
    if records is None:
        raise QCompilerError("minimizing latency needs records=DIR to measure the layers into")
    return _precision_latencies(
        calibration, config, records, target, rpc, threads, echo, precisions
    )


def _most_accurate(plan: Plan) -> str:
    """A budget search's last resort, in words."""
    wide, floated = plan.layers_at("w8a16"), plan.layers_at("float")
    if not wide and not floated:
        return "all weights at 8 bits"
    parts = [f"{len(wide)} layers' inputs at 16 bits"] * bool(wide)
    parts += [f"{len(floated)} layers' weights float"] * bool(floated)
    return f"the most accurate plan ({' and '.join(parts)})"


def _wider_hint(wider) -> str:
    """What else could meet a budget all-8-bit misses, where the search was not given it."""
    if wider:
        return ""
    return "; or allow w8a16 and float layers (precisions, --precisions w8a8,w4a8,w8a16,float)"


# The output measures an output budget can hold (dB against the float model): SQNR, each
# output column's error power against its signal's, both relative to the column's peak; PSNR,
# the columns' errors against their peaks alone (see :mod:`qcompiler.targets.sensitivity`).
OUTPUT_MEASURES = {"sqnr": output_sqnr, "psnr": output_psnr}


@dataclass(frozen=True)
class OutputCandidate:
    """A configuration built against an output budget: its 4-bit layers, weight bytes,
    rounding, and its output SQNR or PSNR (dB) against the float model on the samples
    measured."""

    int4_weights: tuple[str, ...]
    bytes: int
    db: float
    weight_rounding: str = AUTO
    nearest_weights: tuple[str, ...] = ()
    w8a16_layers: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()
    latency_ms: float | None = None
    rounding = Candidate.rounding


@dataclass(frozen=True)
class OutputSearch:
    """What :func:`choose_within_output_db` chose: the config to build, its plan, every
    candidate built in the order tried, the chosen one among them, the measure and how many
    samples measured them."""

    config: QuantConfig
    plan: Plan
    tried: list[OutputCandidate]
    chosen: OutputCandidate
    measure: str
    measured_on: int


def choose_within_output_db(
    model: ImportedModel,
    calibration: Calibration,
    min_db: float,
    config=None,
    *,
    samples,
    measure: str = "sqnr",
    measure_on=None,
    target="x86",
    steps: int = 16,
    minimize: str = "bytes",
    precisions=PRECISIONS[:2],
    records=None,
    rpc: RPCEndpoint | None = None,
    threads: int | None = None,
    echo=print,
) -> OutputSearch:
    """The fewest weight bytes whose build keeps the model's output SQNR (or PSNR, ``measure``)
    against the float model at ``min_db`` or more on ``measure_on`` (input dicts; default
    ``samples``): an accuracy budget for models without labels.

    SQNR (:func:`~qcompiler.targets.sensitivity.output_sqnr`) weighs each output column's error
    against its signal, PSNR (:func:`~qcompiler.targets.sensitivity.output_psnr`, what the
    16-bit activation choice measures) against the column's peak alone. Their scales differ
    where columns are nearly all zeros (a detector's score of a class no image shows): on
    YOLOX-Nano all-8-bit measures 6.5 dB SQNR and 26.5 dB PSNR at a mAP of 0.9997, and the
    two moved together, 20 dB apart, over every candidate measured.

    The plans are :func:`choose_within_accuracy_drop`'s: each layer's 4-bit error measured by
    the weight probe on ``samples`` for each rounding tried, and the integer program's fewest
    bytes within a ladder of error budgets. Each plan tried is built for ``target`` and run
    whole, the activations' rounding included, by binary search over the sizes; the smallest
    that measures ``min_db`` is chosen. A continuous score needs no held-out half, but
    measured on inputs the calibration did not see it is not flattered by weights rounded
    against the calibration's statistics: pass those as ``measure_on``. ``precisions`` as in
    :func:`choose_within_accuracy_drop`: with ``w8a16``/``float`` a budget above all-8-bit's
    value can be met by layers that buy it with time; so is ``minimize``.
    """
    config = _as_config(config)
    if measure not in OUTPUT_MEASURES:
        raise QCompilerError(f"unknown output measure {measure!r}, candidates are sqnr, psnr")
    score = OUTPUT_MEASURES[measure]
    measure_on = list(samples if measure_on is None else measure_on)
    if not measure_on:
        raise QCompilerError(f"an output {measure.upper()} budget needs samples to measure on")
    precisions, wider = _checked_precisions(precisions, samples, records)
    latency = _search_latencies(
        calibration, config, precisions, minimize, records, target, rpc, threads, echo
    )
    fp32 = compile_float(model, target)
    reference = [list(fp32.run(s).values()) for s in measure_on]
    candidates: dict[tuple, OutputCandidate] = {}

    def candidate(plan: Plan, variant: QuantConfig) -> OutputCandidate:
        chosen = _with_plan(calibration, variant, plan)
        key = _build_key(chosen)
        if key not in candidates:
            built = quantize(model, None, chosen, calibration=calibration).build(target)
            got = [list(built.run(s).values()) for s in measure_on]
            candidates[key] = OutputCandidate(
                chosen.int4_weights,
                plan.bytes,
                score(reference, got),
                chosen.weight_rounding,
                chosen.nearest_weights,
                plan.layers_at("w8a16"),
                chosen.float_layers,
                plan.latency_ms if latency is not None else None,
            )
        return candidates[key]

    def fits(plan: Plan, variant: QuantConfig) -> bool:
        return candidate(plan, variant).db >= min_db

    def unreachable(plan: Plan, variant: QuantConfig) -> QCompilerError:
        most = _most_accurate(plan)
        verb = "measures" if most.startswith("the") else "measure"
        more = ""
        if not wider:
            more = "; or give more activations 16 bits (int16_activations) to raise it"
        return QCompilerError(
            f"output {measure.upper()} >= {min_db:g} dB cannot be met: {most} {verb} "
            f"{candidate(plan, variant).db:.2f} dB against the float model on "
            f"{len(measure_on)} samples, the most the search can keep: ask for at most that"
            f"{more}{_wider_hint(wider)}"
        )

    ladders = _rounding_ladders(calibration, config, samples, steps, precisions, latency, minimize)
    variant, plan, _ = _smallest_fitting(ladders, fits, unreachable, minimize)
    return OutputSearch(
        _with_plan(calibration, variant, plan),
        plan,
        list(candidates.values()),
        candidate(plan, variant),
        measure,
        len(measure_on),
    )


def top1_with(model, calibration, config, int4_weights, labelled, target="x86") -> float:
    """Top-1 on ``labelled`` of ``model`` quantized with ``int4_weights`` at 4 bits."""
    chosen = replace(_as_config(config), int4_weights=tuple(int4_weights))
    return top1(quantize(model, None, chosen, calibration=calibration).build(target), labelled)


def _tvm_target(target):
    return resolve_board(target).tvm_target


def quantize_prequantized(model) -> QuantizedModel:
    """The integer module of a model that arrived quantized (no calibration)."""
    model = model if isinstance(model, ImportedModel) else load_model(model)
    check_supported(model.mod, model.name)
    rounding = "tflite" if model.format == "tflite" else "onnxruntime"
    mod = lower_prequantized(model.mod, rounding)
    return QuantizedModel(mod, model, None, {}, rounding=rounding)


def compile(
    model,
    calib=None,
    target="x86",
    config=None,
    *,
    preprocess=None,
    limit=None,
    offset=0,
    tuning_records=None,
    cross_compiler=None,
) -> Artifact:
    """Quantize and build: the one-call path from a float model to a runnable library.

    ``calib`` is needed for a float model; a model that is already quantized needs none.
    """
    model = model if isinstance(model, ImportedModel) else load_model(model)
    if calib is None and not is_prequantized(model.mod):
        raise QCompilerError(
            f"{model.name} is a float model: compiling it needs calibration data (calib=...)"
        )
    quantized = quantize(model, calib, config, preprocess=preprocess, limit=limit, offset=offset)
    return quantized.build(target, tuning_records=tuning_records, cross_compiler=cross_compiler)


def compile_float(model, target="x86", tuning_records=None, cross_compiler=None) -> Artifact:
    """Build the float model unchanged: the baseline the quantized model is judged against."""
    model = model if isinstance(model, ImportedModel) else load_model(model)
    return _build(prepare(model.mod), model, target, None, tuning_records, cross_compiler)


def tune(
    model,
    records,
    target="x86",
    trials: int = 64,
    *,
    rpc: RPCEndpoint | None = None,
    threads: int | None = None,
    echo=print,
) -> TuneReport:
    """Tune the kernels of ``model`` (a :class:`QuantizedModel`, or a float model path/proto).

    Measures on the board behind ``rpc``; without one, a tracker and a server are started on
    127.0.0.1 for the duration (with ``threads`` threads). Records accumulate in ``records``.
    """
    if isinstance(model, QuantizedModel):
        mod = model.mod
    else:
        imported = model if isinstance(model, ImportedModel) else load_model(model)
        mod = prepare(imported.mod)
    return _tune_module(mod, records, target, trials, rpc=rpc, threads=threads, echo=echo)


def layer_latencies(
    mod: tvm.IRModule,
    records,
    target="x86",
    *,
    rpc: RPCEndpoint | None = None,
    threads: int | None = None,
    echo=print,
) -> LayerLatencies:
    """Milliseconds per run of each conv/matmul layer of the integer module ``mod`` on the
    board, and of the rest (see :mod:`qcompiler.targets.latency`): every kernel not yet in
    the tuning database ``records`` is measured there first, over RPC (its default schedule;
    tuned records are used where the database has them)."""
    return attribute(
        mod, _tune_module(mod, records, target, 0, rpc=rpc, threads=threads, echo=echo)
    )


def _tune_module(mod, records, target, trials, *, rpc, threads, echo) -> TuneReport:
    board = resolve_board(target)
    check_cross_compiler(board)
    cross = board.cross_compiler if board.arch != host_arch() else None
    with _board_endpoint(board, rpc, threads, "tuning") as endpoint:
        return tune_kernels(
            mod, board.tvm_target, records, endpoint, trials, echo=echo, cross_compiler=cross
        )


@contextlib.contextmanager
def _board_endpoint(board: Board, rpc: RPCEndpoint | None, threads: int | None, what: str):
    """``rpc``, else for a board that is this host a tracker and a server started on
    127.0.0.1 for the duration (with ``threads`` threads)."""
    if rpc is not None:
        yield rpc
        return
    if board.arch != host_arch():
        raise QCompilerError(
            f"{what} for {board.name} ({board.arch}) measures on that board: give its tracker "
            f"and key (rpc=RPCEndpoint(host, port, {board.rpc_key!r}), or --rpc-tracker/--rpc-key)"
        )
    with LocalRPC(key="local", threads=threads) as endpoint:
        yield endpoint


def board_latency(
    artifact: Artifact,
    sample: dict,
    target="x86",
    *,
    rpc: RPCEndpoint | None = None,
    threads: int | None = None,
    repeat: int = 50,
) -> list[float]:
    """Seconds per run of the whole model on ``sample``, ``repeat`` times, timed on the board
    behind ``rpc`` (else this host through a local tracker): what a latency budget's plan,
    predicted from its kernels, is confirmed by."""
    with _board_endpoint(resolve_board(target), rpc, threads, "timing a model") as endpoint:
        return run(artifact, [sample], rpc=endpoint, threads=threads, repeat=repeat)[1]


def run(
    artifact: Artifact,
    samples,
    *,
    rpc: RPCEndpoint | None = None,
    threads: int | None = None,
    repeat: int = 20,
) -> tuple[list[dict], list[float]]:
    """Run ``samples`` (input dicts) here or on the board behind ``rpc``; time the last one.

    Returns the outputs of every sample and ``repeat`` latencies in seconds, measured on the
    board itself when it is remote. A board lost after some samples finished raises
    :class:`RunInterrupted`, which carries their outputs.
    """
    samples = list(samples)
    if not samples:
        raise QCompilerError("no input samples to run")
    with contextlib.ExitStack() as stack:
        if rpc is None:
            reason = why_not_here(artifact.manifest)
            if reason is not None:
                raise QCompilerError(reason)
            if threads is not None:
                set_threads(threads)
            model = artifact
        else:
            model = stack.enter_context(RemoteModel(artifact, rpc, threads=threads))
        outputs = []
        for sample in samples:
            try:
                outputs.append(model.run(sample))
            except QCompilerError as err:
                if not outputs:
                    raise
                raise RunInterrupted(
                    f"{err} ({len(outputs)} of {len(samples)} samples had finished)", outputs
                ) from err
        if rpc is not None:
            return outputs, model.time(samples[-1], repeat=repeat)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            artifact.run(samples[-1])
            times.append(time.perf_counter() - start)
        return outputs, times


def load(path) -> Artifact:
    """Load an artifact written by :meth:`Artifact.export`."""
    return load_artifact(path)


def weight_bytes(mod: tvm.IRModule) -> int:
    """Bytes of the stored conv/matmul weights of ``mod["main"]``."""
    return sum(layer["weight_bytes"] for layer in layer_table(mod))


def _build(
    mod, model: ImportedModel, target, quantization, tuning_records=None, cross_compiler=None
) -> Artifact:
    board = resolve_board(target)
    if cross_compiler is not None:
        board = replace(board, cross_compiler=cross_compiler)
    check_cross_compiler(board)
    database = None if tuning_records is None else load_database(tuning_records)
    executable = build_executable(mod, board.tvm_target, database)
    params = [p.name for p in mod["main"].params]
    ret = mod["main"].ret_ty
    fields = ret.fields if isinstance(ret, relax.TupleType) else [ret]
    in_q, out_q = io_quantization(model.mod) if is_prequantized(model.mod) else ([], [])
    manifest = {
        "model": {"name": model.name, "format": model.format, "sha256": model.sha256},
        "target": board.summary(),
        # quantization: how the caller turns codes into reals (real = scale * (code - zp))
        # for integer inputs/outputs; None where the model takes or returns floats.
        "inputs": [
            dict(name=i.name, shape=list(i.shape), dtype=i.dtype, param=p, quantization=q)
            for i, p, q in zip(model.inputs, params, in_q or [None] * len(params))
        ],
        "outputs": [
            dict(name=o.name, shape=[int(d) for d in f.shape], dtype=str(f.dtype), quantization=q)
            for o, f, q in zip(model.outputs, fields, out_q or [None] * len(fields))
        ],
        "quantization": quantization,
        "layers": layer_table(mod),
        "weight_bytes": weight_bytes(mod),
        "versions": {"qcompiler": __version__, "tvm": tvm.__version__},
    }
    return Artifact(executable, manifest)


def top1(artifact: Artifact, samples) -> float:
    """Share of samples whose first output's argmax equals the label; samples: (inputs, label)."""
    hits = top1_hits(artifact, samples)
    return float(hits.mean()) if hits.size else 0.0


def top1_hits(artifact: Artifact, samples) -> np.ndarray:
    """Per sample, whether the first output's argmax equals the label (bool array), for
    :func:`qcompiler.evaluate.paired_difference`; samples: (inputs, label)."""
    return np.array(
        [
            np.argmax(next(iter(artifact.run(inputs).values())).reshape(-1)) == label
            for inputs, label in samples
        ],
        dtype=bool,
    )


AGREEMENT_METRICS = ("top1", "map50", "miou", "pooled_iou")


def agreement(reference: Artifact, candidate: Artifact, samples, metric: str, **options) -> float:
    """How closely ``candidate`` answers like ``reference`` (e.g. the float model) on
    ``samples`` (input dicts), with the reference's answers as the ground truth:

    - ``top1``: share of samples with the same argmax of the first output;
    - ``map50``: mAP@0.5 of the candidate's YOLOX detections against the reference's
      detections scoring >= ``truth_score`` (0.3) after NMS (:mod:`qcompiler.evaluate`);
    - ``miou``: mean IoU of the masks ``output >= 0.5``;
    - ``pooled_iou``: their IoU pooled over the samples (intersections over unions summed,
      :func:`qcompiler.evaluate.pooled_mask_iou`), where a sample whose reference mask is
      empty weighs by its stray pixels instead of scoring 0.
    """
    if metric not in AGREEMENT_METRICS:
        raise QCompilerError(f"unknown metric {metric!r}, candidates are {list(AGREEMENT_METRICS)}")
    truth_score = options.get("truth_score", 0.3)
    shape = reference.manifest["inputs"][0]["shape"]
    hw = tuple(shape[2:4]) if shape[1] in (1, 3) else tuple(shape[1:3])
    scores, truth, found = [], [], []
    inter = union = seen = 0
    for sample in samples:
        seen += 1
        ref = next(iter(reference.run(sample).values()))
        out = next(iter(candidate.run(sample).values()))
        if metric == "top1":
            scores.append(float(np.argmax(ref.reshape(-1)) == np.argmax(out.reshape(-1))))
        elif metric == "miou":
            scores.append(evaluate.mask_iou(ref, out))
        elif metric == "pooled_iou":  # running counts: no masks kept
            both, either = evaluate.mask_overlap(ref, out)
            inter, union = inter + both, union + either
        else:
            truth.append(evaluate.decode_yolox(ref, hw).above(truth_score))
            found.append(evaluate.decode_yolox(out, hw))
    if metric == "map50":
        return evaluate.map50(truth, found)
    if not seen:
        raise QCompilerError("no samples to compare")
    if metric == "pooled_iou":
        return 1.0 if union == 0 else inter / union
    return float(np.mean(scores))

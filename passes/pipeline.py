"""The quantization pipeline: a float Relax module and calibration data in, integer module out.

Phases, in order (each ``IRModule -> IRModule`` except calibration, which only measures):

1. ``prepare``     inference-only ops, constants folded (weights become plain constants);
2. ``plan``        choose the quantization points (:mod:`graph`);
3. ``calibrate``   run the float model over the data, one observer per point (:mod:`calibrate`);
4. ``annotate``    write quantize/dequantize pairs with the chosen parameters (:mod:`annotate`);
5. ``integerize``  lower every QDQ chain to integer ops (:mod:`integerize`);
6. ``verify``      fail if a float op sits inside an integer region (:mod:`verify`).

A model that arrives quantized skips 1-4 (:func:`lower_prequantized`, :mod:`prequantized`).

Set ``dump_dir`` to write the IR after each phase (``01-prepare.py``, ...).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from qcompiler.passes import rounding
from qcompiler.passes.annotate import INT4_ATTR, activation_qparams, annotate
from qcompiler.passes.calibrate import calibrate
from qcompiler.passes.canonicalize import canonicalize
from qcompiler.passes.equalize import equalize_module
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import (
    CHANNELS_LAST,
    CONV_OPS,
    MATMUL_OPS,
    QuantPlan,
    bindings,
    const_value,
    layer_name,
    op_name,
    plan_quantization,
)
from qcompiler.passes.integerize import FALLBACK_ATTR, integerize
from qcompiler.passes.observers import quantization_sqnr
from qcompiler.passes.prequantized import channels_last, prepare_prequantized
from qcompiler.passes.scheme import AUTO, OPTIMIZED_4BIT, QuantConfig
from qcompiler.passes.verify import verify_accumulators, verify_integer_only


def prepare(mod: tvm.IRModule) -> tvm.IRModule:
    """Inference-only, constant-folded form of an imported float module."""
    seq = tvm.transform.Sequential(
        [
            relax.transform.DecomposeOpsForInference(),  # batch norm and friends to elementwise
            relax.transform.CanonicalizeBindings(),
            relax.transform.FoldConstant(),  # transposed/reshaped weights become plain constants
            canonicalize,  # importer-emitted TIR clamps back to Relax ops (needs folded bounds)
            # Channels last: the int8 dot-product instructions (x86 VNNI, ARM SDOT) reduce four
            # neighbouring input channels at once, so channels must be the innermost axis. Layout
            # transforms are left only at the model's edges.
            relax.transform.ConvertLayout(CHANNELS_LAST),
            relax.transform.FoldConstant(),  # the transposed weights become constants again
        ]
    )
    return seq(mod)


@dataclass
class ActivationChoice:
    """Which activations get 16 bits and which range method the costly 8-bit ones use, with
    what :func:`qcompiler.targets.sensitivity.choose_activations` measured to choose them
    (output PSNR in dB against the float model)."""

    chosen: tuple[str, ...]
    weights_db: float  # weights quantized, every activation exact
    all_db: float  # every activation at 8 bits
    chosen_db: float  # the chosen at 16 bits (exact in the probe), the rest at 8 with `methods`
    alone_db: dict[str, float]  # each activation alone at 8 bits; empty if not needed
    methods: dict[str, str] = dataclasses.field(default_factory=dict)  # tensor: range method
    # Every activation widened, because the costliest share at 16 bits (``capped``, output PSNR
    # ``capped_db``) was cut by its cap and still left the activations more noise than the
    # weights': the weights, then the larger error, get ``weight_rounding="optimized"`` where
    # the config says "auto".
    widened: bool = False
    capped: tuple[str, ...] = ()
    capped_db: float | None = None

    def summary(self) -> str:
        if not self.alone_db:
            return (
                f"int16 activations: none needed (all 8-bit {self.all_db:.1f} dB output PSNR, "
                f"weights alone {self.weights_db:.1f} dB)"
            )
        if self.widened:
            return (
                f"int16 activations: all {len(self.chosen)}: the {len(self.capped)} costliest "
                f"alone left {self.capped_db:.1f} dB output PSNR against {self.weights_db:.1f} "
                f"with the weights alone (all 8-bit {self.all_db:.1f}); weights rounded "
                "against their inputs"
            )
        return (
            f"int16 activations: {len(self.chosen)} of {len(self.alone_db)} "
            f"({', '.join(self.chosen) or 'none costs enough alone'}): output PSNR "
            f"{self.all_db:.1f} -> {self.chosen_db:.1f} dB (weights alone {self.weights_db:.1f})"
            + (f"; range methods {self.methods}" if self.methods else "")
        )


def choice_key(config: QuantConfig) -> QuantConfig:
    """What the measured activation choice depends on: ``config`` without its 16-bit
    activations, per-tensor range methods and 4-bit weights. One choice serves every mix of
    4-bit layers (they are measured with 8-bit weights), so that candidates of a bit-width
    search differ only in their weights."""
    return dataclasses.replace(
        config,
        int16_activations=(),
        int4_weights=(),
        float_layers=(),
        nearest_weights=(),
        tensor_methods=(),
    )


@dataclass
class Calibration:
    """A prepared float module with its quantization plan and calibration statistics.

    One calibration serves every scheme and range method: ``quantize`` can be called with
    several configs without touching the data again.

    ``samples`` keeps the first :data:`PROBE_SAMPLES` calibration samples for measurements on
    the model's outputs (``float_outputs``: the float model's outputs on them, from the same runs);
    ``activation_choices`` holds the 16-bit activations measured for ``int16_activations="auto"``:
    an :class:`ActivationChoice` per :func:`choice_key` of a config, see :meth:`resolve`.
    """

    mod: tvm.IRModule
    plan: object
    observers: dict
    layers: dict = dataclasses.field(default_factory=dict)
    samples: list = dataclasses.field(default_factory=list)
    float_outputs: list | None = None
    activation_choices: dict = dataclasses.field(default_factory=dict)
    _kept_layers: dict | None = dataclasses.field(default=None, repr=False)
    # conv pairs cross-layer equalized before calibrating (equalize=True), or None
    equalized: int | None = None

    def quantize(self, config: QuantConfig, dump_dir: str | None = None) -> tvm.IRModule:
        if config.equalize and self.equalized is None:
            raise QCompilerError(
                "equalize=True rescales the float model before it is calibrated: calibrate "
                "with equalize=True"
            )
        if config.needs_layer_inputs and not self.layers:
            raise QCompilerError(
                f"weight_rounding={config.weight_rounding!r} and bias_correction need the "
                "layers' input statistics: calibrate with layer_inputs=True"
            )
        resolved = self.resolve(config)
        layers = self.rounding_statistics(config) if resolved.needs_layer_inputs else {}
        annotated = annotate(self.mod, self.plan, self.observers, resolved, layers)
        _dump(dump_dir, "04-annotate", annotated)
        integer = integerize(annotated)
        _dump(dump_dir, "05-integerize", integer)
        verify_integer_only(integer)
        verify_accumulators(integer)
        return integer

    def resolve(self, config: QuantConfig) -> QuantConfig:
        """``config`` with its int16 activations as the tensors' names: a share is looked up
        in the histograms (:meth:`noisiest`); ``"auto"`` must have been measured already,
        into :attr:`activation_choices` (:func:`qcompiler.targets.sensitivity.choose_activations`;
        :func:`qcompiler.quantize` does it)."""
        share = config.int16_activations
        if share == AUTO:
            key = choice_key(config)
            if key not in self.activation_choices:
                raise QCompilerError(
                    "int16_activations='auto' is measured on the model's outputs: quantize "
                    "through qcompiler.quantize, or give a share or tensor names"
                )
            choice = self.activation_choices[key]
            methods = {**choice.methods, **dict(config.tensor_methods)}  # the user's win
            return dataclasses.replace(
                config,
                int16_activations=choice.chosen,
                tensor_methods=tuple(methods.items()),
                weight_rounding=_rounding(config, choice.widened),
            )
        if not isinstance(share, tuple):
            count = math.ceil(share * len(self.observers)) if share > 0 else 0
            config = dataclasses.replace(config, int16_activations=self.noisiest(config, count))
        return dataclasses.replace(config, weight_rounding=_rounding(config, False))

    def rounding_statistics(self, config: QuantConfig) -> dict:
        """The layers' input statistics that ``config`` rounds weights against: the
        calibration's, else, for ``weight_rounding="auto"``, the kept samples'."""
        if not self.layers and config.weight_rounding == AUTO:
            return self.kept_layer_statistics()  # the measured choice asked for it
        return self.layers

    def kept_layer_statistics(self) -> dict:
        """Every layer's input statistics from the kept samples (:attr:`samples`), each with
        :data:`KEPT_POSITIONS` patch positions: what ``weight_rounding="auto"`` optimizes the
        weights with when the calibration gathered none (cached)."""
        if self._kept_layers is None:
            layers = layer_statistics(self.mod, positions=KEPT_POSITIONS)
            calibrate(self.mod, QuantPlan([], {}), self.samples, layers=layers)
            self._kept_layers = layers
        return self._kept_layers

    def noisiest(self, config: QuantConfig, count: int) -> tuple[str, ...]:
        """The ``count`` activation tensors whose 8-bit quantization (the scheme's spec and
        range method) loses the most: lowest expected SQNR on the calibration data."""
        spec, calib = config.scheme.activation, config.calibration
        sqnr = {}
        for point, observer in self.observers.items():
            method = config.range_method(point.name)
            lo, hi = observer.range(method, spec, percentile=calib.percentile)
            sqnr[point.name] = quantization_sqnr(observer, lo, hi, spec)
        return tuple(sorted(sqnr, key=sqnr.get)[:count])

    def activation_params(self, config: QuantConfig) -> dict[str, tuple[float, int]]:
        """``{tensor name: (scale, zero point)}`` of every quantization point."""
        config = self.resolve(config)
        return {p.name: activation_qparams(o, config) for p, o in self.observers.items()}


def run_calibration(
    mod: tvm.IRModule,
    samples: Iterable[dict[str, np.ndarray]],
    bins: int = 2048,
    dump_dir: str | None = None,
    layer_inputs: bool = False,
    equalize: bool = False,
) -> Calibration:
    """Phases 1-3: prepare (and with ``equalize``, equalize conv pairs:
    :mod:`~qcompiler.passes.equalize`), plan and calibrate."""
    mod = prepare(mod)
    equalized = None
    if equalize:
        mod, equalized = equalize_module(mod)
    _dump(dump_dir, "01-prepare", mod)
    plan = plan_quantization(mod["main"])
    layers = layer_statistics(mod, held_out=PROBE_HOLDOUT) if layer_inputs else {}
    kept = []
    observers = calibrate(
        mod, plan, samples, bins=bins, layers=layers, keep=kept, keep_count=PROBE_SAMPLES
    )
    kept_samples, outputs = [s for s, _ in kept], [o for _, o in kept]
    return Calibration(
        mod,
        plan,
        observers,
        layers,
        samples=kept_samples,
        float_outputs=outputs,
        equalized=equalized,
    )


# Calibration samples kept for measuring the outputs (the int16 choice): a fixed few, so that
# memory does not grow with the calibration set.
PROBE_SAMPLES = 2
# Calibration samples that the layers' input statistics leave out, the first few: the weight
# probe scores each layer's rounding on them (the CLI's and the benchmarks' probe samples), so
# that rounding fitted to the rest is scored on inputs it was not fitted to.
PROBE_HOLDOUT = 8
# Patch positions per kept sample in :meth:`Calibration.kept_layer_statistics`: the two samples
# give 3.5 times the longest patch gathered (``rounding.MAX_PATCH``).
KEPT_POSITIONS = 4096


def layer_statistics(
    mod: tvm.IRModule, positions: int = rounding.POSITIONS_PER_SAMPLE, held_out: int = 0
) -> dict:
    """Empty :class:`~qcompiler.passes.rounding.LayerStats` for every conv2d/matmul of
    ``main`` whose input statistics can be gathered, by the layer's var; the first
    ``held_out`` samples are left out of them (see ``LayerStats``)."""
    layers = {}
    for binding in bindings(mod["main"]):
        call, weight = binding.value, None
        if op_name(call) in CONV_OPS | MATMUL_OPS:
            weight = const_value(call.args[1])
        if rounding.supported(call, weight):
            layers[binding.var] = rounding.LayerStats(
                call, weight.shape, positions=positions, held_out=held_out
            )
    return layers


def _rounding(config: QuantConfig, widened: bool) -> str:
    """The weight rounding ``config`` resolves to (``"auto"``: see ``QuantConfig``)."""
    if config.weight_rounding != AUTO:
        return config.weight_rounding
    if widened:
        return "optimized"
    return OPTIMIZED_4BIT if config.int4_weights else "nearest"


def quantize_module(
    mod: tvm.IRModule,
    samples: Iterable[dict[str, np.ndarray]],
    config: QuantConfig | None = None,
    dump_dir: str | None = None,
) -> tvm.IRModule:
    """The whole pipeline: float module + calibration samples -> integer-only module."""
    config = config or QuantConfig(int16_activations=())
    calibration = run_calibration(mod, samples, bins=config.calibration.bins, dump_dir=dump_dir)
    return calibration.quantize(config, dump_dir=dump_dir)


def lower_prequantized(
    mod: tvm.IRModule, rounding: str, dump_dir: str | None = None
) -> tvm.IRModule:
    """An already-quantized import (TFLite int8/uint8, ONNX QDQ) -> integer-only module.

    No calibration: the model's own scales and zero points, with ``rounding`` the arithmetic
    of the runtime it was quantized for (see :func:`integerize`).
    """
    mod = prepare_prequantized(mod)
    _dump(dump_dir, "01-prepare", mod)
    integer = channels_last(integerize(mod, rounding=rounding))
    _dump(dump_dir, "05-integerize", integer)
    verify_integer_only(integer)
    verify_accumulators(integer)
    return integer


def float_fallbacks(mod: tvm.IRModule) -> list[str]:
    """Names of the tensors integerize left in float inside integer regions."""
    attrs = mod["main"].attrs or {}
    return [str(n) for n in attrs.get(FALLBACK_ATTR, [])]


def layer_table(mod: tvm.IRModule) -> list[dict]:
    """Each conv/matmul layer of ``mod["main"]``: its precision and stored weight bytes.

    The precision is ``w<bits>a<bits>`` from the dtypes the layer computes on (``w8a8``:
    int8 weights, 8-bit activations), or ``float``; layers with 4-bit weights (``int4_weights``)
    are ``w4a<bits>`` and store half a byte per weight.
    """
    table = []
    int4 = {str(n) for n in (mod["main"].attrs or {}).get(INT4_ATTR, [])}
    for binding in bindings(mod["main"]):
        value = binding.value
        if op_name(value) not in CONV_OPS | MATMUL_OPS:
            continue
        data, weight = (arg.ty.dtype for arg in value.args[:2])
        stored = const_value(value.args[1])
        name = layer_name(mod["main"], binding.var.name)
        bits = 4 if name in int4 else tvm.DataType(weight).bits
        precision = (
            "float"
            if str(data).startswith(("float", "bfloat"))
            else f"w{bits}a{tvm.DataType(data).bits}"
        )
        size = 0 if stored is None else int(stored.nbytes)
        table.append(
            {
                "layer": name,
                "op": op_name(value).removeprefix("relax."),
                "precision": precision,
                "weight_bytes": (stored.size + 1) // 2 if bits == 4 else size,
            }
        )
    return table


def _dump(dump_dir: str | None, name: str, mod: tvm.IRModule) -> None:
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, f"{name}.py"), "w") as f:
            f.write(mod.script(show_meta=False))

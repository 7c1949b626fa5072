"""Quantization specs, schemes and presets: the vocabulary every other part of qcompiler speaks.

A real value ``r`` is represented by an integer ``q`` as ``r = s * (q - z)`` (scale ``s > 0``,
zero point ``z``). A :class:`QuantSpec` says which integers ``q`` may take and how ``s``/``z`` are
chosen; a :class:`QuantScheme` pairs a spec for weights with one for activations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qcompiler.passes.errors import QCompilerError

CALIBRATION_METHODS = ("minmax", "percentile", "kl", "mse")
# ``CalibConfig.method``: each activation's range measured on the outputs (needs
# ``int16_activations="auto"``); tensors the outputs do not feel use MinMax.
AUTO_METHOD = "auto"


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor is quantized.

    Parameters
    ----------
    bits : int
        Width of the integer, 2..16.
    signed : bool
        Signed (two's complement) or unsigned integers.
    symmetric : bool
        Zero point fixed at 0 (``r = s * q``), range centred on zero.
    per_channel : bool
        One scale (and zero point) per output channel instead of one per tensor.
    narrow_range : bool
        Drop the most negative code of a signed type (int8: [-127, 127]) so that ``-q`` never
        overflows and the range is exactly symmetric.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    per_channel: bool = False
    narrow_range: bool = False

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise QCompilerError(f"QuantSpec.bits must be in [2, 16], got {self.bits}")
        if self.symmetric and not self.signed:
            raise QCompilerError(
                "QuantSpec(symmetric=True, signed=False) cannot represent negative values with "
                "zero point 0; use signed=True for symmetric quantization"
            )
        if self.narrow_range and not self.signed:
            raise QCompilerError("QuantSpec.narrow_range only applies to signed integers")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(1 << (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def dtype(self) -> str:
        """The narrowest storage dtype holding the codes (int4 is stored widened until packed)."""
        width = 8 if self.bits <= 8 else 16
        return f"{'int' if self.signed else 'uint'}{width}"


@dataclass(frozen=True)
class QuantScheme:
    """A named pair of specs: one for weights, one for activations."""

    name: str
    weight: QuantSpec
    activation: QuantSpec

    def __post_init__(self):
        if self.activation.per_channel:
            raise QCompilerError(
                f"scheme {self.name!r}: activations are quantized per tensor; per_channel=True is "
                "only supported for weights"
            )


PRESETS: dict[str, QuantScheme] = {
    # Weights symmetric per output channel, activations asymmetric uint8: the default. The zero
    # point of the activation folds into the bias, so it costs nothing at run time.
    "hybrid": QuantScheme(
        "hybrid",
        weight=QuantSpec(8, signed=True, symmetric=True, per_channel=True, narrow_range=True),
        activation=QuantSpec(8, signed=False, symmetric=False),
    ),
    # Everything symmetric: zero points are 0, activations int8.
    "symmetric": QuantScheme(
        "symmetric",
        weight=QuantSpec(8, signed=True, symmetric=True, per_channel=True, narrow_range=True),
        activation=QuantSpec(8, signed=True, symmetric=True),
    ),
    # Everything asymmetric: weights uint8 with a zero point per output channel as well.
    "asymmetric": QuantScheme(
        "asymmetric",
        weight=QuantSpec(8, signed=False, symmetric=False, per_channel=True),
        activation=QuantSpec(8, signed=False, symmetric=False),
    ),
}


def get_scheme(name_or_scheme: str | QuantScheme) -> QuantScheme:
    """Look a preset up by name (or pass a scheme through)."""
    if isinstance(name_or_scheme, QuantScheme):
        return name_or_scheme
    if name_or_scheme not in PRESETS:
        raise QCompilerError(
            f"unknown quantization scheme {name_or_scheme!r}, candidates are {sorted(PRESETS)}"
        )
    return PRESETS[name_or_scheme]


@dataclass(frozen=True)
class CalibConfig:
    """How activation ranges are chosen from calibration statistics.

    Parameters
    ----------
    method : str
        ``minmax``, ``percentile``, ``kl`` (TensorRT-style entropy), ``mse``, or ``auto``: per
        tensor, the one of these whose range costs the model's outputs least, measured for the
        tensors whose 8-bit rounding the outputs feel (see
        :func:`qcompiler.targets.sensitivity.choose_activations`), MinMax for the rest.
    percentile : float
        For ``percentile``: the share of values (in percent) kept inside the range, e.g. 99.99.
    bins : int
        Histogram resolution used by the histogram-based methods.
    """

    method: str = "minmax"
    percentile: float = 99.99
    bins: int = 2048

    def __post_init__(self):
        if self.method not in (*CALIBRATION_METHODS, AUTO_METHOD):
            raise QCompilerError(
                f"unknown calibration method {self.method!r}, candidates are "
                f"{[*CALIBRATION_METHODS, AUTO_METHOD]}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise QCompilerError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.bins < 128:
            raise QCompilerError(f"bins must be >= 128, got {self.bins}")


# ``QuantConfig.int16_activations`` and ``weight_rounding``: chosen by measuring the outputs.
AUTO = "auto"

# ``optimized-4bit``: 4-bit weights optimized, 8-bit ones to nearest (what ``auto`` resolves to
# unless the activations widened).
OPTIMIZED_4BIT = "optimized-4bit"
WEIGHT_ROUNDINGS = (AUTO, "nearest", "optimized", OPTIMIZED_4BIT)

# Activations that need more than 8 bits: asymmetric int16 codes.
INT16_ACTIVATION = QuantSpec(16, signed=True, symmetric=False)


@dataclass(frozen=True)
class QuantConfig:
    """Everything the quantizer needs to know besides the model and the data.

    ``int16_activations``: which activation tensors (quantization points) are kept at 16 bits
    (:data:`INT16_ACTIVATION`) instead of the scheme's activation spec:

    - ``"auto"`` (the default): those whose 8-bit rounding alone costs the model's outputs the
      most, measured on a few calibration samples, and only when the all-8-bit outputs lose
      enough to need it (:func:`qcompiler.targets.sensitivity.choose_activations`);
    - names of tensors;
    - a share in [0, 1]: that fraction of the tensors whose 8-bit quantization is noisiest by
      the calibration histograms alone (see :meth:`Calibration.noisiest
      <qcompiler.passes.pipeline.Calibration.noisiest>`); ``0`` keeps every activation at 8 bits.

    ``weight_rounding``: ``nearest``, or ``optimized``: each weight rounded down or up to
    reduce the layer's output error on the calibration data (:mod:`~qcompiler.passes.rounding`),
    or ``optimized-4bit``: the 4-bit layers' weights optimized, the 8-bit ones to nearest, or
    ``"auto"`` (the default): where the weights are the larger error. That is every layer when
    the measured ``int16_activations="auto"`` choice widens every activation (``optimized``,
    see :class:`~qcompiler.passes.pipeline.ActivationChoice`), else the 4-bit layers
    (``optimized-4bit``): 15 levels lose far more than 255. Without the calibration's layer
    statistics, ``auto`` optimizes on those of the kept calibration samples.
    ``bias_correction``: remove the mean output shift that weight rounding causes, per channel,
    from every layer. 4-bit layers whose weights are optimized have theirs removed regardless
    (:meth:`corrects_bias`). Both need symmetric weights and apply to conv2d/matmul layers
    with constant weights.

    ``equalize``: cross-layer equalization of conv pairs joined by a bias add and a ReLU
    (:mod:`~qcompiler.passes.equalize`), before calibration: the calibration must be made
    with ``equalize=True``.

    ``tensor_methods``: ``(tensor name, range method)`` pairs overriding
    ``calibration.method`` for those activations (``calibration.method="auto"`` fills them).

    ``int4_weights``: names of conv2d/matmul layers (the op's tensor in the imported model, as
    the manifest's layer table lists them) whose weights get 4 bits, symmetric per channel
    ([-7, 7]); they are stored two per byte (W4A8).

    ``float_layers``: names of conv2d/matmul layers kept in float: their weights stay float32
    and they run as float fallbacks between a dequantize of their input codes and a quantize of
    their output (the report counts them).

    ``nearest_weights``: names of conv2d/matmul layers whose weights round to nearest whatever
    ``weight_rounding`` says: a per-layer rounding choice. Rounding against the layer's inputs
    lowers the error on the statistics it was fitted to, not always on other inputs (a
    classifier's last matmul, EfficientNet-Lite0's 1x1 convs on 7x7 maps); the accuracy-budget
    search fills it with the layers whose 4-bit error measured lower rounded to nearest.
    """

    scheme: QuantScheme = field(default_factory=lambda: PRESETS["hybrid"])
    calibration: CalibConfig = field(default_factory=CalibConfig)
    int16_activations: tuple[str, ...] | float | str = AUTO
    weight_rounding: str = AUTO
    bias_correction: bool = False
    equalize: bool = False
    int4_weights: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()
    nearest_weights: tuple[str, ...] = ()
    tensor_methods: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if isinstance(self.scheme, str):
            object.__setattr__(self, "scheme", get_scheme(self.scheme))
        if isinstance(self.calibration, str):
            object.__setattr__(self, "calibration", CalibConfig(self.calibration))
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise QCompilerError(
                f"unknown weight rounding {self.weight_rounding!r}, candidates are "
                f"{list(WEIGHT_ROUNDINGS)}"
            )
        object.__setattr__(self, "int4_weights", tuple(str(n) for n in self.int4_weights))
        object.__setattr__(self, "float_layers", tuple(str(n) for n in self.float_layers))
        object.__setattr__(self, "nearest_weights", tuple(str(n) for n in self.nearest_weights))
        both = sorted(set(self.int4_weights) & set(self.float_layers))
        if both:
            raise QCompilerError(f"layers {both} are named both in int4_weights and float_layers")
        methods = tuple((str(n), str(m)) for n, m in dict(self.tensor_methods).items())
        for name, method in methods:
            if method not in CALIBRATION_METHODS:
                raise QCompilerError(
                    f"unknown calibration method {method!r} for tensor {name!r}, candidates "
                    f"are {list(CALIBRATION_METHODS)}"
                )
        object.__setattr__(self, "tensor_methods", methods)

        if self.int4_weights and not self.scheme.weight.symmetric:
            raise QCompilerError("int4 weights need a scheme with symmetric weights")
        wide = self.int16_activations
        if wide == AUTO:
            pass
        elif isinstance(wide, int | float) and not isinstance(wide, bool):
            if not 0.0 <= wide <= 1.0:
                raise QCompilerError(f"int16_activations share must be in [0, 1], got {wide}")
        elif isinstance(wide, str):
            raise QCompilerError(
                f"int16_activations must be {AUTO!r}, a share or tensor names, got {wide!r}"
            )
        else:
            object.__setattr__(self, "int16_activations", tuple(str(n) for n in wide))

    @property
    def needs_layer_inputs(self) -> bool:
        """Whether quantizing needs each layer's input statistics from calibration."""
        return (
            self.weight_rounding == "optimized"
            or self.bias_correction
            or (self.weight_rounding == OPTIMIZED_4BIT and bool(self.int4_weights))
        )

    def wants_layer_inputs(self, four_bit: bool = False) -> bool:
        """Whether a calibration for this config should gather the layers' input statistics:
        it needs them, or ``"auto"`` rounding will optimize 4-bit layers (``four_bit``: a
        bit-width search will choose some). Without them, ``"auto"`` falls back on the kept
        samples' statistics, too few patches for the layers of small feature maps."""
        four_bit = four_bit or bool(self.int4_weights)
        return self.needs_layer_inputs or (self.weight_rounding == AUTO and four_bit)

    def optimized_rounding(self, bits: int, layer: str | None = None) -> bool:
        """Whether weights of ``bits`` bits (of the layer called ``layer``, if given) are rounded
        against their layer's input statistics (a resolved ``weight_rounding``: not ``"auto"``;
        ``nearest_weights`` round to nearest)."""
        if layer is not None and layer in self.nearest_weights:
            return False
        return self.weight_rounding == "optimized" or (
            self.weight_rounding == OPTIMIZED_4BIT and bits == 4
        )

    def corrects_bias(self, bits: int, layer: str | None = None) -> bool:
        """Whether the mean output shift of weights of ``bits`` bits (of the layer called
        ``layer``) is removed from the bias, their codes then rounded against the covariance
        of the inputs (:mod:`~qcompiler.passes.rounding`): with ``bias_correction``, or for
        optimized 4-bit weights, whose mean shift is large (on EfficientNet-Lite0, uniform W4A8
        lost 15.75 top-1 points without the correction and 5.00 with it)."""
        return self.bias_correction or (bits == 4 and self.optimized_rounding(bits, layer))

    def weight_spec(self, layer: str) -> QuantSpec:
        """The spec of the weights of the conv/matmul layer called ``layer``."""
        if layer in self.int4_weights:
            return dataclasses.replace(self.scheme.weight, bits=4, narrow_range=True)
        return self.scheme.weight

    def range_method(self, name: str) -> str:
        """The range method of the activation tensor called ``name``."""
        method = dict(self.tensor_methods).get(name, self.calibration.method)
        return "minmax" if method == AUTO_METHOD else method

    def activation_spec(self, name: str) -> QuantSpec:
        """The spec of the activation tensor called ``name``."""
        wide = self.int16_activations
        return (
            INT16_ACTIVATION if isinstance(wide, tuple) and name in wide else self.scheme.activation
        )

"""Quantization vocabulary, observers and the Relax passes of qcompiler (the ground floor)."""

from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.scheme import PRESETS, CalibConfig, QuantConfig, QuantScheme, QuantSpec

__all__ = ["PRESETS", "CalibConfig", "QCompilerError", "QuantConfig", "QuantScheme", "QuantSpec"]

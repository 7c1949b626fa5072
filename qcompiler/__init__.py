"""qcompiler: a quantizing compiler for Apache TVM.

A float ONNX/TFLite model and a little calibration data in; an integer-only library out.
"""

__version__ = "0.1.0"

from qcompiler.api import (  # noqa: E402
    Artifact,
    CalibConfig,
    QuantConfig,
    QuantizedModel,
    QuantScheme,
    QuantSpec,
    calibrate,
    compile,
    compile_float,
    load,
    quantize,
    tune,
)
from qcompiler.passes.errors import QCompilerError  # noqa: E402

__all__ = [
    "Artifact",
    "CalibConfig",
    "QCompilerError",
    "QuantConfig",
    "QuantScheme",
    "QuantSpec",
    "QuantizedModel",
    "calibrate",
    "compile",
    "compile_float",
    "load",
    "quantize",
    "tune",
]

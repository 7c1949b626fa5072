"""qcompiler: a quantizing compiler for Apache TVM.

A float ONNX/TFLite model and a little calibration data in; an integer-only library out.
"""

__version__ = "0.1.0"

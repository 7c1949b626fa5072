"""Model import: ONNX and TFLite files (or in-memory models) to a float Relax module.

Before TVM's importer sees an ONNX graph, ``auto_pad=SAME_*`` convolutions get explicit ``pads``
(TVM otherwise emits an opaque TIR pad the quantizer cannot see through).

Every problem with the file (missing, unreadable, corrupt, unsupported op) is a
:class:`QCompilerError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from qcompiler.data import InputSpec
from qcompiler.passes.errors import QCompilerError


@dataclass
class ImportedModel:
    """A float model in Relax, with what a caller needs to feed it."""

    mod: tvm.IRModule
    name: str
    format: str
    inputs: list[InputSpec]
    outputs: list[InputSpec] = field(default_factory=list)
    sha256: str = ""


def load_model(model, name: str | None = None) -> ImportedModel:
    """Import a model given as a path, an ``onnx.ModelProto`` or TFLite flatbuffer bytes."""
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.is_file():
            raise QCompilerError(f"model file {str(path)!r} does not exist")
        data = path.read_bytes()
        if not data:
            raise QCompilerError(f"model file {str(path)!r} is empty")
        name = name or path.stem
        if path.suffix.lower() == ".tflite" or data[4:8] == b"TFL3":
            return _import_tflite(data, name, str(path))
        if path.suffix.lower() == ".onnx":
            return _import_onnx(_parse_onnx(data, str(path)), name, str(path), data)
        raise QCompilerError(
            f"cannot tell the format of {str(path)!r}: expected a .onnx or .tflite file"
        )
    if isinstance(model, bytes | bytearray):
        return _import_tflite(bytes(model), name or "model", "<bytes>")
    import onnx

    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
        return _import_onnx(model, name or model.graph.name or "model", "<ModelProto>", data)
    raise QCompilerError(
        f"unsupported model object of type {type(model).__name__}: give a path, an "
        "onnx.ModelProto or TFLite bytes"
    )


# -- ONNX -------------------------------------------------------------------------------------
def _parse_onnx(data: bytes, where: str):
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as err:  # protobuf raises its own DecodeError types
        raise QCompilerError(f"{where} is not a valid ONNX file: {err}") from None
    if not model.graph.node:
        raise QCompilerError(f"{where} holds an ONNX model with no nodes")
    return model


def _onnx_inputs(model) -> list[InputSpec]:
    from onnx import helper

    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        # Symbolic (batch) dimensions are bound to 1: these are single-sample edge models.
        shape = tuple(d.dim_value if d.dim_value > 0 else 1 for d in tensor.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        specs.append(InputSpec(value.name, shape, dtype))
    return specs


def _normalize_onnx(model):
    """Explicit conv padding (see the module docstring)."""
    import onnx
    from onnx import shape_inference

    inputs = {v.name for v in model.graph.input}
    if model.ir_version < 4 and any(t.name not in inputs for t in model.graph.initializer):
        # IR 3 required every initializer to be a graph input; tools that add initializers to
        # an old model (onnxruntime's quantizer) leave it invalid under its own version.
        model.ir_version = 4
    model = shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value for d in dims]
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            _explicit_pads(node, shapes.get(node.input[0]))
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def _explicit_pads(node, in_shape) -> None:
    attrs = {a.name: a for a in node.attribute}
    mode = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
    if mode not in ("SAME_UPPER", "SAME_LOWER") or not in_shape or 0 in in_shape:
        return
    from onnx import helper

    kernel = list(attrs["kernel_shape"].ints)
    strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * len(kernel)
    dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * len(kernel)
    begin, end = [], []
    for size, k, s, d in zip(in_shape[2:], kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(helper.make_attribute("pads", begin + end))


def _import_onnx(model, name: str, where: str, data: bytes) -> ImportedModel:
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = _get_convert_map()
    unknown = sorted({n.op_type for n in model.graph.node if n.op_type not in known})
    if unknown:
        raise QCompilerError(f"{where}: unsupported ONNX op(s) {unknown}")
    inputs = _onnx_inputs(model)
    try:
        model = _normalize_onnx(model)
        mod = from_onnx(
            model, shape_dict={i.name: list(i.shape) for i in inputs}, keep_params_in_input=False
        )
    except QCompilerError:
        raise
    except Exception as err:
        raise QCompilerError(f"{where}: TVM could not import the ONNX model: {err}") from None
    return ImportedModel(
        mod, name, "onnx", inputs, _relax_outputs(mod), hashlib.sha256(data).hexdigest()
    )


# -- TFLite -----------------------------------------------------------------------------------
def _import_tflite(data: bytes, name: str, where: str) -> ImportedModel:
    import tflite
    from tvm.relax.frontend.tflite import from_tflite

    if len(data) < 8 or data[4:8] != b"TFL3":
        raise QCompilerError(f"{where} is not a TFLite flatbuffer (no 'TFL3' identifier)")
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        graph = model.Subgraphs(0)
        inputs = []
        for i in range(graph.InputsLength()):
            tensor = graph.Tensors(graph.Inputs(i))
            shape = tuple(int(d) if d > 0 else 1 for d in tensor.ShapeAsNumpy())
            inputs.append(InputSpec(tensor.Name().decode(), shape, _TFLITE_DTYPES[tensor.Type()]))
    except Exception as err:
        raise QCompilerError(f"{where}: corrupt TFLite model: {err}") from None
    try:
        mod = from_tflite(
            model,
            shape_dict={i.name: i.shape for i in inputs},
            dtype_dict={i.name: i.dtype for i in inputs},
        )
    except Exception as err:
        raise QCompilerError(f"{where}: TVM could not import the TFLite model: {err}") from None
    mod = mod[0] if isinstance(mod, tuple) else mod
    return ImportedModel(
        mod, name, "tflite", inputs, _relax_outputs(mod), hashlib.sha256(data).hexdigest()
    )


_TFLITE_DTYPES = {
    0: "float32",
    1: "float16",
    2: "int32",
    3: "uint8",
    4: "int64",
    9: "int8",
    7: "int16",
}


def _relax_outputs(mod) -> list[InputSpec]:
    ty = mod["main"].ret_ty
    fields = ty.fields if isinstance(ty, relax.TupleType) else [ty]
    return [
        InputSpec(
            f"output_{i}" if len(fields) > 1 else "output",
            tuple(int(d) for d in f.shape),
            str(f.dtype),
        )
        for i, f in enumerate(fields)
    ]

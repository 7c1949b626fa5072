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


def _check_onnx_values(model, where: str) -> None:
    """Refuse NaN/Inf in float initializers and QuantizeLinear/DequantizeLinear scales that
    are not finite and > 0, naming the tensor (see :func:`_check_tflite_values`)."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    qdq_scales = {
        n.input[1]: n.name or n.op_type
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1
    }
    for name, tensor in initializers.items():
        if tensor.data_location == 1:  # external data: checked when it is loaded
            continue
        try:
            value = numpy_helper.to_array(tensor)
        except Exception as err:
            raise QCompilerError(f"{where}: initializer {name!r} cannot be read: {err}") from None
        if value.dtype.kind != "f":
            continue
        bad = value.size - int(np.count_nonzero(np.isfinite(value)))
        if bad:
            raise QCompilerError(f"{where}: initializer {name!r} holds {bad} NaN/Inf value(s)")
        if name in qdq_scales and np.any(value <= 0):
            raise QCompilerError(
                f"{where}: {qdq_scales[name]} has scale {name!r} = {value[value <= 0].flat[0]}; "
                "scales must be finite and > 0"
            )


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
    from onnx.defs import onnx_opset_version
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    latest = onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > latest:
            raise QCompilerError(
                f"{where}: the model uses ONNX opset {opset.version}, newer than the {latest} "
                "this installation knows; export it with an older opset"
            )
    known = _get_convert_map()
    unknown = sorted({n.op_type for n in model.graph.node if n.op_type not in known})
    if unknown:
        raise QCompilerError(f"{where}: unsupported ONNX op(s) {unknown}")
    inputs = _onnx_inputs(model)
    _check_onnx_values(model, where)
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

    from qcompiler.tflite_ops import CustomOpConverter

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
        _check_tflite_values(model, graph, where)
    except QCompilerError:
        raise
    except Exception as err:  # offsets past the end of a damaged flatbuffer
        raise QCompilerError(f"{where}: corrupt TFLite model: {err}") from None
    try:
        mod = from_tflite(
            model,
            shape_dict={i.name: i.shape for i in inputs},
            dtype_dict={i.name: i.dtype for i in inputs},
            op_converter=CustomOpConverter,
        )
    except Exception as err:
        raise QCompilerError(f"{where}: TVM could not import the TFLite model: {err}") from None
    mod = mod[0] if isinstance(mod, tuple) else mod
    return ImportedModel(
        mod, name, "tflite", inputs, _relax_outputs(mod), hashlib.sha256(data).hexdigest()
    )


# Ops whose bias (input 2) is int32 in units of input scale x weight scale.
_TFLITE_BIASED = {3: "CONV_2D", 4: "DEPTHWISE_CONV_2D", 9: "FULLY_CONNECTED"}
_TFLITE_FLOATS = {0: np.float32, 1: np.float16}


def _check_tflite_values(model, graph, where: str) -> None:
    """Refuse what no integer (or float) arithmetic can give a meaning to, naming the tensor:
    NaN/Inf in float weights, quantization scales that are not finite and > 0, zero points
    outside their dtype, and an int32 bias whose scale is not the input scale times the
    weight scale (TFLite's kernels ignore the bias scale and read the codes in those units;
    a model that says otherwise has been damaged)."""

    def name(t: int) -> str:
        return f"tensor {t} {graph.Tensors(t).Name().decode(errors='replace')!r}"

    def scales(t: int) -> np.ndarray | None:
        q = graph.Tensors(t).Quantization()
        return None if q is None or q.ScaleIsNone() else q.ScaleAsNumpy().astype(np.float64)

    for t in range(graph.TensorsLength()):
        tensor = graph.Tensors(t)
        s = scales(t)
        if s is not None and s.size:
            if not np.all(np.isfinite(s) & (s > 0)):
                bad = s[~(np.isfinite(s) & (s > 0))][0]
                raise QCompilerError(
                    f"{where}: {name(t)} has quantization scale {bad}; "
                    "scales must be finite and > 0"
                )
            zp = tensor.Quantization().ZeroPointAsNumpy()
            dtype = _TFLITE_DTYPES.get(tensor.Type())
            if isinstance(zp, np.ndarray) and dtype in ("int8", "uint8", "int16"):
                info = np.iinfo(dtype)
                if np.any((zp < info.min) | (zp > info.max)):
                    raise QCompilerError(
                        f"{where}: {name(t)} has a zero point outside {dtype}: "
                        f"{zp[(zp < info.min) | (zp > info.max)][0]}"
                    )
        buffer = model.Buffers(tensor.Buffer())
        if tensor.Type() in _TFLITE_FLOATS and not buffer.DataIsNone():
            values = buffer.DataAsNumpy().view(_TFLITE_FLOATS[tensor.Type()])
            bad = values.size - int(np.count_nonzero(np.isfinite(values)))
            if bad:
                raise QCompilerError(f"{where}: {name(t)} holds {bad} NaN/Inf value(s)")
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        kind = _TFLITE_BIASED.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))
        inputs = op.InputsAsNumpy()
        if kind is None or len(inputs) < 3 or inputs[2] < 0:
            continue
        data, weights, bias = (int(t) for t in inputs[:3])
        s_x, s_w, s_b = scales(data), scales(weights), scales(bias)
        if s_x is None or s_w is None or s_b is None or not (s_x.size and s_w.size and s_b.size):
            continue
        expected = (s_x.astype(np.float32) * s_w.astype(np.float32)).astype(np.float64)
        codes = _tflite_codes(model, graph, bias)
        if codes is None or codes.size != np.broadcast_shapes(s_b.shape, expected.shape)[0]:
            continue
        # Exact when |code * (s_b / expected - 1)| < 1/2: re-expressing the bias in
        # accumulator units then gives back its codes.
        drift = np.abs(codes * (s_b / expected - 1.0))
        if np.any(drift >= 0.5):
            raise QCompilerError(
                f"{where}: operator {i} ({kind}) has bias {name(bias)} with scale "
                f"{s_b[np.argmax(drift) % s_b.size]:g}, but its input scale x weight scale is "
                f"{expected[np.argmax(drift) % expected.size]:g}; TFLite reads bias codes in "
                "those units, so the model's quantization parameters are inconsistent"
            )


def _tflite_codes(model, graph, t: int) -> np.ndarray | None:
    tensor = graph.Tensors(t)
    buffer = model.Buffers(tensor.Buffer())
    if tensor.Type() != 2 or buffer.DataIsNone():  # int32
        return None
    return buffer.DataAsNumpy().view(np.int32).astype(np.float64)


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

"""A minimal TFLite flatbuffer writer for one-operator test models (float, or 8-bit quantized).

The ``tflite`` package only reads flatbuffers, and TensorFlow is not a dependency; this writes the
few tables a one-op model needs (slots as numbered in TFLite's schema.fbs), so a test can hand the
same weights to LiteRT and to qcompiler.
"""

from __future__ import annotations

from dataclasses import dataclass

import flatbuffers
import numpy as np

_TYPES = {np.dtype("float32"): 0, np.dtype("int32"): 2, np.dtype("uint8"): 3, np.dtype("int8"): 9}


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    value: np.ndarray | None = None  # constant data, or None for a runtime tensor
    quantization: tuple[float, int] | None = None  # (scale, zero point) of a quantized tensor


@dataclass
class Op:
    inputs: list[int]
    outputs: list[int]
    builtin_code: int = 32  # CUSTOM
    custom_code: str | None = None
    custom_options: bytes | None = None
    options_type: int = 0  # tflite.BuiltinOptions
    options: dict[int, tuple[str, int]] | None = None  # slot -> (flatbuffers kind, value)


def _ints(b: flatbuffers.Builder, values, kind="Int32", size=4) -> int:
    b.StartVector(size, len(values), size)
    for v in reversed(list(values)):
        getattr(b, f"Prepend{kind}")(v)
    return b.EndVector()


def _offsets(b: flatbuffers.Builder, offsets) -> int:
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def build(tensors: list[Tensor], ops: list[Op], inputs: list[int], outputs: list[int]) -> bytes:
    """Serialize one subgraph; buffer 0 is the empty sentinel TFLite expects."""
    b = flatbuffers.Builder(1024)
    buffers = [None] + [t.value for t in tensors]
    buffer_offsets = []
    for value in buffers:
        data = None
        if value is not None:
            data = b.CreateNumpyVector(np.frombuffer(np.ascontiguousarray(value).tobytes(), "u1"))
        b.StartObject(3)
        if data is not None:
            b.PrependUOffsetTRelativeSlot(0, data, 0)
        buffer_offsets.append(b.EndObject())

    tensor_offsets = []
    for i, t in enumerate(tensors):
        name = b.CreateString(t.name)
        shape = _ints(b, t.shape)
        quantization = None
        if t.quantization is not None:
            scale = _ints(b, [t.quantization[0]], "Float32")
            zero_point = _ints(b, [t.quantization[1]], "Int64", 8)
            b.StartObject(7)  # QuantizationParameters: scale (slot 2), zero_point (slot 3)
            b.PrependUOffsetTRelativeSlot(2, scale, 0)
            b.PrependUOffsetTRelativeSlot(3, zero_point, 0)
            quantization = b.EndObject()
        b.StartObject(8)
        b.PrependUOffsetTRelativeSlot(0, shape, 0)
        if quantization is not None:
            b.PrependUOffsetTRelativeSlot(4, quantization, 0)
        b.PrependInt8Slot(1, _TYPES[np.dtype(t.dtype)], 0)
        b.PrependUint32Slot(2, i + 1 if t.value is not None else 0, 0)
        b.PrependUOffsetTRelativeSlot(3, name, 0)
        tensor_offsets.append(b.EndObject())

    codes = sorted({(op.builtin_code, op.custom_code) for op in ops}, key=str)
    code_offsets = []
    for builtin, custom in codes:
        custom_off = b.CreateString(custom) if custom else None
        b.StartObject(4)
        b.PrependInt8Slot(0, min(builtin, 127), 0)
        if custom_off is not None:
            b.PrependUOffsetTRelativeSlot(1, custom_off, 0)
        b.PrependInt32Slot(2, 1, 1)
        b.PrependInt32Slot(3, builtin, 0)
        code_offsets.append(b.EndObject())

    op_offsets = []
    for op in ops:
        op_in, op_out = _ints(b, op.inputs), _ints(b, op.outputs)
        custom = None
        if op.custom_options is not None:
            custom = b.CreateNumpyVector(np.frombuffer(op.custom_options, "u1"))
        options = None
        if op.options:
            b.StartObject(max(op.options) + 1)
            for slot, (kind, value) in op.options.items():
                getattr(b, f"Prepend{kind}Slot")(slot, value, 0)
            options = b.EndObject()
        b.StartObject(7)
        b.PrependUint32Slot(0, codes.index((op.builtin_code, op.custom_code)), 0)
        b.PrependUOffsetTRelativeSlot(1, op_in, 0)
        b.PrependUOffsetTRelativeSlot(2, op_out, 0)
        if options is not None:
            b.PrependUint8Slot(3, op.options_type, 0)
            b.PrependUOffsetTRelativeSlot(4, options, 0)
        if custom is not None:
            b.PrependUOffsetTRelativeSlot(5, custom, 0)
        op_offsets.append(b.EndObject())

    tensors_vec, ops_vec = _offsets(b, tensor_offsets), _offsets(b, op_offsets)
    in_vec, out_vec = _ints(b, inputs), _ints(b, outputs)
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, tensors_vec, 0)
    b.PrependUOffsetTRelativeSlot(1, in_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, out_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, ops_vec, 0)
    subgraph = b.EndObject()

    codes_vec, graphs_vec = _offsets(b, code_offsets), _offsets(b, [subgraph])
    buffers_vec = _offsets(b, buffer_offsets)
    b.StartObject(5)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, codes_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, graphs_vec, 0)
    b.PrependUOffsetTRelativeSlot(4, buffers_vec, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    return bytes(b.Output())

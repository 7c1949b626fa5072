"""TFLite custom operators that TVM's importer does not know, converted to Relax.

TVM's TFLite frontend refuses every custom operator but one (the SSD post-processing). MediaPipe
models ship a few of their own; the one that matters in practice is ``Convolution2DTransposeBias``,
the upsampling head of the selfie segmentation and hair/face mesh models. It is a transposed
convolution with a bias, whose options are the raw bytes of ``TfLiteTransposeConvParams``
(padding, stride_width, stride_height as three little-endian int32s).
"""

from __future__ import annotations

import struct

import numpy as np
from tvm import relax
from tvm.relax.frontend.tflite.tflite_frontend import OperatorConverter

from qcompiler.passes.errors import QCompilerError

_CUSTOM = 32  # tflite.BuiltinOperator.CUSTOM
_PADDING_SAME, _PADDING_VALID = 1, 2  # TfLitePadding


def transposed_conv_padding(size_in: int, size_out: int, kernel: int, stride: int, same: bool):
    """(pad_before, pad_after, output_padding) of a transposed conv, as TFLite computes them.

    TFLite derives the padding as for the forward convolution that maps the output back to the
    input; a transposed conv of ``size_in`` then yields ``(size_in-1)*stride + kernel - pads``,
    and any shortfall to ``size_out`` is output padding.
    """
    if not same:
        return 0, 0, 0
    total = (size_in - 1) * stride + kernel - size_out
    if total < 0:
        return 0, 0, -total
    return total // 2, total - total // 2, 0


class CustomOpConverter(OperatorConverter):
    """TVM's converter plus MediaPipe's ``Convolution2DTransposeBias``, and quantized
    ARG_MAX/ARG_MIN (DeepLabV3's last op), which TVM refuses on quantized tensors although its
    conversion is already right for them: the index of the largest code is the index of the
    largest value, since dequantization is increasing (its scale is positive, which import
    checks), ties included."""

    _CONVERTERS = {b"Convolution2DTransposeBias": "MEDIAPIPE_TRANSPOSE_CONV_BIAS"}
    _SUPPORTED_QUANTIZED_OPS = OperatorConverter._SUPPORTED_QUANTIZED_OPS | {"ARG_MAX", "ARG_MIN"}

    def __init__(self, model, subgraph, exp_tab, bb):
        super().__init__(model, subgraph, exp_tab, bb)
        self.convert_map["MEDIAPIPE_TRANSPOSE_CONV_BIAS"] = self._transpose_conv_bias

    def get_op_code_str(self, op):
        code = self.model.OperatorCodes(op.OpcodeIndex())
        if max(code.DeprecatedBuiltinCode(), code.BuiltinCode()) == _CUSTOM:
            custom = code.CustomCode()
            if custom in self._CONVERTERS:
                return self._CONVERTERS[custom]
            raise NotImplementedError(
                f"TFLite custom operator {custom.decode(errors='replace')!r} is not supported "
                f"(known: {', '.join(k.decode() for k in self._CONVERTERS)})"
            )
        return super().get_op_code_str(op)

    def convert_softmax(self, op):
        """TVM's conversion drops SOFTMAX's ``beta``; refuse the models where that matters."""
        from tflite.SoftmaxOptions import SoftmaxOptions

        options = SoftmaxOptions()
        table = op.BuiltinOptions()
        if table is not None:
            options.Init(table.Bytes, table.Pos)
            beta = options.Beta()
            if beta != 1.0:
                (output,) = self.get_output_tensors(op)
                raise QCompilerError(
                    f"SOFTMAX {output.tensor.Name().decode()!r} has beta={beta}: only beta=1 "
                    "is supported"
                )
        return super().convert_softmax(op)

    def _value_or_expr(self, tensor):
        if self.has_expr(tensor.tensor_idx):
            return self.get_expr(tensor.tensor_idx), None
        value = self.get_tensor_value_or_prefetched(tensor)
        return None, np.asarray(value, dtype="float32")

    def _transpose_conv_bias(self, op):
        inputs = self.get_input_tensors(op)
        (output,) = self.get_output_tensors(op)
        name = output.tensor.Name().decode()
        if len(inputs) != 3:
            raise QCompilerError(
                f"Convolution2DTransposeBias {name!r}: expected 3 inputs, got {len(inputs)}"
            )
        data, weight, bias = inputs
        if data.qnn_params or output.qnn_params:
            raise QCompilerError(f"Convolution2DTransposeBias {name!r}: only float is supported")
        options = op.CustomOptionsAsNumpy()
        if options is None or len(options) < 12:
            raise QCompilerError(
                f"Convolution2DTransposeBias {name!r}: options are not TfLiteTransposeConvParams"
            )
        padding, stride_w, stride_h = struct.unpack("<3i", options.tobytes()[:12])
        if padding not in (_PADDING_SAME, _PADDING_VALID) or stride_w < 1 or stride_h < 1:
            raise QCompilerError(
                f"Convolution2DTransposeBias {name!r}: padding {padding}, strides "
                f"({stride_h}, {stride_w}) are not valid"
            )
        _, in_h, in_w, in_c = (int(d) for d in self.get_tensor_shape(data))
        _, out_h, out_w, out_c = (int(d) for d in output.tensor.ShapeAsNumpy())
        w_out, k_h, k_w, w_in = (int(d) for d in self.get_tensor_shape(weight))
        if w_in != in_c or w_out != out_c:
            raise QCompilerError(
                f"Convolution2DTransposeBias {name!r}: weight {[w_out, k_h, k_w, w_in]} does not "
                f"map {in_c} to {out_c} channels"
            )
        same = padding == _PADDING_SAME
        top, bottom, extra_h = transposed_conv_padding(in_h, out_h, k_h, stride_h, same)
        left, right, extra_w = transposed_conv_padding(in_w, out_w, k_w, stride_w, same)

        w_expr, w_value = self._value_or_expr(weight)
        if w_value is not None:  # OHWI -> IOHW, Relax's transposed-conv kernel layout
            w_expr = self.exp_tab.new_const(
                np.ascontiguousarray(w_value.transpose(3, 0, 1, 2)),
                dtype="float32",
                source_name=weight.tensor.Name(),
            )
        else:
            w_expr = relax.op.permute_dims(w_expr, axes=(3, 0, 1, 2))
        # TVM legalizes conv2d_transpose in NCHW only: transpose around it.
        out = relax.op.nn.conv2d_transpose(
            relax.op.permute_dims(self.get_expr(data.tensor_idx), axes=(0, 3, 1, 2)),
            w_expr,
            strides=(stride_h, stride_w),
            padding=(top, left, bottom, right),
            output_padding=(extra_h, extra_w),
            kernel_layout="IOHW",
            out_dtype="float32",
        )
        out = relax.op.permute_dims(out, axes=(0, 2, 3, 1))
        b_expr, b_value = self._value_or_expr(bias)
        if b_value is not None:
            b_expr = self.exp_tab.new_const(
                b_value, dtype="float32", source_name=bias.tensor.Name()
            )
        return relax.op.add(out, b_expr)

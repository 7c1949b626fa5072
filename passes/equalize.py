"""Cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019) of conv pairs.

Where a conv2d's output reaches the next conv2d through nothing but a per-channel bias add and
a ReLU, channel ``i`` between them can be scaled by ``1/s_i`` and the next conv's weights on
that channel by ``s_i`` without changing the float function (``relu(x / s) = relu(x) / s`` for
``s > 0``). Choosing ``s_i = sqrt(r1_i / r2_i)``, with ``r1_i`` the largest weight of the first
conv's output channel ``i`` and ``r2_i`` the largest weight the second conv applies to that
channel, gives both the same range ``sqrt(r1_i r2_i)``: channels that a per-tensor activation
scale would crush to a few codes are widened, and the second conv's weights on each input
channel come closer in size, which its per-output-channel scale then rounds alike. Chains
(conv -> ReLU -> depthwise -> ReLU -> conv) share a conv between two pairs, so the scaling is
repeated until it settles.

ReLU6, hard-swish, SiLU and residual adds break the identity, so those pairs are left alone:
EfficientNet-Lite0 (ReLU6, residuals) has two such pairs, YOLOX-Nano (SiLU) none, MediaPipe's
selfie segmentation fourteen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qcompiler.passes.graph import Dataflow, bindings, const_value, op_name

# Rounds of rescaling every pair; a chain of n pairs settles in about n rounds.
MAX_ROUNDS = 32
SETTLED = 1e-6  # largest |log s| of a round below which the scaling has settled


@dataclass(frozen=True)
class _Pair:
    """``first`` conv -> [``bias`` add] -> [relu] -> ``second`` conv, by binding var, with
    their constants and the axes of the weights that hold the middle channels."""

    first: relax.Var
    first_weight: np.ndarray
    first_axis: int  # the first conv's output channel axis
    bias: relax.Var | None
    bias_value: np.ndarray | None  # the bias add's constant, or None
    second: relax.Var
    second_weight: np.ndarray
    second_axis: int  # the axis of the second conv's weights per middle channel


def _kernel_axis(call, letter: str) -> int:
    return str(call.attrs.kernel_layout).index(letter)


def _channel_count(call) -> int:
    weight = const_value(call.args[1])
    return weight.shape[_kernel_axis(call, "O")]


def _second_axis(call, channels: int) -> int | None:
    """The axis of ``call``'s weights that meets the input channels one by one: ``I`` for a
    plain conv, ``O`` for a depthwise one; None for other groupings."""
    weight = const_value(call.args[1])
    groups = int(call.attrs.groups)
    if groups == 1 and weight.shape[_kernel_axis(call, "I")] == channels:
        return _kernel_axis(call, "I")
    if groups == channels and weight.shape[_kernel_axis(call, "I")] == 1:
        return _kernel_axis(call, "O")
    return None


def _is_conv(call) -> bool:
    return op_name(call) == "relax.nn.conv2d" and const_value(call.args[1]) is not None


def _channel_bias(call, var, channels: int):
    """The constant of ``var + bias`` when it holds one value per channel, else None."""
    if op_name(call) != "relax.add":
        return None
    a, b = call.args
    bias = const_value(b) if a.same_as(var) else const_value(a) if b.same_as(var) else None
    if bias is None or bias.size != channels or (bias.ndim and bias.shape[-1] != channels):
        return None
    return bias


def find_pairs(func: relax.Function) -> list[_Pair]:
    """The conv pairs of ``func`` that equalization may rescale (channels-last data)."""
    flow = Dataflow.of(func)
    pairs = []
    for binding in bindings(func):
        call = binding.value
        if not _is_conv(call) or str(call.attrs.data_layout)[-1] != "C":
            continue
        channels = _channel_count(call)
        var, bias, bias_value = binding.var, None, None
        user = flow.sole_consumer(var)
        if user is not None:
            bias_value = _channel_bias(flow.producer[user], var, channels)
            if bias_value is not None:
                var, bias, user = user, user, flow.sole_consumer(user)
        if user is not None and op_name(flow.producer[user]) == "relax.nn.relu":
            var, user = user, flow.sole_consumer(user)
        if user is None or not _is_conv(flow.producer[user]):
            continue
        second = flow.producer[user]
        axis = _second_axis(second, channels)
        if axis is not None and second.args[0].same_as(var):
            pairs.append(
                _Pair(
                    binding.var,
                    const_value(call.args[1]),
                    _kernel_axis(call, "O"),
                    bias,
                    bias_value,
                    user,
                    const_value(second.args[1]),
                    axis,
                )
            )
    return pairs


def _ranges(weight: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(np.moveaxis(weight, axis, 0)).reshape(weight.shape[axis], -1).max(axis=1)


def _scaled(weight: np.ndarray, axis: int, factor: np.ndarray) -> np.ndarray:
    shape = [1] * weight.ndim
    shape[axis] = -1
    return weight * factor.reshape(shape)


def equalize_module(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """``mod`` with its conv pairs equalized (see the module docstring), and their count."""
    func = mod["main"]
    pairs = find_pairs(func)
    if not pairs:
        return mod, 0
    values = {}  # binding var -> its rescaled constant (weights of convs, the bias of adds)
    for pair in pairs:
        values[pair.first] = pair.first_weight.astype(np.float64)
        values[pair.second] = pair.second_weight.astype(np.float64)
        if pair.bias is not None:
            values[pair.bias] = pair.bias_value.astype(np.float64).reshape(-1)
    for _ in range(MAX_ROUNDS):
        largest = 0.0
        for pair in pairs:
            out_axis = pair.first_axis
            r1 = _ranges(values[pair.first], out_axis)
            r2 = _ranges(values[pair.second], pair.second_axis)
            live = (r1 > 0) & (r2 > 0)
            s = np.where(live, np.sqrt(np.where(live, r1, 1) / np.where(live, r2, 1)), 1.0)
            values[pair.first] = _scaled(values[pair.first], out_axis, 1 / s)
            if pair.bias is not None:
                values[pair.bias] = values[pair.bias] / s
            values[pair.second] = _scaled(values[pair.second], pair.second_axis, s)
            largest = max(largest, float(np.abs(np.log(s)).max()))
        if largest < SETTLED:
            break
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = _Rescaler(mod, values).visit_expr(func)
    return out, len(pairs)


@mutator
class _Rescaler(PyExprMutator):
    """Swap in the rescaled constants: conv weights (``args[1]``) and bias add operands."""

    def __init__(self, mod, values: dict):
        super().__init__(mod)
        self.values = values

    def visit_var_binding_(self, binding):
        value = self.values.get(binding.var)
        if value is None:
            return super().visit_var_binding_(binding)
        call = binding.value
        args = list(call.args)
        # a conv's weights, or the constant operand of a bias add
        index = 1 if op_name(call) == "relax.nn.conv2d" or const_value(args[0]) is None else 0
        old = const_value(args[index])
        args[index] = relax.const(value.reshape(old.shape).astype(old.dtype))
        new = relax.VarBinding(binding.var, relax.Call(call.op, args, call.attrs, call.ty_args))
        return super().visit_var_binding_(new)

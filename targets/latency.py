"""What each conv/matmul layer costs on the board: per-layer latencies from the tuning database.

Tuning (:mod:`qcompiler.targets.tuning`) measures every kernel of a model on the board over RPC
and keeps the best latency of each in its database. Here those latencies are read back per
layer, so that bit-width selection (:mod:`qcompiler.targets.bitwidth`) can weigh a precision
by what it costs on that board, not by a proxy:

* the model is lowered exactly as the build lowers it (:func:`~qcompiler.targets.build.
  fused_module`); each conv/matmul layer of the integer module becomes one kernel call there
  (its packed dot-product or depthwise kernel with the fused epilogue), in the same order;
* a layer's latency is its kernel's, plus that of the kernels whose every result only it uses:
  those that prepare its weights (every operand a constant: the unpacking of 4-bit weights,
  where the layer's kernel does not unpack them in registers) and its input (a layout change,
  a pad, the pooling and requantization that only feed it, the byte planes of an int16 input),
  once per call -- so that what widening a layer's input costs is its own, not the rest's
  (on EfficientNet-Lite0, W8A16 layers were predicted at 1.11x W8A8's latency and measured at
  1.43x while their inputs' byte planes were counted in the rest);
* a conv/matmul with int16 activations runs as two int8 kernels on targets with a dot-product
  instruction (its low and its high byte, called one after the other): both are its;
* a layer kept float (``float_layers``) is its float conv/matmul kernel;
* everything else (residual adds, kernels that feed several layers or the outputs) is the
  model's fixed cost.

Kernels that match the layers in no such way make the attribution fail loudly rather than
guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx

from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import CONV_OPS, MATMUL_OPS, bindings, const_value, layer_name, op_name
from qcompiler.targets.kernels import (
    CONV_BLOCK,
    DENSE_BLOCK,
    DEPTHWISE_BLOCK,
    FLOAT_CONV_BLOCK,
    FLOAT_DENSE_BLOCK,
    splits_int16,
)
from qcompiler.targets.tuning import TuneReport

# Blocks that make a kernel a layer's: ours, and those of TVM's legalized convs and matmuls
# (targets without a dot-product instruction).
_LAYER_BLOCKS = (CONV_BLOCK, DENSE_BLOCK, DEPTHWISE_BLOCK, FLOAT_CONV_BLOCK, FLOAT_DENSE_BLOCK)
_LEGALIZED_PREFIXES = ("conv2d", "group_conv2d", "depthwise_conv2d", "matmul", "T_matmul", "dense")


@dataclass(frozen=True)
class LayerLatencies:
    """Milliseconds per run: each layer's kernels, and everything else."""

    layers: dict[str, float]
    rest_ms: float

    @property
    def total_ms(self) -> float:
        return self.rest_ms + sum(self.layers.values())


def layer_names(mod: tvm.IRModule) -> list[str]:
    """The conv/matmul layers with constant weights of ``mod``'s ``main`` (integer ones, and
    float ones kept by ``float_layers``) in program order, by the names
    of the float model's layers (those of :func:`qcompiler.targets.bitwidth.weight_options`)."""
    return [name for name, _ in _layers(mod)]


def _layers(mod: tvm.IRModule) -> list[tuple[str, bool]]:
    """``(name, split)`` of each conv/matmul layer with constant weights in program order
    (a float one is a legalized float conv/matmul kernel); ``split``: its
    int16 activations run as two int8 kernels on targets with a dot-product instruction
    (:func:`qcompiler.targets.kernels.splits_int16`)."""
    main = mod["main"]
    layers = []
    for binding in bindings(main):
        call = binding.value
        if op_name(call) not in CONV_OPS | MATMUL_OPS or const_value(call.args[1]) is None:
            continue
        if str(call.ty.dtype) != "int32":  # a float layer (``float_layers``): one kernel
            layers.append((layer_name(main, binding.var.name), False))
            continue
        layers.append((layer_name(main, binding.var.name), splits_int16(call)))
    return layers


def _is_layer_kernel(func: tirx.PrimFunc) -> bool:
    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(block).name_hint
        if name in _LAYER_BLOCKS or name.startswith(_LEGALIZED_PREFIXES):
            return True
    return False


def _calls(fused: tvm.IRModule):
    """``main``'s kernel calls in order: (bound var, PrimFunc name, var operands)."""
    for binding in bindings(fused["main"]):
        call = binding.value
        if not isinstance(call, relax.Call) or op_name(call) != "relax.call_tir":
            continue
        operands = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
        yield binding.var, call.args[0].name_hint, [a for a in operands if isinstance(a, relax.Var)]


def attribute(mod: tvm.IRModule, report: TuneReport) -> LayerLatencies:
    """Split the per-call latencies of ``report`` (a tuning run over ``mod``, which holds the
    lowered module) into the layers of ``mod`` and the rest."""
    fused = report.module
    seconds = {task.name: task.best_s or task.default_s for task in report.tasks}
    layers = _layers(mod)
    calls = list(_calls(fused))
    is_layer: dict[str, bool] = {}  # per kernel: a function is called once per use
    for _, name, operands in calls:
        if seconds.get(name) is None:
            raise QCompilerError(f"no measured latency for the kernel {name!r}")
        if operands and name not in is_layer:
            is_layer[name] = _is_layer_kernel(fused[name])
    kernels = [var for var, name, operands in calls if operands and is_layer[name]]
    # One kernel per layer, or two for each int16 layer where the target split them.
    split = sum(s for _, s in layers)
    if len(kernels) == len(layers):
        counts = [1] * len(layers)
    elif split and len(kernels) == len(layers) + split:
        counts = [2 if s else 1 for _, s in layers]
    else:
        raise QCompilerError(
            f"cannot attribute kernels to layers: {len(layers)} conv/matmul layers "
            f"({split} of them int16 convs/matmuls) but {len(kernels)} layer kernels after "
            "lowering"
        )
    owner = dict(zip(kernels, (i for i, count in enumerate(counts) for _ in range(count))))
    # A kernel whose every use is one layer's (its kernels, or kernels preparing its input:
    # an int16 input's byte planes, a layout change, a pad) is that layer's; so is one with
    # constant operands only (the unpacking of its weights), once per call.
    users: dict[relax.Var, list[relax.Var]] = {}
    for binding in bindings(fused["main"]):
        for var in relax.analysis.free_vars(binding.value):
            users.setdefault(var, []).append(binding.var)
    # Ownership flows back through every binding, not only kernel calls: the unpacked 4-bit
    # weights reach their layer through a reshape (a view, no kernel of its own).
    outputs = set(relax.analysis.free_vars(fused["main"].body.body))
    for binding in reversed(list(bindings(fused["main"]))):
        var = binding.var
        if var in owner or var in outputs or not users.get(var):
            continue
        owners = {owner.get(user) for user in users[var]}
        if len(owners) == 1 and None not in owners:
            owner[var] = owners.pop()
    per_layer = [0.0] * len(layers)
    rest = 0.0
    for var, name, _ in calls:
        if var in owner:
            per_layer[owner[var]] += seconds[name]
        else:
            rest += seconds[name]
    named = {layer: 1e3 * s for (layer, _), s in zip(layers, per_layer)}
    return LayerLatencies(named, 1e3 * rest)

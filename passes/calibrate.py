"""Calibration: run the float model over real data and feed an observer per quantization point.

The float ``main`` is rewritten to also return every point (:func:`expose_points`), compiled once
with TVM for the host, and run sample by sample. Each sample's tensors go straight into the
observers (running min/max and a histogram), so peak memory is one sample's activations plus the
fixed-size statistics, however many samples there are.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import tvm
from tvm import relax

from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import QuantPlan, bindings
from qcompiler.passes.observers import ActivationObserver


def expose_points(func: relax.Function, points: list) -> relax.Function:
    """``func`` returning ``(original result, *points)`` instead of its result."""
    wanted = set(points)
    exposed = {}
    blocks = []
    for block in func.body.blocks:
        new_bindings = []
        for binding in block.bindings:
            var = binding.var
            if var in wanted and isinstance(var, relax.DataflowVar):
                # A dataflow var cannot leave its block: bind it again to a plain var.
                out = relax.Var(var.name + "_obs", var.ty)
                new_bindings.append(binding)
                new_bindings.append(relax.VarBinding(out, var))
                exposed[var] = out
            else:
                new_bindings.append(binding)
        block_type = type(block)
        blocks.append(block_type(new_bindings))
    results = [exposed.get(p, p) for p in points]
    fields = [func.body.body, *results]
    body = relax.SeqExpr(blocks, relax.Tuple(fields))
    ret_ty = relax.TupleType([f.ty for f in fields])
    return relax.Function(func.params, body, ret_ty, attrs=func.attrs)


# Fewer calibration samples than this gets a warning.
FEW_SAMPLES = 10


def calibrate(
    mod: tvm.IRModule,
    plan: QuantPlan,
    samples: Iterable[dict[str, np.ndarray]],
    bins: int = 2048,
    target: tvm.target.Target | None = None,
    layers: dict | None = None,
    keep: list | None = None,
    keep_count: int = 0,
) -> dict:
    """Observe every point of ``plan`` over ``samples``.

    ``layers`` maps conv2d/matmul vars to :class:`~qcompiler.passes.rounding.LayerStats`, fed
    with the layer's (float) input from the same runs. ``keep``: a list that receives
    ``(sample, outputs)`` for the first ``keep_count`` samples (copies, and the float model's
    outputs on them as numpy arrays), so that they can be measured against later without
    compiling the float model again.

    Returns
    -------
    dict[relax.Var, ActivationObserver]
        One observer per point, keyed by the point's var in ``mod["main"]``.
    """
    func = mod["main"]
    observers = {p: ActivationObserver(p.name, bins=bins) for p in plan.points}
    layers = layers or {}
    producer = {b.var: b.value for b in bindings(func)}
    layer_inputs = {var: producer[var].args[0] for var in layers}
    params = list(func.params)
    # every point and layer input, once, in order; parameters come from the sample itself
    exposed = [x for x in dict.fromkeys([*plan.points, *layer_inputs.values()]) if x not in params]
    calib_mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    calib_mod["main"] = expose_points(func, exposed)
    target = target or tvm.target.Target({"kind": "llvm"})
    executable = tvm.compile(calib_mod, target=target)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    names = [p.name for p in func.params]
    seen = 0
    for sample in samples:
        missing = [n for n in names if n not in sample]
        if missing:
            raise QCompilerError(
                f"calibration sample {seen} lacks model input(s) {missing}; it has {sorted(sample)}"
            )
        args = [np.ascontiguousarray(sample[n]) for n in names]
        results = vm["main"](*[tvm.runtime.tensor(a) for a in args])
        if keep is not None and seen < keep_count:
            first = results[0]
            outputs = [r.numpy() for r in ([first] if hasattr(first, "numpy") else list(first))]
            keep.append(({n: a.copy() for n, a in zip(names, args)}, outputs))
        values = dict(zip(params, args))
        values.update((x, v.numpy()) for x, v in zip(exposed, list(results)[1:]))
        for point in plan.points:
            observers[point].update(values[point])
        for var, stats in layers.items():
            stats.update(values[layer_inputs[var]])
        seen += 1
    if seen == 0:
        raise QCompilerError("the calibration set is empty: give at least one sample")
    for stats in layers.values():
        stats.settle()
    if seen < FEW_SAMPLES and plan.points:
        warnings.warn(
            f"calibrated on {seen} sample(s): activation ranges from so few are noisy "
            f"(use {FEW_SAMPLES} or more; 100 is typical)",
            stacklevel=2,
        )
    return observers

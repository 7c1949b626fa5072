"""From a Relax module to a VM executable: kernels, schedules (tuned or default), codegen.

The lowering is TVM's CPU pipeline with two steps added between operator fusion and the
dataflow lowering:

1. the integer kernels of :mod:`qcompiler.targets.kernels` replace Relax's conv/matmul before
   legalization, so the weights are packed once at compile time, and each requantize chain
   becomes one int32-multiplier epilogue (:mod:`qcompiler.targets.requantize`);
2. every fused TIR function gets a schedule: the tuning database's best record when it has
   one (``MetaScheduleApplyDatabase``), the hand-written default of
   :mod:`qcompiler.targets.schedules` otherwise.

:func:`fused_module` stops after fusion: it is also what tuning extracts its tasks from, so that
records and the functions they are applied to match.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu

from qcompiler.targets.kernels import use_int8_kernels
from qcompiler.targets.requantize import fuse_requantize
from qcompiler.targets.schedules import default_schedules


def fused_module(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """``mod`` with integer kernels, legalized and fused into TIR functions (no schedules)."""
    with target:
        mod = fuse_requantize(use_int8_kernels(mod, target))
        seq = tvm.transform.Sequential(
            [
                *cpu.library_dispatch_passes(target),
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                *cpu.legalize_passes(target),
            ]
        )
        return seq(mod)


def build(mod: tvm.IRModule, target: tvm.target.Target, database=None) -> tvm.runtime.Executable:
    """Compile ``mod`` for ``target``; ``database``: a meta-schedule database to apply first."""
    fused = fused_module(mod, target)
    with target, tvm.transform.PassContext(opt_level=3):
        if database is not None:
            with database:
                fused = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)
        fused = default_schedules(fused)
    lower = tvm.transform.Sequential(
        [
            *cpu.dataflow_lower_passes(target),
            *cpu.finalize_passes(target),
        ]
    )
    return tvm.compile(fused, target=target, relax_pipeline=lower)

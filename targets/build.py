"""From a Relax module to a VM executable: kernels, schedules (tuned or default), codegen.

The lowering is TVM's CPU pipeline with two steps added between operator fusion and the
dataflow lowering:

1. the integer kernels of :mod:`qcompiler.targets.kernels` replace Relax's conv/matmul before
   legalization, so the weights are packed once at compile time (4-bit weights two per byte,
   unpacked in registers by the kernels or by a kernel of their own before the call), and
   each requantize chain
   becomes one int32-multiplier epilogue (:mod:`qcompiler.targets.requantize`);
2. every fused TIR function gets a schedule: the tuning database's best record when it has
   one (``MetaScheduleApplyDatabase``), the hand-written default of
   :mod:`qcompiler.targets.schedules` otherwise.

For a CUDA target (the Jetsons) the CPU kernels are left out and TVM's CUDA pipeline runs
instead, its default GPU schedules (``dlight``) giving every kernel thread bindings; the host
code is compiled for the board's CPU (the target's ``host``).

:func:`fused_module` stops after fusion: it is also what tuning extracts its tasks from, so that
records and the functions they are applied to match.
"""

from __future__ import annotations

import warnings

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.relax.backend.cuda import pipeline as cuda_backend

from qcompiler.passes.errors import QCompilerError
from qcompiler.targets import cuda
from qcompiler.targets.fastmath import fast_sigmoid_pass
from qcompiler.targets.kernels import store_int4_weights, use_int8_kernels
from qcompiler.targets.requantize import fuse_requantize
from qcompiler.targets.schedules import default_schedules


def fused_module(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """``mod`` with integer kernels, legalized and fused into TIR functions (no schedules)."""
    with target:
        if is_gpu(target):
            mod = fuse_requantize(mod)
            passes = [
                *cuda_backend.library_dispatch_passes(target),
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                # TVM's CUDA legalization without its closing dlight step (see build).
                *[p for p in cuda_backend.legalize_passes(target) if "Schedule" not in p.info.name],
            ]
        else:
            mod = fast_sigmoid_pass(fuse_requantize(use_int8_kernels(mod, target)))
            legalize = []
            for p in cpu.legalize_passes(target):
                legalize.append(p)
                if p.info.name == "FoldConstant":  # 4-bit weights stay packed (see there)
                    legalize.append(store_int4_weights)
            passes = [
                *cpu.library_dispatch_passes(target),
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                *legalize,
            ]
        return tvm.transform.Sequential(passes)(mod)


def is_gpu(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"


def build(mod: tvm.IRModule, target: tvm.target.Target, database=None) -> tvm.runtime.Executable:
    """Compile ``mod`` for ``target``; ``database``: a meta-schedule database to apply first."""
    if is_gpu(target):
        why_not = cuda.enable_kernel_compilation()
        if why_not is not None:
            warnings.warn(
                f"the CUDA kernels stay CUDA source, which TVM on the board cannot load: {why_not}",
                stacklevel=2,
            )
    fused = fused_module(mod, target)
    with target, tvm.transform.PassContext(opt_level=3):
        if database is not None:
            with database:
                fused = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)
        fused = _gpu_schedules(fused) if is_gpu(target) else default_schedules(fused)
    backend = cuda_backend if is_gpu(target) else cpu
    lower = tvm.transform.Sequential(
        [*backend.dataflow_lower_passes(target), *backend.finalize_passes(target)]
    )
    with target:  # TVM's CUDA compile callback reads the arch from the current target
        if not is_gpu(target):
            return tvm.compile(fused, target=target, relax_pipeline=lower)
        try:
            return tvm.compile(fused, target=target, relax_pipeline=lower)
        except Exception as err:  # TVM re-raises the compiler's failure with the whole source
            lines = str(err).splitlines()
            fatal = [line for line in lines if "fatal" in line] or [
                line for line in lines if " error" in line
            ]
            if not fatal:
                raise
            raise QCompilerError(
                f"compiling the CUDA kernels for {target.attrs['arch']} failed: {fatal[0].strip()}"
            ) from None


def _gpu_schedules(mod: tvm.IRModule) -> tvm.IRModule:
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    )(mod)

"""Targets qcompiler builds for. For now the host CPU; boards come as profiles later.

TVM 0.27 takes targets as JSON dicts and refuses ``-mcpu=native``: the host CPU is named by
asking LLVM which CPU this is (e.g. ``emeraldrapids``, ``znver4``), so that its vector
extensions (AVX-512, VNNI) are used.
"""

from __future__ import annotations

import os

import psutil
import tvm
from tvm.target import codegen

from qcompiler.passes.errors import QCompilerError

TARGETS = ("x86",)


def host_cpu() -> str:
    cpu = codegen.llvm_get_system_cpu()
    return cpu if cpu and codegen.llvm_is_valid_cpu(cpu, "x86_64-linux-gnu") else "x86-64"


def resolve_target(name: str | tvm.target.Target = "x86") -> tvm.target.Target:
    """A TVM target for a qcompiler target name."""
    if isinstance(name, tvm.target.Target):
        return name
    if name in ("x86", "host", "llvm"):
        # Meta-schedule sizes its parallel loops by the physical core count.
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu(), "num-cores": cores})
    raise QCompilerError(f"unknown target {name!r}, candidates are {list(TARGETS)}")

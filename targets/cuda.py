"""Compiling CUDA kernels for a Jetson on a machine without a GPU.

TVM compiles a CUDA module's kernels to a binary (through its ``tvm_callback_cuda_compile``:
nvcc or NVRTC) only when its CUDA runtime sidecar, ``libtvm_runtime_cuda.so``, is loaded, and
that library links against the CUDA driver, ``libcuda.so.1``. On a build machine without an
NVIDIA driver the sidecar does not load and TVM silently keeps the kernels as CUDA source, which
TVM on the Jetson cannot load.

The driver is only needed to *run* kernels, not to compile them, so where none is installed
qcompiler loads a stand-in (the way NVIDIA's toolkit ships ``stubs/libcuda.so`` for linking): a
small library, built once with the host's C compiler, whose every function answers
``CUDA_ERROR_NO_DEVICE``. The sidecar then loads, and kernels are compiled by nvcc for the
board's ``sm_XX`` into a fatbin inside the library.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from qcompiler.passes.errors import QCompilerError

# The driver functions libtvm_runtime_cuda.so imports (nm -D --undefined-only).
_STUB_SOURCE = """\
/* qcompiler: a build-only stand-in for the CUDA driver; every call reports no device. */
#define CUDA_ERROR_NO_DEVICE 100
int cuDeviceGetName(void) { return CUDA_ERROR_NO_DEVICE; }
int cuFuncSetAttribute(void) { return CUDA_ERROR_NO_DEVICE; }
int cuLaunchKernelEx(void) { return CUDA_ERROR_NO_DEVICE; }
int cuModuleGetFunction(void) { return CUDA_ERROR_NO_DEVICE; }
int cuModuleLoadData(void) { return CUDA_ERROR_NO_DEVICE; }
int cuModuleUnload(void) { return CUDA_ERROR_NO_DEVICE; }
int cuTensorMapEncodeTiled(void) { return CUDA_ERROR_NO_DEVICE; }
int cuGetErrorName(int error, const char **name) {
    if (name) *name = "CUDA_ERROR_NO_DEVICE";
    return 0;
}
int cuGetErrorString(int error, const char **text) {
    if (text) *text = "no CUDA driver on this machine (qcompiler's build-only stand-in)";
    return 0;
}
"""


def runtime_loaded() -> bool:
    """Whether TVM's CUDA runtime sidecar is loaded in this process."""
    from tvm.base import _LOADED_LIBS

    return "tvm_runtime_cuda" in _LOADED_LIBS


def _stub_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qcompiler" / "cuda"


def _build_stub() -> Path:
    path = _stub_dir() / "libcuda.so.1"
    if path.is_file():
        return path
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise QCompilerError("no C compiler (cc/gcc) to build the CUDA driver stand-in")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        source = Path(tmp) / "libcuda_stub.c"
        source.write_text(_STUB_SOURCE)
        built = Path(tmp) / "libcuda.so.1"
        done = subprocess.run(
            [compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", built, source],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise QCompilerError(f"building the CUDA driver stand-in failed: {done.stderr}")
        os.replace(built, path)  # atomic: a concurrent build leaves one good file
    return path


def enable_kernel_compilation() -> str | None:
    """Make TVM compile CUDA kernels to binaries in this process.

    Returns None when it will, else why not (the kernels then stay CUDA source).
    """
    if not runtime_loaded():
        if ctypes.util.find_library("cuda") is not None:
            return "TVM's CUDA runtime did not load although a CUDA driver is installed"
        if ctypes.util.find_library("cudart") is None and not _cudart_beside_nvcc():
            return "the CUDA runtime library (libcudart) is not installed"
        try:
            stub = _build_stub()
        except QCompilerError as err:
            return str(err)
        ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
        _load_sidecar()
        if not runtime_loaded():
            return "TVM's CUDA runtime did not load with the driver stand-in"
    if os.environ.get("TVM_CUDA_COMPILE_MODE") is None and not _has_nvrtc():
        if shutil.which("nvcc") is None:
            return "neither nvcc nor NVRTC (cuda-python) is installed to compile CUDA kernels"
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    return None


def _cudart_beside_nvcc() -> bool:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return False
    root = Path(nvcc).resolve().parent.parent
    found = [*root.glob("lib/libcudart.so*"), *root.glob("lib64/libcudart.so*")]
    if found:  # load it by path, so that the sidecar finds it by name
        ctypes.CDLL(str(found[0]), mode=ctypes.RTLD_GLOBAL)
    return bool(found)


def _has_nvrtc() -> bool:
    try:
        from cuda.bindings import nvrtc  # noqa: F401
    except ImportError:
        return False
    return True


def _load_sidecar() -> None:
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    with contextlib.suppress(OSError, FileNotFoundError, RuntimeError):
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm",
            target_name="tvm_runtime_cuda",
            extra_lib_paths=[runtime_dir],
            mode="RTLD_LOCAL",
        )

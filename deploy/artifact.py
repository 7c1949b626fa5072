"""Artifacts: a compiled library plus ``manifest.json``, written atomically, verified on load.

Layout of an artifact directory::

    model.so        the Relax VM executable for the board, parameters bound inside it
                    (TVM's export_library; linked by the board's cross compiler when the board
                    is another machine, e.g. aarch64-linux-gnu-g++ for a Raspberry Pi)
    manifest.json   model name/hash, board and TVM target, inputs/outputs with their
                    quantization parameters, per-layer precisions, weight_bytes, versions, and
                    the sha256 of every other file

The directory is assembled under a temporary name beside its destination and renamed into place,
so an interrupted export leaves any previous artifact untouched. Loading recomputes the
checksums and refuses a tampered file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import tvm
from tvm import relax

from qcompiler.passes.errors import QCompilerError
from qcompiler.targets.boards import Board, host_arch

MANIFEST = "manifest.json"
LIBRARY = "model.so"
FORMAT = "qcompiler-artifact/2"  # 2: the target names its board, arch and device


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def set_threads(threads: int) -> None:
    """Run compiled models on ``threads`` threads of TVM's pool (0: one per physical core).

    TVM's pool never grows past ``TVM_NUM_THREADS``, which it reads on each reconfiguration and
    defaults to half the logical CPUs on x86 (it assumes hyper-threading): on a 2-core VM
    without it, asking for 2 threads silently gave 1. So the variable is set first.
    """
    if threads < 0:
        raise QCompilerError(f"the thread count must be >= 0, got {threads}")
    count = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    os.environ["TVM_NUM_THREADS"] = str(count)
    tvm.get_global_func("runtime.config_threadpool")(0, count)


def check_cross_compiler(board: Board) -> None:
    """A board of another machine needs its cross compiler here: say so before building."""
    if board.arch == host_arch():
        return
    if not board.cross_compiler:
        raise QCompilerError(
            f"board {board.name!r} is {board.arch} and this host is {host_arch()}: give a cross "
            "compiler (--cross-compiler, e.g. aarch64-linux-gnu-g++)"
        )
    if shutil.which(board.cross_compiler) is None:
        raise QCompilerError(
            f"cross compiler {board.cross_compiler!r} for board {board.name!r} is not installed "
            "(Debian: apt-get install g++-aarch64-linux-gnu), or name another with "
            "--cross-compiler"
        )


def _describe(target: dict) -> str:
    return f"{target['board']} ({target['arch']}, {target['device']})"


def why_not_here(manifest: dict) -> str | None:
    """Why an artifact cannot run on this host (None: it can)."""
    target = manifest["target"]
    if target["arch"] != host_arch():
        return (
            f"the artifact is built for {_describe(target)} and this host is {host_arch()}; run "
            "it on the board with --rpc-tracker HOST:PORT --rpc-key KEY"
        )
    if target["device"] == "cuda" and not tvm.cuda().exist:
        return f"the artifact is built for {_describe(target)} and this host has no CUDA GPU"
    return None


def device_of(manifest: dict, session=None):
    """The device the artifact's kernels run on, here or in an RPC ``session``."""
    where = session if session is not None else tvm
    return where.cuda() if manifest["target"]["device"] == "cuda" else where.cpu()


def prepare_inputs(manifest: dict, inputs: dict, device) -> list:
    """``inputs`` checked against the manifest and placed on ``device``, in parameter order."""
    args = []
    for spec in manifest["inputs"]:
        if spec["name"] not in inputs:
            raise QCompilerError(f"missing input {spec['name']!r}; got {sorted(inputs)}")
        value = np.asarray(inputs[spec["name"]], dtype=spec["dtype"])
        if tuple(value.shape) != tuple(spec["shape"]):
            raise QCompilerError(
                f"input {spec['name']!r} has shape {value.shape}, expected {spec['shape']}"
            )
        args.append(tvm.runtime.tensor(np.ascontiguousarray(value), device=device))
    return args


def named_outputs(manifest: dict, result) -> dict[str, np.ndarray]:
    values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
    return {o["name"]: v.numpy() for o, v in zip(manifest["outputs"], values)}


@dataclass
class Artifact:
    """A compiled model: built in this process, or loaded from an exported directory.

    It runs here when it was built for this host; one built for a board runs there
    (:mod:`qcompiler.deploy.remote`).
    """

    executable: object | None
    manifest: dict
    path: Path | None = None

    def __post_init__(self):
        self._vm = None

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    def _machine(self):
        if self._vm is None:
            reason = why_not_here(self.manifest)
            if reason is not None:
                raise QCompilerError(reason)
            if self.executable is None:
                self.executable = tvm.runtime.load_module(str(self.library))
            self._vm = relax.VirtualMachine(self.executable, device_of(self.manifest))
        return self._vm

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one sample here: ``{input name: array}`` -> ``{output name: array}``."""
        vm = self._machine()
        result = vm["main"](*prepare_inputs(self.manifest, inputs, device_of(self.manifest)))
        return named_outputs(self.manifest, result)

    @property
    def library(self) -> Path:
        if self.path is None:
            raise QCompilerError("the artifact has not been exported: call export(path) first")
        return self.path / self.manifest["library"]

    def export(self, path: str | os.PathLike) -> Path:
        """Write the artifact directory at ``path`` atomically; return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.executable.export_library(str(staging / LIBRARY), fcompile=self._linker())
            manifest = dict(
                self.manifest,
                format=FORMAT,
                library=LIBRARY,
                checksums={LIBRARY: sha256_file(staging / LIBRARY)},
            )
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _replace_dir(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.manifest, self.path = manifest, path
        return path

    def _linker(self):
        """The board's cross compiler, or None for this host's."""
        target = self.manifest["target"]
        if target["arch"] == host_arch():
            return None
        from tvm.support import cc

        return cc.cross_compiler(target["cross_compiler"])


def _replace_dir(staging: Path, path: Path) -> None:
    if not path.exists():
        os.rename(staging, path)
        return
    if not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise QCompilerError(
            f"refusing to replace {str(path)!r}: it is a non-empty directory that is not a "
            "qcompiler artifact"
        )
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(path, old)
    os.rename(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Load an exported artifact after checking its manifest and checksums."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise QCompilerError(f"{str(path)!r} is not a qcompiler artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise QCompilerError(f"{str(manifest_path)!r} is not valid JSON: {err}") from None
    if manifest.get("format") != FORMAT:
        raise QCompilerError(
            f"{str(manifest_path)!r} has format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    checksums = manifest.get("checksums", {})
    if manifest.get("library") not in checksums:
        raise QCompilerError(f"{str(manifest_path)!r} has no checksum for its library")
    for name, expected in checksums.items():
        file = path / name
        if (
            Path(name).is_absolute()
            or ".." in Path(name).parts
            or not file.resolve().is_relative_to(path.resolve())
        ):
            raise QCompilerError(f"manifest names a file outside the artifact: {name!r}")
        if not file.is_file():
            raise QCompilerError(f"artifact {str(path)!r} lacks {name!r}")
        actual = sha256_file(file)
        if actual != expected:
            raise QCompilerError(
                f"checksum mismatch for {str(file)!r}: manifest says {expected[:12]}..., file "
                f"is {actual[:12]}...; the artifact was modified or corrupted"
            )
    machine = elf_machine(path / manifest["library"])
    if machine != manifest["target"]["arch"]:
        raise QCompilerError(
            f"{str(path / manifest['library'])!r} is a {machine} library but the manifest says "
            f"the artifact is for {_describe(manifest['target'])}"
        )
    return Artifact(None, manifest, path)


_ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm", 0xF3: "riscv64", 0x03: "i386"}


def elf_machine(path: Path) -> str:
    """The machine an ELF shared library is for, from its header's ``e_machine``."""
    with open(path, "rb") as f:
        header = f.read(20)
    if header[:4] != b"\x7fELF":
        raise QCompilerError(f"{str(path)!r} is not an ELF shared library")
    order = "little" if header[5] == 1 else "big"
    code = int.from_bytes(header[18:20], order)
    return _ELF_MACHINES.get(code, f"ELF machine {code:#x}")

"""Artifacts: a compiled library plus ``manifest.json``, written atomically, verified on load.

Layout of an artifact directory::

    model.so        the Relax VM executable for the target (TVM's export_library)
    manifest.json   model name/hash, target, inputs/outputs, quantization scheme, weight_bytes,
                    versions, and the sha256 of every other file

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

MANIFEST = "manifest.json"
LIBRARY = "model.so"
FORMAT = "qcompiler-artifact/1"


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


@dataclass
class Artifact:
    """A compiled model that runs here (and is exported for a board)."""

    executable: object
    manifest: dict

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
            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return self._vm

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one sample: ``{input name: array}`` -> ``{output name: array}``."""
        args = []
        for spec in self.manifest["inputs"]:
            if spec["name"] not in inputs:
                raise QCompilerError(f"missing input {spec['name']!r}; got {sorted(inputs)}")
            value = np.asarray(inputs[spec["name"]], dtype=spec["dtype"])
            if tuple(value.shape) != tuple(spec["shape"]):
                raise QCompilerError(
                    f"input {spec['name']!r} has shape {value.shape}, expected {spec['shape']}"
                )
            args.append(tvm.runtime.tensor(np.ascontiguousarray(value)))
        result = self._machine()["main"](*args)
        values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        return {name: v.numpy() for name, v in zip(self.output_names, values)}

    def export(self, path: str | os.PathLike) -> Path:
        """Write the artifact directory at ``path`` atomically; return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.executable.export_library(str(staging / LIBRARY))
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
        self.manifest = manifest
        return path


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
    for name, expected in manifest.get("checksums", {}).items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise QCompilerError(f"manifest names a file outside the artifact: {name!r}")
        if not file.is_file():
            raise QCompilerError(f"artifact {str(path)!r} lacks {name!r}")
        actual = sha256_file(file)
        if actual != expected:
            raise QCompilerError(
                f"checksum mismatch for {str(file)!r}: manifest says {expected[:12]}..., file "
                f"is {actual[:12]}...; the artifact was modified or corrupted"
            )
    library = tvm.runtime.load_module(str(path / manifest["library"]))
    return Artifact(library, manifest)

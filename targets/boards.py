"""Boards: where a compiled model runs, as data.

A :class:`Board` names a TVM target (checked against each vendor's sheet), the C++ compiler
that links its shared library, the key its RPC server registers under and its thread count.
Built in: ``x86`` (this host), ``rpi4``, ``rpi5``, ``jetson-orin-nano``, ``jetson-xavier``.
Users add their own in a TOML file (``--boards FILE``, ``$QC_BOARDS``, or
``~/.config/qcompiler/boards.toml``)::

    [boards.my-pi]
    description = "Raspberry Pi 4 in the lab"
    cross_compiler = "aarch64-linux-gnu-g++"
    rpc_key = "lab-pi"
    threads = 4

    [boards.my-pi.target]   # TVM target JSON
    kind = "llvm"
    mtriple = "aarch64-linux-gnu"
    mcpu = "cortex-a72"
    mattr = ["+neon"]

A TVM target tag (``raspberry-pi/4b-aarch64``, ``nvidia/jetson-orin-nano``, ...) is accepted
too, with the cross compiler inferred from its triple. Note TVM's own Jetson Orin tag gives
the host CPU as ``carmel`` (Xavier's); the Orin's CPU is a Cortex-A78AE, as our profile says.

TVM 0.27 takes targets as JSON dicts and refuses ``-mcpu=native``: the host CPU is named by
asking LLVM which CPU this is (e.g. ``emeraldrapids``, ``znver4``), so that its vector
extensions (AVX-512, VNNI) are used.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomllib
import tvm
from tvm.target import codegen

from qcompiler.passes.errors import QCompilerError

AARCH64_GXX = "aarch64-linux-gnu-g++"  # Debian's g++-aarch64-linux-gnu


@dataclass(frozen=True)
class Board:
    """A kind of board: its TVM target and how to build for it and reach it."""

    name: str
    description: str
    target: dict  # TVM target JSON; a GPU target carries its CPU side under "host"
    cross_compiler: str | None = None  # None: this host's compiler links the library
    rpc_key: str = ""
    threads: int = 0  # 0: one per core
    source: str = "built in"
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not isinstance(self.target, dict) or "kind" not in self.target:
            raise QCompilerError(
                f"board {self.name!r} ({self.source}): target must be a table with a 'kind', "
                f"got {self.target!r}"
            )
        if self.threads < 0:
            raise QCompilerError(
                f"board {self.name!r} ({self.source}): threads must be >= 0, got {self.threads}"
            )

    @functools.cached_property
    def tvm_target(self) -> tvm.target.Target:
        try:
            return tvm.target.Target(self.target)
        except Exception as err:  # TVM raises its own error kinds for bad targets
            raise QCompilerError(
                f"board {self.name!r} ({self.source}): TVM refuses its target "
                f"{json.dumps(self.target)}: {str(err).strip().splitlines()[-1]}"
            ) from None

    @property
    def cpu_target(self) -> dict:
        """The target of the CPU that runs the library's host code."""
        return self.target.get("host", self.target)

    @property
    def arch(self) -> str:
        """The machine the library is for, as ``platform.machine()`` names it."""
        triple = self.cpu_target.get("mtriple")
        return arch_of(triple) if triple else host_arch()

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"``: where the kernels run."""
        return "cuda" if self.target["kind"] == "cuda" else "cpu"

    def summary(self) -> dict:
        return {
            "board": self.name,
            "description": self.description,
            "arch": self.arch,
            "device": self.device,
            "tvm": target_json(self.tvm_target),
            "cross_compiler": self.cross_compiler,
            "rpc_key": self.rpc_key,
        }


def arch_of(triple: str) -> str:
    """The machine of an LLVM triple (or a bare machine name), as ``platform.machine()`` says."""
    machine = triple.split("-")[0]
    return {"arm64": "aarch64", "amd64": "x86_64", "x86-64": "x86_64"}.get(machine, machine)


def host_arch() -> str:
    return arch_of(platform.machine())


def host_cpu() -> str:
    cpu = codegen.llvm_get_system_cpu()
    triple = codegen.llvm_get_system_triple()
    return cpu if cpu and codegen.llvm_is_valid_cpu(cpu, triple) else "generic"


def target_json(target: tvm.target.Target, derived: bool = True) -> dict:
    """``target`` as plain JSON; ``derived=False`` leaves out what TVM derives (features, keys)."""

    def plain(value):
        if isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, str):
            return str(value)
        if hasattr(value, "items"):
            return {
                str(k): plain(v)
                for k, v in value.items()
                if derived or not (str(k).startswith("feature.") or k in ("keys", "tag"))
            }
        return [plain(v) for v in value]

    return plain(target.export())


def _host_board() -> Board:
    # Meta-schedule sizes its parallel loops by the physical core count.
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return Board(
        "x86",
        f"this host ({platform.machine()}, {host_cpu()}, {cores} cores)",
        {"kind": "llvm", "mcpu": host_cpu(), "num-cores": cores},
        rpc_key="local",
    )


# Each CPU and its features from the vendor's sheet:
#   Raspberry Pi 4 Model B: Broadcom BCM2711, 4x Cortex-A72 (Armv8.0-A: NEON, no dot product).
#   Raspberry Pi 5: Broadcom BCM2712, 4x Cortex-A76 (Armv8.2-A: NEON, SDOT/UDOT, fp16).
#   Jetson Orin Nano: 6x Cortex-A78AE (Armv8.2-A, dot product) + Ampere GPU, compute 8.7.
#   Jetson AGX Xavier: 8x NVIDIA Carmel (Armv8.2-A, dot product) + Volta GPU, compute 7.2.
_CUDA_LIMITS = {
    "max_num_threads": 1024,
    "max_threads_per_block": 1024,
    "thread_warp_size": 32,
    "max_shared_memory_per_block": 49152,
    "registers_per_block": 65536,
}


def _aarch64(mcpu: str, cores: int, *features: str) -> dict:
    return {
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mcpu": mcpu,
        "mattr": ["+neon", *features],
        "num-cores": cores,
    }


def _jetson(arch: str, host: dict) -> dict:
    return {"kind": "cuda", "arch": arch, **_CUDA_LIMITS, "host": host}


BUILTIN = {
    "rpi4": Board(
        "rpi4",
        "Raspberry Pi 4 Model B: 4x Cortex-A72, NEON, no dot product",
        _aarch64("cortex-a72", 4),
        AARCH64_GXX,
        rpc_key="rpi4",
        threads=4,
    ),
    "rpi5": Board(
        "rpi5",
        "Raspberry Pi 5: 4x Cortex-A76, NEON with SDOT/UDOT",
        _aarch64("cortex-a76", 4, "+dotprod"),
        AARCH64_GXX,
        rpc_key="rpi5",
        threads=4,
    ),
    "jetson-orin-nano": Board(
        "jetson-orin-nano",
        "Jetson Orin Nano: Ampere GPU (sm_87), 6x Cortex-A78AE host",
        _jetson("sm_87", _aarch64("cortex-a78ae", 6, "+dotprod")),
        AARCH64_GXX,
        rpc_key="jetson-orin-nano",
        threads=6,
        notes=("kernels compiled by nvcc into the library; running needs the Jetson",),
    ),
    "jetson-xavier": Board(
        "jetson-xavier",
        "Jetson AGX Xavier: Volta GPU (sm_72), 8x Carmel host",
        _jetson("sm_72", _aarch64("carmel", 8, "+dotprod")),
        AARCH64_GXX,
        rpc_key="jetson-xavier",
        threads=8,
        notes=("sm_72 needs a CUDA toolkit <= 12.x (CUDA 13 dropped Volta, JetPack 5 has 11.4)",),
    ),
}
ALIASES = {"host": "x86", "llvm": "x86"}


def _user_files(extra: str | os.PathLike | None) -> list[Path]:
    """The board files to read: the default one if present, then those named (which must be)."""
    default = Path.home() / ".config" / "qcompiler" / "boards.toml"
    files = [default] if default.is_file() else []
    if os.environ.get("QC_BOARDS"):
        files.append(Path(os.environ["QC_BOARDS"]))
    if extra is not None:
        files.append(Path(extra))
    return files


def load_board_file(path: str | os.PathLike) -> dict[str, Board]:
    """The boards of one TOML file (``[boards.NAME]`` tables)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise QCompilerError(f"cannot read board file {str(path)!r}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise QCompilerError(f"board file {str(path)!r} is not valid TOML: {err}") from None
    known = {"description", "target", "cross_compiler", "rpc_key", "threads"}
    boards = {}
    for name, table in data.get("boards", {}).items():
        unknown = set(table) - known
        if unknown:
            raise QCompilerError(
                f"board {name!r} in {str(path)!r}: unknown field(s) {sorted(unknown)}, "
                f"expected some of {sorted(known)}"
            )
        if "target" not in table:
            raise QCompilerError(f"board {name!r} in {str(path)!r} has no target")
        board = Board(
            name,
            table.get("description", name),
            dict(table["target"]),
            table.get("cross_compiler"),
            rpc_key=table.get("rpc_key", name),
            threads=int(table.get("threads", 0)),
            source=str(path),
        )
        board.tvm_target  # noqa: B018 (validate now, naming the file)
        boards[name] = board
    return boards


def boards(board_file: str | os.PathLike | None = None) -> dict[str, Board]:
    """Every board known: built in, then the user's files (which may redefine a name)."""
    found = {"x86": _host_board(), **BUILTIN}
    for path in _user_files(board_file):
        found.update(load_board_file(path))
    return found


def _from_target(target: tvm.target.Target, name: str, description: str, source: str) -> Board:
    """A board for a plain TVM target, cross-linked by Debian's g++ when it is aarch64."""
    exported = target_json(target, derived=False)
    triple = str(exported.get("host", exported).get("mtriple", ""))
    cross = AARCH64_GXX if triple.startswith("aarch64") else None
    return Board(name, description, exported, cross, rpc_key=name, source=source)


def resolve_board(
    name: str | Board | tvm.target.Target = "x86", board_file: str | os.PathLike | None = None
) -> Board:
    """The board a user names: a profile name, a TVM target tag, or a Target/Board object."""
    if isinstance(name, Board):
        return name
    if isinstance(name, tvm.target.Target):
        label = str(name.attrs.get("mcpu", name.kind.name))
        return _from_target(name, label, "a TVM target", "a TVM target")
    known = boards(board_file)
    name = ALIASES.get(name, name)
    if name in known:
        return known[name]
    if name in tvm.target.tag.list_tags():
        return _from_target(tvm.target.Target(name), name, f"TVM target tag {name}", "TVM tag")
    raise QCompilerError(
        f"unknown target {name!r}: boards are {sorted(known)} (see `qc targets`), or give a "
        "TVM target tag such as 'raspberry-pi/4b-aarch64'"
    )


def resolve_target(name: str | Board | tvm.target.Target = "x86") -> tvm.target.Target:
    """The TVM target of a board name (see :func:`resolve_board`)."""
    return resolve_board(name).tvm_target

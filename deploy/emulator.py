"""An emulated Raspberry Pi: an arm64 Debian root run under qemu-user, serving TVM RPC.

No board is attached to CI, so the tests reach an emulated one through exactly the path a real
board takes: the board kit (``deploy/kit``) installs TVM's runtime in the root, offline from
aarch64 wheels downloaded here, and its RPC server runs under qemu and registers with a
tracker on 127.0.0.1 under a board key. Cross-compiled libraries are uploaded to it and run
there like on a Pi; its latencies mean nothing (emulation), its outputs must match the host's.

Build it once (about 6 minutes and 800 MB; as root, with debootstrap and qemu-user-static,
whose binfmt handler runs the arm64 programs)::

    python -m qcompiler.deploy.emulator build [DIR]

``DIR`` defaults to ``$QC_BOARD_ROOT`` or ``~/.cache/qcompiler/boards/rpi-arm64``. Then::

    with emulated_board(default_root(), key="rpi4") as endpoint:
        ...  # qc run / tune with endpoint
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from qcompiler.passes.errors import QCompilerError
from qcompiler.targets.tuning import LocalRPC

KIT = Path(__file__).parent / "kit"
READY = "opt/qc/READY"
VENV = "/opt/qc/venv"
SUITE = "bookworm"  # Python 3.11, the version of the wheels below
PACKAGES = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post0", "cloudpickle", "psutil")
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def default_root() -> Path:
    env = os.environ.get("QC_BOARD_ROOT")
    return Path(env) if env else Path.home() / ".cache" / "qcompiler" / "boards" / "rpi-arm64"


def is_ready(root: str | os.PathLike) -> bool:
    return (Path(root) / READY).is_file()


def missing_prerequisites() -> list[str]:
    """What this host lacks to build or run the emulated board (empty: nothing)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (debootstrap and chroot need it)")
    for tool in ("debootstrap", "chroot"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (apt-get install debootstrap)")
    if not (BINFMT / "qemu-aarch64").is_file():
        missing.append(
            "a binfmt handler for aarch64 (apt-get install qemu-user-static binfmt-support; "
            "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
            "update-binfmts --enable qemu-aarch64)"
        )
    return missing


def _run(cmd: list[str], what: str, echo) -> None:
    echo(f"{what}: {' '.join(cmd)}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise QCompilerError(f"{what} failed ({done.returncode}):\n" + "\n".join(tail))


def build(
    root: str | os.PathLike | None = None,
    mirror: str = "http://deb.debian.org/debian",
    echo=print,
) -> Path:
    """Build the emulated board's root at ``root`` (replacing none until it is complete)."""
    root = Path(root) if root is not None else default_root()
    missing = missing_prerequisites()
    if missing:
        raise QCompilerError("cannot build the emulated board, missing: " + "; ".join(missing))
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "debootstrap",
            "--arch=arm64",
            "--variant=minbase",
            "--include=python3,python3-venv,libgomp1",
            SUITE,
            str(staging),
            mirror,
        ],
        "debootstrap (second stage under qemu)",
        echo,
    )
    wheels = staging / "opt/qc/wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--platform=manylinux_2_28_aarch64",
            "--python-version=3.11",
            "--implementation=cp",
            f"--dest={wheels}",
            *PACKAGES,
        ],
        "download the board's wheels",
        echo,
    )
    shutil.copytree(KIT, staging / "opt/qc/kit")
    # The kit, as a user runs it on a Pi: offline from the wheels, under qemu in the root.
    _run(
        [
            "chroot",
            str(staging),
            "/usr/bin/env",
            "-i",
            "HOME=/root",
            "PATH=/usr/bin:/bin",
            "sh",
            "/opt/qc/kit/setup-board.sh",
            VENV,
            "/opt/qc/wheels",
        ],
        "install TVM with the board kit",
        echo,
    )
    (staging / READY).write_text(" ".join(PACKAGES) + "\n")
    if root.exists():
        shutil.rmtree(root)
    os.rename(staging, root)
    echo(f"emulated board ready in {root}")
    return root


def server_command(root: str | os.PathLike, threads: int | None = None):
    """A :class:`LocalRPC` server command that starts the kit's RPC server inside ``root``."""

    def command(tracker_port: int, key: str, port: int) -> list[str]:
        return [
            "chroot",
            str(root),
            "/usr/bin/env",
            "-i",  # the board's environment, not this host's
            "HOME=/root",
            "PATH=/usr/bin:/bin",
            f"TVM_NUM_THREADS={threads or 4}",  # a Pi has 4 cores
            "QC_SERVER_HOST=127.0.0.1",
            f"QC_SERVER_PORT={port}",
            f"QC_SERVER_PORT_END={port + 1}",
            "sh",
            "/opt/qc/kit/start-server.sh",
            f"127.0.0.1:{tracker_port}",
            key,
            VENV,
        ]

    return command


def emulated_board(
    root: str | os.PathLike | None = None,
    key: str = "rpi4",
    servers: int = 1,
    threads: int | None = None,
) -> LocalRPC:
    """A tracker on 127.0.0.1 with ``servers`` emulated boards registered under ``key``."""
    root = Path(root) if root is not None else default_root()
    if not is_ready(root):
        raise QCompilerError(
            f"no emulated board at {str(root)!r}: build it with "
            "`python -m qcompiler.deploy.emulator build`"
        )
    missing = missing_prerequisites()
    if missing:
        raise QCompilerError("cannot run the emulated board, missing: " + "; ".join(missing))
    # Importing TVM under qemu takes ~10 s per server on these cores.
    return LocalRPC(key, servers, server_command=server_command(root, threads), start_timeout_s=300)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcompiler.deploy.emulator")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build the emulated Raspberry Pi root")
    p.add_argument("root", nargs="?", help="directory (default: $QC_BOARD_ROOT or the cache)")
    p.add_argument("--mirror", default="http://deb.debian.org/debian")
    p.add_argument("--if-missing", action="store_true", help="keep a board already built")
    args = parser.parse_args(argv)
    root = Path(args.root) if args.root else default_root()
    if args.if_missing and is_ready(root):
        print(f"emulated board already built in {root}")
        return 0
    try:
        build(root, args.mirror)
    except QCompilerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run an artifact on a board over TVM RPC: upload its library, run it, time it there.

>>> with RemoteModel(load_artifact("out/"), RPCEndpoint("10.0.0.2", 9190, "rpi4")) as board:
...     outputs = board.run({"input": x})
...     seconds = board.time({"input": x}, repeat=50)

The board is asked what it is before anything is uploaded (TVM's own LLVM reports the
machine's triple and CPU), so an artifact for another machine, or one using instructions its
CPU lacks (e.g. dot product on a Pi 4), is refused with both named instead of crashing the
server. Latencies are measured on the board by TVM's time evaluator, not across the network.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import tvm
from tvm import relax

from qcompiler.deploy.artifact import Artifact, device_of, named_outputs, prepare_inputs
from qcompiler.passes.errors import QCompilerError
from qcompiler.targets.boards import arch_of
from qcompiler.targets.tuning import RPCEndpoint


class RunInterrupted(QCompilerError):
    """A run that a board fault stopped after some samples finished; ``outputs`` holds the
    outputs of those first samples, so no finished work is lost."""

    def __init__(self, message: str, outputs: list[dict]):
        super().__init__(message)
        self.outputs = outputs


def board_identity(session) -> tuple[str, str] | None:
    """(LLVM triple, CPU name) of the board behind ``session``, None if its TVM cannot tell.

    A runtime-only TVM on the board lacks LLVM; the check is then skipped.
    """
    try:
        triple = session.get_function("target.llvm_get_system_triple")()
        cpu = session.get_function("target.llvm_get_system_cpu")()
    except (AttributeError, RuntimeError, tvm.error.TVMError):
        return None
    return str(triple), str(cpu)


def check_board(manifest: dict, identity: tuple[str, str] | None, where: str) -> None:
    """Refuse an artifact that the board cannot run, naming the artifact's target and the board."""
    if identity is None:
        return
    triple, cpu = identity
    target = manifest["target"]
    built_for = f"{target['board']} ({target['arch']})"
    if arch_of(triple) != target["arch"]:
        raise QCompilerError(
            f"the artifact is built for {built_for} but the board at {where} is "
            f"{arch_of(triple)} ({triple}, CPU {cpu}): compile it with --target for that board"
        )
    host = target["tvm"].get("host", target["tvm"])
    if not host.get("feature.has_dotprod") or cpu in ("", "generic"):
        return
    try:
        board_target = tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": cpu})
    except Exception:  # an unknown CPU name: nothing to compare
        return
    if not board_target.attrs.get("feature.has_dotprod", True):
        raise QCompilerError(
            f"the artifact is built for {built_for}, CPU {host.get('mcpu')} with dot product "
            f"instructions; the board at {where} is a {cpu} without them: compile it for that "
            "board's profile (e.g. --target rpi4)"
        )


def _bounded(call, seconds: float, what: str, endpoint: RPCEndpoint):
    """``call()`` with a time limit: TVM's RPC client waits forever on a board that stopped
    answering (a hung or frozen server still accepts connections). The call runs in a daemon
    thread that is abandoned on timeout; errors become :class:`QCompilerError`."""
    outcome: dict = {}

    def work():
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed to the caller below
            outcome["error"] = err

    worker = threading.Thread(target=work, daemon=True, name=f"qc-rpc-{what}")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise QCompilerError(
            f"the board at {endpoint} did not answer within {seconds:.0f} s while {what}; "
            "is its RPC server hung, or the network down? (raise the limit with --rpc-timeout)"
        )
    error = outcome.get("error")
    if isinstance(error, QCompilerError):
        raise error
    if error is not None:
        lines = str(error).strip().splitlines()
        raise QCompilerError(
            f"the board at {endpoint} failed while {what}: {lines[-1] if lines else error!r}"
        ) from error
    return outcome.get("value")


class RemoteModel:
    """An artifact loaded on a board reached through a tracker.

    Every remote step is bounded by the endpoint's ``timeout_s`` (uploading and loading by
    twice that), so a board that stops answering ends the run with an error naming it.
    """

    def __init__(self, artifact: Artifact, endpoint: RPCEndpoint, threads: int | None = None):
        self.artifact, self.endpoint, self.threads = artifact, endpoint, threads
        self.session = self.vm = self.device = None

    def __enter__(self) -> RemoteModel:
        self.endpoint.check()
        _bounded(self._load, 2 * self.endpoint.timeout_s, "loading the model", self.endpoint)
        return self

    def _load(self) -> None:
        manifest = self.artifact.manifest
        self.session = self.endpoint.connect()
        check_board(manifest, board_identity(self.session), str(self.endpoint))
        name = f"qc-{manifest['checksums'][manifest['library']][:16]}.so"
        self.session.upload(bytearray(self.artifact.library.read_bytes()), target=name)
        if self.threads is not None:
            self.session.get_function("runtime.config_threadpool")(0, self.threads)
        self.device = device_of(manifest, self.session)
        self.vm = relax.VirtualMachine(self.session.load_module(name), self.device)

    def __exit__(self, *exc) -> None:
        # The session closes when its last reference goes (remote devices hold one too), and
        # the board serves no one else until then; the VM holds itself in a cycle.
        self.vm = self.device = self.session = None
        gc.collect()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        def call():
            args = prepare_inputs(self.artifact.manifest, inputs, self.device)
            return named_outputs(self.artifact.manifest, self.vm["main"](*args))

        return _bounded(call, self.endpoint.timeout_s, "running the model", self.endpoint)

    def time(self, inputs: dict[str, np.ndarray], repeat: int = 20, number: int = 1) -> list:
        """Seconds per run, ``repeat`` measurements of ``number`` runs each, timed on the board."""

        def call():
            args = prepare_inputs(self.artifact.manifest, inputs, self.device)
            timer = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat)
            return list(timer(*args).results)

        return _bounded(call, self.endpoint.timeout_s, "timing the model", self.endpoint)

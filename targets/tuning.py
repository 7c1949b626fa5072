"""Tuning over TVM RPC: a tracker, servers registered under a board key, meta-schedule, a database.

Every measurement goes through RPC, for the host as for a board: :class:`LocalRPC` starts a
tracker and a server on 127.0.0.1 (and stops them), so CI runs the same code path as a
Raspberry Pi behind a tracker.

:func:`tune` extracts the tasks (one per distinct fused TIR function, weighted by how often it is
called) from exactly the module :func:`qcompiler.targets.build.build` lowers, and then

1. measures each task's default schedule (``targets.schedules``) on the board and stores it as a
   tuning record, so a tuned build is never slower than the untuned one;
2. ranks the tasks by ``weight x latency`` and searches with meta-schedule (evolutionary
   search, XGBoost cost model) only the costliest ones not searched before, as many as the
   trial budget covers, sharing the trials with meta-schedule's gradient task scheduler.

Records go to a :class:`~tvm.s_tir.meta_schedule.database.JSONDatabase` in ``records_dir``: one
line per measured candidate, appended as soon as it is measured, so a run that dies keeps
everything measured before and the next run starts from there. One directory can serve many
models and precision configurations: a task is keyed by its TIR, and identical kernels share
records. ``searched.json`` beside them keeps each task's default latency (the ranking) and the
tasks whose search finished, which no later run searches again.

A board that stops answering (server killed, network gone) ends the run with a
:class:`QCompilerError` that says so; the runner checks the tracker for a live server before each
session and times out each measurement, instead of waiting forever for a session.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tvm
import tvm_ffi
from tvm import rpc
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.relax_integration import extract_tasks
from tvm.support.popen_pool import PopenPoolExecutor

from qcompiler.passes.errors import QCompilerError
from qcompiler.targets.build import fused_module
from qcompiler.targets.kernels import fix_tvm_intrinsics, register_tvm_vnni_name
from qcompiler.targets.schedules import schedule_in_place

log = logging.getLogger(__name__)

# A task holding this many records is not searched again.
TRIALS_PER_TASK = 64
# Each searched task gets at least this many trials (two batches); fewer teach XGBoost nothing.
MIN_TRIALS = 16
# Tasks are searched, costliest first, until they cover this share of the estimated run time.
COVER = 0.9
# Candidates per search round of one task.
BATCH = 8
# A measurement runs its kernel until this much time has passed (short kernels time noisily).
MIN_REPEAT_MS = 40
# Beside the database: the tasks already searched, which later runs skip.
SEARCHED = "searched.json"


@dataclass(frozen=True)
class RPCEndpoint:
    """Where boards of one kind are found: a tracker and the key their servers registered."""

    host: str
    port: int
    key: str
    timeout_s: int = 60

    def __str__(self) -> str:
        return f"tracker {self.host}:{self.port}, key {self.key!r}"

    def check(self) -> int:
        """Number of free servers under :attr:`key`; a clear error when there is none."""
        if not _tracker_up(self):
            raise QCompilerError(
                f"cannot reach the RPC tracker at {self.host}:{self.port} (connection refused "
                "or timed out); start one with `python -m tvm.exec.rpc_tracker`"
            )
        try:
            summary = rpc.connect_tracker(self.host, self.port).summary()
        except (OSError, RuntimeError) as err:
            raise QCompilerError(
                f"cannot reach the RPC tracker at {self.host}:{self.port}: {err}"
            ) from err
        queue = summary.get("queue_info", {}).get(self.key, {})
        free = int(queue.get("free", 0))
        # A server that just ended a session is briefly neither free nor pending, but still
        # connected to the tracker.
        connected = any(
            s.get("key") == f"server:{self.key}" for s in summary.get("server_info", [])
        )
        if free + int(queue.get("pending", 0)) == 0 and not connected:
            keys = sorted(summary.get("queue_info", {}))
            raise QCompilerError(
                f"no RPC server is registered under key {self.key!r} at tracker "
                f"{self.host}:{self.port} (keys there: {keys})"
            )
        return free

    def connect(self, session_timeout_s: int | None = None) -> rpc.RPCSession:
        """A session on one of the servers under :attr:`key` (the tracker picks which).

        The session ends after ``session_timeout_s`` (default: ten measurement timeouts), so a
        board that stops answering cannot hold a run forever.
        """
        tracker = rpc.connect_tracker(self.host, self.port)
        return tracker.request(
            self.key, priority=1, session_timeout=session_timeout_s or 10 * self.timeout_s
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRPC:
    """A tracker and ``servers`` RPC servers on 127.0.0.1, as child processes.

    >>> with LocalRPC(key="x86") as endpoint:
    ...     tune(mod, target, "records/", trials=64, rpc=endpoint)

    ``threads`` sets the servers' ``TVM_NUM_THREADS``, so measured latencies are for that many
    threads. ``server_command(tracker_port, key, port)`` gives the command line of a server
    other than this Python's (an emulated board's, :mod:`qcompiler.deploy.emulator`), which
    may take ``start_timeout_s`` to register.
    """

    def __init__(
        self,
        key: str = "local",
        servers: int = 1,
        threads: int | None = None,
        server_command: Callable[[int, str, int], list[str]] | None = None,
        start_timeout_s: float = 60.0,
    ):
        self.key, self.servers, self.threads = key, servers, threads
        self.server_command = server_command or _host_server
        self.start_timeout_s = start_timeout_s
        self.processes: list[subprocess.Popen] = []
        self.endpoint: RPCEndpoint | None = None

    def __enter__(self) -> RPCEndpoint:
        port = _free_port()
        python = [sys.executable, "-m"]
        self._spawn(
            [
                *python,
                "tvm.exec.rpc_tracker",
                "--host=127.0.0.1",
                f"--port={port}",
                f"--port-end={port + 1}",
            ]
        )
        endpoint = RPCEndpoint("127.0.0.1", port, self.key)
        self._wait(lambda: _tracker_up(endpoint), "the RPC tracker to start")
        for _ in range(self.servers):
            self._spawn(self.server_command(port, self.key, _free_port()))
        self._wait(
            lambda: _free_servers(endpoint) >= self.servers,
            "the RPC servers to register",
            self.start_timeout_s,
        )
        self.endpoint = endpoint
        return endpoint

    def __exit__(self, *exc) -> None:
        self.stop()

    def kill_servers(self) -> None:
        """Kill the RPC servers at once (what a board that loses power looks like)."""
        for proc in self.processes[1:]:
            _signal_group(proc, signal.SIGKILL)

    def kill_tracker(self) -> None:
        """Kill the tracker (the machine that hands out boards goes away)."""
        _signal_group(self.processes[0], signal.SIGKILL)

    def stop(self) -> None:
        # TVM's server and tracker serve from child processes: signal the whole group.
        for proc in reversed(self.processes):
            _signal_group(proc, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self.processes.clear()

    def _spawn(self, cmd: list[str]) -> None:
        env = dict(os.environ)
        if self.threads:
            env["TVM_NUM_THREADS"] = str(self.threads)
        self.processes.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p in self.processes if p.poll() is not None]
            if dead:
                self.stop()
                raise QCompilerError(f"{' '.join(dead[0].args)} exited with {dead[0].returncode}")
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise QCompilerError(f"timed out after {timeout:.0f} s waiting for {what}")


def _host_server(tracker_port: int, key: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tvm.exec.rpc_server",
        f"--tracker=127.0.0.1:{tracker_port}",
        f"--key={key}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--port-end={port + 1}",
    ]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _tracker_up(endpoint: RPCEndpoint) -> bool:
    """Whether something listens at the tracker's address (TVM's own client retries for ages)."""
    try:
        socket.create_connection((endpoint.host, endpoint.port), timeout=2).close()
        return True
    except OSError:
        return False


def _free_servers(endpoint: RPCEndpoint) -> int:
    try:
        return endpoint.check()
    except QCompilerError:
        return 0


# -- the database ---------------------------------------------------------------------------------
def open_database(records_dir: str | os.PathLike) -> ms.database.JSONDatabase:
    """The append-only JSON tuning database in ``records_dir`` (created when missing)."""
    path = Path(records_dir)
    if path.exists() and not path.is_dir():
        raise QCompilerError(f"tuning records {str(path)!r} is a file, expected a directory")
    path.mkdir(parents=True, exist_ok=True)
    for name in ("workloads.json", "records.json"):
        _drop_broken_lines(path / name)
    return ms.database.JSONDatabase(
        path_workload=str(path / "workloads.json"),
        path_tuning_record=str(path / "records.json"),
        allow_missing=True,
    )


def _drop_broken_lines(file: Path) -> None:
    """Keep a JSON-lines file loadable after an interrupted append.

    TVM appends one JSON line per record; a run killed mid-write leaves a partial last line,
    and TVM then refuses the whole file. Lines that do not parse are moved to ``FILE.broken``
    (nothing is lost) and the rest is kept, with a warning naming the file.
    """
    if not file.is_file():
        return
    text = file.read_text()
    good, broken = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError:
            broken.append(line)
        else:
            good.append(line)
    if not broken and (not text or text.endswith("\n")):
        return
    if broken:
        with open(file.with_name(file.name + ".broken"), "a") as out:
            out.write("\n".join(broken) + "\n")
        warnings.warn(
            f"{file}: {len(broken)} unreadable line(s) (an interrupted write?) moved to "
            f"{file.name}.broken; {len(good)} kept",
            stacklevel=3,
        )
    staging = file.with_name(f".{file.name}.tmp")
    staging.write_text("".join(line + "\n" for line in good))
    os.replace(staging, file)


def load_database(records_dir: str | os.PathLike) -> ms.database.JSONDatabase:
    """An existing tuning database (for ``--tuning-records``); a clear error when it is not one."""
    path = Path(records_dir)
    if not (path / "records.json").is_file() or not (path / "workloads.json").is_file():
        raise QCompilerError(
            f"{str(path)!r} holds no tuning records (expected workloads.json and records.json "
            "written by `qc tune`)"
        )
    register_tvm_vnni_name()  # records may tensorize with it
    return open_database(path)


# -- tuning ----------------------------------------------------------------------------------------
@dataclass
class TaskReport:
    """One tuned kernel: its name, weight (calls per run) and latencies in seconds."""

    name: str
    weight: int
    default_s: float | None = None
    best_s: float | None = None
    trials: int = 0


@dataclass
class TuneReport:
    records_dir: str
    tasks: list[TaskReport] = field(default_factory=list)
    trials: int = 0
    wall_s: float = 0.0
    skipped: int = 0  # tasks the database already held
    module: tvm.IRModule | None = None  # the lowered module the tasks came from

    def estimated_ms(self) -> float:
        """Sum over tasks of weight x best measured latency."""
        return 1e3 * sum(t.weight * (t.best_s or t.default_s or 0.0) for t in self.tasks)


def create_session(rpc_config: ms.runner.RPCConfig) -> rpc.RPCSession:
    """A session with a server under the key, or an error when none is connected.

    The tracker queues a request for a key that has no server and never answers it, so TVM's
    default (``tracker.request``) waits forever once the board is gone; a tracker that is gone
    is retried for minutes. This runs in the
    runner's worker process; its error message becomes the measurement's error.
    """
    endpoint = RPCEndpoint(rpc_config.tracker_host, rpc_config.tracker_port, "")
    if not _tracker_up(endpoint):  # TVM's client would retry for minutes per measurement
        raise RuntimeError(
            f"RPC: cannot reach the tracker at {endpoint.host}:{endpoint.port} (connection "
            "refused or timed out)"
        )
    tracker = rpc_config.connect_tracker()
    wanted = "server:" + rpc_config.tracker_key
    if not any(s.get("key") == wanted for s in tracker.summary().get("server_info", [])):
        raise RuntimeError(
            f"RPC: no server is connected under key {rpc_config.tracker_key!r} at tracker "
            f"{rpc_config.tracker_host}:{rpc_config.tracker_port}"
        )
    return tracker.request(
        key=rpc_config.tracker_key,
        priority=rpc_config.session_priority,
        session_timeout=rpc_config.session_timeout_sec,
    )


def _runner(endpoint: RPCEndpoint, boards: int = 1) -> ms.runner.RPCRunner:
    """Measures on ``boards`` servers under the endpoint's key at once (a board farm): the
    tracker hands each measurement to a free one."""
    runner = ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(
            tracker_host=endpoint.host,
            tracker_port=endpoint.port,
            tracker_key=endpoint.key,
            session_timeout_sec=endpoint.timeout_s,
        ),
        evaluator_config=ms.runner.EvaluatorConfig(
            number=3, repeat=1, min_repeat_ms=MIN_REPEAT_MS, enable_cpu_cache_flush=False
        ),
        f_create_session=create_session,
        max_workers=boards,
    )
    # RPCRunner's worker pool has no timeout: a server that dies after the session was granted
    # would hang the run. Each measurement gets the session timeout (then "RPCRunner: Timeout").
    runner.pool.shutdown()
    runner.pool = PopenPoolExecutor(max_workers=boards, timeout=endpoint.timeout_s)
    return runner


def _builder(cross_compiler: str | None = None) -> ms.builder.LocalBuilder:
    """Builds candidates here; a board of another machine gets shared libraries linked by its
    cross compiler (meta-schedule's default, a tar of objects, needs a compiler on the board).
    """
    # The default 30 s is too short for conv builds on a busy 2-core machine.
    export = None if cross_compiler is None else functools.partial(cross_export, cross_compiler)
    return ms.builder.LocalBuilder(max_workers=1, timeout_sec=180, f_export=export)


def cross_export(cross_compiler: str, mod: tvm.runtime.Module) -> str:
    """Link ``mod`` into a shared library for the board with ``cross_compiler``; its path."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="qc-build-"), "candidate.so")
    mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    return path


def _measure_defaults(tasks, target, builder, runner, database) -> list[float | None]:
    """Measure the default schedule of each task over RPC (one batch) and commit the records.

    Returns the mean latency per task, ``None`` where no default schedule applies or it failed
    to build.
    """
    candidates = []
    for task in tasks:
        sch = tvm.s_tir.Schedule(task.dispatched[0], debug_mask="all")
        try:
            with target:  # the default schedules pick the board's dot-product instruction
                schedule_in_place(sch)
        except (RuntimeError, ValueError) as err:
            log.debug("no default schedule for %s: %s", task.task_name, err)
            continue
        candidates.append((task, sch))
    if not candidates:
        return [None] * len(tasks)
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in candidates])
    inputs, measured = [], []
    for (task, sch), result in zip(candidates, built):
        if result.error_msg:
            log.warning(
                "default schedule of %s failed to build: %s", task.task_name, result.error_msg
            )
            continue
        args_info = ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"])
        inputs.append(ms.runner.RunnerInput(result.artifact_path, "cpu", args_info))
        measured.append((task, sch, args_info))
    seconds = {}
    for (task, sch, args_info), future in zip(measured, runner.run(inputs)):
        result = future.result()
        if result.error_msg:
            raise QCompilerError(
                f"measuring {task.task_name} over RPC failed: {result.error_msg.strip()[-500:]}"
            )
        run_secs = [float(s) for s in result.run_secs]
        workload = database.commit_workload(task.dispatched[0])
        database.commit_tuning_record(
            ms.database.TuningRecord(sch.trace, workload, run_secs, target, args_info)
        )
        seconds[task.task_name] = sum(run_secs) / len(run_secs)
    return [seconds.get(task.task_name) for task in tasks]


def _best_seconds(database, task) -> tuple[float | None, int]:
    """Best mean latency the database holds for ``task`` and how many records it has."""
    if not database.has_workload(task.dispatched[0]):
        return None, 0
    workload = database.commit_workload(task.dispatched[0])
    records = database.get_top_k(workload, 1 << 20)
    if not records:
        return None, 0
    best = records[0].run_secs
    return sum(float(s) for s in best) / len(best), len(records)


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Prints tasks done and the best latency so far; stops when the board stops answering.

    A batch whose every run failed in RPC means the board is gone (a kernel that crashes fails
    alone): tuning stops there with the records kept, instead of burning the remaining trials
    on timeouts.
    """

    def __init__(self, names: list[str], endpoint: RPCEndpoint, records_dir: str, echo):
        self.names, self.endpoint, self.records_dir, self.echo = names, endpoint, records_dir, echo
        self.best: dict[int, float] = {}
        self.trials = 0
        self.failure: str | None = None  # why tuning stopped early (raised through TVM's C++)

    def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
        self.trials += len(runner_results)
        errors = [r.error_msg for r in runner_results if r.error_msg]
        for result in runner_results:
            if not result.error_msg and result.run_secs:
                secs = sum(float(s) for s in result.run_secs) / len(result.run_secs)
                self.best[task_id] = min(self.best.get(task_id, secs), secs)
        # Candidates that failed to build never reached the board: they say nothing about it.
        measured = [r for b, r in zip(builder_results, runner_results) if not b.error_msg]
        rpc_errors = [
            r.error_msg
            for r in measured
            if r.error_msg and ("rpc" in r.error_msg.lower() or "connect" in r.error_msg.lower())
        ]
        for build in builder_results:
            if build.error_msg:
                log.debug("candidate failed to build: %s", _first_error(build.error_msg))
        for error in errors:
            log.debug("measurement failed: %s", error)
        best = self.best.get(task_id)
        self.echo(
            f"  [{self.trials} trials] {self.names[task_id]}: "
            f"{len(runner_results) - len(errors)}/{len(runner_results)} ok, best "
            + (f"{best * 1e6:.1f} us" if best is not None else "-")
        )
        if measured and len(rpc_errors) == len(measured):
            self.failure = (
                f"the board at {self.endpoint} stopped answering: "
                f"{rpc_errors[0].strip().splitlines()[-1][:300]}. Every record measured so far "
                f"is kept in {self.records_dir}; run the same command again to resume."
            )
            raise QCompilerError(self.failure)


@contextlib.contextmanager
def records_lock(records_dir: str | os.PathLike, echo: Callable[[str], None] = print):
    """Hold ``records_dir`` for one tuning run at a time (other processes wait).

    Two runs appending to one database at once could interleave the halves of long lines;
    the second also reads what the first measured once it gets the lock.
    """
    path = Path(records_dir)
    if path.exists() and not path.is_dir():
        raise QCompilerError(f"tuning records {str(path)!r} is a file, expected a directory")
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"waiting for another tuning run that writes to {path}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _exclusive(func):
    @functools.wraps(func)
    def locked(mod, target, records_dir, *args, **kwargs):
        with records_lock(records_dir, kwargs.get("echo", print)):
            return func(mod, target, records_dir, *args, **kwargs)

    return locked


@_exclusive
def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    records_dir: str | os.PathLike,
    rpc: RPCEndpoint,
    trials: int = 64,
    trials_per_task: int | None = None,
    echo: Callable[[str], None] = print,
    cross_compiler: str | None = None,
) -> TuneReport:
    """Tune every kernel of ``mod`` for ``target`` on the board behind ``rpc``.

    Parameters
    ----------
    trials : int
        Search trials for the whole model (beyond the default schedules, which are always
        measured once per task); 0 measures the defaults only.
    trials_per_task : int, optional
        A task whose database entry already holds this many records is not searched again
        (default :data:`TRIALS_PER_TASK`).
    cross_compiler : str, optional
        For a board of another machine: the compiler that links each candidate's library.

    Trials go where the time is: after the defaults are measured, tasks are ranked by
    ``weight x best latency`` and only the costliest are searched -- as many as the budget
    gives :data:`MIN_TRIALS` each, stopping once they cover :data:`COVER` of the estimated
    run time; meta-schedule's gradient scheduler then shares the trials among them.
    """
    start = time.monotonic()
    fix_tvm_intrinsics()
    records_dir = str(records_dir)
    database = open_database(records_dir)
    boards = max(1, rpc.check())
    fused = fused_module(mod, target)
    tasks = [t for t in extract_tasks(fused, target) if t.dispatched]
    report = TuneReport(records_dir, module=fused)
    # Built when something is to be measured: RPCRunner's sanity check alone takes seconds.
    tools = functools.cache(lambda: (_builder(cross_compiler), _runner(rpc, boards)))
    per_task = trials_per_task or TRIALS_PER_TASK
    echo(f"tuning {len(tasks)} tasks on {rpc} ({boards} board(s)); records in {records_dir}")
    counts = []
    for task in tasks:
        entry = TaskReport(task.task_name, int(task.weight))
        report.tasks.append(entry)
        entry.best_s, count = _best_seconds(database, task)
        counts.append(count)
    new = [i for i, count in enumerate(counts) if count == 0]
    if new:
        echo(f"measuring the default schedules of {len(new)} new tasks")
        defaults = _measure_defaults([tasks[i] for i in new], target, *tools(), database)
        for i, seconds in zip(new, defaults):
            entry = report.tasks[i]
            entry.default_s = entry.best_s = seconds
            counts[i] = 1
            report.trials += 1
            echo(
                f"  {entry.name}: "
                + (f"{seconds * 1e6:.1f} us" if seconds is not None else "no default schedule")
            )
    state = _state(records_dir)
    for task, entry in zip(tasks, report.tasks):
        if entry.default_s is not None:
            state["default_s"][_task_key(task)] = entry.default_s
    _save_state(records_dir, state)
    todo = _worth_tuning(tasks, report.tasks, counts, trials, per_task, state)
    report.skipped = len(tasks) - len(todo)
    if todo:
        share = sum(e.weight * (e.best_s or 0) for _, e in todo) / max(
            1e-12, sum(e.weight * (e.best_s or 0) for e in report.tasks)
        )
        echo(
            f"searching the {len(todo)} costliest tasks ({100 * share:.0f}% of the estimated "
            f"run time), {trials} trials"
        )
        names = [t.task_name for t, _ in todo]
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [t for t, _ in todo], work_dir=os.path.join(records_dir, "logs")
        )
        progress = _Progress(names, rpc, records_dir, echo)
        with _reraise(progress):
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=os.path.join(records_dir, "logs"),
                max_trials_global=trials,
                max_trials_per_task=per_task,
                num_trials_per_iter=min(BATCH, per_task),
                builder=tools()[0],
                runner=tools()[1],
                database=database,
                cost_model="xgb",
                measure_callbacks=[
                    *ms.measure_callback.MeasureCallback.create("default"),
                    progress,
                ],
            )
        report.trials += progress.trials
        for task, entry in todo:
            entry.best_s, count = _best_seconds(database, task)
            entry.trials = count
        state["searched"].update({_task_key(t): e.trials for t, e in todo})
        _save_state(records_dir, state)
    report.wall_s = time.monotonic() - start
    echo(
        f"tuned in {report.wall_s:.0f} s: {report.trials} measurements, "
        f"{report.skipped} tasks not searched, estimated {report.estimated_ms():.3f} ms per run"
    )
    return report


def _task_key(task) -> str:
    return f"{task.task_name}:{tvm_ffi.structural_hash(task.dispatched[0]):x}"


def _state(records_dir: str) -> dict:
    """What this directory knows beyond the records: ``{"default_s": {task key: seconds},
    "searched": {task key: trials}}`` (the default schedules' latencies rank the tasks the same
    way on every run; searched tasks are never searched again)."""
    path = Path(records_dir) / SEARCHED
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        state = {}
    except (OSError, ValueError) as err:
        raise QCompilerError(f"cannot read {path}: {err}") from err
    return {"default_s": state.get("default_s", {}), "searched": state.get("searched", {})}


def _save_state(records_dir: str, state: dict) -> None:
    path = Path(records_dir) / SEARCHED
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    staging.replace(path)


def _worth_tuning(tasks, entries, counts, trials: int, per_task: int, state: dict) -> list:
    """``(task, entry)`` pairs to search, costliest first (see :func:`tune`).

    Tasks are ranked by calls x default latency; the first ``trials // MIN_TRIALS`` of them (or
    fewer, once they cover :data:`COVER` of the time) are the ones this budget tunes. Those
    searched before (or holding ``per_task`` records) are done, so the same command run again
    searches nothing.
    """
    if trials <= 0:
        return []
    keys = [_task_key(t) for t in tasks]
    cost = [
        e.weight * (state["default_s"].get(k) or e.default_s or e.best_s or 0.0)
        for k, e in zip(keys, entries)
    ]
    total = sum(cost) or 1.0
    order = sorted(range(len(tasks)), key=lambda i: -cost[i])
    chosen, covered = [], 0.0
    for rank, i in enumerate(order):
        if rank >= max(1, trials // MIN_TRIALS) or covered >= COVER * total:
            break
        covered += cost[i]
        done = counts[i] >= per_task or keys[i] in state["searched"]
        if not done and entries[i].best_s is not None:
            chosen.append((tasks[i], entries[i]))
    return chosen


@contextlib.contextmanager
def _reraise(progress: _Progress):
    """Our stop from inside meta-schedule's C++ loop comes back as a TVM error: restore it."""
    try:
        yield
    except QCompilerError:
        raise
    except Exception as err:
        if progress.failure is None:
            raise
        raise QCompilerError(progress.failure) from err


def _first_error(message: str) -> str:
    """The line of a TVM error that says what went wrong (not its C++ stack)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or "Check failed" in line:
            return line[:500]
    return lines[-1][:500] if lines else message

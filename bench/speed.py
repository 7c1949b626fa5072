"""Latency of qcompiler's int8 models beside onnxruntime, LiteRT and TVM's own float build.

What it measures
----------------
For each model, with 1 and with 2 threads (``--threads``), in one process so that every column
sees the same machine state:

- ``onnxruntime fp32`` / ``onnxruntime int8``: the float ONNX model and onnxruntime's own
  ``quantize_static`` of it (QDQ, per-channel int8 weights, uint8 activations, MinMax on the
  calibration samples), on the CPU execution provider, ``intra_op_num_threads`` = threads;
- ``LiteRT fp32`` / ``LiteRT int8 (shipped)``: for the TFLite ResNet-8, the float model and the
  int8 model shipped beside it (there is no ONNX file, so no onnxruntime columns);
- ``qcompiler fp32 untuned``: the float model through qcompiler's build (channels-last, the
  packed float kernels of ``targets.kernels`` with their default schedules) -- what
  ``qc compile`` gives a float model, and the reference ``qc eval`` scores against;
- ``qcompiler int8 untuned``: ``qc compile`` with no tuning records (default schedules);
- ``... tuned``: the same with ``--records DIR``, which holds ``<model>/int8`` and
  ``<model>/fp32`` tuning databases (``qc tune`` output); ``--tune TRIALS`` fills them first
  and prints the tuning wall time.

Latency is the median over ``--runs`` calls (after ``--warmup``) of one inference from numpy
inputs to numpy outputs, timed from Python around the call, the same way for every runtime.
``vs ORT int8`` divides by the int8 competitor's median at the same thread count (onnxruntime's
int8 for ONNX models, the shipped int8 model under LiteRT for ResNet-8). Size is the deployable
file: the .onnx / .tflite, or the exported qcompiler library. Peak RSS is the process's, printed
after each model (it only grows).

Run
---
From the repository root::

    python bench/speed.py                                  # all three models, 1 and 2 threads
    python bench/speed.py --models mnist_cnn --runs 200
    python bench/speed.py --models efficientnet_lite0 --records records/   # adds tuned columns
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (the models, data splits and the onnxruntime quantizer)

import qcompiler  # noqa: E402
from qcompiler.deploy.artifact import set_threads  # noqa: E402

Sample = dict[str, np.ndarray]


@dataclass
class Column:
    label: str
    size_bytes: int | None
    # threads -> a call running one inference with that many threads
    make: Callable[[int], Callable[[], object]]
    build_s: float = 0.0


@dataclass
class Timing:
    label: str
    threads: int
    median_s: float | None
    p90_s: float | None
    size_bytes: int | None
    error: str | None = None


def time_call(call: Callable[[], object], runs: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


# -- the runtimes -------------------------------------------------------------------------------
def ort_column(label: str, path: Path, sample: Sample) -> Column:
    def make(threads: int):
        session = accuracy.ort_session(path, threads)
        return lambda: session.run(None, sample)

    return Column(label, path.stat().st_size, make)


def litert_column(label: str, path: Path, sample: Sample) -> Column:
    from ai_edge_litert.interpreter import Interpreter

    def make(threads: int):
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
        source, sink = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        x = accuracy.litert_input(source, next(iter(sample.values())))

        def call():
            interpreter.set_tensor(source["index"], x)
            interpreter.invoke()
            return interpreter.get_tensor(sink["index"])

        return call

    return Column(label, path.stat().st_size, make)


def tvm_column(label: str, build: Callable[[], qcompiler.Artifact], sample: Sample) -> Column:
    start = time.perf_counter()
    artifact = build()
    build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="qc-speed-") as tmp:
        exported = artifact.export(Path(tmp) / "artifact")
        size = (exported / artifact.manifest["library"]).stat().st_size

    def make(threads: int):
        set_threads(threads)
        return lambda: artifact.run(sample)

    return Column(label, size, make, build_s)


# -- one model ----------------------------------------------------------------------------------
def columns_for(case: accuracy.Case, args, shared: Path, workdir: Path) -> tuple[list, str, list]:
    """The columns of one model, the label of its int8 competitor, and notes for the footer."""
    data = case.load(shared, case.spec, 1)
    calib = data.calib[: args.calib]
    sample = data.inputs[0]
    path = shared / "models" / case.model
    notes = []
    columns = []

    if path.suffix == ".tflite":
        columns.append(litert_column("LiteRT fp32", path, sample))
        shipped = shared / "models" / case.shipped_int8
        competitor = "LiteRT int8 (shipped)"
        columns.append(litert_column(competitor, shipped, sample))
    else:
        columns.append(ort_column("onnxruntime fp32", path, sample))
        competitor = "onnxruntime int8"
        with contextlib.redirect_stderr(io.StringIO()):
            qdq = accuracy.ort_quantized(path, calib, "minmax", 99.999, workdir)
        columns.append(ort_column(competitor, qdq, sample))

    model, calibration = qcompiler.calibrate(str(path), calib)
    quantized = qcompiler.quantize(model, None, calibration=calibration)
    records = Path(args.records) / case.name if args.records else None
    if records is not None and args.tune is not None:
        subjects = {"int8": quantized, "fp32": model}
        for precision in args.tune_precisions.split(","):
            subject = subjects[precision]
            start = time.perf_counter()
            report = qcompiler.tune(
                subject,
                records / precision,
                args.target,
                trials=args.tune,
                threads=1,
                echo=lambda line: print("    " + line, file=sys.stderr, flush=True),
            )
            notes.append(
                f"tuning {precision}: {len(report.tasks)} tasks, {report.trials} trials, "
                f"{time.perf_counter() - start:.0f} s wall (threads=1, LocalRPC)"
            )

    columns.append(
        tvm_column(
            "qcompiler fp32 untuned", lambda: qcompiler.compile_float(model, args.target), sample
        )
    )
    if records is not None and (records / "fp32").is_dir():
        columns.append(
            tvm_column(
                "qcompiler fp32 tuned",
                lambda: qcompiler.compile_float(model, args.target, records / "fp32"),
                sample,
            )
        )
    columns.append(
        tvm_column("qcompiler int8 untuned", lambda: quantized.build(args.target), sample)
    )
    if records is not None and (records / "int8").is_dir():
        columns.append(
            tvm_column(
                "qcompiler int8 tuned",
                lambda: quantized.build(args.target, tuning_records=records / "int8"),
                sample,
            )
        )
    build = ", ".join(f"{c.label} {c.build_s:.1f} s" for c in columns if c.build_s)
    notes.append(f"build: {build}")
    return columns, competitor, notes


def measure(columns: list[Column], threads: list[int], args) -> list[Timing]:
    timings = []
    for t in threads:
        for column in columns:
            try:
                median, p90 = time_call(column.make(t), args.runs, args.warmup)
                timing = Timing(column.label, t, median, p90, column.size_bytes)
            except Exception as err:  # noqa: BLE001 (one broken column must not sink the table)
                timing = Timing(column.label, t, None, None, column.size_bytes, f"{err}"[:120])
            print(f"  {t} thread(s) {column.label}: {_ms(timing.median_s)}", file=sys.stderr)
            timings.append(timing)
            gc.collect()
    return timings


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def render(name: str, timings: list[Timing], competitor: str, notes: list[str]) -> list[str]:
    base = {t.threads: t.median_s for t in timings if t.label == competitor}
    head = ("threads", "runtime", "median ms", "p90 ms", f"vs {competitor}", "size KiB")
    rows = []
    for t in timings:
        ratio = (
            f"{t.median_s / base[t.threads]:.2f}x"
            if t.median_s is not None and base.get(t.threads)
            else "-"
        )
        size = "-" if t.size_bytes is None else f"{t.size_bytes / 1024:.0f}"
        rows.append(
            (str(t.threads), t.label, _ms(t.median_s), _ms(t.p90_s), ratio, size)
            if t.error is None
            else (str(t.threads), t.label, "error", t.error, "-", size)
        )
    out = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out += ["", *[f"- {note}" for note in notes], ""]
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help=f"comma-separated, from {', '.join(accuracy.CASES)}")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per column (median)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calib", type=int, default=32, help="calibration samples (default 32)")
    parser.add_argument(
        "--records", metavar="DIR", help="tuning databases: DIR/<model>/{int8,fp32}"
    )
    parser.add_argument(
        "--tune", type=int, metavar="TRIALS", help="tune into --records first (TRIALS per model)"
    )
    parser.add_argument(
        "--tune-precisions",
        default="int8,fp32",
        help="which builds --tune tunes (comma-separated: int8, fp32; default both)",
    )
    parser.add_argument("--target", default="x86")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables here")
    args = parser.parse_args(argv)
    args.models = args.models.split(",") if args.models else list(accuracy.CASES)
    unknown = [n for n in args.models if n not in accuracy.CASES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}, candidates are {list(accuracy.CASES)}")
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.tune is not None and not args.records:
        parser.error("--tune needs --records DIR to tune into")
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shared = Path(os.environ.get("QC_SHARED", accuracy.REPO.parent / "shared")).resolve()
    if not (shared / "models").is_dir():
        print(f"no shared models under {shared}; set QC_SHARED", file=sys.stderr)
        return 2
    head = accuracy.preamble(shared)[:5] + [
        f"latency: median of {args.runs} runs after {args.warmup} warm-up, numpy in -> numpy out"
    ]
    print("\n".join(head), flush=True)
    markdown = ["## qcompiler speed", "", *[f"- {line}" for line in head], ""]
    for name in args.models:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="qc-speed-") as workdir:
            print(f"{name}: building", file=sys.stderr, flush=True)
            columns, competitor, notes = columns_for(
                accuracy.CASES[name], args, shared, Path(workdir)
            )
            timings = measure(columns, args.threads, args)
        notes.append(
            f"wall {time.perf_counter() - start:.0f} s, peak RSS {accuracy._peak_rss_mib():.0f} MiB"
        )
        table = render(name, timings, competitor, notes)
        print("\n" + "\n".join(table), flush=True)
        markdown += table
        if args.markdown:
            Path(args.markdown).write_text("\n".join(markdown) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

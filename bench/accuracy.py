"""Top-1 accuracy of qcompiler's int8 models beside the float model and a reference quantizer.

What it measures
----------------
For each model, on labelled samples that calibration never saw:

- ``fp32 (TVM)``: the float model built by TVM (:func:`qcompiler.compile_float`), the baseline
  every delta is taken against;
- ``<scheme>/<method>``: qcompiler's integer model for each scheme preset (hybrid, symmetric,
  asymmetric) and each range method (minmax, percentile, kl, mse), all twelve from one
  calibration pass (:func:`qcompiler.calibrate`, then ``quantize(..., calibration=...)``);
- the reference runtime: the float model under onnxruntime (LiteRT for a TFLite model), a check
  of the baseline, and a competitor int8 model: onnxruntime ``quantize_static`` (QDQ, per-channel
  int8 weights, uint8 activations; MinMax and Percentile) on the same calibration samples or,
  for the TFLite ResNet-8, which has no ONNX file, the int8 model shipped beside it (TFLite's own
  post-training quantization) under LiteRT.

Each row gives the number of samples it used, top-1, the delta against ``fp32 (TVM)`` in points
on those same samples, the share of samples whose top-1 class equals fp32's, the number of ops
the integer model leaves in float, build time and time per sample (untuned TVM: plain loops, so
latency here says nothing about tuned speed). Above each table: the data split, the reference
used and the float-fallback ops of hybrid/minmax; below it: wall time and peak RSS.

Models and data come from the shared folder: ``../shared`` beside the repository, or
``$QC_SHARED``.

========================  =================================  ==================================
model                     calibration                        evaluation (default)
========================  =================================  ==================================
efficientnet_lite0        imagenet_samples, first 100        the other 400
resnet8_cifar10           cifar10_test_half.npz, first 200   the other 4800
mnist_cnn                 mnist_test.npz, first 200          the next 1000
========================  =================================  ==================================

Under untuned TVM efficientnet_lite0 takes 0.5-0.7 s per image on 2 cores, so only
``fp32``, ``hybrid/minmax`` and the reference columns use all its evaluation images; the other
eleven int8 columns use the first 100 of them unless ``--full`` is given. The table says how many
samples each row used.

Run
---
From the repository root::

    python bench/accuracy.py --quick            # mnist_cnn and resnet8_cifar10, 300 samples each
    python bench/accuracy.py                    # all three: about 45 min on 2 cores
    python bench/accuracy.py --models efficientnet_lite0 --eval 20 --markdown accuracy.md

``--eval N`` caps the evaluation samples of every model and column; ``--markdown PATH`` also writes
the tables as markdown, rewritten after each model so a long run that dies keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

import qcompiler
from qcompiler import CalibConfig, QuantConfig
from qcompiler.data import InputSpec, Preprocess, image_sample, labelled_images

REPO = Path(__file__).resolve().parents[1]
# The table's int8 columns: scheme presets x range methods (CalibConfig refuses unknown ones).
SCHEMES = ("hybrid", "symmetric", "asymmetric")
METHODS = ("minmax", "percentile", "kl", "mse")
DEFAULT_VARIANT = ("hybrid", "minmax")
QUICK_MODELS = ("resnet8_cifar10", "mnist_cnn")
QUICK_EVAL = 300

Sample = dict[str, np.ndarray]
Predict = Callable[[Sample], int]


# -- data -------------------------------------------------------------------------------------
@dataclass
class Data:
    """Calibration inputs and labelled evaluation inputs, already shaped like the model input."""

    calib: list[Sample]
    inputs: list[Sample]
    labels: np.ndarray
    description: str


def _imagenet(shared: Path, spec: InputSpec, count: int | None) -> Data:
    folder = shared / "data" / "imagenet_samples"
    pairs = labelled_images(folder, shared / "data" / "imagenet_synsets.txt")
    # The model's reference pipeline: shorter side to 256, centre crop 224, (x - 127) / 128.
    pre = Preprocess(resize=256, size=spec.shape[2:], mean=127, std=128, layout="NCHW")
    calib, rest = pairs[:100], pairs[100:]
    rest = rest[:count]
    return Data(
        calib=[{spec.name: image_sample(path, spec, pre)} for path, _ in calib],
        inputs=[{spec.name: image_sample(path, spec, pre)} for path, _ in rest],
        labels=np.array([label for _, label in rest]),
        description=(
            f"{folder.name}/ sorted by name: calibration 0-99 (100), evaluation "
            f"100-{99 + len(rest)} ({len(rest)}); shorter side to 256, centre crop "
            "224x224, (x - 127) / 128, NCHW RGB"
        ),
    )


def _npz_split(
    file: str, calib_count: int, shuffle: bool = False
) -> Callable[[Path, InputSpec, int | None], Data]:
    """``file``'s first ``calib_count`` images calibrate, the rest (or ``count`` of them) are
    scored; with ``shuffle``, in the order of a fixed permutation (seed 0), for a file sorted
    by class, whose first images are all one class."""

    def load(shared: Path, spec: InputSpec, count: int | None) -> Data:
        with np.load(shared / "data" / file) as data:
            images, labels = data["images"], data["labels"]
        order = "in file order"
        if shuffle:
            permutation = np.random.default_rng(0).permutation(len(images))
            images, labels = images[permutation], labels[permutation]
            order = "shuffled (seed 0; the file is sorted by class)"
        stop = len(images) if count is None else min(len(images), calib_count + count)

        def sample(image):
            # Raw 0..255 pixels as float, reshaped to the input (adds the batch and, for MNIST,
            # the channel axis; CIFAR-10 is already NHWC).
            return {spec.name: image.astype(np.float32).reshape(spec.shape)}

        return Data(
            calib=[sample(image) for image in images[:calib_count]],
            inputs=[sample(image) for image in images[calib_count:stop]],
            labels=labels[calib_count:stop],
            description=(
                f"{file} {order}: calibration 0-{calib_count - 1} ({calib_count}), evaluation "
                f"{calib_count}-{stop - 1} ({stop - calib_count}); raw 0..255 float"
            ),
        )

    return load


@dataclass(frozen=True)
class Case:
    """One model: where it is, what it eats, how much to evaluate."""

    name: str
    model: str
    spec: InputSpec
    load: Callable[[Path, InputSpec, int | None], Data]
    default_eval: int | None
    # Samples for the int8 columns other than hybrid/minmax, unless --full (None: all).
    variant_eval: int | None = None
    # A TFLite model's own int8 sibling, the competitor when there is no ONNX file.
    shipped_int8: str | None = None


CASES = {
    case.name: case
    for case in (
        Case(
            "efficientnet_lite0",
            "efficientnet_lite0/efficientnet_lite0_fp32.onnx",
            InputSpec("input", (1, 3, 224, 224), "float32"),
            _imagenet,
            default_eval=400,
            variant_eval=100,
        ),
        Case(
            "resnet8_cifar10",
            "resnet8_cifar10/pretrainedResnet.tflite",
            InputSpec("input_1", (1, 32, 32, 3), "float32"),
            _npz_split("cifar10_test_half.npz", 200, shuffle=True),
            default_eval=None,
            shipped_int8="resnet8_cifar10/pretrainedResnet_quant.tflite",
        ),
        Case(
            "mnist_cnn",
            "mnist_cnn/mnist_cnn.onnx",
            InputSpec("Input3", (1, 1, 28, 28), "float32"),
            _npz_split("mnist_test.npz", 200),
            default_eval=1000,
        ),
    )
}


# -- the columns: how each one is built and run -----------------------------------------------
@dataclass
class Row:
    label: str
    preds: np.ndarray | None = None
    fallbacks: list[str] | None = None
    build_s: float = 0.0
    run_s: float = 0.0
    error: str | None = None


def measure(
    label: str, build: Callable[[], tuple[Predict, list[str] | None]], inputs: list[Sample]
) -> Row:
    """Build a column (``build() -> (predict, float fallbacks)``) and predict every input."""
    row = Row(label)
    start = time.perf_counter()
    try:
        predict, row.fallbacks = build()
        row.build_s = time.perf_counter() - start
        start = time.perf_counter()
        row.preds = np.array([predict(sample) for sample in inputs], dtype=np.int64)
        row.run_s = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 (one broken column must not sink the table)
        row.error = f"{type(err).__name__}: {err}"
        row.build_s = time.perf_counter() - start
    print(f"  {label}: {_progress(row, len(inputs))}", file=sys.stderr, flush=True)
    return row


def _progress(row: Row, count: int) -> str:
    if row.error is not None:
        return f"error ({row.error.splitlines()[0][:120]})"
    return f"{count} samples, build {row.build_s:.1f} s, run {row.run_s:.1f} s"


def tvm_predict(artifact: qcompiler.Artifact) -> Predict:
    # The first output's argmax, as qcompiler.api.top1 scores it; per-sample predictions (not
    # top1's bare ratio) so that columns on fewer samples can be compared with fp32 on the same.
    def predict(sample: Sample) -> int:
        return int(np.argmax(next(iter(artifact.run(sample).values()))))

    return predict


def ort_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session; ``threads`` fixes its intra-op threads (default: its own)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_predict(path: Path) -> Predict:
    session = ort_session(path)

    def predict(sample: Sample) -> int:
        return int(np.argmax(session.run(None, sample)[0]))

    return predict


def litert_input(source: dict, x: np.ndarray) -> np.ndarray:
    """``x`` as the LiteRT input ``source`` (its input details) takes it."""
    dtype = np.dtype(source["dtype"])
    if dtype.kind in "iu":
        # The int8 model takes q = round(x / s) + z; its scale and zero point are read from
        # the model rather than assumed (1.0 and -128 for the shipped ResNet-8).
        scale, zero_point = source["quantization"]
        info = np.iinfo(dtype)
        x = np.clip(np.round(x / scale) + zero_point, info.min, info.max)
    return x.astype(dtype)


def litert_predict(path: Path, spec: InputSpec) -> Predict:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    source, sink = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def predict(sample: Sample) -> int:
        interpreter.set_tensor(source["index"], litert_input(source, sample[spec.name]))
        interpreter.invoke()
        # Raw (possibly int8) logits: dequantization has a positive scale, argmax is unchanged.
        return int(np.argmax(interpreter.get_tensor(sink["index"])))

    return predict


def ort_quantized(
    path: Path, calib: list[Sample], method: str, percentile: float, workdir: Path
) -> Path:
    """onnxruntime ``quantize_static`` (QDQ, per-channel S8 weights, U8 activations) of ``path``."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(path)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        # Per-channel DequantizeLinear needs `axis`, which opsets below 13 forbid; quantize_static
        # writes it anyway, so the quantized model would not load (TVM_NOTES).
        model = version_converter.convert_version(model, 13)
    float_path = workdir / f"{path.stem}.opset13.onnx"
    onnx.save(model, float_path)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._samples = iter(calib)

        def get_next(self):
            return next(self._samples, None)

    out = workdir / f"{path.stem}.{method}.qdq.onnx"
    # No quant_pre_process, though quantize_static asks for it: with per_channel=True its output
    # makes onnxruntime 1.32's bias-scale adjustment fail on mnist_cnn.
    extra = {"CalibPercentile": percentile}
    if method == "minmax":
        # MinMax otherwise keeps every activation of every sample until the end (GBs for
        # efficientnet); reducing in chunks gives the same global min/max.
        # onnxruntime 1.32 then fails ("No data is collected") when the chunk divides the sample
        # count, as the last chunk is reduced and cleared before the final collection.
        chunk = next(c for c in range(16, 64) if len(calib) % c)
        extra["CalibMaxIntermediateOutputs"] = chunk
    # quantize_static prints its progress; keep the tables readable.
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(float_path),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
            }[method],
            extra_options=extra,
        )
    return out


# -- one model --------------------------------------------------------------------------------
@dataclass
class Report:
    case: Case
    header: list[str]
    rows: list[Row]
    labels: np.ndarray
    footer: list[str] = field(default_factory=list)


def run_case(case: Case, args, shared: Path) -> Report:
    start = time.perf_counter()
    count = args.eval if args.eval is not None else case.default_eval
    data = case.load(shared, case.spec, count)
    path = shared / "models" / case.model
    is_tflite = path.suffix == ".tflite"
    print(f"{case.name}: calibrating on {len(data.calib)} samples", file=sys.stderr, flush=True)
    try:
        model, calibration = qcompiler.calibrate(str(path), data.calib)
        failure = None
    except Exception as err:  # noqa: BLE001 (the float and reference columns can still run)
        model, calibration, failure = str(path), None, err
    if failure is None and model.inputs != [case.spec]:
        raise SystemExit(f"{case.name}: model inputs {model.inputs} differ from {[case.spec]}")
    n_all = len(data.inputs)
    n_variant = n_all if args.full or case.variant_eval is None else min(case.variant_eval, n_all)

    rows = [
        measure(
            "fp32 (TVM)",
            lambda: (tvm_predict(qcompiler.compile_float(model, args.target)), None),
            data.inputs,
        )
    ]
    for scheme in SCHEMES:
        for method in METHODS:

            def build(scheme=scheme, method=method):
                if failure is not None:
                    raise failure
                quant = qcompiler.quantize(
                    model, None, QuantConfig(scheme, CalibConfig(method)), calibration=calibration
                )
                return tvm_predict(quant.build(args.target)), quant.float_fallbacks

            n = n_all if (scheme, method) == DEFAULT_VARIANT else n_variant
            rows.append(measure(f"int8 {scheme}/{method}", build, data.inputs[:n]))
            gc.collect()  # each built module holds its weights; drop it before the next
    # Before the reference columns: onnxruntime's histogram calibration keeps every activation of
    # every calibration sample (GBs for efficientnet), which would hide qcompiler's own peak.
    rss_tvm = _peak_rss_mib()

    percentile = CalibConfig().percentile
    if is_tflite:
        rows.append(
            measure(
                "fp32 LiteRT (reference runtime)",
                lambda: (litert_predict(path, case.spec), None),
                data.inputs,
            )
        )
        shipped = shared / "models" / case.shipped_int8
        rows.append(
            measure(
                "int8 LiteRT: shipped TFLite int8 model",
                lambda: (litert_predict(shipped, case.spec), None),
                data.inputs,
            )
        )
        reference = (
            f"LiteRT {_version('ai-edge-litert')}; no ONNX file, so the int8 competitor "
            f"is the int8 model shipped beside it ({case.shipped_int8}), not onnxruntime"
        )
    else:
        rows.append(
            measure(
                "fp32 onnxruntime (reference runtime)",
                lambda: (ort_predict(path), None),
                data.inputs,
            )
        )
        with tempfile.TemporaryDirectory(prefix="qc-accuracy-") as workdir:
            for method in ("minmax", "percentile"):
                rows.append(
                    measure(
                        f"int8 onnxruntime quantize_static {method}",
                        lambda method=method: (
                            ort_predict(
                                ort_quantized(path, data.calib, method, percentile, Path(workdir))
                            ),
                            None,
                        ),
                        data.inputs,
                    )
                )
        reference = (
            f"onnxruntime {_version('onnxruntime')} quantize_static: QDQ, per-channel "
            f"QInt8 weights, QUInt8 activations, on the same {len(data.calib)} "
            f"calibration samples, percentile {percentile} (as qcompiler's); model "
            "converted to opset 13 first when older"
        )

    hybrid = next(r for r in rows if r.label == "int8 hybrid/minmax")
    fallbacks = (
        "n/a (quantization failed)"
        if hybrid.fallbacks is None
        else f"{len(hybrid.fallbacks)}"
        + (f": {', '.join(hybrid.fallbacks)}" if hybrid.fallbacks else "")
    )
    header = [
        (
            f"model: models/{case.model} (input {case.spec.name} {list(case.spec.shape)} "
            f"{case.spec.dtype})"
        ),
        f"data: {data.description}",
        f"reference: {reference}",
        f"hybrid/minmax float-fallback ops: {fallbacks}",
    ]
    wall = time.perf_counter() - start
    footer = [
        (
            f"wall time {wall:.1f} s, peak RSS {_peak_rss_mib():.0f} MiB "
            f"({rss_tvm:.0f} MiB before the reference columns; process peak so far, not "
            "this model's alone)"
        )
    ]
    return Report(case, header, rows, data.labels, footer)


# -- tables -----------------------------------------------------------------------------------
COLUMNS = (
    "column",
    "samples",
    "top-1",
    "Δ vs fp32 (pts)",
    "agree w/ fp32",
    "float ops",
    "build s",
    "ms/sample",
)
ERROR_CHARS = 400


def table_rows(report: Report) -> tuple[list[tuple[str, ...]], list[str]]:
    """Cells of the table and notes (errors, one per distinct message, cut short) under it."""
    base = report.rows[0].preds
    cells, errors = [], {}
    for row in report.rows:
        if row.preds is None:
            errors.setdefault(row.error, []).append(row.label)
            cells.append((row.label, "-", "error", "", "", "", f"{row.build_s:.1f}", ""))
            continue
        n = len(row.preds)
        hits = row.preds == report.labels[:n]
        if base is None:
            delta = agree = ""
        else:
            # Against fp32 on the very same samples: columns may use fewer than fp32 did.
            same = base[:n]
            delta = (
                ""
                if row is report.rows[0]
                else f"{(hits.mean() - (same == report.labels[:n]).mean()) * 100:+.2f}"
            )
            agree = f"{(row.preds == same).mean() * 100:.1f}%"
        fallbacks = "" if row.fallbacks is None else str(len(row.fallbacks))
        cells.append(
            (
                row.label,
                str(n),
                f"{hits.mean():.4f}",
                delta,
                agree,
                fallbacks,
                f"{row.build_s:.1f}",
                f"{row.run_s / n * 1e3:.1f}",
            )
        )
    notes = [
        f"{', '.join(labels)}: "
        + (
            error
            if len(error) <= ERROR_CHARS
            else f"{error[:ERROR_CHARS]}... ({len(error)} characters)"
        )
        for error, labels in errors.items()
    ]
    return cells, notes


def render_text(report: Report) -> str:
    cells, notes = table_rows(report)
    widths = [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS))]

    def line(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    out = [
        f"== {report.case.name} ==",
        *report.header,
        line(COLUMNS),
        line(tuple("-" * w for w in widths)),
        *map(line, cells),
    ]
    out += [f"error: {note}" for note in notes] + report.footer
    return "\n".join(out)


def render_markdown(report: Report) -> str:
    cells, notes = table_rows(report)
    out = [
        f"### {report.case.name}",
        "",
        *[f"- {h}" for h in report.header],
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    out += [""] + [f"- error: {note}" for note in notes] + [f"- {f}" for f in report.footer]
    return "\n".join(out) + "\n"


def print_agreement_table(title: str, metric, threads: int, rows) -> None:
    """Markdown table of ``(build, metric value, latency ms, build s or None)`` rows, then the
    process's peak RSS. ``metric`` may be a tuple of names, each row's value a tuple as long."""
    metrics = metric if isinstance(metric, tuple) else (metric,)
    print(f"\n| {title} build | {' | '.join(metrics)} | latency ms ({threads} thread) | build s |")
    print("|---|" + "---:|" * (len(metrics) + 2))
    for name, value, ms, built in rows:
        values = " | ".join(f"{v:.4f}" for v in (value if isinstance(value, tuple) else (value,)))
        print(f"| {name} | {values} | {ms:.2f} | {'' if built is None else f'{built:.0f}'} |")
    print(f"\npeak RSS {_peak_rss_mib():.0f} MiB")


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def preamble(shared: Path) -> list[str]:
    # sys.orig_argv is the command as typed, interpreter included.
    versions = ", ".join(
        f"{p} {_version(p)}"
        for p in ("qcompiler", "apache-tvm", "onnxruntime", "ai-edge-litert", "onnx", "numpy")
    )
    return [
        f"command: {shlex.join(sys.orig_argv)}",
        f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"host: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        f"versions: {versions}",
        f"shared: {shared}",
        (
            "Δ: top-1 minus fp32 (TVM) top-1 on the same samples, in points; agree: share of "
            "samples with the same top-1 class as fp32 (TVM)"
        ),
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        help=f"comma-separated, from {', '.join(CASES)} "
        f"(default: all; with --quick: {', '.join(QUICK_MODELS)})",
    )
    parser.add_argument(
        "--eval", type=int, metavar="N", help="evaluate at most N samples per model and column"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="every int8 column on all "
        "evaluation samples (efficientnet_lite0 otherwise uses 100 for 11 of them)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{' and '.join(QUICK_MODELS)} only, --eval {QUICK_EVAL}",
    )
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables here")
    parser.add_argument("--target", default="x86", help="qcompiler target (default x86)")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}, candidates are {list(CASES)}")
    args.models = names
    if args.eval is None and args.quick:
        args.eval = QUICK_EVAL
    if args.eval is not None and args.eval < 1:
        parser.error(f"--eval must be >= 1, got {args.eval}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shared = Path(os.environ.get("QC_SHARED", REPO.parent / "shared")).resolve()
    if not (shared / "models").is_dir():
        print(f"no shared models under {shared}; set QC_SHARED", file=sys.stderr)
        return 2
    head = preamble(shared)
    print("\n".join(head), flush=True)
    markdown = ["## qcompiler accuracy", "", *[f"- {line}" for line in head], ""]
    for name in args.models:
        report = run_case(CASES[name], args, shared)
        print("\n" + render_text(report), flush=True)
        markdown.append(render_markdown(report))
        if args.markdown:
            Path(args.markdown).write_text("\n".join(markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())

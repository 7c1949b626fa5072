"""Detection accuracy where other quantizers collapse: YOLOX-Nano int8 against its float model.

No box labels: the float model's detections (onnxruntime fp32, score >= 0.3 after NMS) are the
ground truth, and each quantized build is scored by mAP@0.5 of its detections against them
(:mod:`qcompiler.evaluate`). Calibration on the first ``--calib`` COCO images of
../shared/data/coco_val2017_50, scoring on the others. In one run, with latencies (median of
``--runs``, ``--threads`` threads) and the process's peak RSS:

- onnxruntime fp32, and its int8 ``quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations) with MinMax and Percentile calibration;
- qcompiler's float build (``compile_float``: the reference ``qc eval`` scores against);
- qcompiler's int8 builds for each range method: every activation at 8 bits, the default
  (16-bit activations where measured on the outputs to pay, ``int16_activations="auto"``), and
  16 bits for the share of tensors whose 8-bit quantization is noisiest (``--int16-shares``).

Run from the repository root::

    python bench/detection.py
    python bench/detection.py --methods minmax kl --int16-shares 0.05 0.1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (onnxruntime helpers, preamble, peak RSS)
from speed import time_call  # noqa: E402

from qcompiler import api, evaluate  # noqa: E402
from qcompiler.data import Preprocess, image_sample  # noqa: E402
from qcompiler.deploy.artifact import set_threads  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "yolox_nano/yolox_nano.onnx"
PREPROCESS = "letterbox,layout=NCHW,channels=BGR"


def detections(run, samples, hw) -> list[evaluate.Detections]:
    return [evaluate.decode_yolox(run(s), hw) for s in samples]


def _eight_bit(method: str) -> api.QuantConfig:
    return api.QuantConfig(calibration=method, int16_activations=())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=25, help="calibration images (the rest score)")
    parser.add_argument("--methods", nargs="+", default=["minmax", "percentile", "kl"])
    parser.add_argument("--int16-shares", nargs="*", type=float, default=[0.05, 0.1])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-ort-int8", action="store_true")
    args = parser.parse_args(argv)
    shared = Path(os.environ.get("QC_SHARED", REPO.parent / "shared")).resolve()
    for line in accuracy.preamble(shared):
        print(line)
    warnings.simplefilter("ignore")
    set_threads(args.threads)
    path = shared / "models" / MODEL
    model = api.load_model(path)
    spec = model.inputs[0]
    hw = tuple(spec.shape[2:4])
    pre = Preprocess.parse(PREPROCESS)
    files = sorted((shared / "data" / "coco_val2017_50").glob("*.jpg"))
    calib = [{spec.name: image_sample(f, spec, pre)} for f in files[: args.calib]]
    score = [{spec.name: image_sample(f, spec, pre)} for f in files[args.calib :]]
    print(
        f"calibration: {len(calib)} images, scoring: {len(score)} images, {args.threads} thread(s)"
    )

    session = accuracy.ort_session(path, args.threads)
    ort_run = lambda s: session.run(None, s)[0]  # noqa: E731
    truth = [d.above(0.3) for d in detections(ort_run, score, hw)]
    rows = []

    def row(name, run, build_s=None):
        found = detections(run, score, hw)
        median, _ = time_call(lambda: run(score[0]), args.runs, 3)
        rows.append((name, evaluate.map50(truth, found), median * 1e3, build_s))
        print(f"  {name}: mAP@0.5 {rows[-1][1]:.4f}, {rows[-1][2]:.2f} ms", flush=True)

    row("onnxruntime fp32", ort_run)
    start = time.time()
    float_build = api.compile_float(model)
    row("qcompiler fp32", lambda s: float_build.run(s)["output"], time.time() - start)
    if not args.skip_ort_int8:
        with tempfile.TemporaryDirectory() as tmp:
            for method in ("minmax", "percentile"):
                start = time.time()
                qdq = accuracy.ort_quantized(path, calib, method, 99.99, Path(tmp))
                built = time.time() - start
                int8 = accuracy.ort_session(qdq, args.threads)
                row(f"onnxruntime int8 {method}", lambda s, q=int8: q.run(None, s)[0], built)

    start = time.time()
    model, calibration = api.calibrate(model, calib)
    print(f"  qcompiler calibration: {time.time() - start:.0f} s", flush=True)
    configs = []
    for m in args.methods:
        if m != "auto":  # per-tensor ranges are measured with the int16 choice
            configs.append((f"qcompiler int8 {m}, every activation 8-bit", _eight_bit(m)))
        default = " (the default)" if m == "minmax" else ""
        configs.append(
            (f"qcompiler int8 {m}, measured int16{default}", api.QuantConfig(calibration=m))
        )
    for share in args.int16_shares:
        for m in (m for m in args.methods if m != "auto"):
            configs.append(
                (
                    f"qcompiler int8 {m}, int16 for {share:.0%} of activations",
                    api.QuantConfig(calibration=m, int16_activations=share),
                )
            )
    for name, config in configs:
        start = time.time()
        quantized = api.quantize(model, None, config, calibration=calibration)
        artifact = quantized.build("x86")
        built = time.time() - start
        fallbacks = len(quantized.float_fallbacks)
        wide = len(quantized.config.int16_activations)
        row(
            f"{name} ({wide} int16, {fallbacks} float fallbacks)",
            lambda s, a=artifact: a.run(s)["output"],
            built,
        )

    accuracy.print_agreement_table(MODEL, "mAP@0.5 vs fp32", args.threads, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

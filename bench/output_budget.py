"""Mixed precision without labels: the fewest weight bytes within an output SQNR/PSNR budget.

A detector or a segmenter has no top-1 to hold a bit-width search to; ``qc compile
--min-psnr-db`` / ``--min-sqnr-db`` (:func:`qcompiler.api.choose_within_output_db`) holds the
integer build's output PSNR or SQNR (``--measure``) against the float model instead, each
candidate built and measured whole. For each model:
calibration on the first ``--calib`` COCO images of ../shared/data/coco_val2017_50, the SQNR
measured on the next ``--images`` images, and the task metric against the float model's own
answers (YOLOX-Nano: mAP@0.5 of the detections; selfie segmentation: pooled mask IoU) on the
images after those, which neither the calibration nor the search saw. Rows: fp32, the default
W8A8 build, and the search's choice at budgets of ``--below`` dB under W8A8's measure, with
weight bytes, compression against the fp32 weights, the measure, the metric and the search's
wall time; peak RSS at the end.

Run from the repository root::

    python bench/output_budget.py
    python bench/output_budget.py --models yolox_nano --measure sqnr --below 1 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (preamble, peak RSS)

from qcompiler import api  # noqa: E402
from qcompiler.data import Preprocess, image_sample  # noqa: E402
from qcompiler.deploy.artifact import set_threads  # noqa: E402
from qcompiler.passes.errors import QCompilerError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# name: (model file, preprocessing, agreement metric)
MODELS = {
    "yolox_nano": ("yolox_nano/yolox_nano.onnx", "letterbox,layout=NCHW,channels=BGR", "map50"),
    "selfie_segmentation": (
        "selfie_segmentation/selfie_segmentation.tflite",
        "std=255,layout=NHWC",
        "pooled_iou",
    ),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--calib", type=int, default=25, help="calibration images")
    parser.add_argument("--images", type=int, default=8, help="images the measure is taken on")
    parser.add_argument("--measure", choices=sorted(api.OUTPUT_MEASURES), default="psnr")
    parser.add_argument(
        "--below", nargs="+", type=float, default=[1.0, 3.0, 6.0], help="dB under W8A8's"
    )
    args = parser.parse_args(argv)
    shared = Path(os.environ.get("QC_SHARED", REPO.parent / "shared")).resolve()
    print("\n".join(accuracy.preamble(shared)[:5]))
    warnings.simplefilter("ignore")
    set_threads(1)
    for name in args.models:
        bench_model(name, args, shared)
    print(f"\npeak RSS {accuracy._peak_rss_mib():.0f} MiB")
    return 0


def bench_model(name: str, args, shared: Path) -> None:
    path, preprocess, metric = MODELS[name]
    model = api.load_model(shared / "models" / path)
    spec, pre = model.inputs[0], Preprocess.parse(preprocess)
    files = sorted((shared / "data" / "coco_val2017_50").glob("*.jpg"))
    images = [{spec.name: image_sample(f, spec, pre)} for f in files]
    calib = images[: args.calib]
    measure_on = images[args.calib : args.calib + args.images]
    score = images[args.calib + args.images :]
    start = time.perf_counter()
    model, calibration = api.calibrate(model, calib, layer_inputs=True)
    print(
        f"\n{name}: calibration {len(calib)} images with layer statistics "
        f"({time.perf_counter() - start:.0f} s), {args.measure.upper()} on {len(measure_on)}, "
        f"{metric} on the "
        f"{len(score)} after them"
    )
    fp32 = api.compile_float(model, "x86")
    reference = [list(fp32.run(s).values()) for s in measure_on]

    def build(config):
        return api.quantize(model, None, config, calibration=calibration).build("x86")

    def db(artifact) -> float:
        got = [list(artifact.run(s).values()) for s in measure_on]
        return api.OUTPUT_MEASURES[args.measure](reference, got)

    eight = build(api.QuantConfig())
    fp32_bytes = 4 * sum(layer["weight_bytes"] for layer in eight.manifest["layers"])
    base = db(eight)
    rows = [("fp32 (TVM)", fp32, fp32_bytes, None), ("W8A8 (default)", eight, None, None)]
    for below in args.below:
        start = time.perf_counter()
        try:
            search = api.choose_within_output_db(
                model,
                calibration,
                base - below,
                samples=calib[: api.PROBE_HOLDOUT],
                measure=args.measure,
                measure_on=measure_on,
            )
        except QCompilerError as err:
            print(f"- {below:g} dB under W8A8: {err}")
            continue
        seconds = time.perf_counter() - start
        config = search.config
        label = (
            f">= {base - below:.1f} dB (W8A8 - {below:g}): {len(config.int4_weights)} W4A8, "
            f"{search.chosen.rounding if config.int4_weights else 'W8A8'}"
        )
        rows.append((label, build(config), None, seconds))
        tried = ", ".join(
            f"{len(c.int4_weights)} layers {c.db:.1f} dB"
            for c in sorted(search.tried, key=lambda c: c.bytes)
        )
        print(f"- {label}: tried {tried}")
    print(f"\n{path}, 1 thread\n")
    unit = f"{args.measure.upper()} dB"
    print(f"| build | weight KiB | vs fp32 | {unit} | {metric} vs fp32 | search s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, artifact, size, seconds in rows:
        size = size or artifact.manifest["weight_bytes"]
        measured = "" if artifact is fp32 else f"{db(artifact):.1f}"
        agree = api.agreement(fp32, artifact, score, metric)
        print(
            f"| {label} | {size / 1024:.1f} | {fp32_bytes / size:.1f}x | {measured} | "
            f"{agree:.4f} | {'' if seconds is None else f'{seconds:.0f}'} |"
        )


if __name__ == "__main__":
    sys.exit(main())

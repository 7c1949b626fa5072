"""Segmentation accuracy: MediaPipe selfie segmentation int8 against its float model.

No labelled masks: the float model's mask (qcompiler's float build; neither LiteRT nor
onnxruntime can run the model, whose head is MediaPipe's ``Convolution2DTransposeBias`` custom
op) is the ground truth, and each quantized build is scored by the mean IoU of the masks
``output >= 0.5`` (:func:`qcompiler.evaluate.mask_iou`), and by the IoU pooled over all images
(:func:`qcompiler.evaluate.pooled_mask_iou`: in the mean, an image where the float mask is empty
scores 0 for a single stray pixel). Calibration on the first ``--calib`` COCO images of
../shared/data/coco_val2017_50, scoring on the others and on data/misc_images.
In one run, with latencies (median of ``--runs``, ``--threads`` threads) and peak RSS:

- int8 with every activation at 8 bits, the default (16-bit activations where measured to pay,
  ``int16_activations="auto"``: on this model every activation, with the weights rounded against
  their inputs), the default's measured share of int16 tensors alone (before it widens every
  activation), and each refinement switched on in turn: optimized weight rounding,
  bias correction, 16-bit activations for the share of tensors whose 8-bit quantization is
  noisiest on their own, and for the tensors measured most sensitive at the output
  (:mod:`qcompiler.targets.sensitivity`);
- all activations at 16 bits (W8A16), with nearest and with optimized weight rounding.

Run from the repository root::

    python bench/segmentation.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (preamble, peak RSS)
from speed import time_call  # noqa: E402

from qcompiler import api, evaluate  # noqa: E402
from qcompiler.data import Preprocess, image_sample  # noqa: E402
from qcompiler.deploy.artifact import set_threads  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "selfie_segmentation/selfie_segmentation.tflite"
PREPROCESS = "std=255,layout=NHWC"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=25, help="calibration images (the rest score)")
    parser.add_argument("--probe", type=int, default=4, help="calibration images the probe runs")
    parser.add_argument("--sensitive", nargs="*", type=int, default=[3, 8])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    shared = Path(os.environ.get("QC_SHARED", REPO.parent / "shared")).resolve()
    for line in accuracy.preamble(shared):
        print(line)
    warnings.simplefilter("ignore")
    set_threads(args.threads)
    model = api.load_model(shared / "models" / MODEL)
    spec = model.inputs[0]
    pre = Preprocess.parse(PREPROCESS)
    files = sorted((shared / "data" / "coco_val2017_50").glob("*.jpg"))
    extra = sorted(p for p in (shared / "data" / "misc_images").iterdir() if p.suffix)
    calib = [{spec.name: image_sample(f, spec, pre)} for f in files[: args.calib]]
    score = [{spec.name: image_sample(f, spec, pre)} for f in files[args.calib :] + extra]
    print(
        f"calibration: {len(calib)} images, scoring: {len(score)} images, {args.threads} thread(s)"
    )

    reference = api.compile_float(model)
    truth = [reference.run(s)["output"] for s in score]
    rows = []

    def row(name, artifact, build_s=None, fallbacks=None):
        masks = [artifact.run(s)["output"] for s in score]
        mean = float(np.mean([evaluate.mask_iou(t, m) for t, m in zip(truth, masks)]))
        pooled = evaluate.pooled_mask_iou(truth, masks)
        median, _ = time_call(lambda: artifact.run(score[0]), args.runs, 3)
        name = name if fallbacks is None else f"{name} ({fallbacks} float fallbacks)"
        rows.append((name, (mean, pooled), median * 1e3, build_s))
        print(
            f"  {name}: mask IoU {mean:.4f} (pooled {pooled:.4f}), {median * 1e3:.2f} ms",
            flush=True,
        )

    row("qcompiler fp32", reference)
    start = time.time()
    model, calibration = api.calibrate(model, calib, layer_inputs=True)
    print(f"  qcompiler calibration (with layer inputs): {time.time() - start:.0f} s", flush=True)
    start = time.time()
    sensitivity = api.activation_sensitivity(calibration, calib[: args.probe])
    ranked = sensitivity.ranked()
    print(
        f"  sensitivity probe: {time.time() - start:.0f} s; most sensitive "
        + ", ".join(f"{n} {sensitivity.alone_db[n]:.1f} dB" for n in ranked[:5]),
        flush=True,
    )
    eight = {"int16_activations": ()}  # each refinement alone, on all-8-bit activations
    choice = api.quantize(model, None, calibration=calibration).activation_choice
    print(f"  {choice.summary()}", flush=True)
    share = choice.capped if choice.widened else choice.chosen
    default = "int8 default (minmax, measured int16, auto rounding)"
    configs = [
        ("int8, every activation 8-bit (minmax)", api.QuantConfig(**eight)),
        (default, api.QuantConfig()),
        ("int8 default, layer statistics from all calibration images", api.QuantConfig()),
        (
            "int8, the measured share alone (no widening, nearest rounding)",
            api.QuantConfig(int16_activations=share, weight_rounding="nearest"),
        ),
        ("int8 default, optimized rounding", api.QuantConfig(weight_rounding="optimized")),
        ("int8 default, per-tensor ranges", api.QuantConfig(calibration="auto")),
        ("int8, optimized rounding", api.QuantConfig(weight_rounding="optimized", **eight)),
        ("int8, bias correction", api.QuantConfig(bias_correction=True, **eight)),
        ("int8 percentile", api.QuantConfig(calibration="percentile", **eight)),
        ("int8, int16 for the noisiest 10%", api.QuantConfig(int16_activations=0.1)),
    ]
    for k in args.sensitive:
        configs.append(
            (
                f"int8, int16 for the {k} most sensitive",
                api.QuantConfig(int16_activations=tuple(ranked[:k])),
            )
        )
        configs.append(
            (
                f"int8, int16 for the {k} most sensitive, optimized rounding",
                api.QuantConfig(int16_activations=tuple(ranked[:k]), weight_rounding="optimized"),
            )
        )
    configs += [
        ("W8A16 (all activations int16)", api.QuantConfig(int16_activations=1.0)),
        (
            "W8A16, optimized rounding",
            api.QuantConfig(int16_activations=1.0, weight_rounding="optimized"),
        ),
    ]
    # The default as `qc compile` calibrates: no layer statistics gathered, so its weight
    # rounding (when it widens) uses the kept samples' only. The measured choice is shared.
    plain = dataclasses.replace(calibration, layers={})
    for name, config in configs:
        start = time.time()
        source = plain if name == default else calibration
        quantized = api.quantize(model, None, config, calibration=source)
        artifact = quantized.build("x86")
        wide = len(quantized.config.int16_activations)
        name = f"{name}, {wide} int16" if 0 < wide < len(calibration.observers) else name
        row(name, artifact, time.time() - start, len(quantized.float_fallbacks))

    metrics = ("mask IoU vs fp32 (mean of images)", "pooled over images")
    accuracy.print_agreement_table(MODEL, metrics, args.threads, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

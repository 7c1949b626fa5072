"""Which layers' 4-bit weights cost most: measured one layer at a time, or HAWQ's proxy?

For each model (EfficientNet-Lite0 and ResNet-8 from ../shared, calibrated as in
``bench/mixed.py`` with the layers' input statistics, the 4-bit weights rounded as the build
rounds them), each conv/matmul layer's 4-bit error is found two ways on the same 8 calibration
images:

- **measured** (:class:`~qcompiler.targets.sensitivity.WeightProbe`): the output noise with
  the layer alone at 4 bits, one run per layer and image;
- **HAWQ** (:class:`~qcompiler.targets.sensitivity.HessianProbe`): the trace of the loss's
  Hessian over the layer's weights (Hutchinson's estimate on finite differences of the float
  model, ``--probes`` directions per layer, each on one image) times the squared norm of the
  4-bit rounding error, with each probe count in ``--probes``.

Printed per model: each way's wall time, the Spearman rank correlation of the layers' added
noise with the measured one, and, for a weight budget of ``--size`` times W8A8's bytes, the
configuration the integer program chooses from each table (the least added noise,
:func:`qcompiler.api.choose_weight_precisions`): its output SQNR measured by the weight probe
on the 8 calibration images and on 16 evaluation images, and its top-1 on the evaluation
images, beside uniform W8A8. Peak RSS at the end.

Run from the repository root::

    python bench/sensitivity.py --models resnet8_cifar10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (data splits, preamble, peak RSS)
from mixed import MODELS  # noqa: E402

from qcompiler import api  # noqa: E402
from qcompiler.deploy.artifact import set_threads  # noqa: E402
from qcompiler.passes.scheme import QuantConfig  # noqa: E402
from qcompiler.targets.bitwidth import choose_precisions, weight_options  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--images", type=int, help="evaluation images (default: the model's)")
    parser.add_argument("--probes", nargs="+", type=int, default=[16, 64])
    parser.add_argument(
        "--size", type=float, default=0.6, help="weight budget, a share of W8A8's bytes"
    )
    args = parser.parse_args(argv)
    shared = Path(os.environ.get("QC_SHARED", accuracy.REPO.parent / "shared")).resolve()
    print("\n".join(accuracy.preamble(shared)[:5]))
    set_threads(1)
    for name in args.models:
        bench_model(accuracy.CASES[name], args, shared)
    print(f"\npeak RSS {accuracy._peak_rss_mib():.0f} MiB")
    return 0


def added_noise(measured: tuple[dict, float]) -> dict[str, float]:
    """Each layer's 4-bit output noise over all-8-bit's, from ``(alone dB, base dB)``."""
    alone, base = measured
    return {k: 10 ** (-db / 10) - 10 ** (-base / 10) for k, db in alone.items()}


def bench_model(case, args, shared: Path) -> None:
    model = api.load_model(str(shared / "models" / case.model))
    count = args.images if args.images is not None else case.default_eval
    data = case.load(shared, model.inputs[0], count)
    model, calibration = api.calibrate(model, data.calib, layer_inputs=True)
    print(f"\n{case.name}: {data.description}")
    samples, config = data.calib[: api.PROBE_HOLDOUT], QuantConfig()
    held_out = api.weight_probe(calibration, config, data.inputs[:16])
    labelled = list(zip(data.inputs, data.labels))
    fp32 = api.top1(api.compile_float(model, "x86"), labelled)

    tables = {}
    start = time.perf_counter()
    probe = api.weight_probe(calibration, config, samples)
    tables["measured"] = probe.measure()
    times = {"measured": time.perf_counter() - start}
    for probes in args.probes:
        start = time.perf_counter()
        hessian = api.hessian_probe(calibration, config, samples, probes=probes)
        tables[f"HAWQ, {probes} probes"] = hessian.measure()
        times[f"HAWQ, {probes} probes"] = time.perf_counter() - start

    eight = api.quantize(model, None, config, calibration=calibration).build("x86")
    budget = int(args.size * eight.manifest["weight_bytes"])
    reference = added_noise(tables["measured"])
    layers = list(reference)
    rows = [("W8A8 (uniform)", "", "", 0, eight.manifest["weight_bytes"], probe.run(set()),
             held_out.run(set()), api.top1(eight, labelled))]  # fmt: skip
    for label, table in tables.items():
        noise = added_noise(table)
        rho = spearmanr([reference[k] for k in layers], [noise[k] for k in layers]).statistic
        options = weight_options(calibration, config, table)
        plan = choose_precisions(options, minimize="error", max_bytes=budget)
        chosen = QuantConfig(int4_weights=tuple(plan.int4_layers))
        art = api.quantize(model, None, chosen, calibration=calibration).build("x86")
        int4 = set(plan.int4_layers)
        rows.append((label, f"{times[label]:.0f}", f"{rho:.2f}", len(int4),
                     art.manifest["weight_bytes"], probe.run(int4), held_out.run(int4),
                     api.top1(art, labelled)))  # fmt: skip
    print(
        f"weights within {args.size:g}x W8A8's bytes ({budget}); fp32 top-1 {fp32:.4f} on "
        f"{len(labelled)} images; SQNR by the weight probe (activations exact)\n"
    )
    print(
        "| layer errors from | time s | Spearman vs measured | W4A8 layers | weight bytes "
        "| SQNR dB (8 calib.) | SQNR dB (16 eval.) | top-1 (Δ fp32) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, seconds, rho, n, size, calib_db, eval_db, top1 in rows:
        print(
            f"| {label} | {seconds} | {rho} | {n} | {size} | {calib_db:.1f} | {eval_db:.1f} "
            f"| {top1:.4f} ({100 * (top1 - fp32):+.2f}) |"
        )


if __name__ == "__main__":
    sys.exit(main())

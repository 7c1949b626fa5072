"""Does the bit-width program gain from W8A16 and float layers beside W8A8/W4A8?

For each model (EfficientNet-Lite0 and ResNet-8 from ../shared, calibrated as in
``bench/mixed.py`` with the layers' input statistics), the program of
:func:`qcompiler.api.choose_weight_precisions` is solved twice under the same budgets (weights
within ``--size`` times W8A8's bytes, the model's predicted latency within ``--slack`` times
W8A8's; the least output error), once over ``w8a8,w4a8`` and once over all four precisions.
Every layer's kernels are measured on the host board over RPC (a local tracker, 1 thread) at
each precision, into ``--records``; the error of each choice is measured on 8 calibration images
(``w8a16``: what the input's 8-bit rounding adds alone; ``float``: what the 8-bit weights add).
Both choices and uniform W8A8 are built and run: top-1 on the evaluation images, the build's
output SQNR on the 8 calibration images (against the float model), weight
bytes, predicted latency, and latency over RPC (TVM's time evaluator on the server; median of
``--rounds`` interleaved rounds), with the search's wall time and the peak RSS.

Run from the repository root::

    python bench/wider.py --models resnet8_cifar10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (ImageNet split, preamble, peak RSS)
from mixed import MODELS, rpc_latency  # noqa: E402

from qcompiler import api  # noqa: E402
from qcompiler.deploy.artifact import set_threads  # noqa: E402
from qcompiler.passes.errors import QCompilerError  # noqa: E402
from qcompiler.targets.tuning import LocalRPC  # noqa: E402

NARROW = ("w8a8", "w4a8")
EVERY = ("w8a8", "w4a8", "w8a16", "float")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--images", type=int, help="evaluation images (default: the model's)")
    parser.add_argument(
        "--size", type=float, default=0.6, help="weight budget, a share of W8A8's bytes"
    )
    parser.add_argument(
        "--slack", type=float, default=1.2, help="latency budget, a multiple of W8A8's"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--records", help="tuning records for the layer latencies (default: temp)")
    args = parser.parse_args(argv)
    shared = Path(os.environ.get("QC_SHARED", accuracy.REPO.parent / "shared")).resolve()
    print("\n".join(accuracy.preamble(shared)[:5]))
    set_threads(1)
    records = args.records or tempfile.mkdtemp(prefix="qc-wider-records-")
    with contextlib.ExitStack() as stack:
        board = stack.enter_context(LocalRPC(threads=1))
        for name in args.models:
            bench_model(accuracy.CASES[name], args, shared, board, records)
    print(f"\npeak RSS {accuracy._peak_rss_mib():.0f} MiB")
    return 0


def bench_model(case, args, shared: Path, board, records: str) -> None:
    model = api.load_model(str(shared / "models" / case.model))
    count = args.images if args.images is not None else case.default_eval
    data = case.load(shared, model.inputs[0], count)
    model, calibration = api.calibrate(model, data.calib, layer_inputs=True)
    print(f"\n{case.name}: {data.description}")
    probe = data.calib[: api.PROBE_HOLDOUT]
    quiet = {"records": records, "rpc": board, "samples": probe, "echo": lambda _: None}

    def build(config):
        quantized = api.quantize(model, None, config, calibration=calibration)
        return quantized.build("x86"), api.output_sqnr_on(quantized.mod, calibration, probe)

    eight_config, eight_plan = api.choose_weight_precisions(
        calibration, max_bytes=1e12, precisions=("w8a8",), **quiet
    )
    budgets = {
        "max_bytes": args.size * eight_plan.bytes,
        "max_latency_ms": args.slack * eight_plan.latency_ms,
    }
    rows = [("W8A8 (uniform)", *build(eight_config), eight_plan, None)]
    notes = []
    for precisions in (NARROW, EVERY):
        start = time.perf_counter()
        try:
            config, plan = api.choose_weight_precisions(
                calibration, precisions=precisions, **budgets, **quiet
            )
        except QCompilerError as err:
            notes.append(f"{','.join(precisions)}: {err}")
            continue
        seconds = time.perf_counter() - start
        counts = Counter(plan.precisions.values())
        mix = ", ".join(f"{counts[p]} {p}" for p in precisions if counts[p])
        rows.append((f"{','.join(precisions)}: {mix}", *build(config), plan, seconds))
    timed = [[] for _ in rows]
    for _ in range(args.rounds):
        for i, (_, artifact, *_) in enumerate(rows):
            timed[i].append(rpc_latency(artifact, board, data))
    labelled = list(zip(data.inputs, data.labels))
    reference = api.top1(api.compile_float(model, "x86"), labelled)
    print(
        f"\n{case.model}: budgets {args.size:g}x W8A8's weight bytes and {args.slack:g}x its "
        f"predicted latency ({eight_plan.latency_ms:.3f} ms); fp32 top-1 {reference:.4f} on "
        f"{len(labelled)} images; 1 thread\n"
    )
    print(
        "| choice | top-1 | Δ vs fp32 | SQNR dB | weight KiB | predicted ms | RPC ms | search s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, (label, artifact, sqnr, plan, seconds) in enumerate(rows):
        score = api.top1(artifact, labelled)
        print(
            f"| {label} | {score:.4f} | {100 * (score - reference):+.2f} | "
            f"{sqnr:.1f} | {artifact.manifest['weight_bytes'] / 1024:.1f} | "
            f"{plan.latency_ms:.3f} | {np.median(timed[i]):.3f} | "
            f"{'' if seconds is None else f'{seconds:.0f}'} |"
        )
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    sys.exit(main())

"""Where W4A8 kernels should unpack their weights: in registers or by a kernel of their own.

Builds EfficientNet-Lite0 (or ResNet-8) at W8A8 and with every eligible layer at W4A8, the
latter once per value of ``targets.kernels.IN_REGISTER_MAX_PIXELS`` given (kernels of at most
that many output pixels unpack their 4-bit weights in registers, the others by an unpacking
kernel before the call), and times every build in this process (1 thread, median of 50 runs),
interleaved over ``--rounds`` rounds so that the machine's drifts reach every build alike.
Prints each build's median round and its ratio to W8A8's. Nearest rounding: the weights'
values do not change the time.

Run from the repository root::

    python bench/int4_unpack.py                                  # thresholds 0, 1, 49, all
    python bench/int4_unpack.py --thresholds 0 1 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (the models' data, preamble, peak RSS)

from qcompiler import api  # noqa: E402
from qcompiler.deploy.artifact import set_threads  # noqa: E402
from qcompiler.passes.scheme import QuantConfig  # noqa: E402
from qcompiler.targets import kernels  # noqa: E402
from qcompiler.targets.bitwidth import weight_options  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(accuracy.CASES), default="efficientnet_lite0")
    parser.add_argument(
        "--thresholds", nargs="+", type=int, default=[0, 1, 49, 10**9], help="pixels"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args(argv)
    shared = Path(os.environ.get("QC_SHARED", accuracy.REPO.parent / "shared")).resolve()
    print("\n".join(accuracy.preamble(shared)[:5]))
    set_threads(1)
    case = accuracy.CASES[args.model]
    model = api.load_model(str(shared / "models" / case.model))
    data = case.load(shared, model.inputs[0], 8)
    start = time.perf_counter()
    model, calibration = api.calibrate(model, data.calib[:20], layer_inputs=True)
    every = tuple(weight_options(calibration))
    nearest = QuantConfig(weight_rounding="nearest")

    def build(config):
        return api.quantize(model, None, config, calibration=calibration).build("x86")

    builds = {"W8A8": build(nearest)}
    default = kernels.IN_REGISTER_MAX_PIXELS
    try:
        for most in args.thresholds:
            kernels.IN_REGISTER_MAX_PIXELS = most
            label = f"W4A8, in registers up to {most} pixels"
            builds[label] = build(QuantConfig(weight_rounding="nearest", int4_weights=every))
    finally:
        kernels.IN_REGISTER_MAX_PIXELS = default
    built_s = time.perf_counter() - start
    print(f"\n{case.model}: {len(every)} layers at W4A8, calibrated and built in {built_s:.0f} s")
    rounds = {label: [] for label in builds}
    for _ in range(args.rounds):
        for label, artifact in builds.items():
            _, seconds = api.run(artifact, [data.inputs[0]], threads=1, repeat=args.runs)
            rounds[label].append(1e3 * float(np.median(seconds)))
    base = float(np.median(rounds["W8A8"]))
    print(f"\n| build | ms (median of {args.rounds} rounds) | vs W8A8 | rounds |")
    print("|---|---:|---:|---|")
    for label, times in rounds.items():
        ms = float(np.median(times))
        print(f"| {label} | {ms:.3f} | {ms / base:.3f}x | {', '.join(f'{t:.2f}' for t in times)} |")
    print(f"\npeak RSS {accuracy._peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

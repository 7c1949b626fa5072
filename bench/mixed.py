"""Mixed precision by weight size: W8A8, W4A8 and the integer program's choices in between.

For EfficientNet-Lite0 and ResNet-8 (../shared; calibration on the first 100 ImageNet samples
or 200 CIFAR-10 images, with the layers' input statistics for optimized rounding; top-1 on
others): fp32 (TVM), uniform W8A8, uniform W4A8, and the configurations
:func:`qcompiler.api.choose_weight_precisions` picks for weight budgets between the two: each
layer's 4-bit weights measured alone on the model's outputs (8 calibration images, one compiled
probe, the weights rounded as the build rounds them), then the least added noise within the
budget (scipy's MILP). Each chosen configuration is built and run, with nearest weight rounding
and with the default (``auto``: the 4-bit layers' weights optimized). Then the accuracy budget,
as ``qc compile --max-accuracy-drop`` does it
(:func:`qcompiler.api.choose_within_accuracy_drop`): the fewest bytes whose top-1 on the
evaluation images stays within ``--max-drop`` points of fp32 (ranked on every other image,
confirmed on the rest), with nearest rounding, with optimized 4-bit rounding, and as the default
searches (the optimized ladder, then nearest rounding's smaller plans); with ``--search-half``,
also the default searching on the first half of the evaluation images (ranked and confirmed
there), its choice scored on the other half, which it never saw. Weight bytes (int4 packed, half a
byte per weight), compression against fp32, the top-1 change against fp32 with its 95%
interval (paired over the same images: :func:`qcompiler.evaluate.paired_difference`; on 400
images a point is four images, within the noise of one run), the probe's output SQNR of the
choice on its 8 calibration images and on 16 evaluation images ("held-out dB": rounding fitted
to the calibration images can look better on them than it is), latency (median of ``--runs``,
1 thread; every row timed once per round, the median of ``--rounds`` rounds printed) in the same
run, and the search's wall time (probe, builds and scoring included). ``--no-search`` skips the
accuracy-budget searches.

With latency (the default; ``--no-latency`` skips it), every conv/matmul layer's kernels are
measured on the host board over RPC (a local tracker and one server, 1 thread) at W8A8 and at
W4A8 into ``--records`` (:func:`qcompiler.api.layer_latencies`), and each size budget is solved
again with the model's latency held within ``--latency-slack`` times W8A8's (the program's
prediction; a budget no plan meets is listed under the table with the solver's reason); every
row is then also timed end to end on that board over RPC (TVM's time evaluator on the server),
beside the program's predicted latency.

Run from the repository root::

    python bench/mixed.py                      # both models
    python bench/mixed.py --models resnet8_cifar10 --budgets 0.8 0.6
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (ImageNet split, preamble, peak RSS)
from speed import time_call  # noqa: E402

from qcompiler import api  # noqa: E402
from qcompiler.deploy.artifact import set_threads  # noqa: E402
from qcompiler.evaluate import paired_difference  # noqa: E402
from qcompiler.passes.errors import QCompilerError  # noqa: E402
from qcompiler.passes.scheme import AUTO, OPTIMIZED_4BIT, QuantConfig  # noqa: E402
from qcompiler.targets.bitwidth import weight_options  # noqa: E402
from qcompiler.targets.tuning import LocalRPC  # noqa: E402

MODELS = ("efficientnet_lite0", "resnet8_cifar10")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--images",
        type=int,
        help="evaluation images (default: 400 for EfficientNet-Lite0, all 4800 for ResNet-8)",
    )
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=[0.85, 0.7, 0.6],
        help="weight budgets as shares of the W8A8 weight bytes",
    )
    parser.add_argument(
        "--max-drop", type=float, default=1.0, help="accuracy budget: top-1 points below fp32"
    )
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timing rounds, each timing every row once (the median of the rounds is printed)",
    )
    parser.add_argument(
        "--no-search", action="store_true", help="skip the accuracy-budget searches"
    )
    parser.add_argument(
        "--no-latency", action="store_true", help="skip the latency-budgeted rows and RPC timing"
    )
    parser.add_argument("--records", help="tuning records for the layer latencies (default: temp)")
    parser.add_argument(
        "--wider",
        action="store_true",
        help="also the default accuracy search with w8a16 and float layers allowed (their "
        "latencies measured over RPC; not with --no-latency)",
    )
    parser.add_argument(
        "--search-half",
        action="store_true",
        help="also search on half the evaluation images and score the choice on the other half",
    )
    parser.add_argument(
        "--latency-slack",
        nargs="+",
        type=float,
        default=[1.0, 1.1],
        help="latency budgets as multiples of W8A8's predicted latency",
    )
    args = parser.parse_args(argv)
    shared = Path(os.environ.get("QC_SHARED", accuracy.REPO.parent / "shared")).resolve()
    print("\n".join(accuracy.preamble(shared)[:5]))
    set_threads(1)
    records = args.records or tempfile.mkdtemp(prefix="qc-mixed-records-")
    with contextlib.ExitStack() as stack:
        board = None if args.no_latency else stack.enter_context(LocalRPC(threads=1))
        for name in args.models:
            bench_model(accuracy.CASES[name], args, shared, board, records)
    print(f"\npeak RSS {accuracy._peak_rss_mib():.0f} MiB")
    return 0


def bench_model(case, args, shared: Path, board, records: str) -> None:
    """One model's table (see the module docstring)."""
    model = api.load_model(str(shared / "models" / case.model))
    count = args.images if args.images is not None else case.default_eval
    data = case.load(shared, model.inputs[0], count)
    start = time.perf_counter()
    model, calibration = api.calibrate(model, data.calib, layer_inputs=True)
    calibrate_s = time.perf_counter() - start
    print(f"\n{case.name}: {data.description}")
    print(f"calibration with layer statistics: {calibrate_s:.0f} s ({len(data.calib)} samples)")
    labelled = list(zip(data.inputs, data.labels))

    def build(config):
        return api.quantize(model, None, config, calibration=calibration).build("x86")

    def latency(artifact) -> float:
        feed = data.inputs[0]
        return 1e3 * time_call(lambda: artifact.run(feed), args.runs, warmup=3)[0]

    roundings = (
        (", nearest", QuantConfig(weight_rounding="nearest")),
        (", auto rounding (4-bit optimized)", QuantConfig()),
    )
    rows = []
    fp32 = api.compile_float(model, "x86")
    eight = build(QuantConfig())
    fp32_bytes = 4 * sum(layer["weight_bytes"] for layer in eight.manifest["layers"])
    rows.append(("fp32 (TVM)", fp32, fp32_bytes, None, None, None))
    rows.append(("W8A8 (uniform)", eight, eight.manifest["weight_bytes"], None, None, None))
    every = tuple(weight_options(calibration))
    for label, config in roundings:
        four = build(replace(config, int4_weights=every))
        rows.append((f"W4A8 (uniform){label}", four, four.manifest["weight_bytes"], *[None] * 3))
    probe = data.calib[: api.PROBE_HOLDOUT]
    held_out = {}  # rounding -> the weight probe on 16 evaluation images

    def held_out_db(rounding: QuantConfig, int4: tuple[str, ...]) -> float:
        key = (rounding.weight_rounding, rounding.nearest_weights)
        if key not in held_out:
            held_out[key] = api.weight_probe(calibration, rounding, data.inputs[:16])
        return held_out[key].run(set(int4))

    notes = []

    def add_choice(title, label, rounding, config, plan, start: float, predicted=None) -> None:
        """Build the chosen ``config`` and add its row: ``title``, its 4-bit count, ``label``."""
        search_s = time.perf_counter() - start
        artifact = build(config)
        name = f"{title} ({len(config.int4_weights)} W4A8){label}"
        dbs = (plan.measured_sqnr_db, held_out_db(rounding, config.int4_weights))
        rows.append((name, artifact, artifact.manifest["weight_bytes"], dbs, search_s, predicted))

    latency_budget = None
    measure = {"records": records, "rpc": board, "echo": lambda _: None}
    if board is not None:
        start = time.perf_counter()
        # A budget no plan can break yields the all-W8A8 plan's predicted latency.
        _, fastest = api.choose_weight_precisions(calibration, max_latency_ms=1e9, **measure)
        latency_budget = fastest.latency_ms
        print(
            f"layer latencies at W8A8 and W4A8 measured over RPC in "
            f"{time.perf_counter() - start:.0f} s; W8A8 predicted {latency_budget:.3f} ms"
        )
    for share in args.budgets:
        limit = int(share * eight.manifest["weight_bytes"])
        budgets = [({}, "")]
        if latency_budget is not None:
            for slack in args.latency_slack:
                extra = dict(max_latency_ms=slack * latency_budget, **measure)
                budgets.append((extra, f", <= {slack:g}x W8A8 ms"))
        for extra, suffix in budgets:
            for label, rounding in roundings if not extra else roundings[:1]:
                search = time.perf_counter()
                try:
                    config, plan = api.choose_weight_precisions(
                        calibration, rounding, max_bytes=limit, samples=probe, **extra
                    )
                except QCompilerError as err:
                    notes.append(f"<= {share:.0%} of W8A8 bytes{suffix}{label}: {err}")
                    continue
                title = f"mixed, <= {share:.0%} of W8A8 bytes{suffix}"
                predicted = plan.latency_ms if extra else None
                add_choice(title, label, rounding, config, plan, search, predicted)
    searches = [
        (*roundings[0], {}),
        (", optimized-4bit rounding", QuantConfig(weight_rounding=OPTIMIZED_4BIT), {}),
        (", default (auto, nearest, then each layer's better)", QuantConfig(), {}),
    ]
    if args.wider and board is not None:
        wider = {"precisions": ("w8a8", "w4a8", "w8a16", "float"), **measure}
        searches.append((", default, W8A16 and float allowed", QuantConfig(), wider))
    for label, rounding, extra in searches if not args.no_search else ():
        search = time.perf_counter()
        try:
            found = api.choose_within_accuracy_drop(
                model, calibration, labelled, args.max_drop, rounding, samples=probe, **extra
            )
            config, plan, tried = found.config, found.plan, found.tried
        except QCompilerError as err:
            notes.append(f"top-1 within {args.max_drop:g} points{label}: {err}")
            continue
        title = f"top-1 within {args.max_drop:g} points"
        if rounding.weight_rounding == AUTO:
            label = f"{label}: {found.chosen.rounding} won"
        add_choice(title, label, config, config, plan, search)
        notes.append(
            f"{rows[-1][0]}: tried "
            + ", ".join(
                f"{len(c.int4_weights)} layers {c.rounding}{_wider_layers(c)} "
                f"{c.top1:.4f}/{c.held_out_top1:.4f}"
                for c in tried
            )
            + f" (top-1 on the {found.searched} searched/{found.held_out} held-out images; "
            f"fp32 {found.reference:.4f}/{found.held_out_reference:.4f})"
        )

    if args.search_half:
        notes.append(search_on_half(model, calibration, labelled, args.max_drop, probe, fp32))

    def hits(artifact) -> np.ndarray:
        predict = accuracy.tvm_predict(artifact)
        return np.array([predict(x) == y for x, y in labelled], dtype=bool)

    reference = hits(fp32)
    # Timed in rounds, each row once per round, so that the machine's drifts reach every row
    # alike; the median round is printed.
    local, remote = ([[] for _ in rows] for _ in range(2))
    for _ in range(args.rounds):
        for i, (_, artifact, *_) in enumerate(rows):
            local[i].append(latency(artifact))
            if board is not None:
                remote[i].append(rpc_latency(artifact, board, data))
    print(f"\n{case.model}, {len(data.inputs)} evaluation images, 1 thread\n")
    print(
        "| build | top-1 | Δ vs fp32 (95%) | weight KiB | vs fp32 | probe dB | held-out dB | ms | "
        "RPC ms | predicted ms | search s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, (label, artifact, size, dbs, search_s, predicted) in enumerate(rows):
        got = reference if artifact is fp32 else hits(artifact)
        change = paired_difference(reference, got)
        rpc_ms = f"{np.median(remote[i]):.2f}" if remote[i] else ""
        print(
            f"| {label} | {got.mean():.4f} | "
            f"{100 * change.delta:+.2f} ± {100 * change.margin:.2f} | "
            f"{size / 1024:.1f} | {fp32_bytes / size:.1f}x | "
            f"{' | '.join('' if db is None else f'{db:.1f}' for db in dbs or (None, None))} | "
            f"{np.median(local[i]):.2f} | "
            f"{rpc_ms} | {'' if predicted is None else f'{predicted:.2f}'} | "
            f"{'' if search_s is None else f'{search_s:.2f}'} |"
        )
    for note in notes:
        print(f"- {note}")


def _wider_layers(candidate) -> str:
    """A candidate's W8A16 and float layers, in words, where it has any."""
    counts = ((len(candidate.w8a16_layers), "W8A16"), (len(candidate.float_layers), "float"))
    return "".join(f" +{n} {what}" for n, what in counts if n)


def search_on_half(model, calibration, labelled, max_drop, probe, fp32) -> str:
    """The default accuracy search on the first half of the evaluation images, its choice
    scored on both halves: how much of its margin is chosen on the images it is scored on."""
    half = len(labelled) // 2
    own, other = labelled[:half], labelled[half:]
    search = api.choose_within_accuracy_drop(
        model, calibration, own, max_drop, QuantConfig(), samples=probe
    )
    config, plan = search.config, search.plan
    chosen = api.quantize(model, None, config, calibration=calibration).build("x86")
    drops = [100 * (api.top1(chosen, part) - api.top1(fp32, part)) for part in (own, other)]
    return (
        f"the default search on the first {half} evaluation images only: "
        f"{len(config.int4_weights)} W4A8 layers ({search.chosen.rounding} rounding), "
        f"{plan.bytes / 1024:.1f} KiB; top-1 {drops[0]:+.2f} points on those images, "
        f"{drops[1]:+.2f} on the other {len(other)}"
    )


def rpc_latency(artifact, board, data, runs: int = 50) -> float:
    """Median ms of one run on the board behind ``board``, timed there (TVM's evaluator)."""
    with tempfile.TemporaryDirectory() as folder:
        exported = api.load(artifact.export(Path(folder) / "artifact"))
        _, seconds = api.run(exported, [data.inputs[0]], rpc=board, repeat=runs)
    return 1e3 * float(np.median(seconds))


if __name__ == "__main__":
    sys.exit(main())

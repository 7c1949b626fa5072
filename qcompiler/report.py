"""``qc report``: what each layer's precision costs and buys, and the trade-off curve.

For a float model and its calibration, :func:`mixed_precision_report` measures

* each conv/matmul layer's sensitivity: the output SQNR with its weights alone at 4 bits
  (:class:`~qcompiler.targets.sensitivity.WeightProbe`, on a few calibration samples), and
  HAWQ's second-order proxy for it (:class:`~qcompiler.targets.sensitivity.HessianProbe`: the
  trace of the loss's Hessian per weight, times the squared norm of the 4-bit rounding error);
* each layer's latency on the board at W8A8 and at W4A8 (over RPC, from the tuning database:
  :func:`qcompiler.api.layer_latencies`);

and traces the candidates the integer program offers between all-8-bit and all-4-bit weights
(the fewest bytes within each of a halving series of error budgets), each with its predicted
latency, its bytes and its measured output SQNR (and top-1, given labelled samples). The chosen
configuration (under the budgets given, as ``qc compile`` would choose) is marked.

:func:`write` puts ``report.md`` (the per-layer table and the candidates) and ``pareto.png``
(accuracy against latency, the Pareto front drawn, the chosen candidate starred) in a folder.
The plot needs matplotlib (``pip install qcompiler[report]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qcompiler import api
from qcompiler.passes.errors import QCompilerError
from qcompiler.targets.bitwidth import choose_precisions, size_ladder


@dataclass(frozen=True)
class LayerRow:
    name: str
    sqnr_4bit_db: float  # output SQNR with this layer's weights alone at 4 bits
    hawq_4bit_db: float  # the same, predicted by HAWQ's proxy
    curvature: float  # Tr(H) / n: the mean diagonal of the loss's Hessian over the weights
    ms: dict  # {precision: latency on the board}
    bytes: dict  # {precision: stored weight bytes}


@dataclass(frozen=True)
class Point:
    int4_weights: tuple[str, ...]
    bytes: int
    latency_ms: float  # predicted: the measured kernels of the layers plus the rest
    sqnr_db: float  # measured in the probe
    top1: float | None = None


@dataclass
class Report:
    model: str
    board: str
    base_sqnr_db: float  # every layer at 8 bits
    layers: list[LayerRow] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    chosen: Point | None = None
    float_top1: float | None = None


def mixed_precision_report(
    model,
    calibration,
    config=None,
    *,
    samples,
    records,
    target="x86",
    rpc=None,
    threads=None,
    labelled=None,
    max_bytes=None,
    max_latency_ms=None,
    steps: int = 8,
    echo=print,
) -> Report:
    """Measure and trace (see the module docstring); ``labelled``: ``(inputs, label)`` pairs."""
    config = api._as_config(config)
    board = api.resolve_board(target)
    probe = api.weight_probe(calibration, config, samples)
    alone, base = probe.measure()
    hessian = api.hessian_probe(calibration, config, samples)
    predicted, _ = hessian.measure()
    latency = api._precision_latencies(calibration, config, records, board, rpc, threads, echo)
    table = api._option_table(calibration, config, (alone, base), latency)
    report = Report(model.name, board.name, base)
    for name, options in table.items():
        if name == api._REST:
            continue
        report.layers.append(
            LayerRow(
                name,
                alone[name],
                predicted[name],
                hessian.curvature(hessian.names.index(name)),
                {o.precision: o.latency_ms for o in options},
                {o.precision: o.bytes for o in options},
            )
        )
    labelled = list(labelled) if labelled is not None else None
    if labelled:
        report.float_top1 = api.top1(api.compile_float(model, "x86"), labelled)

    def point(plan) -> Point:
        int4 = plan.int4_layers
        top1 = None
        if labelled:
            top1 = api.top1_with(model, calibration, config, int4, labelled)
        return Point(int4, plan.bytes, plan.latency_ms, probe.run(set(int4)), top1)

    report.points = [point(plan) for plan in size_ladder(table, steps)]
    if max_bytes is not None or max_latency_ms is not None:
        plan = choose_precisions(
            table, minimize="error", max_bytes=max_bytes, max_latency_ms=max_latency_ms
        )
        same = [p for p in report.points if set(p.int4_weights) == set(plan.int4_layers)]
        report.chosen = same[0] if same else point(plan)
        if not same:
            report.points.append(report.chosen)
    return report


def pareto_front(points: list[Point], accuracy) -> list[Point]:
    """The points no other point beats on both latency (lower) and ``accuracy(point)``
    (higher), by latency."""
    front = []
    for p in sorted(points, key=lambda p: (p.latency_ms, -accuracy(p))):
        if not front or accuracy(p) > accuracy(front[-1]):
            front.append(p)
    return front


def write(report: Report, folder) -> list[Path]:
    """``report.md`` and ``pareto.png`` in ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labelled = report.float_top1 is not None

    def accuracy(p: Point) -> float:
        return p.top1 if labelled else p.sqnr_db

    front = pareto_front(report.points, accuracy)
    lines = [
        f"# {report.model} on {report.board}: weight precision per layer",
        "",
        f"Output SQNR with every layer at 8 bits: {report.base_sqnr_db:.1f} dB"
        + (f"; float top-1 {report.float_top1:.4f}" if labelled else ""),
        "",
        "| layer | SQNR alone at 4 bits (dB) | HAWQ's prediction (dB) | Tr(H)/n | W8A8 ms "
        "| W4A8 ms | W8A8 bytes | W4A8 bytes |" + (" chosen |" if report.chosen else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if report.chosen else ""),
    ]
    for row in report.layers:
        chosen = ""
        if report.chosen:
            chosen = f" {'w4a8' if row.name in report.chosen.int4_weights else 'w8a8'} |"
        lines.append(
            f"| {row.name} | {row.sqnr_4bit_db:.1f} | {row.hawq_4bit_db:.1f} | "
            f"{row.curvature:.3g} | {row.ms.get('w8a8', 0):.4f} | "
            f"{row.ms.get('w4a8', 0):.4f} | {row.bytes.get('w8a8', 0)} | "
            f"{row.bytes.get('w4a8', 0)} |{chosen}"
        )
    lines += [
        "",
        "Candidates (the fewest bytes within each error budget; latency predicted from the "
        "measured kernels):",
        "",
        "| W4A8 layers | weight bytes | predicted ms | output SQNR dB |"
        + (" top-1 |" if labelled else "")
        + " Pareto | chosen |",
        "|---:|---:|---:|---:|" + ("---:|" if labelled else "") + "---|---|",
    ]
    for p in sorted(report.points, key=lambda p: p.bytes):
        lines.append(
            f"| {len(p.int4_weights)} | {p.bytes} | {p.latency_ms:.3f} | {p.sqnr_db:.1f} |"
            + (f" {p.top1:.4f} |" if labelled else "")
            + f" {'yes' if p in front else ''} | {'yes' if p == report.chosen else ''} |"
        )
    text = folder / "report.md"
    text.write_text("\n".join(lines) + "\n")
    return [text, _plot(report, front, accuracy, labelled, folder / "pareto.png")]


def _plot(report: Report, front, accuracy, labelled: bool, path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise QCompilerError(
            "the Pareto plot needs matplotlib: pip install 'qcompiler[report]'"
        ) from err
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    dots = ax.scatter(
        [p.latency_ms for p in report.points],
        [accuracy(p) for p in report.points],
        c=[p.bytes / 1024 for p in report.points],
        cmap="viridis",
        label="candidates",
    )
    fig.colorbar(dots, ax=ax, label="weight KiB")
    ax.plot(
        [p.latency_ms for p in front],
        [accuracy(p) for p in front],
        "k--",
        lw=1,
        label="Pareto front",
    )
    if report.chosen is not None:
        ax.scatter(
            [report.chosen.latency_ms],
            [accuracy(report.chosen)],
            marker="*",
            s=300,
            c="red",
            label="chosen",
        )
    ax.set_xlabel(f"predicted latency on {report.board} (ms)")
    ax.set_ylabel("top-1" if labelled else "output SQNR (dB)")
    ax.set_title(f"{report.model}: W8A8 / W4A8 per layer")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Bit-width selection: one precision per layer, chosen by an integer linear program.

Each layer has candidate precisions (``w8a8``, ``w8a16``, ``w4a8``, ``float``, ...), each with
three costs: its latency on the board (ms, measured), an additive error proxy of what it costs
in accuracy (output noise power from :mod:`qcompiler.targets.sensitivity`, or a task-metric
drop measured one layer at a time), and the bytes of its stored weights. With a binary
``x[l, p]`` per layer and precision, exactly one per layer, the choice is

    minimize    sum  c[l, p] x[l, p]         (c: latency, error or bytes)
    subject to  sum  e[l, p] x[l, p] <= max_error
                sum  t[l, p] x[l, p] <= max_latency_ms
                sum  b[l, p] x[l, p] <= max_bytes
                x[a, p] == x[b, p]           for layers a, b that must share a precision

(the ties: both operands of a residual add or a concat run at one activation precision), and
``x[a, p] == x[b, p]`` for one precision ``p`` of layers that share what ``p`` changes (the
layers reading one tensor widen it together: ``w8a16`` is a property of their input). It is
solved exactly by HiGHS through ``scipy.optimize.milp``. Additive costs are the model's
assumption -- errors of separate layers add as independent noise, latencies of sequential
kernels add -- so a chosen configuration is to be confirmed by running it.

Among plans equally good by the objective (the ``w8a16`` options cost no bytes), a second
objective can break the tie (``then``: the latency, where it was measured).

An infeasible budget is an error that names the tightest value each budget could reach on its
own (the optimum of that quantity alone, under the ties).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from tvm import relax

from qcompiler.passes import rounding
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.graph import (
    CONV_OPS,
    MATMUL_OPS,
    bindings,
    const_value,
    moves_codes,
    op_name,
)
from qcompiler.passes.scheme import QuantConfig

QUANTITIES = ("latency_ms", "error", "bytes")


@dataclass(frozen=True)
class Option:
    """One precision for one layer and what it costs."""

    precision: str
    latency_ms: float
    error: float
    bytes: int = 0


@dataclass(frozen=True)
class Plan:
    """The chosen precision of each layer and the model's predicted totals."""

    precisions: dict[str, str]
    latency_ms: float
    error: float
    bytes: int
    measured_sqnr_db: float | None = None  # the chosen configuration, run (when it was)

    @property
    def int4_layers(self) -> tuple[str, ...]:
        """The layers this plan gives 4-bit weights."""
        return self.layers_at("w4a8")

    def layers_at(self, precision: str) -> tuple[str, ...]:
        """The layers this plan runs at ``precision``."""
        return tuple(layer for layer, p in self.precisions.items() if p == precision)


@contextlib.contextmanager
def _silenced_stdout():
    """File descriptor 1 pointed at /dev/null: the HiGHS in scipy prints
    ``HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();`` to it from C++
    whatever the display options (ERGO-Code/HiGHS#2783), 50 lines in a search on
    EfficientNet-Lite0's table, in the middle of ``qc compile``'s output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class _Program:
    """Variables, the one-per-layer rows and the tie rows of a table."""

    def __init__(
        self,
        table: Mapping[str, Sequence[Option]],
        ties: Iterable[Iterable[str]],
        precision_ties: Iterable[tuple[str, Iterable[str]]] = (),
    ):
        if not table:
            raise QCompilerError("no layers to choose precisions for")
        self.layers = list(table)
        self.index: dict[tuple[str, str], int] = {}
        self.options: list[tuple[str, Option]] = []
        for layer in self.layers:
            if not table[layer]:
                raise QCompilerError(f"layer {layer!r} has no candidate precision")
            for option in table[layer]:
                if (layer, option.precision) in self.index:
                    raise QCompilerError(f"layer {layer!r} lists {option.precision!r} twice")
                self.index[(layer, option.precision)] = len(self.options)
                self.options.append((layer, option))
        n = len(self.options)
        rows, lower, upper = [], [], []
        for layer in self.layers:  # exactly one precision per layer
            row = np.zeros(n)
            row[[i for i, (name, _) in enumerate(self.options) if name == layer]] = 1
            rows.append(row)
            lower.append(1)
            upper.append(1)
        self.forbidden = np.zeros(n, dtype=bool)
        pairs = []  # (precision, layers): each of them at it, or none
        for group in ties:
            group = list(group)
            unknown = [name for name in group if name not in table]
            if unknown:
                raise QCompilerError(f"tied layers not in the table: {unknown}")
            shared = set.intersection(*({o.precision for o in table[g]} for g in group))
            if not shared:
                raise QCompilerError(f"tied layers {group} have no precision in common")
            for name in group:  # a precision one of them lacks is out for all of them
                for option in table[name]:
                    if option.precision not in shared:
                        self.forbidden[self.index[(name, option.precision)]] = True
            pairs.extend((p, group) for p in sorted(shared))
        for precision, group in pairs + list(precision_ties):
            group = [name for name in group if (name, precision) in self.index]
            for first, other in zip(group, group[1:]):  # x[first, p] == x[other, p]
                row = np.zeros(n)
                row[self.index[(first, precision)]] = 1
                row[self.index[(other, precision)]] = -1
                rows.append(row)
                lower.append(0)
                upper.append(0)
        self.structure = LinearConstraint(np.array(rows), lower, upper)

    def cost(self, quantity: str) -> np.ndarray:
        return np.array([float(getattr(option, quantity)) for _, option in self.options])

    def solve(self, objective: str, budgets: Mapping[str, float], then: str | None = None):
        result = self._solve(objective, budgets)
        if result is None or then is None or then == objective:
            return result
        # The best by ``then`` among the optima of ``objective`` (a relative slack for HiGHS's
        # own tolerance on the optimum).
        best = float(self.cost(objective) @ np.rint(result.x))
        slack = 1e-9 * max(abs(best), 1.0)
        tied = self._solve(then, {**budgets, objective: best + slack})
        return tied if tied is not None else result

    def _solve(self, objective: str, budgets: Mapping[str, float]):
        constraints = [self.structure]
        for quantity, limit in budgets.items():
            constraints.append(LinearConstraint(self.cost(quantity)[None], -np.inf, limit))
        upper = np.where(self.forbidden, 0.0, 1.0)
        with _silenced_stdout():
            result = milp(
                self.cost(objective),
                integrality=np.ones(len(self.options)),
                bounds=Bounds(np.zeros(len(self.options)), upper),
                constraints=constraints,
            )
        return result if result.status == 0 else None

    def plan(self, x: np.ndarray) -> Plan:
        picked = [self.options[i] for i in np.flatnonzero(np.rint(x) == 1)]
        return Plan(
            precisions={layer: option.precision for layer, option in picked},
            latency_ms=float(sum(o.latency_ms for _, o in picked)),
            error=float(sum(o.error for _, o in picked)),
            bytes=int(sum(o.bytes for _, o in picked)),
        )


def choose_precisions(
    table: Mapping[str, Sequence[Option]],
    *,
    minimize: str = "latency_ms",
    max_error: float | None = None,
    max_latency_ms: float | None = None,
    max_bytes: float | None = None,
    ties: Iterable[Iterable[str]] = (),
    precision_ties: Iterable[tuple[str, Iterable[str]]] = (),
    then: str | None = None,
) -> Plan:
    """The precisions that minimize ``minimize`` (``"latency_ms"``, ``"error"`` or
    ``"bytes"``) within the budgets given, and among those ``then``; see the module
    docstring. ``precision_ties``: ``(precision, layers)``, each of ``layers`` at ``precision``
    or none of them."""
    for quantity in (minimize, then):
        if quantity is not None and quantity not in QUANTITIES:
            raise QCompilerError(f"minimize and then must be among {QUANTITIES}: {quantity!r}")
    program = _Program(table, ties, precision_ties)
    budgets = {
        quantity: float(limit)
        for quantity, limit in zip(QUANTITIES, (max_latency_ms, max_error, max_bytes))
        if limit is not None
    }
    for quantity, limit in budgets.items():
        if not math.isfinite(limit):
            raise QCompilerError(f"the {quantity} budget must be a finite number, got {limit}")
    result = program.solve(minimize, budgets, then)
    if result is not None:
        return program.plan(result.x)
    # Infeasible: what could each budget reach on its own?
    reachable = {}
    for quantity in budgets:
        alone = program.solve(quantity, {})
        reachable[quantity] = program.plan(alone.x) if alone is not None else None
    too_tight = [q for q in budgets if getattr(reachable[q], q) > budgets[q]]
    if too_tight:
        listed = "; ".join(
            f"{q} <= {budgets[q]:g} cannot be met: the smallest achievable is "
            f"{getattr(reachable[q], q):g}"
            for q in too_tight
        )
        raise QCompilerError(f"no choice of precisions fits the budget: {listed}")
    listed = ", ".join(f"{q} <= {budgets[q]:g}" for q in budgets)
    best = ", ".join(f"{q} {getattr(reachable[q], q):g}" for q in budgets)
    raise QCompilerError(
        f"no choice of precisions meets {listed} together (each alone can: the smallest "
        f"achievable values are {best})"
    )


def _weighted_layers(calibration):
    """``(binding, weights)`` of each conv/matmul layer with constant weights."""
    for binding in bindings(calibration.mod["main"]):
        call = binding.value
        weight = const_value(call.args[1]) if op_name(call) in CONV_OPS | MATMUL_OPS else None
        if weight is not None:
            yield binding, weight


def weight_layers(calibration) -> tuple[str, ...]:
    """The conv/matmul layers with constant weights: those a precision can be chosen for."""
    return tuple(binding.var.name for binding, _ in _weighted_layers(calibration))


def input_points(calibration) -> dict[str, str]:
    """``{layer: activation tensor}``: the quantization point each conv/matmul layer with
    constant weights reads, through ops that only move values (a reshape, a pad); what widening
    the layer's input to 16 bits (``w8a16``) widens. Layers whose input is no point are left
    out."""
    func = calibration.mod["main"]
    producer = {b.var: b.value for b in bindings(func)}
    points = {p: p.name for p in calibration.plan.points}
    found = {}
    for binding, _ in _weighted_layers(calibration):
        data = binding.value.args[0]
        while data not in points and isinstance(producer.get(data), relax.Call):
            call = producer[data]
            if not (moves_codes(call) or op_name(call) == "relax.nn.pad"):
                break
            data = call.args[0]
        if data in points:
            found[binding.var.name] = points[data]
    return found


def add_wider_options(
    table: dict[str, list[Option]],
    calibration,
    *,
    widened: Mapping[str, float] | None = None,
    floated: Mapping[str, float] | None = None,
    latency: Mapping[str, Mapping[str, float]] | None = None,
) -> list[tuple[str, list[str]]]:
    """Add ``w8a16`` and/or ``float`` options to the ``w8a8`` layers of ``table``, in place;
    return the precision ties of :func:`choose_precisions`.

    ``widened``: ``{activation tensor: output noise power its 8-bit rounding adds}``; a
    layer's ``w8a16`` option removes that of its input (:func:`input_points`), shared among
    the layers that read it, which are tied to widen it together. ``floated``: ``{layer:
    output noise power change with its weights float}`` (negative: the noise of its 8-bit
    weights); a ``float`` option stores 4 bytes per weight. The errors are relative to the
    all-``w8a8`` model, like the ``w4a8`` options'; ``latency`` as in :func:`weight_options`,
    here required: these options buy accuracy with time, and only a measured time prices them.
    """
    if latency is None:
        raise QCompilerError("w8a16 and float options need latencies measured on the board")
    sizes = {binding.var.name: weight.size for binding, weight in _weighted_layers(calibration)}

    def ms(precision: str, layer: str) -> float:
        if layer not in latency.get(precision, {}):
            raise QCompilerError(f"no measured {precision} latency for layer {layer!r}")
        return float(latency[precision][layer])

    readers: dict[str, list[str]] = {}
    for layer, point in input_points(calibration).items():
        if layer in table:
            readers.setdefault(point, []).append(layer)
    if widened is not None:
        for point, layers in readers.items():
            removed = widened.get(point, 0.0) / len(layers)
            for layer in layers:
                table[layer].append(Option("w8a16", ms("w8a16", layer), -removed, sizes[layer]))
    for layer, change in (floated or {}).items():
        if layer in table:
            table[layer].append(Option("float", ms("float", layer), change, 4 * sizes[layer]))
    if widened is None:
        return []
    return [("w8a16", layers) for layers in readers.values() if len(layers) > 1]


def size_ladder(
    table: Mapping[str, Sequence[Option]],
    steps: int = 8,
    factor: float = 2.0,
    *,
    minimize: str = "bytes",
    precision_ties: Iterable[tuple[str, Iterable[str]]] = (),
    then: str | None = None,
) -> list[Plan]:
    """Plans between all-4-bit and all-8-bit weights, cheapest first: the fewest bytes (or
    the least ``minimize``, ``"latency_ms"``; and among those the least ``then``) within each
    of ``steps`` error budgets, from the total of every layer's worst option down by
    ``factor`` at each step, and the least-error plan (all at 8 bits) last.

    Options that remove noise (negative errors: ``w8a16``, ``float``, see
    :func:`add_wider_options`) carry the ladder on past all-8-bit: budgets of 0, and of the
    least-error plan's removal times ``1 - factor**-k`` for k = 1 .. ``steps`` (the remaining
    noise shrinking by ``factor`` at each). A plan no better than another in bytes, error and
    latency alike is left out; the order is by ``minimize``, then error downwards."""
    if minimize not in ("bytes", "latency_ms"):
        raise QCompilerError(f"a ladder minimizes bytes or latency_ms, not {minimize!r}")
    options = {"precision_ties": precision_ties, "then": then}
    everything = sum(max(o.error for o in choices) for choices in table.values())
    budgets = [everything / factor**step for step in range(steps)]
    least = choose_precisions(table, minimize="error", **options)
    if least.error < 0:
        budgets += [0.0] + [least.error * (1 - factor**-k) for k in range(1, steps + 1)]
    plans = {}
    for budget in budgets:
        plan = choose_precisions(table, minimize=minimize, max_error=budget, **options)
        plans.setdefault(tuple(sorted(plan.precisions.items())), plan)
    plans.setdefault(tuple(sorted(least.precisions.items())), least)

    def costs(plan: Plan) -> tuple:
        return plan.bytes, plan.error, plan.latency_ms

    kept: list[Plan] = []  # a plan's betters all come before it in this order
    for plan in sorted(plans.values(), key=costs):
        if not any(all(a <= b for a, b in zip(costs(o), costs(plan))) for o in kept):
            kept.append(plan)
    return sorted(kept, key=lambda plan: (getattr(plan, minimize), -plan.error))


def weight_options(
    calibration, config=None, measured=None, latency=None, four_bit: bool = True
) -> dict[str, list[Option]]:
    """``w8a8`` and (with ``four_bit``) ``w4a8`` options for every conv/matmul layer with
    constant weights: their
    stored bytes, an error, and (with ``latency``: ``{precision: {layer: ms}}``, measured on
    the board by :mod:`qcompiler.targets.latency`) their latency.

    With ``measured`` (``(alone_db, base_db)`` from
    :meth:`qcompiler.targets.sensitivity.WeightProbe.measure`), the error of 4-bit weights in a
    layer is the output noise power they add, measured on the model's outputs relative to their
    peak: ``10**(-alone/10) - 10**(-base/10)``, and 0 at 8 bits -- the quantity to budget.
    Without it, a local proxy from the calibration's layer statistics (``layer_inputs=True``):
    the layer's own relative output noise ``sum rᵀHr / sum wᵀHw``, ``H`` the second moment of
    its input patches -- what the rounding does to the layer, not to the answer. Without
    ``latency`` the latencies are 0: choose by size or error then.
    """
    config = config or QuantConfig()
    if not config.scheme.weight.symmetric:
        raise QCompilerError("choosing weight precisions needs symmetric weights")
    if measured is None and not calibration.layers:
        raise QCompilerError(
            "choosing weight precisions needs measured sensitivities or the layers' input "
            "statistics (calibrate with layer_inputs=True)"
        )
    table = {}

    def ms(precision: str, layer: str) -> float:
        if latency is None:
            return 0.0
        if layer not in latency.get(precision, {}):
            raise QCompilerError(f"no measured {precision} latency for layer {layer!r}")
        return float(latency[precision][layer])

    for binding, weight in _weighted_layers(calibration):
        call = binding.value
        name, small = binding.var.name, (weight.size + 1) // 2
        if measured is not None:
            alone, base = measured
            added = max(10 ** (-alone[name] / 10) - 10 ** (-base / 10), 0.0)
            table[name] = [Option("w8a8", ms("w8a8", name), 0.0, weight.size)]
            if four_bit:
                table[name].append(Option("w4a8", ms("w4a8", name), added, small))
            continue
        stats = calibration.layers.get(binding.var)
        if stats is None or stats.count == 0:  # no statistics (a very long patch): 8 bits
            table[name] = [Option("w8a8", ms("w8a8", name), 0.0, weight.size)]
            continue
        w = rounding.weight_groups(call, weight.astype(np.float64))
        hessian = stats.second_moment
        signal = float(((w @ hessian) * w).sum())
        options = []
        for precision, bits in (("w8a8", 8), ("w4a8", 4))[: 1 + four_bit]:
            spec = config.scheme.weight
            if bits == 4:
                spec = dataclasses.replace(spec, bits=4, narrow_range=True)
            codes, scale = _symmetric_codes(w, spec)
            noise = float(rounding.output_error(w, codes, scale, hessian).sum())
            size = weight.size if bits == 8 else small
            options.append(Option(precision, ms(precision, name), noise / max(signal, 1e-30), size))
        table[name] = options
    return table


def _symmetric_codes(w: np.ndarray, spec):
    """Per-output-channel symmetric codes of grouped weights ``w[g, o, k]`` and their scales
    ``[g, o]`` (the max-abs rule of the annotator)."""
    peak = np.abs(w).max(axis=-1)
    scale = np.where(peak > 0, peak / spec.qmax, 1.0)
    codes = np.clip(np.rint(w / scale[..., None]), spec.qmin, spec.qmax)
    return codes, scale

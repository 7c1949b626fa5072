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

(the ties: both operands of a residual add or a concat run at one activation precision). It is
solved exactly by HiGHS through ``scipy.optimize.milp``. Additive costs are the model's
assumption -- errors of separate layers add as independent noise, latencies of sequential
kernels add -- so a chosen configuration is to be confirmed by running it.

An infeasible budget is an error that names the tightest value each budget could reach on its
own (the optimum of that quantity alone, under the ties).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from qcompiler.passes.errors import QCompilerError

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


class _Program:
    """Variables, the one-per-layer rows and the tie rows of a table."""

    def __init__(self, table: Mapping[str, Sequence[Option]], ties: Iterable[Iterable[str]]):
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
            for first, other in zip(group, group[1:]):
                for precision in sorted(shared):
                    row = np.zeros(n)
                    row[self.index[(first, precision)]] = 1
                    row[self.index[(other, precision)]] = -1
                    rows.append(row)
                    lower.append(0)
                    upper.append(0)
        self.structure = LinearConstraint(np.array(rows), lower, upper)

    def cost(self, quantity: str) -> np.ndarray:
        return np.array([float(getattr(option, quantity)) for _, option in self.options])

    def solve(self, objective: str, budgets: Mapping[str, float]):
        constraints = [self.structure]
        for quantity, limit in budgets.items():
            constraints.append(LinearConstraint(self.cost(quantity)[None], -np.inf, limit))
        upper = np.where(self.forbidden, 0.0, 1.0)
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
) -> Plan:
    """The precisions that minimize ``minimize`` (``"latency_ms"``, ``"error"`` or
    ``"bytes"``) within the budgets given; see the module docstring."""
    if minimize not in QUANTITIES:
        raise QCompilerError(f"minimize must be one of {QUANTITIES}, got {minimize!r}")
    program = _Program(table, ties)
    budgets = {
        quantity: float(limit)
        for quantity, limit in zip(QUANTITIES, (max_latency_ms, max_error, max_bytes))
        if limit is not None
    }
    for quantity, limit in budgets.items():
        if not math.isfinite(limit):
            raise QCompilerError(f"the {quantity} budget must be a finite number, got {limit}")
    result = program.solve(minimize, budgets)
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

"""What each Relax op means to the quantizer, and where a float graph gets quantized.

Ops fall into four roles:

* **heads** compute something new and get an integer lowering of their own (conv2d, matmul,
  add, multiply, concat, mean, elementwise functions as lookup tables, ...);
* **epilogues** fold into the head before them: a constant bias after conv2d/matmul, and clamps
  (ReLU, ReLU6, clip), which become the saturation bounds of the requantization;
* **pass-through** ops move integers without changing their meaning (reshape, transpose,
  max-pool, slicing): their output shares the input's scale and zero point;
* everything else stays float, between a dequantize and a quantize.

:func:`plan_quantization` finds the *quantization points*: the tensors that get an observer during
calibration and a quantize/dequantize pair during annotation. A head and its epilogues form a
chain; only the chain's last tensor is a point, so the bias and the clamp are applied to the int32
accumulator before it is rounded to 8 bits, as on real integer hardware.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from tvm import relax
from tvm.ir import Op
from tvm.ir.expr import Constant, GenericConst

CONV_OPS = {"relax.nn.conv2d"}
TRANSPOSED_CONV_OPS = {"relax.nn.conv2d_transpose"}
# Layouts ConvertLayout asks for (channels innermost, for the int8 dot-product instructions).
# The transposed conv stays NCHW: it would otherwise follow its input to NHWC, where TVM 0.27
# cannot legalize it.
CHANNELS_LAST = {"relax.nn.conv2d": ["NHWC", "OHWI"], "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}
MATMUL_OPS = {"relax.matmul"}
# Ops with constant weights lowered to int8 x int8 -> int32 accumulators. Weight precisions are
# chosen among CONV_OPS | MATMUL_OPS only.
LAYER_OPS = CONV_OPS | TRANSPOSED_CONV_OPS | MATMUL_OPS
BINARY_OPS = {"relax.add", "relax.subtract", "relax.multiply"}
CLAMP_OPS = {"relax.nn.relu", "relax.nn.relu6", "relax.clip", "relax.maximum", "relax.minimum"}
REDUCE_OPS = {"relax.mean", "relax.nn.avg_pool2d"}
PASS_THROUGH_OPS = {
    "relax.reshape",
    "relax.permute_dims",
    "relax.flatten",
    "relax.squeeze",
    "relax.expand_dims",
    "relax.nn.max_pool2d",
    "relax.strided_slice",
}

# Ops that only move values: what flows through them to the outputs leaves the integers as is.
EXIT_MOVES = PASS_THROUGH_OPS | {"relax.concat"}


# Function attribute {conv/matmul var: the layer's name in the imported float model}: passes that
# re-emit bindings rename them (names are made unique), so each records where its layers came
# from; the manifest's layer table and ``QuantConfig.int4_weights`` use the imported names.
LAYER_NAMES_ATTR = "qc.layer_names"


def layer_name(func: relax.Function, var_name: str) -> str:
    """The imported model's name of the conv/matmul ``var_name`` of ``func``."""
    names = (func.attrs or {}).get(LAYER_NAMES_ATTR, {})
    return str(names[var_name]) if var_name in names else var_name


def moves_codes(call) -> bool:
    """Does ``call`` only move (select, reorder, repeat) the values of its first operand?
    Then it commutes with dequantization and runs on the codes: the ops of
    :data:`PASS_THROUGH_OPS`, and nearest-neighbour resizing (YOLO's upsampling)."""
    name = op_name(call)
    if name in PASS_THROUGH_OPS:
        return True
    return name == "relax.image.resize2d" and str(call.attrs.method) == "nearest_neighbor"


def is_exit_move(call) -> bool:
    """An op of :data:`EXIT_MOVES` or a nearest-neighbour resize."""
    return op_name(call) in EXIT_MOVES or moves_codes(call)


# Elementwise functions computed as a lookup table over the input codes. Binary ops count when
# every operand but one is a scalar constant.
UNARY_FUNCS = {
    "relax.sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "relax.tanh": np.tanh,
    "relax.exp": np.exp,
    "relax.sqrt": lambda x: np.sqrt(np.maximum(x, 0.0)),
    "relax.abs": np.abs,
    "relax.negative": np.negative,
    "relax.nn.relu": lambda x: np.maximum(x, 0.0),
    "relax.nn.relu6": lambda x: np.clip(x, 0.0, 6.0),
    "relax.nn.silu": lambda x: x / (1.0 + np.exp(-x)),
    "relax.nn.gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
}
SCALAR_FUNCS = {
    "relax.add": np.add,
    "relax.subtract": np.subtract,
    "relax.multiply": np.multiply,
    "relax.divide": np.divide,
    "relax.maximum": np.maximum,
    "relax.minimum": np.minimum,
    "relax.power": np.power,
}


def op_name(expr) -> str | None:
    """``"relax.nn.conv2d"`` for a call to a Relax operator, None for anything else."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, Op):
        return expr.op.name
    return None


def const_value(expr) -> np.ndarray | None:
    """The numpy value of a Relax constant, else None."""
    if isinstance(expr, GenericConst):
        return expr.value.numpy()
    return None


def is_scalar_const(expr) -> bool:
    value = const_value(expr)
    if value is not None:
        return value.size == 1
    return isinstance(expr, Constant)  # a scalar PrimValue (IntImm / FloatImm)


def scalar_of(expr) -> float:
    if not isinstance(expr, GenericConst):
        return float(expr.value)
    return float(const_value(expr).reshape(()))


def clamp_interval(call) -> tuple[float, float] | None:
    """The real interval a clamp op restricts its first operand to, or None if it is not one."""
    name = op_name(call)
    if name == "relax.nn.relu":
        return 0.0, math.inf
    if name == "relax.nn.relu6":
        return 0.0, 6.0
    if name == "relax.clip":
        return scalar_of(call.args[1]), scalar_of(call.args[2])
    if name in ("relax.maximum", "relax.minimum") and is_scalar_const(call.args[1]):
        bound = scalar_of(call.args[1])
        return (bound, math.inf) if name == "relax.maximum" else (-math.inf, bound)
    return None


def elementwise_func(call):
    """A numpy function of the one non-constant operand, if ``call`` is elementwise with
    scalar-constant other operands; else None."""
    name = op_name(call)
    if name in UNARY_FUNCS:
        return UNARY_FUNCS[name]
    if name == "relax.clip":
        lo, hi = clamp_interval(call)
        return lambda x: np.clip(x, lo, hi)
    if name in SCALAR_FUNCS and len(call.args) == 2:
        lhs, rhs = call.args
        func = SCALAR_FUNCS[name]
        if is_scalar_const(rhs) and not is_scalar_const(lhs):
            c = scalar_of(rhs)
            return lambda x: func(x, c)
        if is_scalar_const(lhs) and not is_scalar_const(rhs):
            c = scalar_of(lhs)
            return lambda x: func(c, x)
    return None


@dataclass
class Region:
    """``end = func(source)`` through elementwise ops only; ``inner`` are the vars between."""

    source: object
    func: object
    inner: list


def elementwise_region(var, flow: Dataflow, is_source, depth: int = 24) -> Region | None:
    """``var`` as one elementwise function of a single tensor, if it is one and at least one
    step combines two tensors: e.g. hard-swish as imported, ``x * clip(x + 3, 0, 6) / 6``, or
    ``x * sigmoid(x)``. Such a value is one lookup table over the source's codes instead of a
    rounding after every step. The walk goes back through producers until ``is_source(v)``.
    """

    def walk(v, budget):
        if is_source(v):
            return v, (lambda x: x), [], False
        call = flow.producer.get(v)
        if call is None or budget == 0 or not isinstance(call, relax.Call):
            return None
        func = elementwise_func(call)
        if func is not None:
            (operand,) = activation_operands(call) or [None]
            inner = walk(operand, budget - 1) if operand is not None else None
            if inner is None:
                return None
            src, g, seen, mixed = inner
            return src, (lambda x: func(g(x))), [*seen, v], mixed
        name = op_name(call)
        if (
            name not in SCALAR_FUNCS
            or len(call.args) != 2
            or not all(_same_shape(a, v) for a in call.args)
        ):
            return None
        parts = [walk(a, budget - 1) for a in call.args]
        if any(p is None for p in parts) or not parts[0][0].same_as(parts[1][0]):
            return None
        (src, fa, seen_a, _), (_, fb, seen_b, _) = parts
        op = SCALAR_FUNCS[name]
        return src, (lambda x: op(fa(x), fb(x))), [*seen_a, *seen_b, v], True

    found = walk(var, depth)
    if found is None or not found[3]:
        return None
    src, func, seen, _ = found
    inner = [u for u in dict.fromkeys(seen) if not u.same_as(var)]
    return Region(src, func, inner)


def constant_operands_only(call) -> bool:
    """Elementwise in one tensor, every other operand a constant (a bias add counts)."""
    if elementwise_func(call) is not None:
        return True
    return (
        op_name(call) in SCALAR_FUNCS
        and len(activation_operands(call)) == 1
        and all(isinstance(a, relax.Var | GenericConst) for a in call.args)
    )


def _same_shape(a, b) -> bool:
    ta, tb = a.ty, b.ty
    if not isinstance(ta, relax.TensorType) or ta.shape is None or tb.shape is None:
        return False
    try:
        return [int(d) for d in ta.shape] == [int(d) for d in tb.shape]
    except TypeError:  # symbolic dims
        return False


def _composable(call, var) -> bool:
    if not isinstance(call, relax.Call):
        return False
    if elementwise_func(call) is not None:
        return True
    return (
        op_name(call) in SCALAR_FUNCS
        and len(call.args) == 2
        and all(isinstance(a, relax.Var) and _same_shape(a, var) for a in call.args)
    )


def region_inner_vars(func: relax.Function, flow: Dataflow) -> set:
    """Vars computed inside an :func:`elementwise_region` and used only there: they are not
    quantized, the region's end is (one lookup table)."""

    def is_source(v):
        return not _composable(flow.producer.get(v), v)

    inner = set()
    for binding in bindings(func):
        region = elementwise_region(binding.var, flow, is_source)
        if region is None:
            continue
        members = {*region.inner, binding.var}
        for u in region.inner:
            users = flow.consumers.get(u, [])
            if u not in flow.outputs and all(c in members for c in users):
                inner.add(u)
    return inner


def activation_operands(call) -> list:
    """The operands of a call that carry data (tensors that are not constants)."""
    args = call.args
    if op_name(call) == "relax.concat":
        args = args[0].fields
    return [a for a in args if isinstance(a, relax.Var)]


def is_head(call) -> bool:
    """Can ``call`` be lowered to integers as the first op of a chain?"""
    name = op_name(call)
    if name in LAYER_OPS or name in REDUCE_OPS or name == "relax.concat":
        return True
    if elementwise_func(call) is not None:
        return True
    return name in BINARY_OPS


def bindings(func: relax.Function):
    """The var bindings of a function body, in program order."""
    for block in func.body.blocks:
        yield from block.bindings


@dataclass
class Dataflow:
    """Producers and consumers of every var in one function."""

    producer: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=lambda: defaultdict(list))
    outputs: set = field(default_factory=set)

    @classmethod
    def of(cls, func: relax.Function) -> Dataflow:
        flow = cls()
        for binding in bindings(func):
            flow.producer[binding.var] = binding.value
            for var in relax.analysis.free_vars(binding.value):
                flow.consumers[var].append(binding.var)
        flow.outputs = set(relax.analysis.free_vars(func.body.body))
        return flow

    def exits(self) -> set:
        """Vars whose value reaches the function's outputs only through data movement
        (:data:`EXIT_MOVES`): quantizing them would only cost precision, as nothing integer
        consumes them. A detector's boxes and scores concatenated into one output are the
        typical case: one scale for both would leave the scores a handful of steps."""
        return self._to_outputs_through(is_exit_move)

    def tail(self) -> set:
        """Like :meth:`exits`, also through elementwise ops with constant operands (a bias
        add, a sigmoid): what a float op computes there can stay float to the outputs."""
        return self._to_outputs_through(
            lambda call: is_exit_move(call) or constant_operands_only(call)
        )

    def _to_outputs_through(self, allowed) -> set:
        found = set()
        for var in reversed(list(self.producer)):
            users = self.consumers.get(var, [])
            if (var in self.outputs or users) and all(
                u in found and allowed(self.producer[u]) for u in users
            ):
                found.add(var)
        return found

    def reaches_integers(self) -> set:
        """Float vars whose value flows (through float ops) into an integer tensor: a
        quantize, or a cast back to integers (a requantization computed in float)."""
        found = set()
        for var in reversed(list(self.producer)):
            if _is_float_tensor(var) and any(
                _is_integer_tensor(u) or u in found for u in self.consumers.get(var, [])
            ):
                found.add(var)
        return found

    def sole_consumer(self, var):
        """The one binding that uses ``var``, if it is used exactly once and is not an output."""
        users = self.consumers.get(var, [])
        if len(users) == 1 and var not in self.outputs:
            return users[0]
        return None


@dataclass
class QuantPlan:
    """Where a float function is quantized.

    Attributes
    ----------
    points : list[relax.Var]
        Tensors to observe and quantize, in program order (function parameters first).
    chains : dict[relax.Var, list[relax.Var]]
        For each point ending a chain, the vars of the chain from head to end.
    biases : set[relax.Var]
        The bias additions folded into a conv2d/matmul chain (their constant stays float until
        integerize turns it into an int32 bias).
    """

    points: list
    chains: dict
    biases: set = field(default_factory=set)


def _chain_from(head, flow: Dataflow, biases: set) -> list:
    chain = [head]
    if op_name(flow.producer[head]) in LAYER_OPS:
        nxt = flow.sole_consumer(head)
        if nxt is not None and _is_bias_add(flow.producer[nxt], head):
            chain.append(nxt)
            biases.add(nxt)
    while True:
        nxt = flow.sole_consumer(chain[-1])
        if nxt is None or clamp_interval(flow.producer[nxt]) is None:
            return chain
        if not flow.producer[nxt].args[0].same_as(chain[-1]):
            return chain
        chain.append(nxt)


def _is_bias_add(call, var) -> bool:
    name = op_name(call)
    return (
        name in ("relax.add", "relax.subtract")
        and call.args[0].same_as(var)
        and isinstance(call.args[1], GenericConst)
    )


def biased_layers(func: relax.Function, plan: QuantPlan) -> dict:
    """``{layer: its bias add}`` (binding vars) of the conv2d/matmul layers of ``func`` with
    constant weights whose bias add (one of ``plan.biases``) holds one constant per output
    channel: those whose bias can take the mean error of their rounded weights."""
    producers = {b.var: b.value for b in bindings(func)}
    layers = {}
    for var in plan.biases:
        add = producers.get(var)
        layer = add.args[0]
        producer, bias = producers.get(layer), const_value(add.args[1])
        if op_name(producer) not in CONV_OPS | MATMUL_OPS or bias is None:
            continue
        weight = const_value(producer.args[1])
        if weight is None:
            continue
        if op_name(producer) in MATMUL_OPS:
            channels = weight.shape[-1]
        else:
            channels = weight.shape[str(producer.attrs.kernel_layout).index("O")]
        if bias.size == channels:
            layers[layer] = var
    return layers


def plan_quantization(func: relax.Function) -> QuantPlan:
    """Choose the quantization points of a float function (see the module docstring)."""
    flow = Dataflow.of(func)
    quantized_inputs = set()  # vars whose value an integer op may consume

    def feeds_integer_ops(var) -> bool:
        return any(
            is_head(flow.producer[user]) or moves_codes(flow.producer[user])
            for user in flow.consumers.get(var, [])
        )

    exits = flow.exits()
    tail = flow.tail()
    inner = region_inner_vars(func, flow)
    points = [p for p in func.params if _is_float_tensor(p) and feeds_integer_ops(p)]
    quantized_inputs.update(points)
    chains = {}
    biases = set()
    absorbed = set()
    for binding in bindings(func):
        var, value = binding.var, binding.value
        if var in absorbed or var in inner or not _is_float_tensor(var):
            continue
        name = op_name(value)
        if (
            var in tail
            and isinstance(value, relax.Call)
            and (
                not is_head(value)
                or not any(a in quantized_inputs for a in activation_operands(value))
            )
        ):
            continue  # a float op (no integer lowering) or its float result, on the way out
        if moves_codes(value) and value.args[0] in quantized_inputs:
            quantized_inputs.add(var)
            continue
        if value is not None and is_head(value):
            chain = _chain_from(var, flow, biases)
            absorbed.update(chain)
            chains[chain[-1]] = chain
            if name in LAYER_OPS and not feeds_integer_ops(chain[-1]):
                continue  # an exit: the int32 accumulator is dequantized directly
            if chain[-1] in exits:
                continue  # computed from integers, kept in float to the output (see exits)
            points.append(chain[-1])
            quantized_inputs.add(chain[-1])
        elif feeds_integer_ops(var) and var not in exits:
            points.append(var)
            quantized_inputs.add(var)
    return QuantPlan(points=points, chains=chains, biases=biases)


def _is_float_tensor(var) -> bool:
    ty = var.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype).startswith("float")


def _is_integer_tensor(var) -> bool:
    ty = var.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype).startswith(("int", "uint"))

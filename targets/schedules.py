"""Default CPU schedules: every kernel parallel and vectorized before any tuning.

TVM's default CPU pipeline schedules nothing: each fused function runs as the naive loop nest its
operators legalized to, about 30x slower than onnxruntime. Meta-schedule fixes that, but only
after minutes of measured trials per kernel. These schedules are written by hand from the shape of
the fused function, without search, so that an untuned build is already usable:

``packed conv2d / dense`` (``targets.kernels``)
    output channels tiled by the instruction's lanes (16 for VNNI, 4 for Arm's sdot) and input
    channels by 4 onto its intrinsic, a few pixels and channel groups per register tile (sized
    from the layer's shape), the requantize epilogue computed per tile while the accumulators
    are hot, parallel over output rows and channel blocks.
``float conv2d / dense`` (packed float weights, ``targets.kernels``)
    the same register tiles as the packed int8 ones, the instruction a fused multiply-add
    over the tile's vector lanes of output channels.
``any other reduction`` (depthwise, pooling, means, matmuls and convs without the intrinsic)
    the innermost spatial axis (channels, in NHWC) split into vector lanes and moved inside the
    reduction loops, everything above it fused into one parallel loop, epilogue at that loop.
``injective`` (requantize of residual adds, layout transforms, pads)
    all loops fused, vector lanes inside, parallel outside.

Producers that can be inlined are inlined first. A function none of these fit is left as it is
(correct, slow) and named in a debug log line.
"""

from __future__ import annotations

import contextlib
import logging

import tvm
from tvm import s_tir, tirx
from tvm.ir.expr import Expr
from tvm.ir.prim import expr as P
from tvm.s_tir.schedule import ScheduleError

from qcompiler.targets.kernels import (
    CONV_BLOCK,
    DENSE_BLOCK,
    DEPTHWISE_BLOCK,
    FLOAT_CONV_BLOCK,
    FLOAT_DENSE_BLOCK,
    LANES,
    NEON,
    SDOT,
    VNNI,
    DotProduct,
    dot_product,
    float_lanes,
    tile_lanes,
)

log = logging.getLogger(__name__)

# What TVM 0.27 marks a scheduled PrimFunc with (MetaScheduleApplyDatabase sets it for the
# functions a tuning record scheduled); the older spelling is honoured as well.
SCHEDULED_ATTR = "tirx.is_scheduled"
_SCHEDULED_ATTRS = (SCHEDULED_ATTR, "tir.is_scheduled")
_VECTOR_BYTES = 64  # one AVX-512 register; on narrower machines LLVM splits the vector
_DATA_PAR, _REDUCE = 0, 2  # IterVar kinds
_MAX_ACCUMULATORS, _MAX_PIXELS = 16, 14  # register tile of the packed conv (_register_tile)
_MAX_ACCUMULATORS_SDOT = 24
_TILE_WEIGHT_BYTES = 40 * 1024
# Instructions per 4-bit weight vector (a load, the nibbles' two transforms, the halves'
# insert; x86 with GFNI as LLVM emits it) against one per broadcast activation word.
_INT4_WEIGHT_COST = 4.0


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def _extent(sch, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _is_reduction(sch, block) -> bool:
    return any(int(iv.iter_type) == _REDUCE for iv in sch.get(block).iter_vars)


def _lanes(sch, block) -> int:
    """Vector lanes for the block's output dtype."""
    buffer = sch.get(block).writes[0].source
    return max(4, _VECTOR_BYTES // max(1, tvm.DataType(buffer.dtype).bits // 8))


def _inline_producers(sch, anchor) -> None:
    """Inline every injective block except the anchor, the outputs and the pads before it."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).same_as(sch.get(anchor)):
            continue
        with contextlib.suppress(ScheduleError, RuntimeError):
            sch.compute_inline(block)


def _epilogue(sch, anchor):
    """The consumer chain after ``anchor``, inlined into its last block (returned, or None)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    index = names.index(sch.get(anchor).name_hint)
    after = blocks[index + 1 :]
    if not after:
        return None
    for block in after[:-1]:
        try:
            sch.compute_inline(block)
        except (ScheduleError, RuntimeError):
            try:
                sch.reverse_compute_inline(block)
            except (ScheduleError, RuntimeError):
                return None
    return after[-1]


def _vectorize_tail(sch, block, lanes: int) -> None:
    """Vectorize the innermost loop of ``block`` (split to ``lanes`` when it is longer)."""
    loop = sch.get_loops(block)[-1]
    extent = _extent(sch, loop)
    if extent is None or extent < 2:
        return
    if extent > lanes:
        _, loop = sch.split(loop, [None, _largest_divisor(extent, lanes)])
    sch.vectorize(loop)


def _shape(sch, block) -> list:
    return [int(d) for d in sch.get(block).writes[0].source.shape]


def _attach_epilogue(sch, anchor, loop, lanes: int) -> None:
    last = _epilogue(sch, anchor)
    if last is None:
        return
    if _shape(sch, last) != _shape(sch, anchor):
        # A consumer of another shape (the next layer's padding, fused in) has elements no
        # tile of the anchor produces (the border): moved under the anchor's loop, they would
        # never be written. It runs on its own, after the anchor.
        _schedule_injective(sch, last)
        return
    sch.reverse_compute_at(last, loop)
    _vectorize_tail(sch, last, lanes)


def _dot_product_of(sch, block) -> tuple[DotProduct, str]:
    """The instruction a packed conv/dense block was built for, from its weights' tiles, and
    the intrinsic to tensorize with: int8 tiles ``[..., L, 4]``, or 4-bit ones ``[..., L/2, 4]``
    (uint8) that the intrinsic unpacks."""
    buffers = [region.source for region in sch.get(block).reads]
    for rank in (6, 4):  # conv weights [O/L, KH, KW, I/4, L, 4]; dense [N/L, K/4, L, 4]
        for buffer in buffers:
            dtype = str(buffer.dtype)
            if dtype not in ("int8", "uint8") or len(buffer.shape) != rank:
                continue
            int4 = dtype == "uint8"
            if tile_lanes(buffer) == VNNI.lanes:
                dot = VNNI
            else:
                # 4 lanes: sdot or plain NEON, as the target says (NEON runs on every AArch64)
                target = tvm.target.Target.current(allow_none=True)
                dot = (dot_product(target) if target is not None else None) or NEON
            return dot, dot.intrin_int4 if int4 else dot.intrin
    raise ValueError("no packed weights among the block's operands")


def _register_tile(
    width: int,
    blocks: int,
    reduce_bytes: int,
    lanes: int = LANES,
    most: int = _MAX_ACCUMULATORS,
    weight_cost: float = 1.0,
) -> tuple[int, int]:
    """Pixels x 16-channel groups of one register tile of the packed conv.

    Per reduction step the tile broadcasts one activation word per pixel and loads one weight
    vector per group, then issues ``pixels * groups`` dot products: the fewer loads per dot
    product the better, a weight vector counting ``weight_cost`` broadcasts. 4-bit weights
    cost :data:`_INT4_WEIGHT_COST`: each vector is unpacked in registers once per step and
    shared by the tile's pixels, so their tiles favour pixels over groups (a 1x1 conv 480 ->
    80 on 14 x 14, 1 thread: 2 pixels x 5 groups, the int8 tile, took 71 us with 4-bit weights
    against 42 us with int8 ones; 14 x 1 took 47 us).

    Bounds, measured on EfficientNet-Lite0's 1x1 convs (AVX-512, 32 vector registers): at most
    16 accumulators (with the weight vectors and a broadcast they must stay in registers; 7 x 4
    spilled them to the stack every step and ran at half the speed of 7 x 2); at most 14
    pixels; and the tile's weights (``groups x 16 x K`` bytes) within about an L1 data cache,
    else a wide tile streams them from L2 once per pixel block.

    ``most`` accumulators: 16 here; Arm's 4-lane ``sdot`` tiles may hold 24 (NEON also has 32
    vector registers; 8 x 12 outputs is the usual int8 GEMM tile there), plain NEON's 16 (its
    widening multiplies need temporaries): assumptions, not measured on a board.
    """

    def cost(pixels: int, groups: int) -> float:
        return (pixels + weight_cost * groups) / (pixels * groups)

    best = (1, 1)
    for pixels in range(1, min(width, _MAX_PIXELS) + 1):
        if width % pixels:
            continue
        for groups in range(1, blocks + 1):
            if blocks % groups or pixels * groups > most:
                continue
            if groups > 1 and groups * lanes * reduce_bytes > _TILE_WEIGHT_BYTES:
                continue
            if (cost(pixels, groups), -pixels) < (cost(*best), -best[0]):
                best = (pixels, groups)
    return best


def _conv_tiles(sch, block, lanes: int, pixels: int, groups: int, reduce_lanes: int, vector: int):
    """A packed conv's loops as register tiles of ``pixels`` x ``groups`` vectors of ``lanes``
    output channels (input channels split by ``reduce_lanes`` for a dot-product instruction),
    parallel over output rows and channel blocks, the epilogue per tile (in ``vector`` lanes)
    and the pads per output row. Returns the loops the caller finishes the tile with:
    ``(ry, wi, o2, oi)``."""
    n, h, w, o, ry, rx, rc = sch.get_loops(block)
    oo, o2, oi = sch.split(o, [None, groups, lanes])
    inner = []
    if reduce_lanes > 1:
        rc, rci = sch.split(rc, [None, reduce_lanes])
        inner = [rci]
    wo, wi = sch.split(w, [None, pixels])
    sch.reorder(n, h, oo, wo, ry, rx, rc, wi, o2, oi, *inner)
    outer = sch.fuse(n, h, oo)
    sch.parallel(outer)
    # The epilogue moves in while the block is still a whole reduction (before decomposing).
    _attach_epilogue(sch, block, wo, vector)
    for pad in sch.get_producers(block):
        sch.compute_at(pad, outer)
        _vectorize_tail(sch, pad, 64)
    return ry, wi, o2, oi


def _schedule_conv_packed(sch, block) -> None:
    dot, intrin = _dot_product_of(sch, block)
    _, _, w, o, ry, rx, rc = sch.get_loops(block)
    width, channels = _extent(sch, w), _extent(sch, o)
    reduce_bytes = _extent(sch, ry) * _extent(sch, rx) * _extent(sch, rc)
    most = _MAX_ACCUMULATORS_SDOT if dot is SDOT else _MAX_ACCUMULATORS
    int4 = intrin == dot.intrin_int4
    pixels, groups = _register_tile(
        width,
        channels // dot.lanes,
        reduce_bytes // 2 if int4 else reduce_bytes,
        dot.lanes,
        most,
        _INT4_WEIGHT_COST if int4 else 1.0,
    )
    ry, wi, o2, oi = _conv_tiles(sch, block, dot.lanes, pixels, groups, 4, LANES)
    init = sch.decompose_reduction(block, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(oi, intrin)
    sch.unroll(wi)
    sch.unroll(o2)


def _float_tile(sch, block) -> tuple[int, int]:
    """``(lanes, most)``: output channels per vector of a float kernel (its packed weights'
    last axis) and the register tile's accumulators at most, counted in those vectors (a
    vector wider than the target's registers takes several)."""
    packed = sch.get(block).reads[-1].source
    lanes = int(packed.shape[-1])
    target = tvm.target.Target.current(allow_none=True)
    native = float_lanes(target) if target is not None else lanes
    return lanes, max(1, _MAX_ACCUMULATORS // max(1, lanes // native))


def _with_epilogue(sch, block) -> None:
    """Give ``block`` a consumer to move under its tile: with none (its sums are the
    function's result), a copy-out, so that the sums stay in registers until the tile is done."""
    if _epilogue(sch, block) is None:
        sch.cache_write(block, 0, "global")


def _schedule_conv_float(sch, block) -> None:
    """The float conv as the packed int8 one (:func:`_schedule_conv_packed`), with fused
    multiply-adds in vector lanes for the dot-product instruction: per input channel and tap,
    each pixel's value broadcast and each channel group's weights one vector load."""
    lanes, most = _float_tile(sch, block)
    _, _, w, o, ry, rx, rc = sch.get_loops(block)
    width, channels = _extent(sch, w), _extent(sch, o)
    reduce_bytes = 4 * _extent(sch, ry) * _extent(sch, rx) * _extent(sch, rc)
    pixels, groups = _register_tile(width, channels // lanes, reduce_bytes, lanes, most)
    _with_epilogue(sch, block)
    ry, wi, o2, oi = _conv_tiles(sch, block, lanes, pixels, groups, 1, lanes)
    sch.vectorize(oi)
    init = sch.decompose_reduction(block, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(wi)
    sch.unroll(o2)


def _schedule_dense_float(sch, block) -> None:
    lanes, most = _float_tile(sch, block)
    i, j, rk = sch.get_loops(block)
    groups = _largest_divisor(_extent(sch, j) // lanes, min(4, most))
    jo, j2, ji = sch.split(j, [None, groups, lanes])
    sch.reorder(i, jo, rk, j2, ji)
    outer = sch.fuse(i, jo)
    sch.parallel(outer)
    _with_epilogue(sch, block)
    _attach_epilogue(sch, block, outer, lanes)
    sch.vectorize(ji)
    init = sch.decompose_reduction(block, rk)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(j2)


def _schedule_dense_packed(sch, block) -> None:
    dot, intrin = _dot_product_of(sch, block)
    i, j, rk = sch.get_loops(block)
    groups = _largest_divisor(_extent(sch, j) // dot.lanes, 4)
    jo, j2, ji = sch.split(j, [None, groups, dot.lanes])
    rko, rki = sch.split(rk, [None, 4])
    sch.reorder(i, jo, rko, j2, ji, rki)
    outer = sch.fuse(i, jo)
    sch.parallel(outer)
    _attach_epilogue(sch, block, outer, LANES)
    init = sch.decompose_reduction(block, rko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ji, intrin)
    sch.unroll(j2)


def _depthwise_tile(width: int, channels: int) -> tuple[int, int]:
    """Pixels x channels of one depthwise register tile: as many accumulator vectors as fit
    (16, with the pixels at most 14), fewer channels on a tie. Measured on EfficientNet-Lite0's
    depthwise layers, 14 x 16 and 7 x 32 ran 5-15% faster than the 8 x 16 used before."""
    if channels % LANES:
        return _largest_divisor(width, _MAX_PIXELS), _largest_divisor(channels, LANES)
    best, best_vectors = (1, LANES), 0
    for lanes in (LANES, 2 * LANES):
        if channels % lanes:
            continue
        pixels = _largest_divisor(width, min(_MAX_PIXELS, _MAX_ACCUMULATORS * LANES // lanes))
        if pixels * lanes // LANES > best_vectors:
            best, best_vectors = (pixels, lanes), pixels * lanes // LANES
    return best


def _schedule_depthwise(sch, block) -> None:
    """Register tile of pixels x channels (:func:`_depthwise_tile`), all taps unrolled, padding
    done up front."""
    pads = sch.get_producers(block)
    b, y, x, k, ry, rx = sch.get_loops(block)
    pixels, lanes = _depthwise_tile(_extent(sch, x), _extent(sch, k))
    ko, ki = sch.split(k, [None, lanes])
    xo, xi = sch.split(x, [None, pixels])
    sch.reorder(b, y, xo, ko, ry, rx, xi, ki)
    outer = sch.fuse(b, y)
    sch.parallel(outer)
    _attach_epilogue(sch, block, ko, lanes)
    sch.vectorize(ki)
    init = sch.decompose_reduction(block, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    for loop in (ry, rx, xi):
        sch.unroll(loop)
    for pad in pads:
        _schedule_injective(sch, pad)


def _schedule_reduction(sch, block) -> None:
    """Innermost spatial axis as vector lanes inside the reduction loops, the rest parallel."""
    loops = sch.get_loops(block)
    kinds = [int(iv.iter_type) for iv in sch.get(block).iter_vars]
    if len(loops) != len(kinds):
        raise ValueError("loops and block iterators do not correspond one to one")
    spatial = [lp for lp, k in zip(loops, kinds) if k == _DATA_PAR]
    reduce = [lp for lp, k in zip(loops, kinds) if k == _REDUCE]
    if not spatial:
        raise ValueError("a reduction to a scalar")
    lanes = _lanes(sch, block)
    inner = spatial[-1]
    extent = _extent(sch, inner) or 1
    vector = _largest_divisor(extent, lanes) if extent >= 4 else 1
    if vector > 1:
        outer_c, inner = sch.split(inner, [None, vector])
        sch.reorder(*spatial[:-1], outer_c, *reduce, inner)
        parallel = sch.fuse(*spatial[:-1], outer_c)
    else:
        sch.reorder(*spatial, *reduce)
        parallel = sch.fuse(*spatial)
    sch.parallel(parallel)
    _attach_epilogue(sch, block, parallel, lanes)
    if vector > 1:
        sch.vectorize(inner)
    if reduce:
        init = sch.decompose_reduction(block, reduce[0])
        _vectorize_tail(sch, init, lanes)


def _comparisons(expr, out: list) -> list:
    """Every comparison inside the TIR expression ``expr``."""
    if isinstance(expr, (P.LT, P.LE, P.GT, P.GE)):
        out.append(expr)
    for attr in ("a", "b", "value", "condition", "true_value", "false_value"):
        child = getattr(expr, attr, None)
        if isinstance(child, Expr):
            _comparisons(child, out)
    for attr in ("args", "indices"):
        for child in getattr(expr, attr, None) or ():
            if isinstance(child, Expr):
                _comparisons(child, out)
    return out


def _bounds(sch, block) -> dict[int, list[int]]:
    """Per loop of a not yet scheduled block, the inner points where one of its comparisons of
    that loop's index with a constant (a pad's ``1 <= y < 57``) changes value."""
    realized = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) != len(realized.iter_vars) or not isinstance(realized.body, tirx.BufferStore):
        return {}
    axis_of = {iv.var: i for i, iv in enumerate(realized.iter_vars)}
    points: dict[int, set[int]] = {}
    for cmp in _comparisons(realized.body.value, []):
        if isinstance(cmp.a, tirx.Var) and isinstance(cmp.b, tirx.IntImm) and cmp.a in axis_of:
            var, value, at_value = cmp.a, int(cmp.b), isinstance(cmp, (P.LT, P.GE))
        elif isinstance(cmp.b, tirx.Var) and isinstance(cmp.a, tirx.IntImm) and cmp.b in axis_of:
            var, value, at_value = cmp.b, int(cmp.a), isinstance(cmp, (P.LE, P.GT))
        else:
            continue
        point = value if at_value else value + 1  # first index on the other side
        extent = _extent(sch, loops[axis_of[var]]) or 0
        if 0 < point < extent:
            points.setdefault(axis_of[var], set()).add(point)
    return {axis: sorted(p) for axis, p in points.items()}


def _partition_at_bounds(sch, block) -> bool:
    """Split the outermost loop (not the innermost) whose index a bounds test reads (a pad's
    rows) at the points where the test flips, make the loops above it -- or else each piece --
    parallel, and leave the rest to LLVM (True); or do nothing (False).

    Within each piece that test is constant and simplifies away; what remains (the columns'
    test, say) LLVM's own vectorizer handles better than TVM's: the input layer of
    EfficientNet-Lite0 (quantize, NCHW -> NHWC, pad 3 -> 4 channels and one pixel) ran in
    113 us with the vectorized schedule below and 9 us split at its last row.
    """
    loops = sch.get_loops(block)
    bounds = {axis: p for axis, p in _bounds(sch, block).items() if axis < len(loops) - 1}
    if not bounds:  # a test of the innermost index alone (a channel pad) is cheap as it is
        return False
    axis = min(bounds)
    points = bounds[axis]
    sizes = [points[0]] + [b - a for a, b in zip(points, points[1:])]
    above = [loop for loop in loops[:axis] if (_extent(sch, loop) or 2) > 1]
    pieces = sch.loop_partition(loops[axis], [*sizes, None])
    # One parallel loop, outermost: a parallel loop inside a serial one would start the
    # thread pool once per outer iteration.
    if above:
        sch.parallel(sch.fuse(*above) if len(above) > 1 else above[0])
    else:
        for piece in pieces:
            sch.parallel(piece)
    return True


def _schedule_injective(sch, block) -> None:
    """Vector lanes along the innermost axis (unit stride in the output), the rest parallel.

    Fusing every loop first would vectorize across rows too, and the div/mod that recovers the
    row in each lane (a pad's bounds test, say) costs more than the vector saves. Blocks with
    such bounds tests are split at them instead (:func:`_partition_at_bounds`).
    """
    loops = sch.get_loops(block)
    if not loops:  # a scalar: nothing to spread
        return
    if _partition_at_bounds(sch, block):
        return
    lanes = _lanes(sch, block)
    inner = loops[-1]
    extent = _extent(sch, inner) or 1
    vector = _largest_divisor(extent, lanes)
    outer = list(loops[:-1])
    if vector > 1 and vector < extent:
        rest, inner = sch.split(inner, [None, vector])
        outer.append(rest)
    if vector > 1:
        sch.vectorize(inner)
    elif extent > 1:
        outer.append(inner)
    if outer:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if (_extent(sch, fused) or 2) > 1:
            sch.parallel(fused)


def schedule_in_place(sch: s_tir.Schedule) -> None:
    """Apply the default schedule to the ``main`` of ``sch`` (see the module docstring)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    named = {sch.get(b).name_hint: b for b in blocks}
    rules = (
        (CONV_BLOCK, _schedule_conv_packed),
        (DENSE_BLOCK, _schedule_dense_packed),
        (DEPTHWISE_BLOCK, _schedule_depthwise),
        (FLOAT_CONV_BLOCK, _schedule_conv_float),
        (FLOAT_DENSE_BLOCK, _schedule_dense_float),
    )
    for name, rule in rules:
        if name in named:
            rule(sch, named[name])
            return
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if reductions:
        _inline_producers(sch, reductions[0])
        for block in reductions:
            _schedule_reduction(sch, block)
        return
    _inline_producers(sch, blocks[-1])
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        _schedule_injective(sch, block)


def schedule_function(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its default schedule."""
    sch = s_tir.Schedule(func)
    schedule_in_place(sch)
    return sch.mod["main"]


def is_scheduled(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` already has a schedule (a tuning record's, or ours)."""
    attrs = func.attrs or {}
    return any(bool(attrs.get(name, False)) for name in _SCHEDULED_ATTRS)


@tvm.transform.module_pass(opt_level=0, name="QCDefaultSchedules")
def default_schedules(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Schedule every PrimFunc that has no schedule yet (from a tuning database, say)."""
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        try:
            scheduled = schedule_function(func)
        except (RuntimeError, ValueError, IndexError) as err:
            log.debug("no default schedule for %s: %s", gvar.name_hint, err)
            continue
        out[gvar] = scheduled.with_attr(SCHEDULED_ATTR, True)
    return out

"""CPU kernels: int8 dot products and float32 FMAs on packed weights, and the rewrite to them.

Relax's own ``conv2d``/``matmul`` legalize to plain loops over the original weight layout, which
no schedule can turn into the CPU's int8 dot-product instructions: x86's ``vpdpbusd`` (AVX-512
VNNI) multiplies 4 unsigned activation bytes by 4 signed weight bytes for each of 16 output
channels and adds the 16 sums into int32 lanes in one instruction, so it needs the 4 input
channels of a pixel next to each other (NHWC, see ``passes.pipeline.prepare``) and the weights
as contiguous ``16 x 4`` tiles. This module

* registers that instruction as a TIR tensor intrinsic (:data:`VNNI_INTRIN`; TVM's own
  ``dot_16x4_vnni`` passes ``<16 x i32>`` operands that LLVM 22 rejects for this intrinsic),
  and likewise Arm's ``sdot`` (Armv8.2 dot product: Raspberry Pi 5, Jetson hosts), which
  multiplies signed by signed bytes for 4 output channels (:data:`SDOT_INTRIN`), and for Arm
  CPUs without it (the Pi 4) the same 4 x 4 tile from NEON's widening multiplies
  (:data:`NEON_INTRIN`),
* defines the packed conv2d/dense computations (:func:`conv2d_nhwc_packed`, :func:`dense_packed`;
  weights ``[O/L, KH, KW, I/4, L, 4]`` and ``[N/L, K/4, L, 4]`` with ``L`` the instruction's
  lanes, 16 or 4, packed once at compile time),
* and for W4A8 layers stores the weights two per byte: a matrix-vector kernel (one row) reads
  4-bit tiles ``[..., L/2, 4]`` (uint8) and unpacks them in registers, each intrinsic having a
  variant that loads ``2 L`` bytes into the instruction's ``4 L``-byte weight operand
  (:func:`tile_weight`); the other kernels, whose pixel tiles would each unpack every weight
  vector again, get their int8 tiles from a small unpacking kernel before each call
  (:func:`store_int4_weights`; :data:`IN_REGISTER_MAX_PIXELS` has the measurements),
* defines float32 convs, depthwise convs and dense layers on weights packed alike
  (``[O/L, KH, KW, I, L]``, ``[N/L, K, L]`` with ``L`` the CPU's fp32 vector lanes or a
  divisor of the channels; depthwise ``[KH, KW, C]``; :func:`weight_tiling`), for float
  models and layers kept float. TVM's own legalized convs read a vector of output channels
  from OHWI weights ``KH*KW*I`` apart: EfficientNet-Lite0's float build took 62.8 ms on them
  against onnxruntime's 9.4 ms (1 thread), and 9.2 ms on these kernels,
* and rewrites the module's 8-bit and float convs and matmuls to them (:func:`use_int8_kernels`).
  Activations of the other signedness than the instruction wants are shifted by 128 (int8 ->
  uint8 for VNNI, uint8 -> int8 for sdot), and the ``128 * sum(w)`` this adds or removes is
  corrected per output channel. Channel counts that are not multiples of ``L`` (outputs) or 4
  (inputs) are padded with zero weights and sliced off again.

The computations are plain TE, so the same functions serve the default schedules
(``targets.schedules``) and meta-schedule's search.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

from qcompiler.passes import qmath
from qcompiler.passes.annotate import INT4_ATTR
from qcompiler.passes.graph import const_value, layer_name, op_name

VNNI_INTRIN = "qc_dot_16x4_vnni"
# Names of the packed compute blocks; the default schedules look for them.
CONV_BLOCK = "qc_conv2d_nhwc_packed"
DENSE_BLOCK = "qc_dense_packed"
DEPTHWISE_BLOCK = "qc_depthwise_nhwc"
FLOAT_CONV_BLOCK = "qc_conv2d_nhwc_float"
FLOAT_DENSE_BLOCK = "qc_dense_float"
LANES, GROUP = 16, 4  # int32 lanes per instruction, bytes reduced per lane
# A W4A8 kernel of at most this many output pixels (rows of a matmul) unpacks its weights in
# registers; one of more, by a kernel of its own before the call. In registers each pixel tile
# unpacks every weight vector again; a kernel unpacks each once per call, but writes the int8
# codes out for the dot products to read back. Measured on EfficientNet-Lite0 with all 50
# layers W4A8 (`python bench/int4_unpack.py`: 1 thread, each build timed 7-9 times interleaved
# with W8A8 in one process; three runs on 2026-12-06): every kernel in registers 1.070-1.078x
# W8A8's latency; none 1.017-1.064x; only the classifier's matmul (one row: its 1.3 MB of
# weights take 49 us to unpack on their own, and cost nothing extra in registers)
# 1.002-1.022x; every kernel of <= 49 pixels (the 7 x 7 convs too) 1.019-1.037x.
IN_REGISTER_MAX_PIXELS = 1


def int4_code(byte, high):
    """The signed 4-bit code in the low (``high`` = 0) or high (1) nibble of the uint8 ``byte``,
    as int8 (TE or TIR expressions: the kernels' computations and the intrinsics' descriptions
    build it alike, so that tensorization matches them)."""
    nibble = (byte >> (high * 4).astype("uint8")) & tirx.const(15, "uint8")
    eight = tirx.const(8, "uint8")
    return tirx.reinterpret("int8", (nibble ^ eight) - eight)


def tile_weight(packed, outer, lane, group):
    """Weight ``(lane, group)`` of the tile at index ``outer`` of ``packed`` weights.

    8-bit tiles are ``[..., L, 4]`` int8; 4-bit tiles ``[..., L/2, 4]`` uint8, whose byte
    ``(l, g)`` holds lane ``l``'s code in its low nibble and lane ``l + L/2``'s in its high one,
    so that one vector of ``2 L`` bytes unpacks into the two halves of the instruction's
    ``4 L``-byte weight operand (:func:`pack_int4_tiles`).
    """
    if str(packed.dtype) == "uint8":
        half = int(packed.shape[-2])
        return int4_code(packed[(*outer, lane % half, group)], lane // half)
    return packed[(*outer, lane, group)]


def _weight_operand(lanes: int, int4: bool) -> tuple[int, str]:
    """Rows and dtype of an intrinsic's ``(rows, 4)`` weight operand: one row per lane of int8
    codes, or half as many of 4-bit pairs (:func:`tile_weight`)."""
    return (lanes // 2, "uint8") if int4 else (lanes, "int8")


def _dot_desc(lanes: int, data_dtype: str, int4: bool = False):
    """What a dot-product instruction computes: ``lanes`` int32 sums, each of 4 products of
    one shared 4-byte activation word with that lane's 4 weights (bytes, or 4-bit codes)."""
    rows, weight_dtype = _weight_operand(lanes, int4)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), data_dtype, offset_factor=1)
        B = T.match_buffer(b, (rows, 4), weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:rows, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(
                            tile_weight(B, (), vi, vk), "int32"
                        )

    return desc


def _weight_vector(B, lanes: int, int4: bool):
    """The instruction's ``4 * lanes`` weight bytes: loaded whole, or unpacked in registers from
    ``2 * lanes`` bytes of 4-bit codes (the low nibbles are the first half, the high ones the
    second, :func:`tile_weight`)."""
    if not int4:
        return B.vload([0, 0], dtype=f"int8x{4 * lanes}")
    n = 2 * lanes
    packed = B.vload([0, 0], dtype=f"uint8x{n}")

    def splat(value):
        return tirx.Broadcast(tirx.const(value, "uint8"), n)

    low = ((packed & splat(15)) ^ splat(8)) - splat(8)
    high = ((packed >> splat(4)) ^ splat(8)) - splat(8)
    halves = [tirx.reinterpret(f"int8x{n}", half) for half in (low, high)]
    return tirx.Shuffle(halves, [tirx.const(i, "int32") for i in range(2 * n)])


def _dot_instruction(lanes: int, data_dtype: str, llvm_intrinsic: str, int4: bool = False):
    """The description as one LLVM intrinsic ``(acc, activations, weights) -> acc``: the
    activation word broadcast to every lane, the weight tile loaded whole (or unpacked)."""
    word, vector, out = f"{data_dtype}x4", f"{data_dtype}x{4 * lanes}", f"int32x{lanes}"
    rows, weight_dtype = _weight_operand(lanes, int4)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), data_dtype, offset_factor=1)
        B = T.match_buffer(b, (rows, 4), weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:rows, 0:4])
            T.writes(C[0:lanes])
            a_i32 = T.reinterpret(A.vload([0], word), dtype="int32")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrinsic),
                C.vload([0], dtype=out),
                T.reinterpret(T.broadcast(a_i32, lanes), dtype=vector),
                _weight_vector(B, lanes, int4),
                dtype=out,
            )

    return impl


_dot_16x4_desc = _dot_desc(16, "uint8")
_dot_4x4_desc = _dot_desc(4, "int8")

# vpdpbusd multiplies unsigned (its second operand) by signed bytes; sdot is signed x signed.
_dot_16x4_vnni = _dot_instruction(16, "uint8", "llvm.x86.avx512.vpdpbusd.512")
TensorIntrin.register(VNNI_INTRIN, _dot_16x4_desc, _dot_16x4_vnni, override=True)
TensorIntrin.register(
    VNNI_INTRIN + "_int4",
    _dot_desc(16, "uint8", int4=True),
    _dot_instruction(16, "uint8", "llvm.x86.avx512.vpdpbusd.512", int4=True),
    override=True,
)

SDOT_INTRIN = "qc_dot_4x4_sdot"
_SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
TensorIntrin.register(SDOT_INTRIN, _dot_4x4_desc, _dot_instruction(4, "int8", _SDOT), override=True)
TensorIntrin.register(
    SDOT_INTRIN + "_int4",
    _dot_desc(4, "int8", int4=True),
    _dot_instruction(4, "int8", _SDOT, int4=True),
    override=True,
)

NEON_INTRIN = "qc_dot_4x4_neon"


def _widening_dot(a, b):
    """NEON: the 8 products of two ``int8x8`` vectors widened into int16 (exact for int8 x
    int8), adjacent pairs summed into ``int32x4``."""
    product = tirx.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull.v8i16", a, b)
    return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", product)


def _neon_instruction(int4: bool = False):
    rows, weight_dtype = _weight_operand(4, int4)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        # Plain NEON (Armv8.0, the Pi 4's Cortex-A72): widening multiplies into int16 (exact
        # for int8 x int8), pairwise widening adds into int32, as TVM's own neon_4x4_i8i8i32.
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (rows, 4), weight_dtype, offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:rows, 0:4])
            T.writes(C[0:4])
            a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            a = T.reinterpret(T.broadcast(a_i32, 2), dtype="int8x8")
            b = _weight_vector(B, 4, int4)
            low = _widening_dot(a, tirx.vectorlow("int8x8", b))
            high = _widening_dot(a, tirx.vectorhigh("int8x8", b))
            C[T.ramp(T.int32(0), 1, 4)] = C.vload([0], dtype="int32x4") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"),
                low,
                high,
                dtype="int32x4",
            )

    return impl


TensorIntrin.register(NEON_INTRIN, _dot_4x4_desc, _neon_instruction(), override=True)
TensorIntrin.register(
    NEON_INTRIN + "_int4", _dot_desc(4, "int8", int4=True), _neon_instruction(True), override=True
)


@dataclass(frozen=True)
class DotProduct:
    """A CPU's int8 dot-product instruction as the kernels use it."""

    name: str
    lanes: int  # int32 output lanes per instruction (each sums GROUP byte products)
    data_dtype: str  # the activations' byte type it multiplies (the weights are int8)
    intrin: str  # the registered tensor intrinsic

    @property
    def intrin_int4(self) -> str:
        """The intrinsic whose weight operand is the tile's 4-bit codes in ``2 * lanes`` bytes,
        unpacked in registers before the instruction (:func:`tile_weight`)."""
        return self.intrin + "_int4"

    def shift(self, dtype: str) -> int:
        """What to add to activations of ``dtype`` to get the instruction's byte type."""
        if dtype == self.data_dtype:
            return 0
        return 128 if self.data_dtype == "uint8" else -128


VNNI = DotProduct("avx512-vnni", 16, "uint8", VNNI_INTRIN)
SDOT = DotProduct("arm-sdot", 4, "int8", SDOT_INTRIN)
NEON = DotProduct("arm-neon", 4, "int8", NEON_INTRIN)


TVM_VNNI_INTRIN = "dot_16x4_vnni"  # the name meta-schedule's x86 rules tensorize with


def register_tvm_vnni_name() -> None:
    """Register ours under TVM's VNNI name, without TVM's intrinsic package.

    Tuning records name the intrinsic their schedules tensorized with; loading a database needs
    it registered. Importing ``tvm.s_tir.tensor_intrin`` (every target's intrinsics) takes
    20-60 s, which a build from records should not pay.
    """
    TensorIntrin.register(TVM_VNNI_INTRIN, _dot_16x4_desc, _dot_16x4_vnni, override=True)


def fix_tvm_intrinsics() -> None:
    """TVM's intrinsics registered for meta-schedule's rules, with ``dot_16x4_vnni`` ours.

    TVM's ``dot_16x4_vnni`` passes ``<16 x i32>`` operands that LLVM 22 rejects. Only tuning
    needs the whole package; it registers its names without ``override``, which would fail
    after :func:`register_tvm_vnni_name`, so the import runs with overriding allowed.
    """
    import sys

    if "tvm.s_tir.tensor_intrin" not in sys.modules:
        register = TensorIntrin.register

        def overriding(name, desc, impl, override=False):
            return register(name, desc, impl, override=True)

        TensorIntrin.register = staticmethod(overriding)
        try:
            import tvm.s_tir.tensor_intrin  # noqa: F401
        finally:
            TensorIntrin.register = register
    register_tvm_vnni_name()


def has_vnni(target: tvm.target.Target) -> bool:
    """Whether ``target`` is an x86 CPU with AVX-512 VNNI."""
    return dot_product(target) is VNNI


def dot_product(target: tvm.target.Target) -> DotProduct | None:
    """The int8 dot-product instruction of ``target``'s CPU that the kernels use, if any:
    AVX-512 VNNI on x86, ``sdot`` on Arm CPUs with the dot-product extension, NEON's widening
    multiplies on the other 64-bit Arm CPUs (every AArch64 CPU has NEON)."""
    if target.kind.name != "llvm" or "mcpu" not in target.attrs:
        return None
    triple = str(target.attrs.get("mtriple", "x86_64"))
    if triple.startswith(("x86_64", "i686")):
        return VNNI if codegen.llvm_cpu_has_features("avx512vnni", target) else None
    if triple.startswith("aarch64"):
        return SDOT if codegen.llvm_cpu_has_features("dotprod", target) else NEON
    return None


def float_lanes(target: tvm.target.Target) -> int:
    """fp32 lanes of ``target``'s widest vector register: 16 with AVX-512, 8 on other x86
    CPUs (AVX2), 4 elsewhere (NEON)."""
    triple = str(target.attrs.get("mtriple", "x86_64"))
    if not triple.startswith(("x86_64", "i686")):
        return 4
    if "mcpu" in target.attrs and codegen.llvm_cpu_has_features("avx512f", target):
        return 16
    return 8


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


# -- weight packing (numpy, at compile time) ------------------------------------------------------
def pack_conv_weight(w: np.ndarray, lanes: int = LANES) -> np.ndarray:
    """``OHWI`` int8 weights as ``[O/L, KH, KW, I/4, L, 4]``, zero-padded to whole tiles."""
    o, kh, kw, i = w.shape
    o_pad, i_pad = _ceil_to(o, lanes), _ceil_to(i, GROUP)
    padded = np.zeros((o_pad, kh, kw, i_pad), dtype=np.int8)
    padded[:o, :, :, :i] = w
    tiles = padded.reshape(o_pad // lanes, lanes, kh, kw, i_pad // GROUP, GROUP)
    return np.ascontiguousarray(tiles.transpose(0, 2, 3, 4, 1, 5))


def pack_dense_weight(w: np.ndarray, lanes: int = LANES) -> np.ndarray:
    """``[K, N]`` int8 weights (``x @ w``) as ``[N/L, K/4, L, 4]``, zero-padded."""
    k, n = w.shape
    k_pad, n_pad = _ceil_to(k, GROUP), _ceil_to(n, lanes)
    padded = np.zeros((k_pad, n_pad), dtype=np.int8)
    padded[:k, :n] = w
    tiles = padded.reshape(k_pad // GROUP, GROUP, n_pad // lanes, lanes)
    return np.ascontiguousarray(tiles.transpose(2, 0, 3, 1))


def pack_int4_tiles(packed: np.ndarray) -> np.ndarray:
    """Packed int8 tiles ``[..., L, 4]`` of codes in [-8, 7] as 4-bit tiles ``[..., L/2, 4]``:
    byte ``(l, g)`` holds lane ``l``'s code in its low nibble and lane ``l + L/2``'s in its high
    one (:func:`tile_weight`)."""
    half = packed.shape[-2] // 2
    nibbles = packed.astype(np.uint8) & 0xF
    return np.ascontiguousarray(nibbles[..., :half, :] | (nibbles[..., half:, :] << 4))


def float_tile_lanes(channels: int, native: int) -> int:
    """Output channels per tile of a float kernel: the widest of ``native`` (the target's fp32
    vector lanes), its halves, ... down to 4 that divides ``channels``, so that no zero
    channels are computed and sliced off; 4 (padded) when none does."""
    lanes = native
    while lanes > 4 and channels % lanes:
        lanes //= 2
    return lanes


def weight_tiling(kind: str, shape, lanes: int = 1):
    """``(pad, tiles, axes)``: how weights of ``shape`` become the operand of a float kernel,
    or of a depthwise one: zero-padded by ``pad`` (``(before, after)`` per axis), reshaped to
    ``tiles``, transposed by ``axes``. One recipe for numpy (constant weights, at compile
    time) and Relax (weights computed at run time, as the sensitivity probes switch them).

    * ``"conv"``: ``OHWI`` as ``[O/L, KH, KW, I, L]``, the ``L`` output channels of one input
      channel and tap one vector load;
    * ``"dense"``: ``[K, N]`` (``x @ w``) as ``[N/L, K, L]``;
    * ``"depthwise"``: ``[C, KH, KW, 1]`` as ``[KH, KW, C]``.
    """
    if kind == "conv":
        o, kh, kw, i = shape
        pad = [(0, _ceil_to(o, lanes) - o), (0, 0), (0, 0), (0, 0)]
        return pad, [-1, lanes, kh, kw, i], [0, 2, 3, 4, 1]
    if kind == "dense":
        k, n = shape
        return [(0, 0), (0, _ceil_to(n, lanes) - n)], [k, -1, lanes], [1, 0, 2]
    c, kh, kw, _ = shape
    return [(0, 0)] * 4, [c, kh, kw], [1, 2, 0]


def tile_weights(kind: str, w: np.ndarray, lanes: int = 1) -> np.ndarray:
    """Constant weights ``w`` laid out as :func:`weight_tiling` says."""
    pad, tiles, axes = weight_tiling(kind, w.shape, lanes)
    return np.ascontiguousarray(np.pad(w, pad).reshape(tiles).transpose(axes))


def tile_lanes(packed) -> int:
    """Output channels per tile of packed weights (a tensor or buffer; 4-bit tiles, uint8,
    hold two per byte row)."""
    rows = int(packed.shape[-2])
    return 2 * rows if str(packed.dtype) == "uint8" else rows


# -- compute definitions (TE) ----------------------------------------------------------------------
def _pad_nhwc(data, padding, value):
    """NHWC ``data`` with ``(top, left, bottom, right)`` rows and columns of ``value`` around it."""
    if not any(padding):
        return data
    n, h, w, c = (int(d) for d in data.shape)
    top, left, bottom, right = padding
    return te.compute(
        (n, h + top + bottom, w + left + right, c),
        lambda b, y, x, k: tirx.if_then_else(
            tirx.all(y >= top, y < h + top, x >= left, x < w + left),
            data[b, y - top, x - left, k],
            tirx.const(value, data.dtype),
        ),
        name="qc_pad",
    )


def _conv_output_size(padded, kernel, strides, dilation) -> tuple[int, int]:
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    oh = (int(padded.shape[1]) - dh * (kh - 1) - 1) // sh + 1
    ow = (int(padded.shape[2]) - dw * (kw - 1) - 1) // sw + 1
    return oh, ow


def conv2d_nhwc_packed(data, packed, strides, padding, dilation):
    """int32 ``conv2d`` of 8-bit NHWC ``data`` with packed weights (8-bit or 4-bit tiles, see
    :func:`tile_weight`), zero padding.

    ``data`` has ``I`` channels (a multiple of 4); the result has ``O = packed.shape[0] * L``.
    """
    ob, kh, kw, ib = (int(d) for d in packed.shape[:4])
    lanes = tile_lanes(packed)
    (sh, sw), (dh, dw) = strides, dilation
    data = _pad_nhwc(data, padding, 0)
    oh, ow = _conv_output_size(data, (kh, kw), strides, dilation)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rc = te.reduce_axis((0, ib * GROUP), "rc")

    def weight(o):
        tile = (o // lanes, ry, rx, rc // GROUP)
        return tile_weight(packed, tile, o % lanes, rc % GROUP).astype("int32")

    return te.compute(
        (int(data.shape[0]), oh, ow, ob * lanes),
        lambda b, y, x, o: te.sum(
            data[b, y * sh + ry * dh, x * sw + rx * dw, rc].astype("int32") * weight(o),
            axis=[ry, rx, rc],
        ),
        name=CONV_BLOCK,
    )


def conv2d_nhwc_float(data, packed, strides, padding, dilation):
    """float32 ``conv2d`` of NHWC ``data`` with weights tiled by :func:`weight_tiling`
    (``"conv"``), zero padding; the result has ``O = packed.shape[0] * L`` channels."""
    ob, kh, kw, ib, lanes = (int(d) for d in packed.shape)
    (sh, sw), (dh, dw) = strides, dilation
    data = _pad_nhwc(data, padding, 0.0)
    oh, ow = _conv_output_size(data, (kh, kw), strides, dilation)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rc = te.reduce_axis((0, ib), "rc")
    return te.compute(
        (int(data.shape[0]), oh, ow, ob * lanes),
        lambda b, y, x, o: te.sum(
            data[b, y * sh + ry * dh, x * sw + rx * dw, rc]
            * packed[o // lanes, ry, rx, rc, o % lanes],
            axis=[ry, rx, rc],
        ),
        name=FLOAT_CONV_BLOCK,
    )


def depthwise_nhwc(data, weight, strides, padding, dilation, pad_value, out_dtype="int32"):
    """Depthwise conv of NHWC ``data`` with ``[KH, KW, C]`` weights: int32 sums of integer
    operands, or float32 ones of float operands (``out_dtype``).

    Channels are innermost in both operands, so a schedule vectorizes over them with unit
    stride. Padding uses ``pad_value`` (for integers the code of 0.0, so the zero-point fold
    stays exact).
    """
    c = int(data.shape[3])
    kh, kw, _ = (int(d) for d in weight.shape)
    (sh, sw), (dh, dw) = strides, dilation
    data = _pad_nhwc(data, padding, pad_value)
    oh, ow = _conv_output_size(data, (kh, kw), strides, dilation)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    return te.compute(
        (int(data.shape[0]), oh, ow, c),
        lambda b, y, x, k: te.sum(
            data[b, y * sh + ry * dh, x * sw + rx * dw, k].astype(out_dtype)
            * weight[ry, rx, k].astype(out_dtype),
            axis=[ry, rx],
        ),
        name=DEPTHWISE_BLOCK,
    )


def dense_packed(data, packed):
    """int32 ``data @ w`` of 8-bit ``data[M, K]`` with packed weights ``[N/L, K/4, L, 4]`` (or
    4-bit tiles ``[N/L, K/4, L/2, 4]``)."""
    m = int(data.shape[0])
    nb, kb = (int(d) for d in packed.shape[:2])
    lanes = tile_lanes(packed)
    rk = te.reduce_axis((0, kb * GROUP), "rk")

    def weight(j):
        tile = (j // lanes, rk // GROUP)
        return tile_weight(packed, tile, j % lanes, rk % GROUP).astype("int32")

    return te.compute(
        (m, nb * lanes),
        lambda i, j: te.sum(
            data[i, rk].astype("int32") * weight(j),
            axis=[rk],
        ),
        name=DENSE_BLOCK,
    )


def dense_float(data, packed):
    """float32 ``data @ w`` of ``data[M, K]`` with weights tiled by :func:`weight_tiling`
    (``"dense"``)."""
    nb, kb, lanes = (int(d) for d in packed.shape)
    rk = te.reduce_axis((0, kb), "rk")
    return te.compute(
        (int(data.shape[0]), nb * lanes),
        lambda i, j: te.sum(data[i, rk] * packed[j // lanes, rk, j % lanes], axis=[rk]),
        name=FLOAT_DENSE_BLOCK,
    )


# -- the Relax rewrite ---------------------------------------------------------------------------
def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _dims(w) -> list[int]:
    """The shape of weights given as a numpy array or a Relax expression."""
    return list(w.shape) if isinstance(w, np.ndarray) else _shape(w)


def _pad_channels(bb, data, channels: int):
    """``data`` zero-padded along its last axis to ``channels``."""
    have = _shape(data)[-1]
    if have == channels:
        return data
    widths = [0, 0] * (len(_shape(data)) - 1) + [0, channels - have]
    return bb.emit(relax.op.nn.pad(data, widths, pad_value=0.0))


def _slice_channels(bb, out, channels: int):
    out = bb.normalize(out)
    if _shape(out)[-1] == channels:
        return out
    axis = len(_shape(out)) - 1
    return relax.op.strided_slice(bb.emit(out), axes=[axis], begin=[0], end=[channels])


@mutator
class _CpuKernels(PyExprMutator):
    def __init__(
        self, mod, dot: DotProduct | None, float_lanes: int, int4: frozenset = frozenset()
    ):
        super().__init__(mod)
        self.dot = dot
        self.dot_product = dot is not None
        self.float_lanes = float_lanes  # the target's fp32 vector lanes
        self.int4 = int4  # layers whose weights are stored as 4-bit codes
        self.int4_digests: list[str] = []  # ... of those unpacked by a kernel of their own
        self.main = mod["main"]
        self.layer = ""

    def visit_var_binding_(self, binding):
        self.layer = layer_name(self.main, binding.var.name)
        super().visit_var_binding_(binding)

    def _kernel_name(self, base: str, w: np.ndarray) -> str:
        """``qc_conv2d_int4`` / ``qc_dense_int4`` for a layer whose weights are stored as 4-bit
        codes, ``..._int8`` otherwise (a name for readers: equal kernels share one PrimFunc
        whatever their names)."""
        return f"{base}_int4" if self._stores_int4(w) else f"{base}_int8"

    def _stores_int4(self, w: np.ndarray) -> bool:
        """Is the current layer's weight ``w`` to be stored as 4-bit codes?"""
        return self.layer in self.int4 and w.min() >= -8 and w.max() <= 7

    def _packed_const(self, packed: np.ndarray, w: np.ndarray, pixels: int):
        """The packed tiles as the kernel's constant, for a kernel of ``pixels`` output pixels
        (rows of a matmul). A W4A8 layer's 4-bit codes: two per byte in the tiles, unpacked in
        registers by the kernel's intrinsic, where few pixels share each weight vector;
        otherwise int8 tiles that :func:`store_int4_weights` stores packed and unpacks by a
        kernel of their own before the call (see :data:`IN_REGISTER_MAX_PIXELS`)."""
        if self._stores_int4(w):
            if pixels <= IN_REGISTER_MAX_PIXELS:
                return relax.const(pack_int4_tiles(packed), "uint8")
            self.int4_digests.append(_digest(packed))
        return relax.const(packed, "int8")

    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = op_name(call)
        rewritten = None
        if name == "relax.nn.conv2d":
            rewritten = self._conv2d(call)
        elif name == "relax.matmul":
            rewritten = self._matmul(call)
        return call if rewritten is None else rewritten

    @staticmethod
    def _int8_operands(call):
        data, weight = call.args[0], call.args[1]
        w = const_value(weight)
        ok = (
            w is not None
            and w.dtype == np.int8
            and str(data.ty.dtype) in ("uint8", "int8")
            and str(call.ty.dtype) == "int32"
        )
        return (data, w) if ok else (None, None)

    def _shifted(self, data):
        """``(data + shift, shift)`` in the instruction's byte type: int8 codes ``x + 128`` for
        VNNI (unsigned x signed bytes), uint8 codes ``x - 128`` for sdot (signed x signed);
        the caller takes ``shift * sum(w)`` off each output channel again."""
        shift = self.dot.shift(str(data.ty.dtype))
        if not shift:
            return data, 0
        wide = relax.op.add(relax.op.astype(data, "int16"), relax.const(shift, "int16"))
        return self.builder_.emit(relax.op.astype(wide, self.dot.data_dtype)), shift

    def _unshift(self, out, w: np.ndarray, shift: int, reduce_axes, shape):
        """``out - shift * sum(w)`` per output channel (undoes :meth:`_shifted`)."""
        correction = -shift * w.astype(np.int64).sum(axis=reduce_axes)
        const = relax.const(correction.reshape(shape).astype(np.int32), "int32")
        return relax.op.add(self.builder_.emit(out), const)

    def _conv2d(self, call):
        attrs = call.attrs
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
        if layouts != ("NHWC", "OHWI", "NHWC"):
            return None
        if int(attrs.groups) != 1:
            return self._depthwise(call)
        w = self._float_weight(call)
        if w is not None:
            return self._conv2d_float(call, w)
        if self._is_int16_data(call):
            return self._split_int16(call, self._conv2d)
        split = self._offset_split(call)
        if split is not None:
            return self._split_weight_offset(call, split, self._conv2d)
        data, w = self._int8_operands(call)
        if data is None or not self.dot_product:
            return None
        bb = self.builder_
        padding = [int(p) for p in attrs.padding]
        if any(padding) and self.dot.shift(str(data.ty.dtype)):
            # Padded before the shift, so that the pad is the code 0 of the original type.
            top, left, bottom, right = padding
            data = bb.emit(
                relax.op.nn.pad(data, [0, 0, top, bottom, left, right, 0, 0], pad_value=0.0)
            )
            padding = [0, 0, 0, 0]
        data, shift = self._shifted(data)
        packed = pack_conv_weight(w, self.dot.lanes)
        data = _pad_channels(bb, data, packed.shape[3] * GROUP)
        out = bb.call_te(
            conv2d_nhwc_packed,
            data,
            self._packed_const(packed, w, int(np.prod(_shape(call)[:3]))),
            strides=[int(s) for s in attrs.strides],
            padding=padding,
            dilation=[int(d) for d in attrs.dilation],
            primfunc_name_hint=self._kernel_name("qc_conv2d", w),
        )
        out = _slice_channels(bb, out, w.shape[0])
        return self._unshift(out, w, shift, (1, 2, 3), (1, 1, 1, -1)) if shift else out

    @staticmethod
    def _float_weight(call):
        """The weights of a float32 conv/matmul of float32 data (a float model, a layer kept
        float, the sensitivity probes' switchable weights), if they are float32 too and of a
        static shape: a numpy array where they are constant, else the Relax expression."""
        weight = call.args[1]
        dtypes = (call.args[0].ty.dtype, weight.ty.dtype, call.ty.dtype)
        if any(str(d) != "float32" for d in dtypes):
            return None
        w = const_value(weight)
        if w is not None:
            return w
        static = all(isinstance(d, tirx.IntImm) for d in weight.ty.shape)
        return weight if static else None

    def _tiles(self, kind: str, w, lanes: int = 1):
        """Weights ``w`` (constant or not) as the kernel's operand (:func:`weight_tiling`):
        constants tiled now, others by a layout kernel before each call."""
        if isinstance(w, np.ndarray):
            return relax.const(tile_weights(kind, w, lanes), str(w.dtype))
        bb = self.builder_
        pad, tiles, axes = weight_tiling(kind, _shape(w), lanes)
        if any(after for _, after in pad):
            w = bb.emit(relax.op.nn.pad(w, [n for p in pad for n in p], pad_value=0.0))
        return bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(w, tiles)), axes))

    def _conv2d_float(self, call, w):
        attrs, bb = call.attrs, self.builder_
        channels = _dims(w)[0]
        out = bb.call_te(
            conv2d_nhwc_float,
            call.args[0],
            self._tiles("conv", w, float_tile_lanes(channels, self.float_lanes)),
            strides=[int(s) for s in attrs.strides],
            padding=[int(p) for p in attrs.padding],
            dilation=[int(d) for d in attrs.dilation],
            primfunc_name_hint="qc_conv2d_float",
        )
        return _slice_channels(bb, out, channels)

    def _is_int16_data(self, call) -> bool:
        return self.dot_product and splits_int16(call)

    def _split_int16(self, call, lower):
        """An int16-activation conv/matmul as two int8 ones on the dot-product kernels:
        ``x = 256 * hi + lo`` with ``lo = x & 255`` (uint8) and ``hi = x >> 8`` (int8), so
        ``f(x) = 256 * f(hi) + f(lo)`` for the linear ``f``, exactly. Zero padding stays zero
        padding in both halves. Each half's sum is bounded by the whole one's, which the
        accumulator check already bounded by 2**31."""
        bb = self.builder_
        data = call.args[0]
        lo = bb.emit(
            relax.op.astype(relax.op.bitwise_and(data, relax.const(255, "int16")), "uint8")
        )
        hi = bb.emit(relax.op.astype(relax.op.right_shift(data, relax.const(8, "int16")), "int8"))
        parts = []
        for half in (lo, hi):
            half_call = relax.Call(call.op, [half, *call.args[1:]], call.attrs, call.ty_args)
            part = lower(bb.normalize(half_call))
            if part is None:
                return None
            parts.append(bb.emit(part))
        high = bb.emit(relax.op.multiply(parts[1], relax.const(256, "int32")))
        return relax.op.add(parts[0], high)

    def _offset_split(self, call) -> tuple[np.ndarray, np.ndarray, int] | None:
        """``(w8, offset, out_axis)`` with ``w = w8 + offset`` (one offset per output channel,
        ``w8`` int8) for an 8-bit-activation conv/matmul whose constant weights need more than
        8 bits only because they are not centred: uint8 weights minus a zero point (TFLite's
        uint8 models) span up to 255 codes per channel, just not around 0."""
        w = const_value(call.args[1])
        if (
            not self.dot_product
            or w is None
            or w.dtype.kind != "i"
            or w.dtype.itemsize == 1
            or str(call.args[0].ty.dtype) not in ("uint8", "int8")
            or str(call.ty.dtype) != "int32"
        ):
            return None
        out_axis = 0 if op_name(call) == "relax.nn.conv2d" else w.ndim - 1
        axes = tuple(a for a in range(w.ndim) if a != out_axis)
        low, high = w.min(axis=axes).astype(np.int64), w.max(axis=axes).astype(np.int64)
        if np.any(high - low > 255):
            return None
        # any offset in [high - 127, low + 128] works; the one nearest 0 keeps the sums small
        offset = np.clip(0, high - 127, low + 128)
        shape = [1] * w.ndim
        shape[out_axis] = -1
        return (w - offset.reshape(shape)).astype(np.int8), offset, out_axis

    def _split_weight_offset(self, call, split, lower):
        """``f(x, w8 + c) = f(x, w8) + c * f(x, 1)`` for the linear ``f`` (conv or matmul),
        exactly: the int8 part runs on the dot-product kernels, and ``f(x, 1)`` -- the sum of
        ``x`` over each output's window, one channel -- is a cheap reduction, shared by all
        output channels. Padding contributes zero to both, as to ``f(x, w)``."""
        bb = self.builder_
        w8, offset, _ = split
        data, attrs = call.args[0], call.attrs
        int8_call = relax.Call(call.op, [data, relax.const(w8, "int8")], attrs, call.ty_args)
        main = lower(bb.normalize(int8_call))
        if main is None:
            return None
        main = bb.emit(main)
        if not np.any(offset):
            return main
        wide = bb.emit(relax.op.astype(data, "int32"))
        if op_name(call) == "relax.matmul":
            window = relax.op.sum(wide, axis=[-1], keepdims=True)
        elif w8.shape[1:3] == (1, 1) and not any(
            int(s) != 1 or int(p) for s, p in zip(attrs.strides, attrs.padding)
        ):
            window = relax.op.sum(wide, axis=[3], keepdims=True)  # 1x1: the channel sum
        else:
            ones = np.ones((1, *w8.shape[1:]), np.int32)
            window = relax.op.nn.conv2d(
                wide,
                relax.const(ones, "int32"),
                strides=attrs.strides,
                padding=attrs.padding,
                dilation=attrs.dilation,
                data_layout="NHWC",
                kernel_layout="OHWI",
                out_dtype="int32",
            )
        window = bb.emit(window)
        scaled = bb.emit(relax.op.multiply(window, relax.const(offset.astype(np.int32), "int32")))
        return relax.op.add(main, scaled)

    def _depthwise(self, call):
        data, attrs = call.args[0], call.attrs
        channels = _shape(data)[-1]
        w = const_value(call.args[1])
        integer = str(data.ty.dtype) in ("uint8", "int8", "int16") and str(call.ty.dtype) == "int32"
        if not (integer and w is not None and w.dtype.kind == "i"):
            w = self._float_weight(call)
        if w is None or int(attrs.groups) != channels or _dims(w)[::3] != [channels, 1]:
            return None
        return self.builder_.call_te(
            depthwise_nhwc,
            data,
            self._tiles("depthwise", w),
            strides=[int(s) for s in attrs.strides],
            padding=[int(p) for p in attrs.padding],
            dilation=[int(d) for d in attrs.dilation],
            pad_value=0,
            out_dtype=str(call.ty.dtype),
            primfunc_name_hint="qc_depthwise_int" if integer else "qc_depthwise_float",
        )

    def _matmul(self, call):
        w = self._float_weight(call)
        if w is not None and len(_dims(w)) == 2 and len(_shape(call.args[0])) == 2:
            channels = _dims(w)[1]
            out = self.builder_.call_te(
                dense_float,
                call.args[0],
                self._tiles("dense", w, float_tile_lanes(channels, self.float_lanes)),
                primfunc_name_hint="qc_dense_float",
            )
            return _slice_channels(self.builder_, out, channels)
        if self._is_int16_data(call):
            return self._split_int16(call, self._matmul)
        split = self._offset_split(call)
        if split is not None:
            return self._split_weight_offset(call, split, self._matmul)
        data, w = self._int8_operands(call)
        if data is None or not self.dot_product or w.ndim != 2 or len(_shape(data)) != 2:
            return None
        bb = self.builder_
        data, shift = self._shifted(data)
        packed = pack_dense_weight(w, self.dot.lanes)
        data = _pad_channels(bb, data, packed.shape[1] * GROUP)
        out = bb.call_te(
            dense_packed,
            data,
            self._packed_const(packed, w, _shape(data)[0]),
            primfunc_name_hint=self._kernel_name("qc_dense", w),
        )
        out = _slice_channels(bb, out, w.shape[1])
        return self._unshift(out, w, shift, (0,), (1, -1)) if shift else out


def splits_int16(call: relax.Call) -> bool:
    """Whether an integer conv/matmul runs as two int8 kernels where the target has a
    dot-product instruction (:meth:`_CpuKernels._split_int16`): int16 activations, int8
    weights, not depthwise."""
    w = const_value(call.args[1])
    grouped = op_name(call) == "relax.nn.conv2d" and int(call.attrs.groups) != 1
    return (
        str(call.args[0].ty.dtype) == "int16"
        and w is not None
        and w.dtype == np.int8
        and str(call.ty.dtype) == "int32"
        and not grouped
    )


def use_int8_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Rewrite ``main``'s integer and float convs and matmuls to the kernels of this module.

    8-bit x int8 convs/matmuls become packed dot-product kernels where the target has the
    instruction (:func:`dot_product`); integer depthwise convs become channels-innermost kernels
    on every target, and so do float32 convs, depthwise convs and matmuls with constant
    weights (packed for the target's vector lanes, :func:`float_lanes`).
    """
    int4 = frozenset(str(n) for n in (mod["main"].attrs or {}).get(INT4_ATTR, []))
    rewriter = _CpuKernels(mod, dot_product(target), float_lanes(target), int4)
    main = rewriter.visit_expr(mod["main"])
    if rewriter.int4_digests:
        main = main.with_attr(INT4_DIGESTS_ATTR, rewriter.int4_digests)
    return with_main(rewriter, main)


def with_main(rewriter: PyExprMutator, main: relax.Function) -> tvm.IRModule:
    """The rewriter's module (with the kernels it added) around the rewritten ``main``."""
    out = rewriter.builder_.get()
    out["main"] = main
    return relax.transform.DeadCodeElimination(["main"])(out)


# -- 4-bit weight storage ----------------------------------------------------------------------
# main's attribute: digests of the packed int8 weights that hold 4-bit codes, to be stored packed
INT4_DIGESTS_ATTR = "qc.int4_weight_digests"


def _digest(packed: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(packed).tobytes()).hexdigest()


def unpack_int4(packed):
    """TE: the int8 codes of 4-bit pairs (``(2, n)`` from ``n`` bytes): row 0 the low nibbles,
    row 1 the high ones, sign-extended. One long unit-stride row per nibble vectorizes; codes
    unpacked in their own order (two per byte along the tile's 4-lane axis) did not, at 5 GB/s."""

    def body(h, j):
        shift = (h * 4).astype("uint8")
        nibble = (packed[j] >> shift) & tvm.tirx.const(15, "uint8")
        eight = tvm.tirx.const(8, "uint8")
        return tvm.tirx.reinterpret("int8", (nibble ^ eight) - eight)

    return te.compute((2, packed.shape[0]), body, name="unpack_int4")


@mutator
class _Int4Storage(PyExprMutator):
    def __init__(self, mod, digests: set):
        super().__init__(mod)
        self.digests = digests

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
            return call
        args = list(call.args[1].fields)
        weights = const_value(args[1]) if len(args) > 1 else None
        if weights is None or weights.dtype != np.int8 or _digest(weights) not in self.digests:
            return call
        # byte j holds code j (low nibble) and code j + n/2 (high) of the flattened tiles (whose
        # size, a multiple of the dot product's lanes, is even)
        nibbles = qmath.pack_int4(weights.reshape(2, -1).T).reshape(-1)
        bb = self.builder_
        halves = bb.emit(
            bb.call_te(
                unpack_int4, relax.const(nibbles, "uint8"), primfunc_name_hint="qc_unpack_int4"
            )
        )
        args[1] = bb.emit(relax.op.reshape(halves, weights.shape))  # a view, no copy
        return relax.Call(call.op, [call.args[0], relax.Tuple(args)], call.attrs, call.ty_args)


@tvm.transform.module_pass(opt_level=0, name="QCStoreInt4Weights")
def store_int4_weights(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """The packed int8 weights of the W4A8 kernels that do not unpack them in registers
    (:data:`IN_REGISTER_MAX_PIXELS`) stored as 4-bit codes, two per byte, and unpacked by a
    small kernel before each call (half the bytes in the library and in memory).

    Runs after ``FoldConstant`` -- which would otherwise evaluate the unpacking at compile time
    and store the int8 codes again -- and before ``FuseOps``, which leaves the unpacking (no
    op pattern) a kernel of its own, so the dot-product kernel reads int8 codes as before."""
    digests = {str(d) for d in (mod["main"].attrs or {}).get(INT4_DIGESTS_ATTR, [])}
    if not digests:
        return mod
    rewriter = _Int4Storage(mod, digests)
    return with_main(rewriter, rewriter.visit_expr(mod["main"]))

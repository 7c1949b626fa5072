"""Integer kernels and their default schedules against numpy; tuning over a real local RPC.

Every kernel is checked for exact int32 equality with a numpy int64 reference, once with the
host's VNNI path and once for a CPU without it (generic schedules), so both code paths are
exercised on this machine.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from qcompiler.targets.boards import resolve_target
from qcompiler.targets.build import build
from qcompiler.targets.kernels import has_vnni, pack_conv_weight, pack_dense_weight
from qcompiler.targets.tuning import LocalRPC, load_database, open_database, tune

HOST = resolve_target("x86")
NO_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
TARGETS = [pytest.param(HOST, id="host"), pytest.param(NO_VNNI, id="haswell")]
needs_vnni = pytest.mark.skipif(not has_vnni(HOST), reason="the host CPU has no AVX-512 VNNI")


def run(mod, target, *arrays):
    vm = relax.VirtualMachine(build(mod, target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    return out.numpy()


def conv_module(x_shape, w, strides, padding, groups=1, x_dtype="uint8"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(
                relax.op.nn.conv2d(
                    x,
                    relax.const(w, str(w.dtype)),
                    strides=strides,
                    padding=padding,
                    groups=groups,
                    data_layout="NHWC",
                    kernel_layout="OHWI",
                    out_dtype="int32",
                )
            )
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def conv_reference(x, w, strides, padding, groups=1):
    top, left, bottom, right = padding
    xp = np.pad(x.astype(np.int64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    o, kh, kw, i = w.shape
    sh, sw = strides
    oh = (xp.shape[1] - kh) // sh + 1
    ow = (xp.shape[2] - kw) // sw + 1
    out = np.zeros((x.shape[0], oh, ow, o), np.int64)
    per_group = o // groups
    for g in range(groups):
        xs = xp[..., g * i : (g + 1) * i]
        ws = w[g * per_group : (g + 1) * per_group].astype(np.int64)
        for r in range(kh):
            for c in range(kw):
                patch = xs[:, r : r + sh * (oh - 1) + 1 : sh, c : c + sw * (ow - 1) + 1 : sw]
                out[..., g * per_group : (g + 1) * per_group] += np.einsum(
                    "nhwc,oc->nhwo", patch, ws[:, r, c, :]
                )
    return out


CONV_CASES = [
    # (N, H, W, C) input, O, K, stride, padding
    ((1, 14, 14, 32), 48, 1, 1, 0),
    ((1, 15, 13, 8), 32, 3, 2, 1),  # odd sizes, stride 2
    ((1, 16, 16, 3), 24, 3, 2, 1),  # 3 input channels (padded to 4), 24 outputs (to 32)
    ((2, 7, 7, 64), 16, 3, 1, 1),  # batch 2
    # register tiles other than pixels x 2 groups (schedules._register_tile)
    ((1, 14, 14, 40), 48, 1, 1, 0),  # 2 pixels x 3 groups
    ((1, 7, 7, 96), 80, 1, 1, 0),  # 7 pixels x 1 group (5 groups would spill)
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("x_shape,out_channels,k,stride,pad", CONV_CASES)
def test_conv2d_matches_numpy(target, x_shape, out_channels, k, stride, pad):
    rng = np.random.default_rng(sum(x_shape) + out_channels)
    x = rng.integers(0, 256, x_shape, dtype=np.uint8)
    w = rng.integers(-127, 128, (out_channels, k, k, x_shape[-1]), dtype=np.int8)
    padding = (pad, pad, pad, pad)
    got = run(conv_module(x_shape, w, (stride, stride), padding), target, x)
    np.testing.assert_array_equal(got, conv_reference(x, w, (stride, stride), padding))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "x_dtype,k,stride,width,channels",
    [
        ("uint8", 3, 1, 19, 40),
        ("int8", 5, 2, 19, 40),
        ("uint8", 3, 2, 19, 40),
        ("uint8", 3, 1, 16, 64),  # 8 pixels x 32 channels per tile
    ],
)
def test_depthwise_matches_numpy(target, x_dtype, k, stride, width, channels):
    rng = np.random.default_rng(k * 10 + stride)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, (1, 17, width, channels)).astype(x_dtype)
    w = rng.integers(-127, 128, (channels, k, k, 1), dtype=np.int8)
    padding = (k // 2,) * 4
    mod = conv_module(x.shape, w, (stride, stride), padding, groups=channels, x_dtype=x_dtype)
    got = run(mod, target, x)
    np.testing.assert_array_equal(
        got, conv_reference(x, w, (stride, stride), padding, groups=channels)
    )


def test_default_schedules_leave_tuned_functions_alone():
    """A function a tuning record scheduled (TVM marks it ``tirx.is_scheduled``) keeps that
    schedule; an unmarked one gets the default."""
    from tvm import te

    from qcompiler.targets.schedules import default_schedules

    x = te.placeholder((64, 64), "int32")
    y = te.compute((64, 64), lambda i, j: x[i, j] * 3, name="y")
    func = te.create_prim_func([x, y])
    tuned = tvm.IRModule({"tuned": func.with_attr("tirx.is_scheduled", True), "plain": func})
    out = default_schedules(tuned)
    tvm.ir.assert_structural_equal(out["tuned"], tuned["tuned"])
    with pytest.raises(ValueError):  # the unmarked one was scheduled
        tvm.ir.assert_structural_equal(out["plain"], func)


@pytest.mark.parametrize("target", TARGETS)
def test_pads_split_at_their_bounds_match_numpy(target):
    """A layout change plus uneven pads: the schedule splits the rows at the pad's bounds."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (1, 3, 10, 9)).astype("uint8")
    bb = relax.BlockBuilder()
    var = relax.Var("x", relax.TensorType(x.shape, "uint8"))
    with bb.function("main", [var]):
        with bb.dataflow():
            nhwc = bb.emit(relax.op.permute_dims(var, [0, 2, 3, 1]))
            padded = bb.emit(relax.op.nn.pad(nhwc, [0, 0, 1, 2, 0, 1, 0, 1], pad_value=5.0))
            out = bb.emit_output(padded)
        bb.emit_func_output(out)
    expected = np.pad(x.transpose(0, 2, 3, 1), ((0, 0), (1, 2), (0, 1), (0, 1)), constant_values=5)
    np.testing.assert_array_equal(run(bb.get(), target, x), expected)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("m,k,n", [(1, 1280, 1000), (3, 30, 20)])
def test_dense_matches_numpy(target, m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((m, k), "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(xv, relax.const(w, "int8"), out_dtype="int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    got = run(bb.get(), target, x)
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64))


def test_weight_packing_layout():
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (20, 3, 3, 6), dtype=np.int8)
    packed = pack_conv_weight(w)
    assert packed.shape == (2, 3, 3, 2, 16, 4)
    for o, r, c, i in [(0, 0, 0, 0), (19, 2, 1, 5), (17, 1, 2, 3)]:
        assert packed[o // 16, r, c, i // 4, o % 16, i % 4] == w[o, r, c, i]
    assert not packed[1, :, :, :, 4:, :].any() and not packed[:, :, :, 1, :, 2:].any()
    d = rng.integers(-127, 128, (10, 17), dtype=np.int8)
    dp = pack_dense_weight(d)
    assert dp.shape == (2, 3, 16, 4)
    assert dp[1, 2, 0, 1] == d[9, 16]


# -- tuning over RPC ------------------------------------------------------------------------------
def small_model():
    rng = np.random.default_rng(5)
    return conv_module(
        (1, 8, 8, 16), rng.integers(-127, 128, (32, 3, 3, 16), dtype=np.int8), (1, 1), (1, 1, 1, 1)
    )


@needs_vnni
def test_tuning_over_local_rpc_keeps_outputs_and_records(tmp_path):
    mod = small_model()
    x = np.random.default_rng(6).integers(0, 256, (1, 8, 8, 16), dtype=np.uint8)
    untuned = run(mod, HOST, x)
    lines = []
    with LocalRPC(key="test", threads=1) as endpoint:
        report = tune(mod, HOST, tmp_path / "rec", endpoint, trials=4, echo=lines.append)
    assert report.tasks and all(t.best_s is not None for t in report.tasks)
    # The default schedule is a record too, so the best can only be at least as fast.
    assert all(t.best_s <= t.default_s for t in report.tasks if t.default_s)
    database = load_database(tmp_path / "rec")
    assert len(database) >= len(report.tasks) + 1
    vm = relax.VirtualMachine(build(mod, HOST, database), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), untuned)
    # A fresh process (no tuning, so TVM's intrinsic package never imported) loads the records
    # -- their schedules name TVM's VNNI intrinsic -- and builds the same integers.
    np.save(tmp_path / "x.npy", x)
    script = (
        f"import sys, numpy as np, tvm; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from tvm import relax\n"
        "from test_kernels import small_model, HOST\n"
        "from qcompiler.targets.build import build\n"
        "from qcompiler.targets.tuning import load_database\n"
        f"db = load_database({str(tmp_path / 'rec')!r})\n"
        "vm = relax.VirtualMachine(build(small_model(), HOST, db), tvm.cpu())\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, vm['main'](tvm.runtime.tensor(x)).numpy())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), untuned)
    # A second run finds everything in the database and measures nothing new.
    lines.clear()
    with LocalRPC(key="test", threads=1) as endpoint:
        again = tune(mod, HOST, tmp_path / "rec", endpoint, trials=4, echo=lines.append)
    assert again.skipped == len(again.tasks)
    assert not any("measuring the default" in line for line in lines)


@needs_vnni
@pytest.mark.parametrize(
    "lost",
    ["servers", pytest.param("tracker", marks=pytest.mark.slow)],  # ~2 min; .ci/run runs it
)
def test_killed_rpc_server_or_tracker_keeps_records_and_resumes(tmp_path, lost):
    from qcompiler.passes.errors import QCompilerError

    mod = small_model()
    rpc = LocalRPC(key="kill", threads=1)
    endpoint = rpc.__enter__()
    try:

        def echo(line):
            if line.startswith("  ") and "us" in line:  # a default schedule was measured
                getattr(rpc, f"kill_{lost}")()

        with pytest.raises(QCompilerError, match=r"kill|records|RPC|answer"):
            tune(mod, HOST, tmp_path / "rec", endpoint, trials=8, echo=echo)
    finally:
        rpc.stop()
    assert (tmp_path / "rec" / "records.json").read_text().strip()
    kept = len(open_database(tmp_path / "rec"))
    assert kept >= 1
    with LocalRPC(key="kill", threads=1) as endpoint:
        lines = []
        tune(mod, HOST, tmp_path / "rec", endpoint, trials=0, echo=lines.append)
    assert not any("measuring the default" in line for line in lines)
    assert len(open_database(tmp_path / "rec")) >= kept


def test_missing_tracker_is_a_clear_error(tmp_path):
    from qcompiler.passes.errors import QCompilerError
    from qcompiler.targets.tuning import RPCEndpoint

    with pytest.raises(QCompilerError, match=r"127\.0\.0\.1:1\b"):
        RPCEndpoint("127.0.0.1", 1, "board").check()
    with pytest.raises(QCompilerError, match="no tuning records"):
        load_database(tmp_path)


def test_a_board_farm_measures_on_several_servers_at_once(shared, tmp_path, monkeypatch):
    """Two servers under one key: the tracker hands out sessions to both, in parallel.

    Each server logs its sessions ("start serving" ... "finish serving", with times); the
    intervals of the two servers must overlap somewhere. Each measurement here runs for a
    second, far longer than the ~0.2 s a worker takes between sessions: with the default 40 ms
    the two servers' sessions could fall out of step on a busy machine and never overlap.
    """
    from datetime import datetime

    from qcompiler.targets import tuning

    monkeypatch.setattr(tuning, "MIN_REPEAT_MS", 1000)

    def logged_server(tracker_port, key, port):
        log = tmp_path / f"server-{port}.log"
        return [
            "sh",
            "-c",
            f"exec {sys.executable} -m tvm.exec.rpc_server --tracker=127.0.0.1:{tracker_port} "
            f"--key={key} --host=127.0.0.1 --port={port} --port-end={port + 1} 2>>{log}",
        ]

    from qcompiler import api

    model = shared / "models/mnist_cnn/mnist_cnn.onnx"  # float: several distinct tasks
    with LocalRPC(key="farm", servers=2, threads=1, server_command=logged_server) as endpoint:
        report = api.tune(model, tmp_path / "rec", HOST, trials=0, rpc=endpoint, echo=print)
    assert len(report.tasks) >= 4 and all(t.best_s is not None for t in report.tasks)

    def sessions(log):
        stamps = {"start serving": [], "finish serving": []}
        for line in log.read_text().splitlines():
            for what, found in stamps.items():
                if what in line:
                    found.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f"))
        return list(zip(stamps["start serving"], stamps["finish serving"]))

    logs = sorted(tmp_path.glob("server-*.log"))
    assert len(logs) == 2
    first, second = (sessions(log) for log in logs)
    assert first and second, "both servers must have served measurements"
    assert any(a0 < b1 and b0 < a1 for a0, a1 in first for b0, b1 in second)


@needs_vnni
@pytest.mark.parametrize(("dtype", "pad"), [("int16", 1), ("int16", 0), ("int8", 1)])
def test_int16_and_padded_int8_convs_on_the_dot_product_kernels(dtype, pad):
    """int16 activations run as two int8 halves (256 * hi + lo) and padded int8 ones with an
    explicit pad of their uint8 form: exact against numpy's int64 convolution."""
    from qcompiler.targets.build import fused_module

    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, (1, 7, 7, 20)).astype(dtype)
    w = rng.integers(-127, 128, (12, 3, 3, 20)).astype(np.int8)
    bb = relax.BlockBuilder()
    var = relax.Var("x", relax.TensorType(x.shape, dtype))
    with bb.function("main", [var]):
        with bb.dataflow():
            conv = relax.op.nn.conv2d(
                var, relax.const(w), padding=[pad] * 4, data_layout="NHWC",
                kernel_layout="OHWI", out_dtype="int32",
            )  # fmt: skip
            out = bb.emit_output(conv)
        bb.emit_func_output(out)
    mod = bb.get()
    kernels = [gv.name_hint for gv in fused_module(mod, HOST).get_global_vars()]
    assert any("qc_conv2d_int8" in k for k in kernels)
    got = relax.VirtualMachine(build(mod, HOST), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    padded = np.pad(x.astype(np.int64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    size = padded.shape[1] - 2
    expected = np.zeros((1, size, size, 12), np.int64)
    for i in range(size):
        for j in range(size):
            window = padded[0, i : i + 3, j : j + 3]
            expected[0, i, j] = np.einsum("hwc,ohwc->o", window, w.astype(np.int64))
    np.testing.assert_array_equal(got, expected)


@needs_vnni
@pytest.mark.parametrize(
    ("k", "stride", "pad"), [(1, 1, 0), (3, 2, 1), (1, 2, 0)], ids=["1x1", "3x3s2", "1x1s2"]
)
def test_uncentred_9_bit_weights_run_on_the_dot_product_kernels(k, stride, pad):
    """uint8 weights minus a zero point (TFLite's uint8 models) span 255 codes but not around
    0, so they are int16: split into int8 weights plus a per-channel offset times the window
    sum of the input, exact against numpy's int64 convolution."""
    from qcompiler.targets.build import fused_module

    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (1, 9, 9, 24)).astype(np.uint8)
    codes = rng.integers(0, 256, (16, k, k, 24))
    zero_points = rng.integers(0, 256, (16, 1, 1, 1))
    zero_points[0] = 128  # a channel that is already centred (offset 0)
    w = (codes - zero_points).astype(np.int16)
    assert w.min() < -128 or w.max() > 127
    mod = conv_module(x.shape, w, (stride, stride), (pad,) * 4)
    kernels = [gv.name_hint for gv in fused_module(mod, HOST).get_global_vars()]
    assert any("qc_conv2d_int8" in name for name in kernels)
    got = run(mod, HOST, x)
    np.testing.assert_array_equal(got, conv_reference(x, w, (stride, stride), (pad,) * 4))


@needs_vnni
def test_uncentred_9_bit_dense_weights_run_on_the_dot_product_kernels():
    rng = np.random.default_rng(12)
    x = rng.integers(0, 256, (2, 300), dtype=np.uint8)
    w = (rng.integers(0, 256, (300, 40)) - rng.integers(0, 256, 40)).astype(np.int16)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(xv, relax.const(w, "int16"), out_dtype="int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    from qcompiler.targets.build import fused_module

    kernels = [gv.name_hint for gv in fused_module(bb.get(), HOST).get_global_vars()]
    assert any("qc_dense_int8" in name for name in kernels)
    got = run(bb.get(), HOST, x)
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64))


# -- float kernels: float models and layers kept float ---------------------------------------------
def float_conv_model(x_shape, w, b, stride, pad, dilation=1, group=1, activation="relu"):
    """ONNX x -> Conv(w, b) [-> activation: relu, sigmoid or silu] -> y (NCHW, as models
    arrive)."""
    from onnx import TensorProto, helper, numpy_helper

    inputs = ["x", "w"] + ([] if b is None else ["b"])
    attrs = dict(strides=[stride, stride], pads=[pad] * 4, dilations=[dilation, dilation])
    conv = "y" if activation is None else "c"
    nodes = [helper.make_node("Conv", inputs, [conv], group=group, **attrs)]
    if activation == "relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    elif activation == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["c"], ["y"]))
    elif activation == "silu":
        nodes.append(helper.make_node("Sigmoid", ["c"], ["s"]))
        nodes.append(helper.make_node("Mul", ["c", "s"], ["y"]))
    consts = {"w": w} if b is None else {"w": w, "b": b}
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def float_gemm_model(m, k, n, w, b):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def run_float(onnx_model, target, x, kernel):
    """The float model built for ``target`` on ``x``, after checking that its conv/matmul ran
    as ``kernel`` with the default schedule (an unscheduled kernel is correct but ~30x slow)."""
    from qcompiler.frontend import load_model
    from qcompiler.passes.pipeline import prepare
    from qcompiler.targets.build import fused_module
    from qcompiler.targets.schedules import default_schedules, is_scheduled

    mod = prepare(load_model(onnx_model).mod)
    fused = fused_module(mod, target)
    with target:
        scheduled = default_schedules(fused)
    funcs = {
        g.name_hint: f for g, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
    }
    assert any(kernel in name for name in funcs), sorted(funcs)
    assert all(is_scheduled(f) for f in funcs.values()), [
        n for n, f in funcs.items() if not is_scheduled(f)
    ]
    return run(mod, target, x)


def onnxruntime_answer(onnx_model, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


FLOAT_CONV_CASES = [
    # (N, C, H, W) input, O, K, stride, pad, dilation, bias and ReLU
    ((1, 3, 17, 15), 24, 3, 2, 1, 1, True),  # the stem: 3 channels in, 8-lane tiles
    ((1, 40, 14, 14), 48, 1, 1, 0, 1, True),  # 1x1, 16-lane tiles
    ((2, 16, 7, 7), 80, 1, 1, 0, 1, False),  # batch 2, no epilogue (the tile's copy-out)
    ((1, 8, 12, 12), 5, 3, 1, 2, 2, True),  # dilated; 5 outputs padded to 8 and sliced
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("x_shape,out_channels,k,stride,pad,dilation,epilogue", FLOAT_CONV_CASES)
def test_float_conv2d_matches_onnxruntime(
    target, x_shape, out_channels, k, stride, pad, dilation, epilogue
):
    rng = np.random.default_rng(sum(x_shape) + out_channels)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((out_channels, x_shape[1], k, k)) / np.sqrt(x_shape[1] * k * k)
    b = rng.standard_normal(out_channels) if epilogue else None
    activation = "relu" if epilogue else None
    model = float_conv_model(x_shape, w, b, stride, pad, dilation, activation=activation)
    got = run_float(model, target, x, "qc_conv2d_float")
    np.testing.assert_allclose(got, onnxruntime_answer(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("k,stride,channels", [(3, 1, 40), (5, 2, 32), (3, 2, 24)])
def test_float_depthwise_matches_onnxruntime(target, k, stride, channels):
    rng = np.random.default_rng(k + stride + channels)
    x_shape = (1, channels, 19, 17)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((channels, 1, k, k)) / k
    model = float_conv_model(
        x_shape, w, rng.standard_normal(channels), stride, k // 2, group=channels
    )
    got = run_float(model, target, x, "qc_depthwise_float")
    np.testing.assert_allclose(got, onnxruntime_answer(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("m,k,n", [(1, 1280, 1000), (3, 30, 20), (2, 7, 3)])
def test_float_dense_matches_onnxruntime(target, m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)) / np.sqrt(k)
    model = float_gemm_model(m, k, n, w, rng.standard_normal(n).astype(np.float32))
    got = run_float(model, target, x, "qc_dense_float")
    np.testing.assert_allclose(got, onnxruntime_answer(model, x), rtol=1e-4, atol=1e-5)


def test_float_weight_tiling():
    """Each vector of tiled float weights is one input channel and tap of L output channels
    (numpy indexing), padded output channels zero; the depthwise layout is [KH, KW, C]."""
    from qcompiler.targets.kernels import float_tile_lanes, tile_weights

    assert [float_tile_lanes(c, 16) for c in (48, 24, 1000, 20, 5)] == [16, 8, 8, 4, 4]
    assert float_tile_lanes(48, 4) == 4
    w = np.arange(5 * 2 * 3 * 7, dtype=np.float32).reshape(5, 2, 3, 7)  # OHWI
    packed = tile_weights("conv", w, 4)
    assert packed.shape == (2, 2, 3, 7, 4)
    assert packed[1, 1, 2, 6, 0] == w[4, 1, 2, 6]
    assert packed[0, 0, 1, 3, 2] == w[2, 0, 1, 3]
    assert not packed[1, ..., 1:].any()
    d = np.arange(7 * 6, dtype=np.float32).reshape(7, 6)  # [K, N]
    dense = tile_weights("dense", d, 4)
    assert dense.shape == (2, 7, 4)
    assert dense[1, 3, 1] == d[3, 5]
    assert not dense[1, :, 2:].any()
    depthwise = tile_weights("depthwise", w[..., :1])
    assert depthwise.shape == (2, 3, 5)
    assert depthwise[1, 2, 4] == w[4, 1, 2, 0]


@pytest.mark.parametrize("activation", ["sigmoid", "silu"])
def test_float_sigmoid_and_silu_run_vectorized_and_match_onnxruntime(activation):
    """Fused into the conv as ``fast_sigmoid``/``fast_silu`` (targets/fastmath.py); the
    answer is onnxruntime's within the conv sums' rounding (outputs up to about 10)."""
    rng = np.random.default_rng(7)
    x = (4 * rng.standard_normal((1, 16, 10, 10))).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)) / 6
    model = float_conv_model(x.shape, w, rng.standard_normal(32), 1, 1, activation=activation)
    got = run_float(model, HOST, x, f"fast_{activation}")
    np.testing.assert_allclose(got, onnxruntime_answer(model, x), rtol=1e-5, atol=1e-5)


def test_fast_sigmoid_is_within_1e7_of_numpy():
    from tvm import te

    from qcompiler.targets.fastmath import fast_sigmoid

    x = te.placeholder((200001,), "float32")
    func = te.create_prim_func([x, fast_sigmoid(x)])
    lib = tvm.compile(tvm.IRModule({"main": func}), target=HOST)
    v = np.linspace(-100, 100, 200001).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros_like(v))
    lib["main"](tvm.runtime.tensor(v), out)
    exact = 1 / (1 + np.exp(-v.astype(np.float64)))
    assert np.abs(out.numpy() - exact).max() < 1e-7


@pytest.mark.parametrize("group", [1, 24])
def test_float_conv_with_weights_computed_at_run_time(group):
    """Weights that are an input (as the sensitivity probes switch them) are tiled by a layout
    kernel before the call, and the conv runs on the float kernels all the same."""
    from onnx import TensorProto, helper

    from qcompiler.frontend import load_model
    from qcompiler.passes.pipeline import prepare

    rng = np.random.default_rng(group)
    x = rng.standard_normal((1, 24, 9, 11)).astype(np.float32)
    w = (rng.standard_normal((20 if group == 1 else 24, 24 // group, 3, 3)) / 8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=group)],
        "conv",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape)),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    mod = prepare(load_model(onnx_model).mod)
    kernel = "qc_conv2d_float" if group == 1 else "qc_depthwise_float"
    fused = fused_module_names(mod, HOST)
    assert any(kernel in name for name in fused), fused
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    expected = session.run(None, {"x": x, "w": w})[0]
    np.testing.assert_allclose(run(mod, HOST, x, w), expected, rtol=1e-4, atol=1e-5)


def fused_module_names(mod, target) -> list[str]:
    from qcompiler.targets.build import fused_module

    return [g.name_hint for g in fused_module(mod, target).functions]

"""The emulated Raspberry Pi end to end: cross-compile, upload over RPC, run, tune.

The board is an arm64 Debian root with TVM installed by the board kit, its RPC server run under
qemu and registered with a tracker on 127.0.0.1 (:mod:`qcompiler.deploy.emulator`). The tests
skip unless it was built (`python -m qcompiler.deploy.emulator build`; .ci/run builds it).
Integer models must give the host's outputs bit for bit.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from qcompiler import api
from qcompiler.cli import main
from qcompiler.deploy.emulator import default_root, emulated_board, is_ready, missing_prerequisites
from qcompiler.passes.errors import QCompilerError

pytestmark = pytest.mark.board


@pytest.fixture(scope="module")
def board():
    root = default_root()
    if not is_ready(root):
        pytest.skip(f"no emulated board at {root} (python -m qcompiler.deploy.emulator build)")
    if missing_prerequisites():
        pytest.skip("cannot run the emulated board: " + "; ".join(missing_prerequisites()))
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("Debian's g++-aarch64-linux-gnu is not installed")
    with emulated_board(root, key="rpi4") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def quantized(shared):
    path = shared / "models/resnet8_cifar10/pretrainedResnet_quant.tflite"
    return api.quantize_prequantized(api.load_model(path))


def cifar_inputs(shared, manifest, count=8):
    """Real CIFAR-10 images quantized with the artifact's own input parameters."""
    (spec,) = manifest["inputs"]
    q = spec["quantization"]
    images = np.load(shared / "data/cifar10_test_half.npz")["images"][:count]
    # resnet8's float input is the raw pixel value; real = scale * (code - zero_point).
    codes = np.round(images / q["scale"][0]) + q["zero_point"][0]
    return {spec["name"]: np.clip(codes, -128, 127).astype(spec["dtype"])[:, None]}


def test_emulated_pi_runs_the_cross_compiled_model_bit_exact(shared, quantized, board, tmp_path):
    pi = quantized.build("raspberry-pi/4b-aarch64").export(tmp_path / "pi")
    host = quantized.build("x86").export(tmp_path / "host")
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **cifar_inputs(shared, api.load(host).manifest))
    rpc = ["--rpc-tracker", f"{board.host}:{board.port}", "--rpc-key", board.key]
    args = ["--inputs", str(inputs), "--repeat", "3"]
    assert main(["run", str(pi), *args, "--output", str(tmp_path / "pi.npz"), *rpc]) == 0
    assert main(["run", str(host), *args, "--output", str(tmp_path / "host.npz")]) == 0
    with np.load(tmp_path / "pi.npz") as on_pi, np.load(tmp_path / "host.npz") as here:
        assert sorted(on_pi) == sorted(here)
        for name in here:
            assert on_pi[name].shape == here[name].shape == (8, 1, 10)
            np.testing.assert_array_equal(on_pi[name], here[name])


def test_emulated_pi5_runs_the_sdot_kernels_bit_exact(shared, quantized, board, tmp_path):
    """The Pi 5 build multiplies on Arm's ``sdot`` (qemu emulates the dot-product extension)."""
    pi5 = quantized.build("rpi5")
    assert "sdot" in pi5.executable.mod.imports[0].inspect_source("asm")
    pi5 = pi5.export(tmp_path / "pi5")
    host = quantized.build("x86").export(tmp_path / "host")
    batch = cifar_inputs(shared, api.load(host).manifest, count=4)
    samples = [{name: codes[i] for name, codes in batch.items()} for i in range(4)]
    on_pi, _ = api.run(api.load(pi5), samples, rpc=board, repeat=1)
    here, _ = api.run(api.load(host), samples, repeat=1)
    for pi_outputs, host_outputs in zip(on_pi, here, strict=True):
        for name, value in host_outputs.items():
            np.testing.assert_array_equal(pi_outputs[name], value)


def _run_on_board(board, executable, arrays, tmp_path):
    import tvm
    from tvm import relax
    from tvm.support import cc

    library = tmp_path / "kernel.so"
    executable.export_library(str(library), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    session = board.connect()
    session.upload(str(library))
    device = session.cpu()
    vm = relax.VirtualMachine(session.load_module("kernel.so"), device)
    out = vm["main"](*[tvm.runtime.tensor(a, device=device) for a in arrays])
    return out.numpy()


def int4_layers(mod):
    """``mod`` with every binding of ``main`` marked as a layer of 4-bit weights."""
    from qcompiler.passes.annotate import INT4_ATTR
    from qcompiler.passes.graph import bindings

    main = mod["main"]
    mod["main"] = main.with_attr(INT4_ATTR, [b.var.name for b in bindings(main)])
    return mod


@pytest.mark.parametrize(
    ("board_name", "instruction"), [("rpi5", "sdot"), ("rpi4", "smull")], ids=["pi5", "pi4"]
)
@pytest.mark.parametrize(
    ("x_shape", "out_channels", "k", "stride", "pad", "x_dtype", "bits"),
    [
        ((1, 14, 14, 32), 48, 1, 1, 0, "uint8", 8),  # 12 groups of 4 lanes
        ((1, 15, 13, 8), 20, 3, 2, 1, "uint8", 8),  # padded: the pad is uint8 0, not int8 0
        ((1, 9, 9, 3), 8, 3, 1, 1, "int8", 8),  # int8 data needs no shift; 3 -> 4 channels
        ((1, 15, 13, 8), 20, 3, 2, 1, "uint8", 4),  # W4A8: codes unpacked in registers
    ],
)
def test_arm_dot_product_convs_match_numpy_on_the_emulated_pi(
    board,
    tmp_path,
    monkeypatch,
    x_shape,
    out_channels,
    k,
    stride,
    pad,
    x_dtype,
    bits,
    board_name,
    instruction,
):
    """The Pi 5's kernels multiply on ``sdot``, the Pi 4's on NEON's widening ``smull``; with
    4-bit weights unpacked in registers as with 8-bit ones (a separate unpacking kernel is
    plain vector code)."""
    from test_kernels import conv_module, conv_reference

    from qcompiler.targets import kernels
    from qcompiler.targets.boards import resolve_target
    from qcompiler.targets.build import build, fused_module

    monkeypatch.setattr(kernels, "IN_REGISTER_MAX_PIXELS", 10**6)

    rng = np.random.default_rng(out_channels)
    info = np.iinfo(x_dtype)
    x = rng.integers(info.min, info.max + 1, x_shape).astype(x_dtype)
    most = 2 ** (bits - 1) - 1
    w = rng.integers(-most - 1, most + 1, (out_channels, k, k, x_shape[-1]), dtype=np.int8)
    padding = (pad,) * 4
    mod = conv_module(x_shape, w, (stride, stride), padding, x_dtype=x_dtype)
    if bits == 4:
        mod = int4_layers(mod)
        lowered = fused_module(mod, resolve_target(board_name))
        assert any("qc_conv2d_int4" in gv.name_hint for gv in lowered.get_global_vars())
    executable = build(mod, resolve_target(board_name))
    assert instruction in executable.mod.imports[0].inspect_source("asm")
    got = _run_on_board(board, executable, [x], tmp_path)
    np.testing.assert_array_equal(got, conv_reference(x, w, (stride, stride), padding))


def test_emulated_pi_refuses_an_x86_artifact(quantized, board, tmp_path):
    host = quantized.build("x86").export(tmp_path / "host")
    with pytest.raises(QCompilerError, match=r"built for x86 \(x86_64\).*board at .* is aarch64"):
        api.run(api.load(host), [{"input_1_int8": np.zeros((1, 32, 32, 3), np.int8)}], rpc=board)


@pytest.mark.slow  # about 3.5 minutes; .ci/run runs it after the default suite
def test_tuning_through_the_emulated_pi(shared, quantized, board, tmp_path):
    records = tmp_path / "records"
    report = api.tune(quantized, records, "rpi4", trials=16, rpc=board, echo=lambda _: None)
    searched = [task for task in report.tasks if task.trials]
    assert report.trials >= len(report.tasks) and searched
    assert all(task.best_s is not None and task.best_s > 0 for task in searched)
    # The tuned build runs on the board and computes what the host computes.
    tuned = quantized.build("rpi4", tuning_records=records).export(tmp_path / "tuned")
    host = quantized.build("x86")
    inputs = cifar_inputs(shared, host.manifest, count=2)
    samples = [{k: v[i] for k, v in inputs.items()} for i in range(2)]
    on_pi, _ = api.run(api.load(tuned), samples, rpc=board, repeat=1)
    for got, sample in zip(on_pi, samples):
        for name, value in host.run(sample).items():
            np.testing.assert_array_equal(got[name], value)

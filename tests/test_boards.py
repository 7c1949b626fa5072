"""Board profiles, cross-compiled artifacts and what `qc run` refuses.

The references are independent of qcompiler: TVM's own target parser and feature derivation,
the ELF header as `file` reads it, LiteRT's quantization parameters for the model's inputs, and
nvcc for the generated CUDA kernels.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import tvm

from qcompiler import api
from qcompiler.cli import main
from qcompiler.passes.errors import QCompilerError
from qcompiler.targets.boards import boards, load_board_file, resolve_board

litert = pytest.importorskip("ai_edge_litert.interpreter")
needs_gxx = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None,
    reason="Debian's g++-aarch64-linux-gnu is not installed",
)


def resnet8(shared):
    return shared / "models/resnet8_cifar10/pretrainedResnet_quant.tflite"


@pytest.fixture(scope="module")
def quantized(shared):
    return api.quantize_prequantized(api.load_model(resnet8(shared)))


def file_says(path) -> str:
    if shutil.which("file") is None:
        pytest.skip("the `file` command is not installed")
    return subprocess.run(["file", "-b", str(path)], capture_output=True, text=True).stdout


# -- profiles ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, mcpu, dotprod, cores",
    [("rpi4", "cortex-a72", False, 4), ("rpi5", "cortex-a76", True, 4)],
)
def test_raspberry_pi_profiles_match_the_vendor_sheets(name, mcpu, dotprod, cores):
    target = resolve_board(name).tvm_target
    assert target.kind.name == "llvm"
    assert str(target.attrs["mtriple"]).startswith("aarch64")
    assert target.attrs["mcpu"] == mcpu
    assert int(target.attrs["num-cores"]) == cores
    # TVM derives the features from LLVM's knowledge of the CPU and the attributes.
    assert bool(target.attrs["feature.has_asimd"])
    assert bool(target.attrs["feature.has_dotprod"]) is dotprod


@pytest.mark.parametrize(
    "name, arch, host_cpu",
    [("jetson-orin-nano", "sm_87", "cortex-a78ae"), ("jetson-xavier", "sm_72", "carmel")],
)
def test_jetson_profiles_are_cuda_with_an_aarch64_host(name, arch, host_cpu):
    target = resolve_board(name).tvm_target
    assert target.kind.name == "cuda"
    assert target.attrs["arch"] == arch
    assert target.host.attrs["mcpu"] == host_cpu
    assert str(target.host.attrs["mtriple"]).startswith("aarch64")


def test_every_profile_resolves_and_a_tvm_tag_is_accepted():
    names = set(boards())
    assert {"x86", "rpi4", "rpi5", "jetson-orin-nano", "jetson-xavier"} <= names
    for board in boards().values():
        assert isinstance(board.tvm_target, tvm.target.Target)
    tagged = resolve_board("raspberry-pi/4b-aarch64")
    assert tagged.arch == "aarch64" and tagged.cross_compiler == "aarch64-linux-gnu-g++"


def test_unknown_target_names_the_boards():
    with pytest.raises(QCompilerError, match="unknown target 'rpi9'.*rpi4"):
        resolve_board("rpi9")


def test_a_user_board_file(tmp_path, capsys):
    path = tmp_path / "boards.toml"
    path.write_text(
        "[boards.lab-pi]\n"
        'description = "the Pi on the shelf"\n'
        'cross_compiler = "aarch64-linux-gnu-g++"\n'
        'rpc_key = "shelf"\n'
        "[boards.lab-pi.target]\n"
        'kind = "llvm"\nmtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a53"\n'
    )
    board = resolve_board("lab-pi", path)
    assert board.rpc_key == "shelf" and board.tvm_target.attrs["mcpu"] == "cortex-a53"
    assert main(["targets", "--boards", str(path)]) == 0
    listed = capsys.readouterr().out
    assert "lab-pi" in listed and "cortex-a53" in listed and str(path) in listed


@pytest.mark.parametrize(
    "text, message",
    [
        ("[boards.x\n", "not valid TOML"),
        ('[boards.p]\ndescription = "no target"\n', "has no target"),
        ('[boards.p]\ntarget = { kind = "llvm" }\nspeed = 3\n', r"unknown field\(s\) \['speed'\]"),
        ('[boards.p]\ntarget = { kind = "llvm", mcpu = 3 }\n', "TVM refuses its target"),
    ],
)
def test_bad_board_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(QCompilerError, match=message) as err:
        load_board_file(path)
    assert "bad.toml" in str(err.value)


# -- artifacts ---------------------------------------------------------------------------------
@needs_gxx
def test_cross_compiled_library_is_an_aarch64_elf(quantized, tmp_path):
    art = quantized.build("rpi4").export(tmp_path / "rpi4")
    assert "ARM aarch64" in file_says(art / "model.so")
    with open(art / "model.so", "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 0xB7
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target"]["board"] == "rpi4"
    assert manifest["target"]["tvm"]["mcpu"] == "cortex-a72"


def test_manifest_round_trip_and_model_quantization(shared, quantized, tmp_path):
    art = quantized.build("x86")
    path = art.export(tmp_path / "art")
    loaded = api.load(path)
    assert loaded.manifest == json.loads((path / "manifest.json").read_text())
    assert loaded.manifest["weight_bytes"] == sum(
        layer["weight_bytes"] for layer in loaded.manifest["layers"]
    )
    assert {layer["precision"] for layer in loaded.manifest["layers"]} == {"w8a8"}
    # The caller quantizes inputs with the parameters LiteRT reports for the model.
    interpreter = litert.Interpreter(model_path=str(resnet8(shared)))
    (expected,) = interpreter.get_input_details()
    (given,) = loaded.manifest["inputs"]
    assert given["dtype"] == np.dtype(expected["dtype"]).name
    assert given["shape"] == list(expected["shape"])
    scale, zero_point = expected["quantization"]
    assert given["quantization"]["scale"] == [pytest.approx(scale)]
    assert given["quantization"]["zero_point"] == [zero_point]
    (out_expected,) = interpreter.get_output_details()
    out_scale, out_zp = out_expected["quantization"]
    assert loaded.manifest["outputs"][0]["quantization"]["scale"] == [pytest.approx(out_scale)]
    assert loaded.manifest["outputs"][0]["quantization"]["zero_point"] == [out_zp]
    # The loaded library computes what the one in memory does.
    x = {given["name"]: np.arange(np.prod(given["shape"])).reshape(given["shape"]).astype(np.int8)}
    for name, value in art.run(x).items():
        np.testing.assert_array_equal(loaded.run(x)[name], value)


def test_a_tampered_library_is_refused(quantized, tmp_path):
    path = quantized.build("x86").export(tmp_path / "art")
    data = bytearray((path / "model.so").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.so").write_bytes(bytes(data))
    with pytest.raises(QCompilerError, match="checksum mismatch for .*model.so"):
        api.load(path)


@needs_gxx
def test_qc_run_refuses_an_artifact_for_another_machine(quantized, tmp_path, capsys):
    path = quantized.build("rpi4").export(tmp_path / "rpi4")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rpi4 (aarch64" in err and "this host is x86_64" in err


def test_a_missing_cross_compiler_is_named_before_building(quantized):
    with pytest.raises(QCompilerError, match="cross compiler 'no-such-g\\+\\+' .* not installed"):
        quantized.build("rpi4", cross_compiler="no-such-g++")


def nvcc_arches() -> set[str]:
    done = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True)
    return set(done.stdout.split())


def embedded_cubin(library: bytes) -> bytes:
    """The first CUDA ELF inside the first fatbin (magic 0xBA55ED50) of a library."""
    start = library.find((0xBA55ED50).to_bytes(4, "little"))
    assert start >= 0, "no fatbin in the library: the CUDA kernels were not compiled"
    elf = library.find(b"\x7fELF", start)
    return library[elf : elf + 64]


@needs_gxx
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (the CUDA toolkit) is not installed")
@pytest.mark.parametrize("board, sm", [("jetson-orin-nano", 87), ("jetson-xavier", 72)])
def test_jetson_build_links_for_aarch64_with_compiled_kernels(quantized, tmp_path, board, sm):
    if f"compute_{sm}" not in nvcc_arches():
        with pytest.raises(QCompilerError, match=f"CUDA kernels for sm_{sm} failed: nvcc fatal"):
            quantized.build(board)
        return
    art = quantized.build(board)
    path = art.export(tmp_path / board)
    assert "ARM aarch64" in file_says(path / "model.so")
    assert art.manifest["target"]["device"] == "cuda"
    header = embedded_cubin((path / "model.so").read_bytes())
    assert int.from_bytes(header[18:20], "little") == 190  # EM_CUDA
    assert (int.from_bytes(header[48:52], "little") >> 8) & 0xFF == sm  # e_flags: SM version

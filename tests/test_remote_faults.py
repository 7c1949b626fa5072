"""A board that dies or hangs during `qc run`: a bounded wait, then an error naming the board."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from qcompiler import api
from qcompiler.passes.errors import QCompilerError
from qcompiler.targets.tuning import LocalRPC, RPCEndpoint


@pytest.fixture(scope="module")
def artifact(shared, tmp_path_factory):
    path = shared / "models/resnet8_cifar10/pretrainedResnet_quant.tflite"
    quantized = api.quantize_prequantized(api.load_model(path))
    return api.load(quantized.build("x86").export(tmp_path_factory.mktemp("art") / "art"))


SAMPLE = [{"input_1_int8": np.zeros((1, 32, 32, 3), np.int8)}]


@pytest.fixture
def board():
    """A tracker and one host server; yields (the LocalRPC, an endpoint with short timeouts)."""
    rpc = LocalRPC(key="flaky", threads=1)
    endpoint = rpc.__enter__()
    try:
        yield rpc, RPCEndpoint(endpoint.host, endpoint.port, endpoint.key, timeout_s=5)
    finally:
        for proc in rpc.processes[1:]:
            os.killpg(proc.pid, signal.SIGCONT)
        rpc.stop()


def test_a_server_killed_mid_run_is_an_error_naming_the_board(artifact, board):
    from qcompiler.deploy.remote import RemoteModel

    rpc, endpoint = board
    with RemoteModel(artifact, endpoint) as remote:
        remote.run(SAMPLE[0])  # fine while the board is up
        rpc.kill_servers()
        with pytest.raises(QCompilerError, match=r"board at tracker 127\.0\.0\.1:\d+, key 'flaky'"):
            remote.run(SAMPLE[0])


def test_a_hung_board_times_out_with_its_name(artifact, board):
    rpc, endpoint = board
    for proc in rpc.processes[1:]:  # still registered and accepting, never answering
        os.killpg(proc.pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(QCompilerError, match=r"key 'flaky'.* did not answer within 10 s"):
        api.run(artifact, SAMPLE, rpc=endpoint, repeat=1)
    assert time.monotonic() - start < 30


def test_an_unreachable_tracker_is_named_before_anything_runs(artifact, board):
    rpc, endpoint = board
    rpc.kill_tracker()
    start = time.monotonic()
    with pytest.raises(
        QCompilerError, match=rf"cannot reach the RPC tracker at 127\.0\.0\.1:{endpoint.port}"
    ):
        api.run(artifact, SAMPLE, rpc=endpoint, repeat=1)
    assert time.monotonic() - start < 30


def test_a_tracker_lost_mid_run_does_not_stop_the_run(artifact, board):
    """The tracker only hands out the board: a session already open runs on without it."""
    from qcompiler.deploy.remote import RemoteModel

    rpc, endpoint = board
    local = artifact.run(SAMPLE[0])
    with RemoteModel(artifact, endpoint) as remote:
        rpc.kill_tracker()
        for name, value in remote.run(SAMPLE[0]).items():
            np.testing.assert_array_equal(value, local[name])


def _kill_before_call(monkeypatch, rpc, call: int) -> None:
    """Fault injection: the real board's servers are killed just before the ``call``-th
    ``RemoteModel.run`` (a board losing power mid-way through a batch of inputs)."""
    from qcompiler.deploy.remote import RemoteModel

    real, calls = RemoteModel.run, []

    def run(self, inputs):
        calls.append(1)
        if len(calls) == call:
            rpc.kill_servers()
        return real(self, inputs)

    monkeypatch.setattr(RemoteModel, "run", run)


def samples(n):
    rng = np.random.default_rng(4)
    return [
        {"input_1_int8": rng.integers(-128, 128, (1, 32, 32, 3), dtype=np.int8)} for _ in range(n)
    ]


def test_an_interrupted_run_keeps_the_finished_outputs(artifact, board, monkeypatch):
    rpc, endpoint = board
    inputs = samples(5)
    _kill_before_call(monkeypatch, rpc, 4)
    with pytest.raises(api.RunInterrupted, match="3 of 5 samples had finished") as caught:
        api.run(artifact, inputs, rpc=endpoint, repeat=1)
    kept = caught.value.outputs
    assert len(kept) == 3
    for sample, out in zip(inputs, kept):
        for name, value in artifact.run(sample).items():
            np.testing.assert_array_equal(out[name], value)


def test_qc_run_resume_finishes_an_interrupted_run(artifact, board, monkeypatch, tmp_path, capsys):
    from qcompiler import cli
    from qcompiler.data import save_npz_stream

    rpc, endpoint = board
    inputs = samples(5)
    save_npz_stream(tmp_path / "x.npz", inputs)
    out = tmp_path / "y.npz"
    argv = [
        "run", str(artifact.path), "--inputs", str(tmp_path / "x.npz"), "--output", str(out),
        "--rpc-tracker", f"{endpoint.host}:{endpoint.port}", "--rpc-key", endpoint.key,
        "--rpc-timeout", "5", "--repeat", "1",
    ]  # fmt: skip
    _kill_before_call(monkeypatch, rpc, 3)
    assert cli.main(argv) == 2
    assert "kept in" in capsys.readouterr().err and not out.exists()
    monkeypatch.undo()
    rpc.stop()  # a fresh board registers under the same key at a new tracker
    with LocalRPC(key="flaky", threads=1) as fresh:
        argv[argv.index("--rpc-tracker") + 1] = f"{fresh.host}:{fresh.port}"
        assert cli.main([*argv, "--resume"]) == 0
    assert "resuming after the 2 sample(s)" in capsys.readouterr().out
    assert not (tmp_path / "y.npz.partial.npz").exists()
    with np.load(out) as got:
        (name,) = got.files
        assert got[name].shape[0] == 5
        for i, sample in enumerate(inputs):
            np.testing.assert_array_equal(got[name][i], artifact.run(sample)[name])

"""A board that dies or hangs during `qc run`: a bounded wait, then an error naming the board."""

from __future__ import annotations

import os
import signal
import time
import warnings

import numpy as np
import pytest

from qcompiler import api
from qcompiler.passes.errors import QCompilerError
from qcompiler.targets.tuning import LocalRPC, RPCEndpoint


@pytest.fixture(scope="module")
def artifact(shared, tmp_path_factory):
    path = shared / "models/resnet8_cifar10/pretrainedResnet_quant.tflite"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # softmax stays float
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

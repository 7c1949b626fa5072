"""The tuning database under faults: interrupted appends, two runs at once."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from test_kernels import HOST, small_model

from qcompiler.targets.tuning import LocalRPC, load_database, open_database, tune


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """A database with real records: the defaults of a small model measured over RPC."""
    path = tmp_path_factory.mktemp("records")
    with LocalRPC(key="db", threads=1) as endpoint:
        tune(small_model(), HOST, path, endpoint, trials=0, echo=lambda _: None)
    return path


def test_an_interrupted_append_loses_only_the_broken_line(records, tmp_path):
    path = tmp_path / "copy"
    path.mkdir()
    for name in ("workloads.json", "records.json"):
        (path / name).write_bytes((records / name).read_bytes())
    count = len(load_database(path))
    assert count >= 1
    whole = (path / "records.json").read_text()
    with open(path / "records.json", "a") as f:  # a run killed in the middle of a write
        f.write(whole.splitlines()[0][:57])
    with pytest.warns(UserWarning, match=r"records\.json: 1 unreadable line.*moved to"):
        database = load_database(path)
    assert len(database) == count
    assert (path / "records.json.broken").read_text() == whole.splitlines()[0][:57] + "\n"
    assert (path / "records.json").read_text() == whole
    open_database(path)  # and it stays loadable


def test_a_second_tuning_run_waits_for_the_first(records):
    lines = []
    with LocalRPC(key="db2", threads=1) as endpoint:
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time; from qcompiler.targets.tuning import records_lock\n"
                f"with records_lock({str(records)!r}):\n"
                "    print('locked', flush=True); time.sleep(3)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        tune(small_model(), HOST, records, endpoint, trials=0, echo=lines.append)
        waited = time.monotonic() - start
    assert holder.wait(timeout=60) == 0
    assert any("waiting for another tuning run" in line for line in lines)
    assert waited >= 1.5

"""The thread count a user asks for is the number of threads TVM's pool runs kernels on.

Each case runs in a fresh interpreter (the pool is process-wide) and counts the OS threads of the
process after a parallel kernel ran: the pool's workers are threads beside the main one.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, psutil, tvm
    from tvm import s_tir, te
    from qcompiler.deploy.artifact import set_threads

    a = te.placeholder((1 << 16,), "float32", name="a")
    b = te.compute(a.shape, lambda i: a[i] * 2.0, name="b")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    outer, _ = sch.split(sch.get_loops(sch.get_sblock("b"))[0], [64, None])
    sch.parallel(outer)
    lib = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"}))
    before = psutil.Process().num_threads()
    set_threads(int(sys.argv[1]))
    x = tvm.runtime.tensor(np.ones(1 << 16, "float32"))
    y = tvm.runtime.tensor(np.zeros(1 << 16, "float32"))
    for _ in range(3):
        lib(x, y)
    assert (y.numpy() == 2.0).all()
    print(psutil.Process().num_threads() - before)
    """
)


def extra_threads(threads: int) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(threads)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("threads", [2, 3])
def test_pool_grows_to_the_requested_count(threads):
    # The main thread runs one share; the pool adds threads - 1 workers.
    assert extra_threads(threads) == threads - 1


def test_one_thread_starts_no_workers():
    assert extra_threads(1) == 0

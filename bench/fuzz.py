"""Fuzz the compiler with mutated model files: every case must end in a clean error or a
correct result.

Each case takes a model from ../shared, mutates it with a seeded generator (bit flips anywhere,
bit flips in the first 4 KiB where the graph structure lives, or truncation) and compiles it in
a forked child process, so a native crash is counted instead of ending the run. Outcomes:

- ``clean error``: a :class:`QCompilerError` (the message is what a user would read);
- ``correct``: the compile succeeded and the result agrees with the reference runtime running
  the same mutated file: LiteRT's reference kernels for TFLite integer models (at most one step
  apart, the float softmax), onnxruntime for the ONNX models (output SQNR >= 20 dB against
  the float reference, and no NaN where the reference has none);
- ``imprecise``: compiled and finite, but below 20 dB (a weight flipped to a huge value
  swamps a per-tensor activation scale): honest int8, reported apart;
- ``reference refused``: the compile succeeded but the reference runtime rejects the file too
  (nothing to compare with);
- ``BUG``: any other exception, a crash (signal), a wrong result or a hang (``--timeout``).

Run from the repository root (a bounded count, a fixed seed)::

    python bench/fuzz.py                         # 20 cases per model, seed 0
    python bench/fuzz.py --cases 5 --models mnist --seed 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (preamble, peak RSS)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QC_SHARED", REPO.parent / "shared")).resolve()

MODELS = {
    "mnist": "mnist_cnn/mnist_cnn.onnx",
    "mnist_qdq": "mnist_cnn/mnist_cnn.onnx",  # quantized here by onnxruntime (see qdq_mnist)
    "resnet8_int8": "resnet8_cifar10/pretrainedResnet_quant.tflite",
    "vww_int8": "vww_mobilenet/vww_96_int8.tflite",
}
KINDS = ("flip", "flip", "head", "truncate")
# int8 quantization of these models keeps about 30 dB of output SQNR on real and random inputs.
MIN_SQNR_DB = 20.0


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One seeded mutation of ``data`` and a short description of it."""
    kind = rng.choice(KINDS)
    if kind == "truncate":
        end = rng.randrange(len(data))
        return data[:end], f"truncated to {end} bytes"
    mutated = bytearray(data)
    positions = []
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(min(len(data), 4096) if kind == "head" else len(data))
        mutated[pos] ^= 1 << rng.randrange(8)
        positions.append(pos)
    return bytes(mutated), f"{kind} bits at {sorted(positions)}"


def _inputs(model, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        sample = {}
        for spec in model.inputs:
            if np.dtype(spec.dtype).kind in "iu":
                info = np.iinfo(spec.dtype)
                sample[spec.name] = rng.integers(info.min, info.max + 1, spec.shape, spec.dtype)
            else:
                sample[spec.name] = rng.uniform(0, 255, spec.shape).astype(spec.dtype)
        out.append(sample)
    return out


def qdq_mnist(source: Path, folder: Path) -> Path:
    """MNIST quantized by onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights,
    uint8 activations, MinMax), calibrated on 50 test images."""
    with np.load(SHARED / "data" / "mnist_test.npz") as data:
        images = data["images"][:50].astype(np.float32).reshape(-1, 1, 1, 28, 28)
    calib = [{"Input3": x} for x in images]
    return accuracy.ort_quantized(source, calib, "minmax", 99.99, folder)


def _reference(path: Path, samples: list[dict]) -> list[np.ndarray]:
    """The reference runtime's first output for each sample (raises if it refuses the file)."""
    if path.suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        interpreter = Interpreter(
            model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF
        )
        interpreter.allocate_tensors()
        index = interpreter.get_input_details()[0]["index"]
        out = interpreter.get_output_details()[0]["index"]
        results = []
        for sample in samples:
            interpreter.set_tensor(index, next(iter(sample.values())))
            interpreter.invoke()
            results.append(interpreter.get_tensor(out).copy())
        return results
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, sample)[0] for sample in samples]


def _compile_and_run(path: Path, calib: list[dict], samples: list[dict]) -> list[np.ndarray]:
    import qcompiler

    model = qcompiler.frontend.load_model(str(path))
    quantized = qcompiler.quantize(model, calib)
    artifact = quantized.build("x86")
    return [next(iter(artifact.run(s).values())) for s in samples]


def _judge(got: list[np.ndarray], ref: list[np.ndarray]) -> tuple[str, str]:
    """Outcome of comparing ``got`` with the reference's outputs, and the detail."""
    for i, (g, r) in enumerate(zip(got, ref)):
        if g.shape != r.shape or g.dtype != r.dtype:
            return "BUG", f"sample {i}: {g.dtype}{g.shape}, reference {r.dtype}{r.shape}"
        if g.dtype.kind in "iu":
            worst = int(np.max(np.abs(g.astype(np.int64) - r.astype(np.int64))))
            if worst > 1:
                return "BUG", f"sample {i}: {worst} steps from the reference"
        elif np.all(np.isfinite(r)) and not np.all(np.isfinite(g)):
            return "BUG", f"sample {i}: NaN/Inf where the reference is finite"
    if got[0].dtype.kind == "f":
        g, r = np.stack(got).astype(np.float64), np.stack(ref).astype(np.float64)
        if not np.all(np.isfinite(r)):
            return "correct", "the reference itself is not finite"
        sqnr = 10 * np.log10(np.sum(r**2) / max(np.sum((g - r) ** 2), 1e-30))
        if sqnr < MIN_SQNR_DB:
            # A weight flipped to a huge value swamps the per-tensor activation scale: the
            # int8 model is honest but poor. Counted apart, not as a bug.
            return "imprecise", f"output SQNR {sqnr:.1f} dB against the float reference"
    return "correct", ""


def run_case(path: Path, calib: list[dict], samples: list[dict]) -> tuple[str, str]:
    """Outcome and detail of compiling the file at ``path`` (runs in the forked child)."""
    from qcompiler.passes.errors import QCompilerError

    warnings.simplefilter("ignore")  # calibration-size and fallback warnings: not outcomes
    try:
        got = _compile_and_run(path, calib, samples)
    except QCompilerError as err:
        return "clean error", str(err).splitlines()[0][:300]
    except Exception:
        return "BUG", traceback.format_exc()[-1500:]
    try:
        ref = _reference(path, samples)
    except Exception as err:
        return "reference refused", f"{type(err).__name__}: {str(err)[:200]}"
    return _judge(got, ref)


def in_child(fn, timeout_s: float) -> tuple[str, str]:
    """``fn()`` in a forked process: a crash or a hang becomes an outcome, not the end of us."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover  (the child)
        os.close(read)
        try:
            result = fn()
        except BaseException:
            result = ("BUG", traceback.format_exc()[-1500:])
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            return "BUG", f"no answer within {timeout_s:.0f} s"
        time.sleep(0.05)
    with os.fdopen(read, "rb") as pipe:
        payload = pipe.read()
    if os.WIFSIGNALED(status):
        return "BUG", f"crashed with {signal.Signals(os.WTERMSIG(status)).name}"
    return tuple(json.loads(payload))


def fuzz(names, cases: int, seed: int, timeout_s: float) -> Counter:
    from qcompiler.frontend import load_model

    totals = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            source = SHARED / "models" / MODELS[name]
            if name.endswith("_qdq"):
                source = qdq_mnist(source, Path(tmp))
            data = source.read_bytes()
            model = load_model(str(source))
            calib = _inputs(model, 8, seed)
            samples = _inputs(model, 4, seed + 1)
            rng = random.Random(f"{seed}:{name}")
            counts = Counter()
            for case in range(cases):
                mutated, how = mutate(data, rng)
                path = Path(tmp) / f"{name}_{case}{source.suffix}"
                path.write_bytes(mutated)
                outcome, detail = in_child(partial(run_case, path, calib, samples), timeout_s)
                counts[outcome] += 1
                print(f"{name} #{case:<3} {how[:60]:<60} {outcome}: {detail[:160]}", flush=True)
                if outcome == "BUG":
                    print(detail, flush=True)
                path.unlink()
            print(f"== {name}: {dict(counts)}", flush=True)
            totals += counts
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--cases", type=int, default=20, help="mutations per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case")
    args = parser.parse_args(argv)
    start = time.time()
    totals = fuzz(args.models, args.cases, args.seed, args.timeout)
    print(
        f"\n{sum(totals.values())} cases in {time.time() - start:.0f} s: {dict(totals)}; "
        f"peak RSS {accuracy._peak_rss_mib():.0f} MiB (children not counted)"
    )
    return 1 if totals["BUG"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""A bounded, seeded fuzz run over mutated shared models (16 cases; bench/fuzz.py has the full run):
every case ends in a clean QCompilerError or a result that agrees with the reference runtime
on the same mutated file, never a crash, a hang or another exception."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("ai_edge_litert.interpreter")
pytest.importorskip("onnxruntime")


def _fuzz_module():
    path = Path(__file__).resolve().parent.parent / "bench" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("qc_bench_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mutated_models_end_in_a_clean_error_or_a_correct_result(shared, monkeypatch):
    fuzz = _fuzz_module()
    monkeypatch.setattr(fuzz, "SHARED", shared)
    totals = fuzz.fuzz(["mnist", "resnet8_int8"], cases=8, seed=11, timeout_s=300)
    assert sum(totals.values()) == 16
    assert totals["BUG"] == 0, totals
    # The mutations reach both ends: some files are refused, some still compile correctly.
    assert totals["clean error"] and totals["correct"], totals

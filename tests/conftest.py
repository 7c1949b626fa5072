"""Shared fixtures: where the reference models and data live (../shared or $QC_SHARED)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    return Path(os.environ.get("QC_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "models").is_dir():
        pytest.skip(f"shared models not found at {path} (set QC_SHARED)")
    return path

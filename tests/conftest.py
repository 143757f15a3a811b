import json
import os
from pathlib import Path

import numpy as np
import pytest

from lofi.checkpoint import load_safetensors

# The suite runs the MLX engine unless a test says otherwise (test_onnx.py and test_no_mlx.py run
# the ONNX engine): `auto` picks ONNX Runtime on Linux CPUs where it is installed.
os.environ.setdefault("LOFI_ENGINE", "mlx")

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "ace_step_tiny"
CHECKPOINT = GOLDEN / "checkpoint"


def golden(name: str) -> dict[str, np.ndarray]:
    return load_safetensors(GOLDEN / f"{name}.safetensors")


def manifest() -> dict:
    return json.loads((GOLDEN / "manifest.json").read_text())


def assert_close(actual, expected, atol: float, what: str = ""):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3e} > {atol:.1e}"
    return err


@pytest.fixture(scope="session")
def checkpoint_dir():
    return CHECKPOINT

"""Shared test setup: deterministic CPU runs, the repository root importable, and the integration tier's ComfyUI
checkout (``COMFYUI_PATH``) as one fixture for every test that needs it, unit files included."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tiny models: more threads only add contention on CI's 2 shared cores);
    the trainer test files use it for every test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    """The ComfyUI checkout named by ``COMFYUI_PATH`` (>= 0.3.64); every test using it is skipped, saying why, when
    the variable is unset or does not point at a checkout."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("integration tier: set COMFYUI_PATH to a ComfyUI checkout (>= 0.3.64) to run it")
    checkout = Path(path)
    if not (checkout / "main.py").is_file():
        pytest.skip(f"integration tier: COMFYUI_PATH={path} has no main.py (not a ComfyUI checkout)")
    return checkout

"""pytest fixtures shared by the test files (the grid and the helpers are in helpers.py)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def gen():
    """A generator with a fresh seed per test (printed, so a failure can be replayed with
    GAPKERNELS_TEST_SEED)."""
    seed = int(os.environ.get("GAPKERNELS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"GAPKERNELS_TEST_SEED={seed}")
    g = torch.Generator()
    g.manual_seed(seed)
    return g

"""Shared test set-up: determinism, one thread, and the ``reference`` package on the path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:  # `from reference.naive import ...` whatever pytest's import mode
    sys.path.insert(0, _TESTS)

# Tests use tensors of width <= 64 on a shared 2-core machine: one thread is faster than two.
torch.set_num_threads(1)

# Hypothesis: few examples, no per-example deadline (the first call of a shape can be slow).
settings.register_profile("xmodal", max_examples=15, deadline=None, derandomize=True)
settings.load_profile("xmodal")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)

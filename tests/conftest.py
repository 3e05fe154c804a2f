"""Shared fixtures: small state dicts the tests build themselves (the builders are in tests/helpers.py)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import small_state_dict

# tests/test_fuzz.py only re-exports the fuzz harness under the name benchmarks/fuzz.py imports
collect_ignore = ["test_fuzz.py"]


@pytest.fixture
def state_dict() -> dict[str, torch.Tensor]:
    return small_state_dict()

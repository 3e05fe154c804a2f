"""Shared fixtures: small state dicts the tests build themselves."""
from __future__ import annotations

import pytest
import torch


def small_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(8, 4, 3, 3, generator=g) * 0.2
    fc = torch.randn(16, 72, generator=g) * 0.1
    return {
        "conv.weight": conv,
        "conv.bias": torch.randn(8, generator=g) * 0.01,
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.running_var": torch.rand(8, generator=g) + 1e-6,
        "bn.num_batches_tracked": torch.tensor(1234),
        "fc.weight": fc,
        "fc.bias": torch.zeros(16),
        "emb.weight": (torch.randn(50, 12, generator=g) * 0.5).to(torch.bfloat16),
        "half.weight": (torch.randn(20, 20, generator=g)).to(torch.float16),
        "double.weight": torch.randn(30, 10, generator=g, dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(-5, 5, dtype=torch.int32),
        "bytes": torch.arange(0, 250, 7, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
        "one": torch.tensor([7.0]),
    }


@pytest.fixture
def state_dict() -> dict[str, torch.Tensor]:
    return small_state_dict()

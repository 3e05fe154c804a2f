"""Shared fixtures: small state dicts the tests build themselves (the builders are in tests/helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import MARKER_ENV, small_state_dict, toy_model, write_hf

# tests/test_fuzz.py only re-exports the fuzz harness under the name benchmarks/fuzz.py imports
collect_ignore = ["test_fuzz.py"]


@pytest.fixture
def state_dict() -> dict[str, torch.Tensor]:
    return small_state_dict()


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """Where a hostile pickle's code would leave a file (``tests.helpers.RunsCode``), were it run."""
    m = tmp_path / "code-ran"
    monkeypatch.setenv(MARKER_ENV, str(m))
    return m


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> Path:
    """A sharded Hugging Face folder of the toy model (3 shards, an index, carried files)."""
    folder = tmp_path_factory.mktemp("hf") / "toy"
    write_hf(folder, toy_model(), shards=3)
    return folder

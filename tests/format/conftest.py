"""Fixtures of the format tests."""
from __future__ import annotations

import pytest

import tqcodec
from tests.helpers import small_state_dict


@pytest.fixture(scope="module")
def good() -> bytes:
    """A valid file of every dtype family, which the tests damage."""
    return tqcodec.encode_bytes(small_state_dict())

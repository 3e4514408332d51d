"""Fixtures for the ct2 backend tests: the converted Gemma 3 270M model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ct2_test_model import ct2_gemma3_270m  # noqa: E402


@pytest.fixture(scope="session")
def ct2_model_path() -> str:
    return ct2_gemma3_270m()

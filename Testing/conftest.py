"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def sgp_data() -> Path:
    """The real test data folder: $SGP_DATA if set, else ../shared/data beside the checkout."""
    env = os.environ.get("SGP_DATA")
    folder = Path(env) if env else DEFAULT_DATA
    if not folder.is_dir():
        pytest.skip(
            f"real test data not found at {folder} "
            f"({'from SGP_DATA' if env else 'set SGP_DATA or put it at ../shared/data'})"
        )
    return folder

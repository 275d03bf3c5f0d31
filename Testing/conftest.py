"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The suites live in subfolders by subject; the helpers they share (synthetic, oracles,
# module_fixtures, slicer_loader, ...) live here, beside this file.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))


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

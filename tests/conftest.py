import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CLBENCH_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data, or skip: tests never fake the real data."""
    if not (SHARED_DATA / "cifar10-jpeg.zip").is_file():
        pytest.skip(f"real data not found: {SHARED_DATA}/cifar10-jpeg.zip (set CLBENCH_SHARED_DATA)")
    return SHARED_DATA

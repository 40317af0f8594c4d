import os
import socket
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CLBENCH_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data, or skip: tests never fake the real data."""
    if not (SHARED_DATA / "cifar10-jpeg.zip").is_file():
        pytest.skip(f"real data not found: {SHARED_DATA}/cifar10-jpeg.zip (set CLBENCH_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test (restored after): small tensors on a shared 2-core machine run several
    times faster than with two, and timings measured with one thread are compared with one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """Call it for a TCP port on 127.0.0.1 that nothing listens on (free when asked: a server to start, or a
    closed port to fail on)."""
    return _free_port

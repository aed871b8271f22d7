"""Shared fixtures: the location of the real datasets in ``../shared/data``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def _data_dir(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name!r} not found at {path} (the ../shared/data folder beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; tests that need it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    return _data_dir("camvid")


@pytest.fixture(scope="session")
def isbi_root() -> Path:
    return _data_dir("isbi2012")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Caches (dataset validation, downloaded weights) go to a temporary MASKWORKS_HOME, never to ~/.cache."""
    import os

    old = os.environ.get("MASKWORKS_HOME")
    os.environ["MASKWORKS_HOME"] = str(tmp_path_factory.mktemp("maskworks_home"))
    yield
    if old is None:
        os.environ.pop("MASKWORKS_HOME", None)
    else:
        os.environ["MASKWORKS_HOME"] = old


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``), restored
    after the module: a module-level ``torch.set_num_threads(1)`` would leave the whole session single-threaded from
    collection on."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

from pathlib import Path

import pytest

pytest_plugins = ["bdframe.testing"]

REPO = Path(__file__).resolve().parent.parent
SHARED_CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-dataset caches out of the user's home during tests."""
    monkeypatch.setenv("BDFRAME_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("BDFRAME_PROGRESS", "0")


@pytest.fixture
def two_threads():
    """Two torch threads for the test (tiny models gain nothing from more), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)

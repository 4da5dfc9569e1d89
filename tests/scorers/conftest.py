import pytest
import torch

# the scorer fixtures of bdframe.testing, also when the root conftest does not load it as a plugin
from bdframe.testing import tiny_scorer_data, tiny_scorer_model  # noqa: F401


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: extra threads only add overhead (and the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def registry():
    from bdframe.plugins import load_registry

    return load_registry()

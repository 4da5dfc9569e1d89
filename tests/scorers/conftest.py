import pytest
import torch

# the scorer fixtures of bdframe.testing, also when the root conftest does not load it as a plugin
from bdframe.testing import tiny_scorer_data, tiny_scorer_model  # noqa: F401

torch.set_num_threads(1)  # tiny models: threads only add overhead (and the machine is shared)


@pytest.fixture(scope="session")
def registry():
    from bdframe.plugins import load_registry

    return load_registry()

"""Model factories: shapes, the features/head split the scorers rely on, normalisation in the wrapper."""

import pytest
import torch

from bdframe.data import DatasetInfo
from bdframe.nn import Classifier
from bdframe.plugins import load_registry

REG = load_registry()
INFO = DatasetInfo(10, 3, 32, 32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))


@pytest.mark.parametrize("name,params", [("simple-cnn", {}), ("simple-cnn", {"pool": "avg", "logit_scale": 1.0}),
                                         ("resnet18", {"width": 8}), ("resnet34", {"width": 8}),
                                         ("preact-resnet18", {"width": 8}), ("mobilenetv2", {"width_mult": 0.25}),
                                         ("timm", {"arch": "resnet10t"}),
                                         ("fast-cnn", {"widths": [8, 16, 16]}), ("fast-cnn", {"whiten": False})])
def test_model_shapes_and_feature_head_split(name, params):
    torch.manual_seed(0)
    net = REG.create("model", name, **params).build(INFO)
    model = Classifier(net, INFO.mean, INFO.std).eval()
    x = torch.rand(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 10)
    f = model.features(x)
    assert f.dim() == 2 and f.shape[0] == 2
    assert torch.allclose(model.head(f), logits, atol=1e-5)
    # normalisation lives in the wrapper: the raw net sees (x - mean) / std
    assert torch.allclose(net.forward_head(net.forward_features((x - model.mean) / model.std)), logits, atol=1e-5)


def test_unknown_timm_arch_is_a_recipe_error():
    from bdframe.errors import RecipeError

    with pytest.raises(RecipeError, match="unknown timm model 'resnet-18'"):
        REG.create("model", "timm", arch="resnet-18")

"""CLP: the Conv -> BatchNorm pairs of every built-in model, the channel bound, what pruning
changes (exactly the pruned BatchNorm entries) and what it leaves alone, end to end."""

import json

import pytest
import torch
from torch import nn

from helpers import EXAMPLES_CPU, TINY, cpu_signature
from bdframe.cli import main
from bdframe.data import DatasetInfo
from bdframe.nn import Classifier
from bdframe_defense_clp.plugin import conv_bn_pairs, prune, uclc

INFO = DatasetInfo(10, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)


def built(registry, name, **params):
    torch.manual_seed(0)
    model = Classifier(registry.create("model", name, **params).build(INFO), INFO.mean, INFO.std)
    with torch.no_grad():  # trained-looking BatchNorm statistics and scales
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                if m.weight.requires_grad:
                    m.weight.uniform_(0.2, 1.5)
    return model.eval()


@pytest.mark.parametrize("name, params, expected", [
    ("simple-cnn", {"width": 8}, 8), ("fast-cnn", {}, 6), ("preact-resnet18", {}, 8), ("resnet18", {}, 20),
    ("mobilenetv2", {}, 52)])
def test_every_builtin_model_has_its_pairs(bdframe_registry, name, params, expected):
    model = built(bdframe_registry, name, **params)
    pairs = conv_bn_pairs(model)
    assert len(pairs) == expected and len({bn for _, bn in pairs}) == len(pairs)
    modules = dict(model.named_modules())
    for conv, bn in pairs:
        assert modules[conv].out_channels == modules[bn].num_features
    if name == "preact-resnet18":  # bn1 reads the residual sum, not a convolution: skipped
        assert all(not bn.endswith("bn1") for _, bn in pairs) and all(conv.endswith("conv1") for conv, _ in pairs)


def test_the_bound_is_the_scaled_kernel_s_largest_singular_value(bdframe_registry):
    model = built(bdframe_registry, "simple-cnn", width=8)
    modules = dict(model.named_modules())
    conv, bn = (modules[n] for n in conv_bn_pairs(model)[1])
    values = uclc(conv, bn)
    assert (values >= 0).all() and torch.equal(values, uclc(conv, bn))
    k = 3
    w = conv.weight[k].detach().double().reshape(conv.in_channels, -1) * abs(float(bn.weight[k].detach()) / float(bn.running_var[k]) ** 0.5)
    assert float(values[k]) == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-9)


def test_pruning_zeroes_exactly_the_outlying_channels(bdframe_registry):
    model = built(bdframe_registry, "resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune(model, 0.5)
    assert sum(len(layer["pruned"]) for layer in report) > 0
    after = model.state_dict()
    for layer in report:
        idx = torch.tensor(layer["pruned"], dtype=torch.long)
        for p in ("weight", "bias"):
            key = f"{layer['bn']}.{p}"
            assert (after[key][idx] == 0).all()
            keep = torch.ones(layer["channels"], dtype=torch.bool)
            keep[idx] = False
            assert torch.equal(after[key][keep], before[key][keep])
        assert layer["threshold"] == pytest.approx(layer["uclc_mean"] + 0.5 * layer["uclc_std"])
    untouched = [k for k in after if not any(k.startswith(layer["bn"] + ".") for layer in report)]
    assert all(torch.equal(after[k], before[k]) for k in untouched)


def test_pruning_is_deterministic(bdframe_registry):
    a, b = built(bdframe_registry, "preact-resnet18"), built(bdframe_registry, "preact-resnet18")
    b.load_state_dict(a.state_dict())
    report = prune(a, 1.0)
    assert any(layer["pruned"] for layer in report) and report == prune(b, 1.0)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_huge_u_prunes_nothing_and_leaves_the_outputs(bdframe_registry):
    model = built(bdframe_registry, "mobilenetv2")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = model(x)
        report = prune(model, 1e9)
        assert all(not layer["pruned"] for layer in report)
        assert torch.equal(model(x), y0)


def test_a_model_that_cannot_be_traced_is_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="cannot trace the model"):
        conv_bn_pairs(Branchy())


def test_end_to_end(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1)
                 + '\n[defense]\nname = "clp"\nu = 0.0\nrepair_epochs = 1\nevaluate_each_epoch = false\n')
    assert main(["run", str(f), "--quiet"]) == 0
    m = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    dm = m["defense_metrics"]
    assert [t["step"] for t in dm["trend"]] == ["train", "prune", "repair"]
    assert dm["pruned_channels"] == sum(len(layer["pruned"]) for layer in dm["layers"]) > 0
    assert dm["trend"][-1]["clean_acc"] == m["clean_acc"] and "detection" not in m


@pytest.mark.slow
def test_the_clp_example_removes_the_backdoor_without_data(tmp_path):
    """examples/clp-quickstart.toml: the plainly trained model has the backdoor, pruning at u = 1
    removes it (and keeps the accuracy docs/clp.md gives on the CPU it was recorded on)."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "clp-quickstart.toml"
    assert main(["run", str(example), "--quiet", "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    trained = m["defense_metrics"]["trend"][0]
    assert trained["step"] == "train" and trained["asr"] > 0.9
    assert m["defense_metrics"]["pruned_channels"] > 0
    assert m["asr"] < 0.2
    if cpu_signature() == EXAMPLES_CPU:  # docs/clp.md's figures; elsewhere pruning can cost more accuracy
        assert m["clean_acc"] > 0.6

"""The widened training interface and the simclr, linear-probe and mixmatch stages
(docs/training-stages.md)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe.interfaces import StageContext, StageData
from bdframe.losses import lowest_share
from bdframe.nn import head_parameter_names
from bdframe.testing import state_snapshot, tiny_classifier, tiny_imageset
from bdframe_trainer_linear_probe.plugin import LinearProbe, LinearProbeConfig
from bdframe_trainer_mixmatch.plugin import MixMatch, MixMatchConfig
from bdframe_trainer_simclr.plugin import SimCLR, SimCLRConfig

SET = settings(max_examples=25, deadline=None)
QUICK = dict(amp="off", batch_size=16)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stage(name="s", seed=0, **kw):
    return StageContext(seed=seed, name=name, progress=False, **kw)


def split(data, k):
    return data.subset(torch.arange(k)), data.subset(torch.arange(k, len(data)))


def head_names(model):
    return set(head_parameter_names(model, torch.zeros(2, model.net.fc.in_features)))


# -- the interface --------------------------------------------------------------------------------

def test_a_stage_refuses_an_input_it_does_not_take_by_name(bdframe_registry):
    data = tiny_imageset(16, num_classes=4, size=8)
    a, b = split(data, 8)
    standard = bdframe_registry.create("trainer", "standard", epochs=1)
    with pytest.raises(ValueError, match="standard stage has no unlabelled set"):
        standard.fit(tiny_classifier(data), a, stage(), unlabelled=b)
    with pytest.raises(ValueError, match="linear-probe stage has no unlabelled set"):
        LinearProbe().fit(tiny_classifier(data), StageData(a, unlabelled=b), stage())
    with pytest.raises(ValueError, match="simclr stage's labelled and unlabelled sets share sample ids"):
        SimCLR().fit(tiny_classifier(data), data, stage(), unlabelled=a)
    with pytest.raises(TypeError, match="not both"):
        standard.fit(tiny_classifier(data), StageData(a), stage(), forget=b)


def test_head_parameters_are_found_for_every_built_in_model(bdframe_registry):
    from bdframe.nn import Classifier
    from bdframe.testing import info_for

    info = info_for(tiny_imageset(4, num_classes=3, size=32))
    for name in ("resnet18", "preact-resnet18", "mobilenetv2", "simple-cnn", "fast-cnn"):
        net = bdframe_registry.create("model", name).build(info)
        model = Classifier(net, (0.5,) * 3, (0.25,) * 3)
        f = torch.zeros(2, model.features(torch.zeros(2, 3, 32, 32)).shape[1])
        names = head_parameter_names(model, f)
        assert names and all(n.startswith("net.fc.") for n in names), (name, names)


# -- lowest_share ---------------------------------------------------------------------------------

@SET
@given(n=st.integers(0, 60), share=st.floats(0, 1), seed=st.integers(0, 10_000), ties=st.booleans())
def test_lowest_share_keeps_exactly_floor_share_n_of_the_lowest_whatever_the_order(n, share, seed, ties):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 4, (n,), generator=g).double() if ties else torch.rand(n, generator=g, dtype=torch.float64)
    ids = torch.randperm(10 * n + 1, generator=g)[:n]
    keep = lowest_share(values, share, ids)
    assert int(keep.sum()) == math.floor(share * n + 1e-9)
    if bool(keep.any()) and bool((~keep).any()):
        assert values[keep].max() <= values[~keep].min()
    perm = torch.randperm(n, generator=g)
    assert set(ids[perm][lowest_share(values[perm], share, ids[perm])].tolist()) == set(ids[keep].tolist())


@SET
@given(n=st.integers(0, 60), k=st.integers(1, 5), share=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_lowest_share_by_group_keeps_the_lowest_floor_share_of_every_group(n, k, share, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, generator=g, dtype=torch.float64)
    groups = torch.randint(0, k, (n,), generator=g)
    ids = torch.randperm(10 * n + 1, generator=g)[:n]
    keep = lowest_share(values, share, ids, groups)
    for c in range(k):
        rows = groups == c
        kept, left = values[rows & keep], values[rows & ~keep]
        assert len(kept) == math.floor(share * int(rows.sum()) + 1e-9)
        if len(kept) and len(left):
            assert kept.max() <= left.min()
    perm = torch.randperm(n, generator=g)
    again = lowest_share(values[perm], share, ids[perm], groups[perm])
    assert set(ids[perm][again].tolist()) == set(ids[keep].tolist())


def test_lowest_share_by_group_keeps_a_class_that_the_global_split_drops():
    # class 1's losses are all above class 0's: the global half is class 0 alone
    values = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    ids = torch.arange(8)
    assert lowest_share(values, 0.5, ids).tolist() == [True] * 4 + [False] * 4
    assert lowest_share(values, 0.5, ids, labels).tolist() == [True, True, False, False, True, True, False, False]
    with pytest.raises(ValueError, match="groups has shape"):
        lowest_share(values, 0.5, ids, labels[:3])


# -- simclr ----------------------------------------------------------------------------------------

def test_simclr_trains_the_backbone_leaves_the_head_and_drops_its_projection(tmp_path):
    data = tiny_imageset(32, num_classes=4, size=8)
    model = tiny_classifier(data)
    before = state_snapshot(model)
    hist = SimCLR(SimCLRConfig(epochs=2, lr=0.05, **QUICK)).fit(model, data, stage(state_path=tmp_path / "s.pt"))
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in hist)
    after = model.state_dict()
    assert after.keys() == before.keys()  # the projection head is not part of the model
    heads = head_names(model)
    for k in before:
        if k in heads:
            assert torch.equal(after[k], before[k]), f"head parameter {k} changed"
    assert not torch.equal(after["net.conv1.weight"], before["net.conv1.weight"])
    assert "projection" in torch.load(tmp_path / "s.pt", weights_only=False)["modules"]


class _Stop(Exception):
    pass


def _stop_after_first(rec):
    if rec["epoch"] == 1 and not rec.get("replayed"):
        raise _Stop


@pytest.mark.parametrize("make", [
    lambda: (SimCLR(SimCLRConfig(epochs=2, lr=0.05, **QUICK)), {}),
    lambda: (MixMatch(MixMatchConfig(epochs=2, credible_share=0.5, **QUICK)), {}),
], ids=["simclr", "mixmatch-split"])
def test_an_interrupted_stage_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, make):
    data = tiny_imageset(32, num_classes=4, size=8)
    trainer, _ = make()
    full = tiny_classifier(data)
    trainer.fit(full, data, stage())
    part = tiny_classifier(data)
    with pytest.raises(_Stop):
        trainer.fit(part, data, stage(state_path=tmp_path / "s.pt", on_epoch=_stop_after_first))
    resumed = tiny_classifier(data, seed=5)  # other weights: the state must replace them
    hist = trainer.fit(resumed, data, stage(state_path=tmp_path / "s.pt"))
    assert len(hist) == 2
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_simclr_supcon_needs_every_sample_labelled_and_ss_ctl_takes_both():
    data = tiny_imageset(32, num_classes=4, size=8)
    a, b = split(data, 20)
    with pytest.raises(ValueError, match="supcon"):
        SimCLR(SimCLRConfig(epochs=1, mode="supcon", **QUICK)).fit(tiny_classifier(data), a, stage(), unlabelled=b)
    hist = SimCLR(SimCLRConfig(epochs=1, mode="ss-ctl", **QUICK)).fit(tiny_classifier(data), a, stage(),
                                                                       unlabelled=b)
    assert hist[0]["images"] == 32


def test_simclr_lowers_its_loss_on_a_fixed_batch():
    data = tiny_imageset(32, num_classes=4, size=8)
    hist = SimCLR(SimCLRConfig(epochs=8, lr=0.05, batch_size=32, amp="off")).fit(tiny_classifier(data), data, stage())
    assert hist[-1]["loss"] < hist[0]["loss"]


# -- linear-probe -----------------------------------------------------------------------------------

def test_linear_probe_leaves_the_backbone_and_its_batchnorm_statistics_bit_identical():
    data = tiny_imageset(32, num_classes=4, size=8)
    model = tiny_classifier(data)
    before = state_snapshot(model)
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    LinearProbe(LinearProbeConfig(epochs=2, **QUICK)).fit(model, data, stage())
    heads = head_names(model)
    after = model.state_dict()
    for k, v in before.items():
        if k in heads:
            assert not torch.equal(after[k], v), f"head parameter {k} did not train"
        else:
            assert torch.equal(after[k], v), f"backbone state {k} changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before


def test_linear_probe_forget_term_with_lam_zero_is_the_labelled_loss_alone():
    data = tiny_imageset(32, num_classes=4, size=8)
    a, b = split(data, 20)
    cfg = dict(epochs=1, loss="ce", reset_head=False, batch_size=32, amp="off", crop_padding=0, flip=False)
    m1, m2 = tiny_classifier(data), tiny_classifier(data)
    LinearProbe(LinearProbeConfig(lam=0.0, **cfg)).fit(m1, a, stage(), forget=b)
    h2 = LinearProbe(LinearProbeConfig(lam=0.0, **cfg)).fit(m2, a, stage())
    # the same step on the labelled rows (batch order differs, one full batch each)
    assert torch.allclose(m1.net.fc.weight, m2.net.fc.weight, atol=1e-6)
    m3 = tiny_classifier(data)
    LinearProbe(LinearProbeConfig(lam=1.0, **cfg)).fit(m3, a, stage(), forget=b)
    assert not torch.allclose(m3.net.fc.weight, m2.net.fc.weight, atol=1e-6)
    assert h2[0]["images"] == 20


# -- mixmatch ---------------------------------------------------------------------------------------

def test_mixmatch_with_a_credible_share_splits_exactly_each_epoch_and_is_deterministic():
    data = tiny_imageset(30, num_classes=3, size=8)
    runs = []
    for _ in range(2):
        model = tiny_classifier(data)
        hist = MixMatch(MixMatchConfig(epochs=2, credible_share=0.5, **QUICK)).fit(model, data, stage())
        runs.append((hist, state_snapshot(model)))
    hist = runs[0][0]
    assert [h["labelled"] for h in hist] == [15, 15] and [h["unlabelled"] for h in hist] == [15, 15]
    assert all(h["split_loss_labelled"] <= h["split_loss_unlabelled"] for h in hist)
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    with pytest.raises(ValueError, match="splits the data itself"):
        a, b = split(data, 10)
        MixMatch(MixMatchConfig(epochs=1, credible_share=0.5)).fit(tiny_classifier(data), a, stage(), unlabelled=b)


def test_mixmatch_uses_the_unlabelled_set_and_trains_every_parameter():
    data = tiny_imageset(40, num_classes=4, size=8)
    a, b = split(data, 10)
    model = tiny_classifier(data)
    before = state_snapshot(model)
    hist = MixMatch(MixMatchConfig(epochs=1, **QUICK)).fit(model, a, stage(), unlabelled=b)
    assert hist[0]["images"] == 10 and math.isfinite(hist[0]["loss"])
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "net.fc.weight" in changed and "net.conv1.weight" in changed

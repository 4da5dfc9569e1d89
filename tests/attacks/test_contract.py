"""The attack contract, run on every registered attack (a new attack plugin gets it for free).

Built on :func:`bdframe.testing.check_attack_contract`, plus invariants from
docs/attacks.md ("Invariants") that hold for every attack: poison labels = target, covers keep
labels, every poisoned/cover image carries a trigger, the ASR set is triggered non-target
images (TaCT: source-class images) labelled with the target and has no training transform,
meta is JSON, inputs are not modified, results do not depend on the global RNG, training
batches (including an attack's ``ImageSet.transform``) work, and 1-channel 28x28 data works.
"""

import json

import attrs
import pytest
import torch

from bdframe.config import validate_all
from bdframe.data import Augment, Batches
from bdframe.plugins import load_registry
from bdframe.testing import check_attack_contract, info_for, tiny_imageset

REGISTRY = load_registry()
NAMES = REGISTRY.names("attack")
# the attacks of this package set (their selection follows sample ids, not row positions)
ID_KEYED = ["adaptive-blend", "adaptive-patch", "blend", "physicalba", "sig", "tact", "wanet"]


def _sets(channels=3, size=32):
    train = tiny_imageset(200, num_classes=10, size=size, channels=channels, seed=0)
    test = tiny_imageset(100, num_classes=10, size=size, channels=channels, seed=1, id_offset=10_000)
    return train, test


def _attack(name, **params):
    return REGISTRY.create("attack", name, **params)


def test_all_attacks_registered():
    assert set(ID_KEYED) | {"badnet"} <= set(NAMES)
    assert not REGISTRY.failed


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    check_attack_contract(_attack(name), *_sets(), seed=3)


@pytest.mark.parametrize("name", NAMES)
def test_default_config_is_valid(name):
    cls = REGISTRY.get("attack", name)
    assert validate_all(cls.Config()) == []
    assert cls.summary and cls.kind == "attack"


@pytest.mark.parametrize("name", NAMES)
def test_labels_triggers_and_meta(name):
    train, _ = _sets()
    atk = _attack(name)
    ps = atk.poison_train(train, seed=5)
    d = ps.data
    assert ps.poison_ids.dtype == torch.int64 and ps.cover_ids.dtype == torch.int64
    assert len(ps.poison_ids) > 0
    ppos, cpos = d.contains(ps.poison_ids), d.contains(ps.cover_ids)
    assert (d.labels[ppos] == atk.config.target).all()
    assert torch.equal(d.labels[cpos], train.labels[cpos])
    changed = (d.images != train.images).flatten(1).any(1)
    assert changed[ppos].all(), "a poisoned image carries no trigger"
    assert changed[cpos].all(), "a cover image carries no trigger"
    json.dumps(ps.meta)  # saved with every run


@pytest.mark.parametrize("name", NAMES)
def test_asr_set(name):
    train, test = _sets()
    atk = _attack(name)
    atk.poison_train(train, seed=5)
    asr = atk.poison_test(test)
    c = atk.config
    assert len(asr) > 0 and (asr.labels == c.target).all() and asr.labels.dtype == torch.int64
    true = test.labels[test.positions(asr.ids)]
    assert (true != c.target).all(), "target-class images in the ASR set"
    if hasattr(c, "source"):  # source-specific: only source-class images count
        assert (true == c.source).all() and len(asr) == int((test.labels == c.source).sum())
    else:
        assert len(asr) == int((test.labels != c.target).sum())
    clean = test.images[test.positions(asr.ids)]
    assert (asr.images != clean).flatten(1).any(1).all(), "an ASR image carries no trigger"
    assert asr.transform is None


@pytest.mark.parametrize("name", NAMES)
def test_inputs_untouched_and_global_rng_irrelevant(name):
    train, test = _sets()
    before = (train.images.clone(), train.labels.clone(), train.ids.clone(), test.images.clone())
    atk = _attack(name)
    torch.manual_seed(1)
    a = atk.poison_train(train, seed=9)
    ta = atk.poison_test(test)
    torch.manual_seed(2)
    torch.rand(17)
    b = _attack(name).poison_train(train, seed=9)
    tb = atk.poison_test(test)
    assert torch.equal(a.poison_ids, b.poison_ids) and torch.equal(a.cover_ids, b.cover_ids)
    assert torch.equal(a.data.images, b.data.images) and torch.equal(a.data.labels, b.data.labels)
    assert a.meta == b.meta
    assert torch.equal(ta.images, tb.images)
    for x, y in zip(before, (train.images, train.labels, train.ids, test.images)):
        assert torch.equal(x, y), "input set modified in place"


@pytest.mark.parametrize("name", NAMES)
def test_other_seed_other_selection(name):
    train, _ = _sets()
    atk = _attack(name)
    assert not torch.equal(atk.poison_train(train, seed=1).poison_ids, atk.poison_train(train, seed=2).poison_ids)


@pytest.mark.parametrize("name", NAMES)
def test_training_batches_with_attack_transform(name):
    train, _ = _sets()
    ps = _attack(name).poison_train(train, seed=4)

    def epoch(seed):
        out = []
        for x, y, ids in Batches(ps.data, 64, shuffle=True, generator=torch.Generator().manual_seed(seed),
                                 augment=Augment()):
            assert x.dtype == torch.float32 and x.shape[1:] == train.images.shape[1:]
            assert x.min() >= 0 and x.max() <= 1
            out.append(x)
        return torch.cat(out)

    assert torch.equal(epoch(0), epoch(0)), "training batches not a function of the generator"


@pytest.mark.parametrize("name", NAMES)
def test_one_channel_28px(name):
    train, test = _sets(channels=1, size=28)
    atk = _attack(name)
    assert atk.check_dataset(info_for(train)) == []
    check_attack_contract(atk, train, test, seed=0)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_target_class_rejected(name):
    train, _ = _sets()
    atk = REGISTRY.get("attack", name)
    cfg = attrs.evolve(atk.Config(), target=10)
    problems = atk(cfg).check_dataset(info_for(train))
    assert any(f == "target" and "[0, 9]" in m for f, m in problems)


@pytest.mark.parametrize("name", ID_KEYED)
def test_selection_follows_ids_not_row_order(name):
    train, test = _sets()
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    shuffled = train.subset(perm)
    a = _attack(name).poison_train(train, seed=6)
    b = _attack(name).poison_train(shuffled, seed=6)
    assert torch.equal(a.poison_ids, b.poison_ids) and torch.equal(a.cover_ids, b.cover_ids)
    assert torch.equal(a.data.images[perm], b.data.images) and torch.equal(a.data.labels[perm], b.data.labels)

"""Test helpers for bdframe and for third-party plugins (an opt-in pytest plugin).

Enable in a ``conftest.py`` with ``pytest_plugins = ["bdframe.testing"]``. Provides:

- fixture ``bdframe_registry``: a registry built from installed plugins (fresh per test);
- :func:`registry_with`: a registry with extra plugin objects/modules registered for a test
  (``autoload=False`` gives one with only those);
- :func:`tiny_imageset`: a small random :class:`~bdframe.data.ImageSet`;
- :func:`check_attack_contract`: the invariants every Attack must satisfy, so a new attack
  plugin gets them by calling it on its component.
"""

from __future__ import annotations

import pytest
import torch

from bdframe.data import DatasetInfo, ImageSet


def registry_with(*plugins, autoload: bool = True, block=()):
    from bdframe.plugins import load_registry

    return load_registry(plugins=plugins, autoload=autoload, block=block)


def tiny_imageset(n: int = 120, num_classes: int = 4, size: int = 16, channels: int = 3, seed: int = 0,
                  id_offset: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    return ImageSet(images, labels.to(torch.int64), torch.arange(n, dtype=torch.int64) + id_offset,
                    tuple(f"c{i}" for i in range(num_classes)))


def info_for(data: ImageSet) -> DatasetInfo:
    _, c, h, w = data.images.shape
    return DatasetInfo(data.num_classes, c, h, w, (0.5,) * c, (0.25,) * c, data.classes)


def check_attack_contract(attack, train: ImageSet, test: ImageSet, *, seed: int = 0) -> None:
    """Invariants every Attack satisfies (specs/attacks.md section 7)."""
    assert attack.check_dataset(info_for(train)) == [], "attack rejects a valid dataset"
    ps = attack.poison_train(train, seed=seed)
    d = ps.data
    assert d.images.dtype == torch.uint8 and d.images.shape == train.images.shape, "shape/dtype changed"
    assert torch.equal(d.ids, train.ids), "ids changed or reordered"
    poison, cover = set(ps.poison_ids.tolist()), set(ps.cover_ids.tolist())
    assert len(poison) == len(ps.poison_ids) and len(cover) == len(ps.cover_ids), "duplicate ids"
    assert not (poison & cover), "poison and cover overlap"
    assert (poison | cover) <= set(train.ids.tolist()), "unknown ids"
    touched = poison | cover
    untouched = ~d.contains(torch.tensor(sorted(touched), dtype=torch.int64))
    assert torch.equal(d.images[untouched], train.images[untouched]), "clean samples modified"
    assert torch.equal(d.labels[untouched], train.labels[untouched]), "clean labels modified"
    if cover:
        cpos = d.contains(ps.cover_ids)
        assert torch.equal(d.labels[cpos], train.labels[cpos]), "cover samples must keep their labels"
    again = attack.poison_train(train, seed=seed)
    assert torch.equal(again.poison_ids, ps.poison_ids) and torch.equal(again.data.images, d.images), \
        "not deterministic under a seed"
    asr = attack.poison_test(test)
    assert asr.images.dtype == torch.uint8 and asr.images.shape[1:] == test.images.shape[1:]
    assert len(asr) <= len(test)
    assert set(asr.ids.tolist()) <= set(test.ids.tolist())


@pytest.fixture
def bdframe_registry():
    from bdframe.plugins import load_registry

    return load_registry()

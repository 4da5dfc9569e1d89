"""Tests of the example plugin, as its own distribution would carry them.

Run them after installing the plugin (``pip install -e .``) with ``python -m pytest`` from this
folder: the registry test needs the entry point, the others only the package.
"""

import torch

from bdframe.testing import check_attack_contract, tiny_imageset
from bdframe_example_corner_noise.plugin import CornerNoise

DIST = "bdframe-attack-corner-noise-example"


def test_registered_with_its_distribution(bdframe_registry):
    entry = bdframe_registry.entry("attack", "corner-noise")
    assert entry.cls is CornerNoise
    assert entry.provider.distribution == DIST


def test_attack_contract():
    attack = CornerNoise(CornerNoise.Config(poison_rate=0.1, target=1))
    check_attack_contract(attack, tiny_imageset(120), tiny_imageset(40, seed=1))


def test_poisoned_rows_carry_the_patch_and_the_target():
    attack = CornerNoise(CornerNoise.Config(poison_rate=0.25, target=2, patch_size=3, corner="top-left"))
    train = tiny_imageset(80, size=16)
    ps = attack.poison_train(train, seed=7)
    rows = ps.data.contains(ps.poison_ids)
    assert int(rows.sum()) == 20
    assert torch.equal(ps.data.images[rows][:, :, :3, :3], attack.patch(3).expand(20, -1, -1, -1))
    assert bool((ps.data.labels[rows] == 2).all())

"""The third-party attack example (examples/third-party-attack), found through real entry-point
discovery without installing it into the environment: a throwaway .dist-info carrying the
example's entry points is put on sys.path together with the example's src/ folder."""

import sys
from pathlib import Path

import pytest
import torch

from bdframe import recipe as rmod
from bdframe.cli import main
from bdframe.errors import RecipeError
from bdframe.plugins import load_recipe, load_registry
from bdframe.testing import check_attack_contract, registry_with, tiny_imageset

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "third-party-attack"
PROJECT = rmod.tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
DIST = "bdframe-attack-corner-noise-example"
PACKAGE = "bdframe_example_corner_noise"


def _forget_package():
    for mod in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[mod]


@pytest.fixture
def example_installed(tmp_path, monkeypatch):
    """The example as pip would install it: a .dist-info whose METADATA and entry_points.txt
    come from the example's pyproject.toml, and the package importable from its src/."""
    info = tmp_path / f"{PROJECT['name'].replace('-', '_')}-{PROJECT['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {PROJECT['name']}\nVersion: {PROJECT['version']}\n")
    eps = "".join(f"{k} = {v}\n" for k, v in PROJECT["entry-points"]["bdframe"].items())
    (info / "entry_points.txt").write_text("[bdframe]\n" + eps)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.delenv("BDFRAME_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("BDFRAME_LOAD_PLUGINS", raising=False)
    _forget_package()
    yield
    _forget_package()


def test_entry_point_follows_the_naming_convention():
    assert PROJECT["name"] == DIST
    assert PROJECT["entry-points"]["bdframe"] == {DIST: f"{PACKAGE}.plugin"}


def test_registry_finds_it_with_its_distribution(example_installed):
    reg = load_registry()
    assert reg.failed == []
    e = reg.entry("attack", "corner-noise")
    assert (e.provider.plugin, e.provider.distribution, e.provider.version) == (DIST, DIST, PROJECT["version"])
    assert e.cls.__module__ == f"{PACKAGE}.plugin"
    assert "badnet" in reg.names("attack")  # the built-in plugins are still there


def test_bdframe_plugins_lists_it(example_installed, capsys):
    assert main(["plugins"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "corner-noise" in ln)
    assert line.split() == ["attack", "corner-noise", DIST, PROJECT["version"]]


def test_example_recipe_validates(example_installed):
    r, reg = load_recipe(EXAMPLE / "recipe.toml")
    assert r.attack.name == "corner-noise"
    assert (r.attack.config.poison_rate, r.attack.config.corner, r.attack.config.noise_seed) == (0.1, "top-left", 0)
    assert rmod.loads_dict(rmod.tomllib.loads(r.to_toml()), reg) == r  # the resolved recipe round-trips


def test_recipe_errors_name_the_field(example_installed):
    base = {"dataset": {"name": "synthetic", "num_classes": 4, "image_size": 8}, "model": {"name": "simple-cnn"}}
    reg = load_registry()
    with pytest.raises(RecipeError) as ei:
        rmod.loads_dict({**base, "attack": {"name": "corner-noise", "poison_rate": 1.5, "corner": "middle"}}, reg)
    assert "$.attack.poison_rate: must be in (0, 1), got 1.5" in ei.value.problems
    assert any(p.startswith("$.attack.corner: must be one of 'top-left'") for p in ei.value.problems)
    with pytest.raises(RecipeError) as ei:  # dataset-dependent checks
        rmod.loads_dict({**base, "attack": {"name": "corner-noise", "target": 4, "patch_size": 9}}, reg)
    assert "$.attack.target: must be a class index in [0, 3], got 4" in ei.value.problems
    assert "$.attack.patch_size: must be <= the image size 8x8, got 9" in ei.value.problems


def test_attack_contract(example_installed):
    attack = load_registry().create("attack", "corner-noise", poison_rate=0.1, target=1)
    check_attack_contract(attack, tiny_imageset(120), tiny_imageset(40, seed=1))
    check_attack_contract(attack, tiny_imageset(60, channels=1, size=8), tiny_imageset(20, channels=1, size=8))


def test_trigger_is_the_fixed_noise_patch(example_installed):
    attack = load_registry().create("attack", "corner-noise", poison_rate=0.25, target=2, patch_size=3,
                                    corner="bottom-left")
    train = tiny_imageset(80, size=16)
    ps = attack.poison_train(train, seed=5)
    rows = ps.data.contains(ps.poison_ids)
    assert int(rows.sum()) == 20 and len(ps.cover_ids) == 0
    patch = attack.patch(3)
    assert torch.equal(ps.data.images[rows][:, :, 13:, :3], patch.expand(20, -1, -1, -1))
    assert bool((ps.data.labels[rows] == 2).all())
    asr = attack.poison_test(tiny_imageset(40, seed=1, size=16))
    assert len(asr) == 30 and bool((asr.labels == 2).all())
    assert torch.equal(asr.images[:, :, 13:, :3], patch.expand(30, -1, -1, -1))


def test_blocking(example_installed, monkeypatch, tmp_path):
    assert "corner-noise" not in load_registry(block=[DIST]).names("attack")
    recipe = tmp_path / "r.toml"
    recipe.write_text((EXAMPLE / "recipe.toml").read_text() + f'\n[plugins]\nblock = ["{DIST}"]\n')
    with pytest.raises(RecipeError, match=r"\$\.attack\.name: unknown attack 'corner-noise'"):
        load_recipe(recipe)
    monkeypatch.setenv("BDFRAME_BLOCK_PLUGINS", DIST)
    reg = load_registry()
    _forget_package()
    reg = load_registry()
    assert "corner-noise" not in reg.names("attack") and "badnet" in reg.names("attack")
    assert PACKAGE + ".plugin" not in sys.modules  # a blocked plugin is not even imported


def test_registry_with_module_without_installing(monkeypatch):
    """The route writing-plugins.md shows for testing a plugin module directly."""
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    _forget_package()
    try:
        import bdframe_example_corner_noise.plugin as plugin

        reg = registry_with(plugin, autoload=False)
        assert reg.names("attack") == ["corner-noise"]
        assert reg.entry("attack", "corner-noise").provider.distribution is None
        attack = reg.create("attack", "corner-noise", poison_rate=0.1)
        assert attack.config.poison_rate == 0.1
    finally:
        _forget_package()


@pytest.mark.slow
def test_runs_end_to_end(example_installed, tmp_path):
    import json

    recipe = tmp_path / "r.toml"
    recipe.write_text("""
name = "cn"
seed = 1
device = "cpu"
[dataset]
name = "synthetic"
train_size = 200
test_size = 50
image_size = 16
[model]
name = "simple-cnn"
width = 4
[attack]
name = "corner-noise"
poison_rate = 0.1
[train]
name = "standard"
epochs = 1
batch_size = 64
""")
    assert main(["run", str(recipe), "--quiet", "--out", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["plugins"]["attack"] == {"name": "corner-noise", "plugin": DIST, "distribution": DIST,
                                        "version": PROJECT["version"]}
    assert len(json.loads((tmp_path / "run" / "poison.json").read_text())["poison_ids"]) == 20

"""Every attack works from a recipe: `bdframe validate` passes with defaults on the synthetic
dataset, the resolved recipe round-trips, and bad parameters give errors naming the field."""

import pytest

from bdframe import recipe as rmod
from bdframe.cli import main
from bdframe.errors import RecipeError
from bdframe.plugins import load_registry

REG = load_registry()
ATTACKS = ["blend", "sig", "wanet", "physicalba", "tact", "adaptive-blend", "adaptive-patch"]

RECIPE = """
name = "{name}"
seed = 1
device = "cpu"

[dataset]
name = "synthetic"
train_size = 500
test_size = 100

[model]
name = "simple-cnn"

[attack]
name = "{name}"
{params}
"""

BAD = {
    "blend": ("alpha = 1.5", "$.attack.alpha: must be in (0, 1], got 1.5"),
    "sig": ("target = 10", "$.attack.target: must be a class index in [0, 9], got 10"),
    "wanet": ("k = 40", "$.attack.k: must be <= the image size 32x32, got 40"),
    "physicalba": ("scale_min = 0.95", "$.attack.scale_min: must be <= scale_max (0.9), got 0.95"),
    "tact": ("cover_classes = [0, 5]",
             "$.attack.cover_classes: must exclude the source (0) and target (1) classes, got [0, 5]"),
    "adaptive-blend": ("pieces = 9", "$.attack.pieces: sqrt(pieces) = 3 must divide the image size 32x32"),
    "adaptive-patch": ("train_alphas = [1.0, 1.0]",
                       "$.attack.train_alphas: needs one alpha per training trigger (4), got 2"),
}


def _write(tmp_path, name, params=""):
    f = tmp_path / f"{name}.toml"
    f.write_text(RECIPE.format(name=name, params=params))
    return f


@pytest.mark.parametrize("name", ATTACKS)
def test_validate_ok_and_round_trip(name, tmp_path, capsys):
    f = _write(tmp_path, name)
    assert main(["validate", str(f)]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")
    r = rmod.load(f, registry=REG)
    again = rmod.loads_dict(rmod.tomllib.loads(r.to_toml()), registry=REG)
    assert again.attack == r.attack


@pytest.mark.parametrize("name", ATTACKS)
def test_bad_parameter_names_the_field(name, tmp_path, capsys):
    params, message = BAD[name]
    f = _write(tmp_path, name, params)
    with pytest.raises(RecipeError) as ei:
        rmod.load(f, registry=REG)
    assert message in ei.value.problems
    assert main(["validate", str(f)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ATTACKS)
def test_unknown_parameter_lists_allowed(name, tmp_path):
    f = _write(tmp_path, name, "poison_ratio = 0.1")
    with pytest.raises(RecipeError) as ei:
        rmod.load(f, registry=REG)
    assert any("$.attack.poison_ratio: unknown parameter" in p and "did you mean 'poison_rate'" in p
               for p in ei.value.problems)


def test_missing_trigger_files_are_named(tmp_path):
    f = _write(tmp_path, "adaptive-patch", 'trigger_images = ["/nope/a.png"]')
    with pytest.raises(RecipeError) as ei:
        rmod.load(f, registry=REG)
    assert "$.attack.trigger_images[0]: file '/nope/a.png' does not exist" in ei.value.problems

"""Recipe loading: validation with paths, every error collected, round-trip of the resolved recipe."""

import pytest
from hypothesis import given, settings, strategies as st

from bdframe import recipe as rmod
from bdframe.errors import RecipeError
from bdframe.plugins import load_registry

REG = load_registry()


def base(**over):
    d = {"dataset": {"name": "synthetic", "train_size": 100}, "model": {"name": "simple-cnn"},
         "attack": {"name": "badnet"}}
    d.update(over)
    return d


def problems(data):
    with pytest.raises(RecipeError) as ei:
        rmod.loads_dict(data, registry=REG)
    return ei.value.problems


def test_defaults_are_filled_in():
    r = rmod.loads_dict(base(), registry=REG)
    assert r.train.name == "standard" and r.defense.name == "none" and r.device == "auto"
    assert r.attack.config.poison_rate == 0.05 and r.attack.config.target == 1


def test_all_errors_collected_with_paths():
    p = problems(base(attack={"name": "badnet", "poison_rate": 1.5, "target": 99, "colour": "red"},
                      model={"name": "resnet-18"}, train={"name": "standard", "epochs": "ten"}, seeds=3))
    text = "\n".join(p)
    assert "$.attack.colour: unknown parameter" in text
    assert "$.model.name: unknown model 'resnet-18'; did you mean 'resnet18'" in text
    assert "$.train.epochs" in text
    assert "$.seeds: unknown key (did you mean 'seed'?)" in text
    assert len(p) == 4


def test_value_errors_name_field_and_allowed_range():
    p = problems(base(attack={"name": "badnet", "poison_rate": 1.5}))
    assert p == ["$.attack.poison_rate: must be in (0, 1), got 1.5"]
    p = problems(base(attack={"name": "badnet", "target": 10}))
    assert p == ["$.attack.target: must be a class index in [0, 9], got 10"]


def test_missing_sections_and_bad_types():
    p = problems({"model": {"name": "simple-cnn"}, "seed": "x", "device": "gpu"})
    text = "\n".join(p)
    assert "$.dataset: missing section" in text and "$.seed: must be an integer" in text
    assert "$.device: must be 'auto'" in text


def test_dataset_root_checked_at_validation(tmp_path):
    p = problems(base(dataset={"name": "imagefolder", "root": str(tmp_path / "nope")}))
    assert p and p[0].startswith("$.dataset: root: dataset folder") and "does not exist" in p[0]


def test_bad_toml_is_a_user_error(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("name = \n")
    with pytest.raises(RecipeError.__mro__[1], match="not valid TOML"):
        rmod.load(f, registry=REG)


@settings(max_examples=25, deadline=None)
@given(rate=st.floats(0.001, 0.999), target=st.integers(0, 9), patch=st.integers(1, 8),
       epochs=st.integers(0, 50), lr=st.floats(1e-4, 1.0), ls=st.floats(0, 0.5),
       schedule=st.sampled_from(["cosine", "linear", "onecycle", "constant"]), seed=st.integers(0, 2**31))
def test_resolved_recipe_round_trips(rate, target, patch, epochs, lr, ls, schedule, seed):
    data = base(seed=seed, attack={"name": "badnet", "poison_rate": rate, "target": target, "patch_size": patch},
                train={"name": "standard", "epochs": epochs, "lr": lr, "label_smoothing": ls, "schedule": schedule})
    r1 = rmod.loads_dict(data, registry=REG)
    import tomllib

    r2 = rmod.loads_dict(tomllib.loads(r1.to_toml()), registry=REG)
    assert r1 == r2
    assert r1.to_toml() == r2.to_toml()

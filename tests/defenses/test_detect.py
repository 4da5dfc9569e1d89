"""The ``detect`` defense: scores and flags with any scorer, from its own model or a saved one,
and refuses a bad scorer, bad parameters or a model that does not fit, with the field's path."""

import json

import pytest

from helpers import TINY
from bdframe.cli import main


def recipe(tmp_path, defense: str, name="tiny", width=4):
    f = tmp_path / f"{name}.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=2).replace('name = "tiny"', f'name = "{name}"')
                 .replace("width = 4", f"width = {width}") + '\n[defense]\nname = "detect"\n' + defense)
    return f


pytestmark = pytest.mark.usefixtures("two_threads")


def read(tmp_path, name):
    d = tmp_path / "runs" / name
    return json.loads((d / "metrics.json").read_text()), json.loads((d / "suspected.json").read_text())


def test_trains_scores_and_flags_by_the_scorer_s_rule_then_a_saved_model_gives_the_same(tmp_path):
    assert main(["run", str(recipe(tmp_path, 'scorer = "loss"\nparams = {isolation_ratio = 0.05}\n')), "--quiet"]) == 0
    m, sus = read(tmp_path, "tiny")
    assert sus["count"] == int(0.05 * m["train_size"]) == m["detection"]["flagged"]
    assert 0 <= m["detection"]["auroc"] <= 1 and m["defense_metrics"]["has_rule"]
    model = tmp_path / "runs" / "tiny" / "model.pt"
    f = recipe(tmp_path, f'scorer = "loss"\nparams = {{isolation_ratio = 0.05}}\nmodel = "{model}"\n', name="again")
    assert main(["run", str(f), "--quiet"]) == 0
    m2, sus2 = read(tmp_path, "again")
    assert sus2["suspected_ids"] == sus["suspected_ids"] and m2["detection"] == m["detection"]
    assert m2["clean_acc"] == m["clean_acc"] and m2["defense_metrics"]["stage_seconds"]["train"] == 0.0


def test_a_scorer_without_a_rule_flags_nothing_but_scores(tmp_path):
    assert main(["run", str(recipe(tmp_path, 'scorer = "adv-kl"\n')), "--quiet"]) == 0
    m, sus = read(tmp_path, "tiny")
    assert sus["count"] == 0 and not m["defense_metrics"]["has_rule"] and "auroc" in m["detection"]


@pytest.mark.parametrize("defense, expected", [
    ('scorer = "stripp"\n', "$.defense.scorer: unknown scorer 'stripp'; did you mean 'strip'?"),
    ('scorer = "strip"\nparams = {n_overlay = 2}\n', "$.defense.params.n_overlay: unknown parameter for scorer 'strip'"),
    ('scorer = "loss"\nparams = {isolation_ratio = 2.0}\n', "$.defense.params.isolation_ratio: must be"),
])
def test_bad_scorer_settings_are_refused_at_validation(tmp_path, capsys, defense, expected):
    assert main(["validate", str(recipe(tmp_path, defense))]) == 2
    assert expected in capsys.readouterr().err


def test_a_saved_model_that_does_not_fit_is_refused(tmp_path, capsys):
    assert main(["run", str(recipe(tmp_path, 'scorer = "loss"\n')), "--quiet"]) == 0
    model = tmp_path / "runs" / "tiny" / "model.pt"
    f = recipe(tmp_path, f'scorer = "loss"\nmodel = "{model}"\n', name="wide", width=8)
    capsys.readouterr()
    assert main(["run", str(f), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bdframe: error: $.defense.model:" in err and "does not fit the recipe's [model]" in err
    assert not (tmp_path / "runs" / "wide").exists() and not (tmp_path / "runs" / "wide.partial").exists()

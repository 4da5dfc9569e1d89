"""The ``detect`` defense: scores and flags with any scorer, from its own model or a saved one,
and refuses a bad scorer, bad parameters or a model that does not fit, with the field's path."""

import json

import pytest
import torch

from helpers import TINY, spy_on_trainers
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
    ('scorer = "adv-kl"\nretrain = true\n', "$.defense.retrain: scorer 'adv-kl' ranks without flagging"),
    ('scorer = "loss"\nunlearn = 0.6\n', "$.defense.unlearn: unlearns the flagged samples while retraining"),
    ('scorer = "loss"\nretrain = true\nunlearn_below = 1.0\n', "$.defense.unlearn_below: must be"),
])
def test_bad_scorer_or_retrain_settings_are_refused_at_validation(tmp_path, capsys, defense, expected):
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


def _ctx(tmp_path, registry, defense: dict):
    """A programmatic run context for the tiny recipe with the ``detect`` defense ``defense``."""
    import tomllib

    from bdframe import runner
    from bdframe.build import materialise
    from bdframe.recipe import loads_dict

    data = tomllib.loads(TINY.format(out=tmp_path / "runs", epochs=2))
    data["defense"] = {"name": "detect", **defense}
    recipe = loads_dict(data, registry)
    parts = materialise(recipe, registry)
    ctx = runner.RunContext.for_parts(parts, torch.device("cpu"), tmp_path, progress=False)
    fits = []
    spy_on_trainers(ctx, lambda made, data, kw: fits.append((made, data, kw.get("forget"))))
    return recipe, ctx, parts.train, fits


@pytest.mark.parametrize("unlearn", [0.0, 0.6])
def test_retrain_trains_a_fresh_model_on_exactly_the_unflagged_samples(tmp_path, bdframe_registry, unlearn):
    """``retrain = true``: detection is the same as without it, then a fresh model is trained on the
    samples left unflagged and returned; ``unlearn`` > 0 trains it with the mixed stage (the recipe's
    [train] settings) that unlearns exactly the flagged samples, capped at -ln(unlearn_below)."""
    import math

    from bdframe_defense_detect.plugin import Detect

    base = {"scorer": "loss", "params": {"isolation_ratio": 0.1}}
    recipe0, ctx0, train, _ = _ctx(tmp_path / "plain", bdframe_registry, base)
    plain = Detect(recipe0.defense.config).run(train, ctx0)
    recipe, ctx, train, fits = _ctx(tmp_path / "retrain", bdframe_registry,
                                    {**base, "retrain": True, "unlearn": unlearn, "unlearn_below": 0.05})
    res = Detect(recipe.defense.config).run(train, ctx)
    flagged = res.suspected_ids
    assert torch.equal(flagged, plain.suspected_ids) and len(flagged) == int(0.1 * len(train))
    assert len(fits) == 2  # the scored model, then the retrained one
    made, kept, forget = fits[1]
    assert set(kept.ids.tolist()) == set(train.ids.tolist()) - set(flagged.tolist())
    own = recipe.train.config
    if unlearn:
        assert made.name == "mixed" and sorted(forget.ids.tolist()) == sorted(flagged.tolist())
        assert (made.config.lam, made.config.normalize, made.config.forget_ceiling) == \
            (0.6, "batch", pytest.approx(-math.log(0.05)))
        assert (made.config.epochs, made.config.lr, made.config.batch_size) == (own.epochs, own.lr, own.batch_size)
    else:
        assert made.name == "standard" and forget is None
    scored = plain.model.state_dict()
    assert any(not torch.equal(v, scored[k]) for k, v in res.model.state_dict().items())
    r = res.metrics["retrain"]
    assert (r["train_size"], r["unlearned"]) == (len(train) - len(flagged), len(flagged) if unlearn else 0)
    assert "retrain" in res.metrics["stage_seconds"] and plain.metrics["retrain"] is None
    assert f"retrained on the {len(kept)} unflagged samples" in res.summary[-1]
    assert ("unlearning the" in res.summary[-1]) == bool(unlearn)


def test_retrain_through_the_cli_returns_the_retrained_model_and_logs_its_stage(tmp_path):
    f = recipe(tmp_path, 'scorer = "loss"\nparams = {isolation_ratio = 0.1}\nretrain = true\nunlearn = 0.6\n')
    assert main(["run", str(f), "--quiet"]) == 0
    m, sus = read(tmp_path, "tiny")
    r = m["defense_metrics"]["retrain"]
    assert r["train_size"] == m["train_size"] - sus["count"] and r["unlearned"] == sus["count"] > 0
    assert m["clean_acc"] == r["eval"]["clean_acc"]  # the run's model is the retrained one
    stages = [json.loads(line).get("stage") for line in (tmp_path / "runs" / "tiny" / "history.jsonl").open()]
    assert "detect-retrain" in stages


def test_unlearning_refuses_a_train_stage_setting_the_mixed_stage_lacks_before_any_training(tmp_path,
                                                                                          bdframe_registry):
    import attrs

    from bdframe_defense_detect.plugin import Detect

    recipe, ctx, train, fits = _ctx(tmp_path, bdframe_registry, {"scorer": "loss", "retrain": True, "unlearn": 0.6})
    cfg = attrs.evolve(recipe.train.config, cutmix_prob=0.5)
    real = ctx.component

    def component(kind, name=None, **params):
        made = real(kind, name, **params)
        if kind == "trainer" and name is None:
            made.config = cfg
        return made

    ctx.component = component  # the recipe's [train] stage now sets cutmix_prob
    with pytest.raises(ValueError, match="detect: unlearn trains with the mixed stage, which has no \\[train\\] cutmix_prob"):
        Detect(recipe.defense.config).run(train, ctx)
    assert fits == []


@pytest.mark.slow
def test_the_detect_retrain_example_finds_the_poison_and_retrains_without_the_backdoor(tmp_path):
    """examples/detect-retrain-quickstart.toml: the scored model has the backdoor, Activation
    Clustering flags most of the poison, and the model retrained without the flagged samples has
    lost it."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "detect-retrain-quickstart.toml"
    assert main(["run", str(example), "--quiet", "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["defense_metrics"]["retrain"]["unlearned"] == 0
    history = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").open()]
    scored = [h for h in history if h.get("stage") == "detect-train"]
    assert scored and scored[0]["asr"] > 0.5
    assert m["detection"]["recall"] > 0.8
    assert m["asr"] < 0.1 and m["clean_acc"] > 0.85

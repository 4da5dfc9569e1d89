"""The ``d-br`` and ``d-st`` defenses: the FCT split, the class-separation stage, validation of
their tables, what they report, and that neither reads the test set."""

import inspect
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import TINY
from bdframe.cli import main
from bdframe.losses import class_centre_similarity
from bdframe.steps import plateaued

pytestmark = pytest.mark.usefixtures("two_threads")

SPLIT = "notrans_epochs = 1\nintra_epochs = 1\n"
DBR = '[defense]\nname = "d-br"\n' + SPLIT + "rounds = 2\n"
DST = ('[defense]\nname = "d-st"\n' + SPLIT
       + "simclr = {epochs = 1, batch_size = 64, warmup_epochs = 0}\nlinear = {epochs = 1, lr = 0.5}\n")


def recipe(tmp_path, defense):
    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1) + defense)
    return f


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 5), d=st.integers(1, 6), seed=st.integers(0, 1000))
def test_class_centre_similarity_is_a_mean_cosine_of_distinct_centres(n, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    v = float(class_centre_similarity(f, y))
    present = len(torch.unique(y))
    assert -1.0 - 1e-6 <= v <= 1.0 + 1e-6
    if present == 1:
        assert v == 0.0
    perm = torch.randperm(n, generator=g)
    assert math.isclose(float(class_centre_similarity(f[perm], y[perm])), v, abs_tol=1e-5)


def test_class_centres_that_point_apart_score_lower_than_aligned_ones():
    y = torch.tensor([0, 0, 1, 1])
    apart = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, -0.1]])
    aligned = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.05], [1.0, -0.1]])
    assert float(class_centre_similarity(apart, y)) < 0 < float(class_centre_similarity(aligned, y))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 6), d=st.integers(1, 8), seed=st.integers(0, 1000),
       relu=st.booleans())
def test_the_class_separation_floor_is_a_lower_bound_of_the_loss(n, k, d, seed, relu):
    """-1/k for k classes (0 for one class), 0 for non-negative features: the loss is never lower."""
    from bdframe_trainer_class_separation.plugin import batch_floor

    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g)
    f = f.clamp(min=0) if relu else f
    y = torch.randint(0, k, (n,), generator=g)
    floor = batch_floor(f, y)
    present = len(torch.unique(y))
    assert floor == (0.0 if present == 1 or bool((f >= 0).all()) else -1.0 / present)
    assert float(class_centre_similarity(f, y)) >= floor - 1e-6


@pytest.mark.parametrize("k", [2, 3, 10])
def test_the_class_separation_floor_is_reached_by_centres_spread_as_a_simplex(k):
    from bdframe_trainer_class_separation.plugin import batch_floor

    centres = torch.eye(k) - 1.0 / k  # a regular simplex: the k centred unit axes
    y = torch.arange(k).repeat(3)
    f = centres[y]
    assert float(class_centre_similarity(f, y)) == pytest.approx(-1.0 / k, abs=1e-6) == batch_floor(f, y)
    assert batch_floor(torch.eye(k)[y], y) == 0.0 == pytest.approx(float(class_centre_similarity(torch.eye(k)[y], y)))


@pytest.mark.parametrize("gap, epochs", [(0, 3), (10.0, 1)], ids=["all-epochs", "stops-after-one"])
def test_intra_stop_gap_ends_the_class_separation_stage_near_its_floor(tmp_path, gap, epochs):
    """Every separation epoch records its floor; a gap wider than any loss can be from its floor
    (the loss is at most 1 and the floor at least -1/2) stops the stage after its first epoch."""
    f = recipe(tmp_path, DBR.replace("intra_epochs = 1", "intra_epochs = 3") + f"intra_stop_gap = {gap}\n")
    assert main(["run", str(f), "--quiet"]) == 0
    d = tmp_path / "runs" / "tiny"
    recs = [r for r in map(json.loads, (d / "history.jsonl").read_text().splitlines())
            if r.get("stage") == "dbr-scoring-separate" and "epoch" in r]
    assert [r["epoch"] for r in recs] == list(range(1, epochs + 1))
    assert all(r["loss"] >= r["loss_floor"] - 1e-6 and -0.5 <= r["loss_floor"] <= 0 for r in recs)
    assert [bool(r.get("stopped")) for r in recs] == [False] * (epochs - 1) + [gap > 0]


@pytest.mark.parametrize("defense, expected", [
    (DBR + "alpha_clean = 0.9\nalpha_poison = 0.2\n", "$.defense.alpha_poison: alpha_clean + alpha_poison must be <= 1"),
    (DBR + "fct = {transforms = [\"spin\"]}\n", "$.defense.fct.transforms: element 0: must be one of"),
    (DBR + "plateau_share = 0\n", "$.defense.plateau_share:"),
    (DBR + "intra_stop_gap = -0.1\n", "$.defense.intra_stop_gap:"),
    (DBR + "plateau_fall = 1.0\n", "$.defense.plateau_fall:"),
    (DBR + "fct = {alpha_clean = 0.1}\n", "$.defense.fct: 'alpha_clean' is set by the defense itself"),
    (DST.replace("simclr = {", "simclr = {mode = \"simclr\", "), "$.defense.simclr: 'mode' is set by the defense itself"),
    (DST.replace("linear = {", "linear = {lossy = 1, "), "$.defense.linear.lossy: unknown parameter"),
])
def test_bad_split_or_stage_settings_are_one_clear_line(tmp_path, capsys, defense, expected):
    assert main(["validate", str(recipe(tmp_path, defense))]) == 2
    err = capsys.readouterr().err
    assert expected in err, err


@pytest.mark.parametrize("defense, prefix", [(DBR, "dbr"), (DST, "dst")], ids=["d-br", "d-st"])
def test_the_split_partitions_the_data_by_the_alphas_and_is_reported(tmp_path, defense, prefix):
    assert main(["run", str(recipe(tmp_path, defense)), "--quiet"]) == 0
    d = tmp_path / "runs" / "tiny"
    m = json.loads((d / "metrics.json").read_text())
    n = m["train_size"]
    split = m["defense_metrics"]["split"]
    assert sum(split.values()) == n
    assert split["poisoned"] == math.floor(0.05 * n) and split["clean"] == math.floor(0.2 * n) + 1  # ties aside
    assert m["detection"]["flagged"] == split["poisoned"] and 0 <= m["detection"]["auroc"] <= 1
    stages = [json.loads(line)["stage"] for line in (d / "history.jsonl").read_text().splitlines()]
    assert f"{prefix}-scoring-plain" in stages and f"{prefix}-scoring-separate" in stages
    assert stages.index(f"{prefix}-fct-split") > stages.index(f"{prefix}-scoring-separate")


def test_d_br_without_a_suspected_poisoned_set_is_plain_relearning(tmp_path):
    f = recipe(tmp_path, DBR.replace("rounds = 2", "rounds = 1") + "alpha_poison = 0.001\n")
    assert main(["run", str(f), "--quiet"]) == 0
    d = tmp_path / "runs" / "tiny"
    m = json.loads((d / "metrics.json").read_text())
    assert m["defense_metrics"]["split"]["poisoned"] == 0
    stages = [json.loads(line)["stage"] for line in (d / "history.jsonl").read_text().splitlines()]
    assert "dbr-round-01-relearn" in stages and "dbr-round-01-unlearn" not in stages


@settings(max_examples=50, deadline=None)
@given(k=st.integers(1, 8), share=st.sampled_from([0.01, 0.05, 0.1, 0.25, 0.5]), n=st.integers(0, 60),
       start=st.integers(0, 100))
def test_a_steady_fall_has_not_plateaued_until_the_window_is_a_small_enough_share_of_it(k, share, n, start):
    """A fall of one point per round: the last k rounds are k of the r points fallen, so the rule
    holds exactly when k < share * r, and never in the first k rounds."""
    fits = [float(start - i) for i in range(n + 1)]
    assert plateaued(fits, k, share) == (n > k and k < share * n)


@settings(max_examples=50, deadline=None)
@given(k=st.integers(1, 6), drop=st.integers(1, 50), at=st.integers(1, 20), extra=st.integers(0, 10),
       noise=st.lists(st.integers(0, 5), min_size=16, max_size=16))
def test_a_fall_then_a_flat_or_rising_line_plateaus_k_rounds_after_the_lowest_point(k, drop, at, extra, noise):
    """The accuracy falls by ``drop`` at round ``at`` and then never goes lower (it may rise
    back): the rule holds from round ``at + k`` on, and not before."""
    fits = [100.0] * at + [100.0 - drop] + [100.0 - drop + x for x in noise[:extra + k]]
    for r in range(len(fits)):
        assert plateaued(fits[: r + 1], k, 0.05) == (r >= at + k), r


@settings(max_examples=50, deadline=None)
@given(k=st.integers(1, 6), drop=st.integers(1, 50), least=st.integers(0, 60), at=st.integers(1, 10),
       flat=st.integers(0, 12))
def test_a_fall_smaller_than_least_fall_never_plateaus_and_a_larger_one_is_unaffected(k, drop, least, at, flat):
    """``least_fall``: a dip of ``drop`` points followed by a flat line is a plateau only when the
    dip is at least ``least_fall``; when it is, the rule answers as without ``least_fall``."""
    fits = [100.0] * at + [100.0 - drop] * (1 + flat)
    for r in range(len(fits)):
        with_least = plateaued(fits[: r + 1], k, 0.05, float(least))
        assert with_least == (plateaued(fits[: r + 1], k, 0.05) and drop >= least), r


def test_no_fall_never_plateaus_and_the_window_must_be_full():
    assert not plateaued([0.5] * 30, 5, 0.05)
    assert not plateaued([0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7], 2, 0.05)
    assert not plateaued([1.0, 0.0], 1, 0.05) and plateaued([1.0, 0.0, 0.0], 1, 0.05)
    assert not plateaued([1.0, 0.0, 0.0], 0, 0.05)


def test_d_br_stops_at_the_first_round_where_the_rule_holds_on_the_logged_fit_figures(tmp_path, monkeypatch):
    """The run asks the rule after every round with the fit figures so far (round 0 first) and
    the recipe's two settings, stops at the first round where it holds, reports that round's
    model and says so. The rule is replaced by one that holds from round 2 on (the tiny model
    does not fit its suspected-poisoned set enough for the real rule to be exercised here;
    the rule itself is tested above)."""
    from bdframe import steps

    calls = []

    def rule(fits, rounds, share, least_fall):
        calls.append((list(fits), rounds, share, least_fall))
        return len(fits) >= 3

    monkeypatch.setattr(steps, "plateaued", rule)  # the repair's rule, shared with MeCa's repair
    f = recipe(tmp_path, DBR.replace("rounds = 2", "rounds = 6")
               + "plateau_rounds = 4\nplateau_share = 0.2\nplateau_fall = 0.1\n")
    assert main(["run", str(f), "--quiet"]) == 0
    d = tmp_path / "runs" / "tiny"
    m = json.loads((d / "metrics.json").read_text())
    dm = m["defense_metrics"]
    trend = dm["trend"]
    assert dm["rounds"] == 2 and [t["round"] for t in trend] == [0, 2]  # round 0 and the last
    assert [len(c[0]) for c in calls] == [2, 3] and all(c[1:] == (4, 0.2, 0.1) for c in calls)
    assert calls[-1][0][0] == trend[0]["fit_poisoned"] and calls[-1][0][-1] == trend[-1]["fit_poisoned"]
    assert all(0 <= t["fit_poisoned"] <= 1 and 0 <= t["fit_clean"] <= 1 for t in trend)
    assert m["clean_acc"] == trend[-1]["clean_acc"]
    stages = [json.loads(line)["stage"] for line in (d / "history.jsonl").read_text().splitlines()]
    assert "dbr-round-02-relearn" in stages and not [s for s in stages if s.startswith("dbr-round-03")]
    assert "after 2 rounds of unlearning and relearning (stopped:" in m["defense_summary"][-1]


def test_d_br_without_the_rule_runs_every_round_and_measures_no_fit(tmp_path):
    assert main(["run", str(recipe(tmp_path, DBR)), "--quiet"]) == 0
    dm = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())["defense_metrics"]
    assert dm["rounds"] == 2 and [t["round"] for t in dm["trend"]] == [0, 2]
    assert dm["trend"][0]["fit_poisoned"] is None


def test_neither_defense_reads_the_test_set_except_through_the_reporting_evaluate():
    """No identifier in the defenses' code names a test or ASR set: what they get about the test
    data comes from ``ctx.evaluate`` (reporting only), and the context offers nothing else."""
    import ast

    import bdframe_defense_dbr.plugin as dbr
    from bdframe.interfaces import DefenseContext

    tree = ast.parse(inspect.getsource(dbr))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not {x for x in names if "test" in x.lower() or "asr" in x.lower()}
    assert not [name for name in dir(DefenseContext) if "test" in name or "asr" in name]


def _example(name):
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "examples" / name


@pytest.mark.slow
def test_the_d_br_example_removes_the_backdoor_of_the_model_it_repairs(tmp_path):
    assert main(["run", str(_example("dbr-quickstart.toml")), "--quiet", "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    trend = m["defense_metrics"]["trend"]
    assert trend[0]["round"] == 0 and trend[0]["asr"] > 0.8  # the trained model has the backdoor
    assert m["asr"] < 0.1 and m["clean_acc"] > 0.5
    assert m["detection"]["precision"] > 0.9 and m["detection"]["auroc"] > 0.9


@pytest.mark.slow
@pytest.mark.heavy
def test_the_d_st_example_trains_a_model_that_mostly_resists_the_trigger(tmp_path):
    """A model trained on the same data without a defense obeys the trigger (ASR 100%, see
    test_dbd.py); d-st's does a fraction of the time (docs/dbr.md: about 11% with two threads)."""
    assert main(["run", str(_example("dst-quickstart.toml")), "--quiet", "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["asr"] < 0.25 and m["clean_acc"] > 0.3
    assert m["detection"]["precision"] > 0.9

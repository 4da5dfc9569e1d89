"""MeCa (docs/meca.md): partition, schedule and detection rules, composition
through the registry without ground truth, and an end-to-end `bdframe run` with resume."""

import json
import math
import sys
import tomllib
from fractions import Fraction
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import spy_on_trainers
from bdframe import runner
from bdframe.cli import main
from bdframe.data import ImageSet
from bdframe.training import cpu_bf16_supported
from bdframe_defense_meca.plugin import (PAPER_SETTINGS, MeCa, MeCaConfig, alpha_at, detect, forget_count,
                                         partition, repair_split)

SET = settings(max_examples=30, deadline=None)

RECIPE = """
name = "tiny-meca"
seed = 3
device = "cpu"
output_dir = "{out}"

[dataset]
name = "synthetic"
train_size = {train_size}
test_size = 60
image_size = 16

[model]
name = "simple-cnn"
width = 4
{attack}
[train]
name = "standard"
epochs = 2
batch_size = 64
lr = 0.05

[defense]
name = "meca"
warmup_epochs = 1
iterations = 2
batch_size = 64
# the paper's detection and clean training (the tests add bdframe's options where they test them)
detection = "argmax"
class_test = "enhanced"
class_stat = "share"
spread_max_classes = 0
inside = "otsu"
split_side = "confident"
clean_unlearn = 0.0
clean_unlearn_core = false
core_side = "confident"
recheck_below = 0.0
relabel = "all"
relearn = {relearn}
relearn_epochs = 1
"""

ATTACK = """
[attack]
name = "badnet"
poison_rate = 0.1
target = 1
"""


def recipe_text(out, *, train_size=300, attack=True, relearn=True):
    return RECIPE.format(out=out, train_size=train_size, attack=ATTACK if attack else "",
                         relearn="true" if relearn else "false")


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)


# -- Algorithm 1: the partition ------------------------------------------------------------------

@SET
@given(st.integers(1, 400), st.integers(1, 20), st.integers(0, 10 ** 6))
def test_partition_sizes_are_exact_disjoint_and_cover(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10 * n, generator=g)[:n] + 7
    scores = -torch.rand(n, generator=g, dtype=torch.float64).round(decimals=2)  # -KL, with ties
    alpha = alpha_at(k, 0.05, 0.5)
    f, l = partition(scores, ids, alpha)
    exact = math.ceil(min(Fraction(5 * k, 100), Fraction(1, 2)) * n)
    assert len(f) == exact == forget_count(alpha, n)
    assert len(f) + len(l) == n and not set(f.tolist()) & set(l.tolist())
    assert sorted(f.tolist() + l.tolist()) == list(range(n))
    if len(f) and len(l):  # D_c holds the least consistent samples (highest KL)
        assert float(scores[f].max()) <= float(scores[l].min())
    # set-level, permutation-equivariant: the same ids whatever the row order
    perm = torch.randperm(n, generator=g)
    fp, _ = partition(scores[perm], ids[perm], alpha)
    assert set(ids[perm][fp].tolist()) == set(ids[f].tolist())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_partition_never_puts_a_protected_sample_in_the_unlearned_set(n, k, seed):
    """With ``eligible`` (MeCa's protect_confident), D_c holds the least consistent eligible
    samples, as many as without protection when enough are eligible, and every protected sample
    stays in the learned set; with ``skip`` (forget_skip) the least consistent eligible rows are
    passed over first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10 * n, generator=g)[:n]
    scores = -torch.rand(n, generator=g, dtype=torch.float64).round(decimals=2)
    eligible = torch.rand(n, generator=g) < 0.6
    alpha = alpha_at(k, 0.05, 0.5)
    f, l = partition(scores, ids, alpha, eligible)
    assert bool(eligible[f].all())
    assert len(f) == min(forget_count(alpha, n), int(eligible.sum()))
    assert sorted(f.tolist() + l.tolist()) == list(range(n))
    rest = l[eligible[l]]
    if len(f) and len(rest):
        assert float(scores[f].max()) <= float(scores[rest].min())
    skip = 0.1
    fs, ls_ = partition(scores, ids, alpha, eligible, skip=skip)
    passed = min(forget_count(skip, n), int(eligible.sum()))
    assert bool(eligible[fs].all()) and len(fs) == min(forget_count(alpha, n), int(eligible.sum()) - passed)
    if len(fs):  # exactly the passed-over rows are less consistent than D_c among the eligible ones
        below = [i for i in range(n) if eligible[i] and i not in set(fs.tolist()) and scores[i] < scores[fs].min()]
        assert len(below) <= passed
    everyone = torch.ones(n, dtype=torch.bool)
    assert all(torch.equal(a, b) for a, b in zip(partition(scores, ids, alpha, everyone), partition(scores, ids, alpha)))



def test_alpha_schedule_and_float_noise():
    assert [alpha_at(k, 0.05, 0.5) for k in (1, 2, 10, 11, 30)] == [0.05, 0.1, 0.5, 0.5, 0.5]
    assert 0.05 * 3 > 0.15 and forget_count(0.05 * 3, 100) == 15  # 0.15000000000000002
    assert forget_count(0.05, 1) == 1 and forget_count(0.5, 7) == 4 and forget_count(1e-9, 10) == 1
    with pytest.raises(FloatingPointError):
        partition(torch.tensor([0.0, float("nan")]), torch.tensor([1, 2]), 0.5)


def test_detection_rule_and_enhanced_score():
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-2.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    poisoned, prob = detect(logits, labels)
    assert poisoned.tolist() == [True, False, False, True]  # argmax != label -> clean (ties -> first)
    assert bool(((prob >= 0) & (prob <= 1)).all())
    assert torch.allclose(prob, torch.softmax(logits, 1)[torch.arange(4), labels])


def test_defaults_match_the_spec():
    """The paper's schedule and scorer are the defaults; where bdframe's defaults differ (no
    enhancement, label-aware detection, a clean training that unlearns the flagged cores),
    PAPER_SETTINGS holds the paper's values, and with them the config is the paper's pipeline."""
    c = MeCaConfig()
    assert (c.iterations, c.detection, c.class_test, c.class_stat, c.spread_max_classes, c.inside, c.split_side,
            c.clean_unlearn, c.clean_unlearn_core, c.core_side) == (0, "label-aware", "warmup", "gap-separation-floor",
                                                                    1, "clusters", "auto-moved", 2.0, True, "far")
    assert c.spread_k == 3.0
    c = MeCaConfig(**PAPER_SETTINGS)
    assert (c.iterations, c.detection, c.clean_unlearn, c.relearn) == (10, "argmax", 0.0, False)
    assert set(PAPER_SETTINGS) <= {f.name for f in attrs.fields(MeCaConfig)}
    assert all(getattr(MeCaConfig(), k) != v for k, v in PAPER_SETTINGS.items())  # only what differs
    assert (c.warmup_epochs, c.iterations, c.alpha_step, c.alpha_max, c.lam) == (10, 10, 0.05, 0.5, 0.05)
    assert (c.epochs_per_iteration, c.enhance_lr, c.momentum, c.weight_decay, c.batch_size) == (1, 0.01, 0.9, 5e-4,
                                                                                              128)
    assert (c.epsilon, c.patch_size, c.mask_mode, c.keep_prob, c.grad_loss) == (8 / 255, 2, "grid", 0.5, "ce_label")
    assert (c.relearn, c.relearn_epochs, c.relearn_lr) == (False, 20, 0.01)
    assert (c.relearn_settings, c.relearn_balance) == ("meca", False)
    assert (MeCaConfig().relearn_settings, MeCaConfig().relearn_balance) == ("train", True)
    # the second look, off in the paper's pipeline, looks once by default
    assert (c.recheck_below, MeCaConfig().recheck_below, MeCaConfig().recheck_rounds) == (0.0, 0.5, 1)


def test_trend_plot_has_labelled_axes_and_skips_missing_values(tmp_path):
    from bdframe import plots

    d = plots.trend([0.9, 0.5, 0.2], [0.0, float("nan"), 1.0], tmp_path / "meca_trend.png")
    assert d["file"] == "meca_trend.png" and (tmp_path / "meca_trend.png").stat().st_size > 5000
    assert d["xlabel"] == "iteration (0 = warm-up model)" and "%" in d["ylabel"] and "MeCa" in d["title"]
    assert [x.split(" (")[0] for x in d["legend"]] == ["clean accuracy", "attack success rate"]
    assert d["points"] == {"acc": 3, "asr": 2}
    assert plots.trend([], [], tmp_path / "empty.png")["legend"] == []


class Forbidden:
    """A component stand-in whose every use fails the test; reading the real component's
    ``config`` (settings, not work) is allowed when one is given."""

    def __init__(self, what, real=None):
        self.what = what
        if real is not None:
            self.config = real.config

    def __getattr__(self, attr):
        pytest.fail(f"{self.what}.{attr} used: a finished stage was redone")


# -- composition without ground truth ------------------------------------------------------------

def make_ctx(tmp_path, registry, *, train_size=120):
    from bdframe.recipe import loads_dict

    from bdframe.build import materialise

    recipe = loads_dict(tomllib.loads(recipe_text(tmp_path, train_size=train_size, attack=False, relearn=False)),
                        registry)
    parts = materialise(recipe, registry)
    ctx = runner.RunContext.for_parts(parts, torch.device("cpu"), tmp_path, progress=False)
    return recipe, ctx, parts.train


def test_runs_on_plain_data_through_the_registry_and_resumes_from_saved_stages(tmp_path, bdframe_registry):
    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry)
    # nothing but images, labels and ids (and class names): no poison information exists anywhere
    plain = ImageSet(train.images.clone(), train.labels.clone(), train.ids.clone())
    asked = []
    real = ctx.component

    def component(kind, name=None, **params):
        asked.append((kind, name, params.get("iteration")))
        return real(kind, name, **params)

    ctx.component = component
    defense = MeCa(recipe.defense.config)
    res = defense.run(plain, ctx)
    # the recipe's [train] stage is asked first: MeCa's own stages follow its amp setting (amp = "auto")
    assert asked == [("trainer", None, None), ("trainer", "standard", None), ("trainer", "mixed", None),
                     ("scorer", "adv-kl", None),
                     ("trainer", None, None), ("scorer", "adv-kl", 1), ("scorer", "adv-kl", 2)]
    n = len(plain)
    sus = set(res.suspected_ids.tolist())
    assert sus <= set(plain.ids.tolist())
    m = res.metrics
    assert m["split"]["poison"] == len(sus) and m["split"]["clean"] + m["split"]["poison"] == n
    assert [t["iteration"] for t in m["trend"]] == [0, 1, 2]
    assert [t["forget_size"] for t in m["trend"]] == [0, math.ceil(0.05 * n), math.ceil(0.1 * n)]
    assert all(t["forget_size"] + t["learn_size"] == n for t in m["trend"])
    assert all(t["asr"] is None and 0 <= t["clean_acc"] <= 1 for t in m["trend"])  # no attack: no ASR
    assert m["relearn"] is None and m["resumed_stages"] == []
    assert (tmp_path / "meca_trend.png").exists() and (tmp_path / "meca_clean_model.pt").exists()
    saved = torch.load(tmp_path / "meca_scores.pt")
    assert len(saved["consistency_scores"]) == 2 and bool((saved["consistency_scores"][0] <= 0).all())
    assert {p.name for p in (tmp_path / "state" / "steps").iterdir()} == {
        "meca-warmup.pt", "meca-enhance.pt", "meca-detect.pt", "meca-clean.pt"}
    assert not any(p.suffix == ".pt" for p in (tmp_path / "state").iterdir())  # per-epoch files are gone
    # a second run over the same run directory reuses every finished stage: no training, no scoring
    _, ctx2, _ = make_ctx(tmp_path, bdframe_registry)
    real2 = ctx2.component
    ctx2.component = lambda kind, name=None, **params: Forbidden(f"{kind} {name}", real2(kind, name, **params))
    res2 = defense.run(plain, ctx2)
    assert res2.metrics["resumed_stages"] == ["warmup", "iteration-1", "iteration-2", "detect", "clean"]
    assert torch.equal(res2.suspected_ids, res.suspected_ids)
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), res2.model.state_dict().values()))
    assert all(r.get("replayed") for r in ctx2.history)


def test_warmup_model_replaces_the_warm_up_training_with_the_saved_model(tmp_path, bdframe_registry):
    """``warmup_model``: the enhancement starts from the saved model (a plain run's ``model.pt``):
    no warm-up epoch is trained, the trend starts with that model's figures, and
    ``meca_warmup_model.pt`` is that model."""
    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry)
    trained = ctx.new_model()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not what a fresh model of the recipe would start with
    saved = tmp_path / "plain-model.pt"
    torch.save({k: v.clone() for k, v in trained.state_dict().items()}, saved)
    res = MeCa(attrs.evolve(recipe.defense.config, iterations=1, warmup_model=str(saved))).run(train, ctx)
    assert not [r for r in ctx.history if r.get("stage") == "meca-warmup" and "epoch" in r]
    loaded = [r for r in ctx.history if r.get("stage") == "meca-warmup"]
    assert len(loaded) == 1 and loaded[0]["loaded_from"] == str(saved)
    assert res.metrics["trend"][0]["clean_acc"] == pytest.approx(ctx.evaluate(trained)["clean_acc"])
    assert res.metrics["stage_seconds"]["warmup"] == 0.0
    warm = torch.load(tmp_path / "meca_warmup_model.pt")
    assert all(torch.equal(warm[k], v) for k, v in trained.state_dict().items())
    assert res.summary[0].startswith(f"meca: warm-up model (loaded from {saved})")
    # the resumed run loads the saved step, not the file again
    (tmp_path / "plain-model.pt").unlink()
    _, ctx2, _ = make_ctx(tmp_path, bdframe_registry)
    res2 = MeCa(attrs.evolve(recipe.defense.config, iterations=1, warmup_model=str(saved))).run(train, ctx2)
    assert res2.metrics["resumed_stages"][0] == "warmup"


def test_warmup_model_that_is_missing_or_does_not_fit_is_a_user_error(tmp_path, bdframe_registry):
    from bdframe.errors import UserError

    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry)
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=r"\$\.defense\.warmup_model: .*nope\.pt.* does not exist"):
        MeCa(attrs.evolve(recipe.defense.config, warmup_model=str(missing))).run(train, ctx)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    _, ctx, _ = make_ctx(tmp_path / "b", bdframe_registry)
    with pytest.raises(UserError, match=r"\$\.defense\.warmup_model: .*other\.pt.* does not fit the recipe's \[model\]"):
        MeCa(attrs.evolve(recipe.defense.config, warmup_model=str(other))).run(train, ctx)
    assert not (tmp_path / "b" / "meca_scores.pt").exists()


def test_bdframe_run_with_a_missing_warmup_model_exits_2_and_leaves_no_run_directory(tmp_path, capsys):
    text = recipe_text(tmp_path / "runs").replace('name = "meca"\n', f'name = "meca"\nwarmup_model = "{tmp_path / "gone.pt"}"\n')
    f = tmp_path / "r.toml"
    f.write_text(text)
    assert main(["run", str(f), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bdframe: error: $.defense.warmup_model:" in err and "gone.pt" in err and "does not exist" in err
    assert not (tmp_path / "runs" / "tiny-meca").exists() and not (tmp_path / "runs" / "tiny-meca.partial").exists()


def test_protected_partition_and_sparse_evaluation_run_end_to_end(tmp_path, bdframe_registry):
    """``protect_confident`` keeps every sample fitted above it out of D_c (each iteration logs how
    many were protected and D_c never exceeds ceil(alpha N)); ``evaluate_iterations = false``
    evaluates only the warm-up and the final enhanced model."""
    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry)
    # this tiny recipe's models stay close to uniform over 10 classes: 0.1 protects a part, not all
    config = attrs.evolve(recipe.defense.config, protect_confident=0.1, evaluate_iterations=False,
                          detection="label-aware")
    res = MeCa(config).run(train, ctx)
    trend = res.metrics["trend"]
    assert trend[1]["clean_acc"] is None and trend[0]["clean_acc"] is not None and trend[2]["clean_acc"] is not None
    recs = [r for r in ctx.history if r.get("meca_iteration", 0) > 0]
    n = len(train)
    assert [r["forget_size"] <= math.ceil(r["alpha"] * n) for r in recs] == [True, True]
    assert all(isinstance(r["protected"], int) and 0 < r["protected"] < n for r in recs), [r["protected"] for r in recs]
    assert all(r["forget_size"] + r["protected"] <= n for r in recs)


def test_a_warm_up_state_without_figures_is_evaluated_not_a_crash(tmp_path, bdframe_registry):
    """A warm-up state made outside the defense (the ablation benchmark hands in a saved model with
    an empty ``eval``) used to crash the summary line on ``100 * None``."""
    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry)
    model = ctx.new_model()
    state = tmp_path / "state" / "steps"
    state.mkdir(parents=True)
    torch.save({"result": {"model": {k: v.clone() for k, v in model.state_dict().items()}, "eval": {},
                           "seconds": 0.0}, "records": []}, state / "meca-warmup.pt")
    res = MeCa(attrs.evolve(recipe.defense.config, iterations=1)).run(train, ctx)
    first = res.metrics["trend"][0]
    assert res.metrics["resumed_stages"] == ["warmup"]
    assert first["clean_acc"] == pytest.approx(ctx.evaluate(model)["clean_acc"])
    assert res.summary[0].startswith("meca: warm-up model") and "ACC " in res.summary[0]


def test_without_matplotlib_the_defense_completes_without_its_trend_plot(tmp_path, bdframe_registry, capsys,
                                                                        monkeypatch):
    from bdframe import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the `plots` extra were not installed
    monkeypatch.setattr(plots, "_notice_shown", False)
    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry, train_size=60)
    res = MeCa(attrs.evolve(recipe.defense.config, iterations=1)).run(train, ctx)
    assert res.metrics["plot"] is None and not (tmp_path / "meca_trend.png").exists()
    assert len(res.metrics["trend"]) == 2 and (tmp_path / "meca_scores.pt").exists()
    err = [line for line in capsys.readouterr().err.splitlines() if "plots skipped" in line]
    assert len(err) == 1 and "pip install 'bdframe[plots]'" in err[0]


# -- end to end -----------------------------------------------------------------------------------

_OPENED: list = []
_WATCH = {"on": False, "installed": False}


def _audit(event, args):
    if _WATCH["on"] and event == "open" and args:
        _OPENED.append(str(args[0]))


def _watch_files_opened_by_the_defense(monkeypatch):
    if not _WATCH["installed"]:
        sys.addaudithook(_audit)
        _WATCH["installed"] = True
    _OPENED.clear()
    real_run = MeCa.run

    def run(self, data, ctx):
        _WATCH["on"] = True
        try:
            return real_run(self, data, ctx)
        finally:
            _WATCH["on"] = False

    monkeypatch.setattr(MeCa, "run", run)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("meca-ref")
    f = tmp / "r.toml"
    f.write_text(recipe_text(tmp / "runs"))
    mp = pytest.MonkeyPatch()
    try:
        _watch_files_opened_by_the_defense(mp)
        assert main(["run", str(f), "--quiet", "--out", str(tmp / "ref")]) == 0
        opened = list(_OPENED)
    finally:
        mp.undo()
    return f, tmp / "ref", opened


def test_end_to_end_run_reports_detection_trend_plot_and_suspects(reference_run):
    _, d, opened = reference_run
    names = {p.name for p in d.iterdir()}
    assert {"metrics.json", "suspected.json", "poison.json", "model.pt", "meca_trend.png", "meca_scores.pt",
            "meca_clean_model.pt", "meca_enhanced_model.pt", "meca_warmup_model.pt", "history.jsonl"} <= names
    assert "state" not in names
    assert not any(p.endswith("poison.json") for p in opened), "the defense read the ground truth"
    assert any("history.jsonl" in p for p in opened)  # the watch sees files opened during the defense
    m = json.loads((d / "metrics.json").read_text())
    assert m["defense"] == "meca" and set(m["detection"]) >= {"recall", "precision", "fpr"}
    dm = m["defense_metrics"]
    assert [t["iteration"] for t in dm["trend"]] == [0, 1, 2]
    for t in dm["trend"]:
        assert 0 <= t["clean_acc"] <= 1 and 0 <= t["asr"] <= 1 and t["forget_size"] + t["learn_size"] == 300
    assert [t["forget_size"] for t in dm["trend"]] == [0, 15, 30]
    sus = json.loads((d / "suspected.json").read_text())["suspected_ids"]
    assert len(sus) == dm["split"]["poison"] == m["detection"]["flagged"]
    assert dm["split"]["clean"] + dm["split"]["poison"] == 300
    # relearning is on: the clean model before it is reported too
    assert set(dm["clean_model"]) == {"clean_acc", "asr"} and dm["relearn"]["relabelled"] == len(sus)
    assert m["clean_acc"] == dm["relearn"]["clean_acc"] and m["asr"] == dm["relearn"]["asr"]
    assert set(dm["stage_seconds"]) >= {"warmup", "enhance", "iterations", "detect", "clean_train", "relearn"}
    # the lines bdframe run prints: warm-up (undefended) and final figures, matching metrics.json
    summ = m["defense_summary"]
    assert summ[0].startswith("meca: warm-up model") and f"ASR {100 * dm['trend'][0]['asr']:.2f}%" in summ[0]
    assert f"after relabel-and-relearn: ACC {100 * m['clean_acc']:.2f}%, ASR {100 * m['asr']:.2f}%" in summ[-1]
    assert len(dm["stage_seconds"]["iterations"]) == 2
    assert dm["plot"] == "meca_trend.png" and (d / "meca_trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (d / "meca_trend.png").stat().st_size > 5000
    stages = [json.loads(line)["stage"] for line in (d / "history.jsonl").read_text().splitlines()]
    for s in ("meca-warmup", "meca-iter-01", "meca-iter-02", "meca-detect", "meca-clean", "meca-relearn"):
        assert s in stages


def test_interrupted_run_resumes_without_redoing_finished_stages(reference_run, tmp_path, monkeypatch):
    from bdframe_scorer_adv_kl.plugin import AdvKL

    f, ref, _ = reference_run
    stages = [json.loads(line)["stage"] for line in (ref / "history.jsonl").read_text().splitlines()]
    cut_in_iter2 = stages.index("meca-iter-02") + 1  # after iteration 2's (only) epoch
    cut_in_clean = stages.index("meca-clean") + 1  # after the first clean-training epoch
    out = tmp_path / "cut"
    real_log = runner.RunContext.log
    real_score = AdvKL.score
    seen: list = []
    scored = {"n": 0}

    def score(self, *a, **k):
        scored["n"] += 1
        return real_score(self, *a, **k)

    def interrupt_at(n):
        def log(self, record):
            seen.append((record.get("stage"), bool(record.get("replayed"))))
            real_log(self, record)
            if len(seen) == n:
                raise KeyboardInterrupt
        return log

    monkeypatch.setattr(AdvKL, "score", score)
    monkeypatch.setattr(runner.RunContext, "log", interrupt_at(cut_in_iter2))
    assert main(["run", str(f), "--quiet", "--out", str(out)]) == 130
    assert (tmp_path / "cut.partial" / "state" / "steps" / "meca-enhance.pt").exists() and scored["n"] == 2

    seen.clear()
    scored["n"] = 0
    monkeypatch.setattr(runner.RunContext, "log", interrupt_at(cut_in_clean))
    assert main(["run", str(f), "--quiet", "--out", str(out), "--resume"]) == 130
    assert scored["n"] == 1  # only iteration 2 is scored again; warm-up and iteration 1 are loaded
    assert seen[:cut_in_iter2] == [(s, True) for s in stages[:cut_in_iter2]]

    seen.clear()
    scored["n"] = 0
    monkeypatch.setattr(runner.RunContext, "log", interrupt_at(-1))
    assert main(["run", str(f), "--quiet", "--out", str(out), "--resume"]) == 0
    assert scored["n"] == 0
    assert seen == [(s, i < cut_in_clean) for i, s in enumerate(stages)]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    assert b["defense_metrics"]["resumed_stages"] == ["warmup", "iteration-1", "iteration-2", "detect"]
    for key in ("clean_acc", "asr", "detection"):
        assert a[key] == b[key]
    for key in ("split", "clean_model", "relearn"):
        assert a["defense_metrics"][key] == b["defense_metrics"][key]
    strip = [{k: v for k, v in t.items() if k != "seconds"} for t in a["defense_metrics"]["trend"]]
    assert strip == [{k: v for k, v in t.items() if k != "seconds"} for t in b["defense_metrics"]["trend"]]
    assert (ref / "suspected.json").read_text() == (out / "suspected.json").read_text()
    sa, sb = torch.load(ref / "model.pt"), torch.load(out / "model.pt")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (ref / "history.jsonl").read_text().count("\n") == (out / "history.jsonl").read_text().count("\n")


# -- clean training that unlearns the flagged set ------------------------------------------------

def test_clean_unlearn_trains_the_clean_model_on_the_kept_set_while_unlearning_the_flagged_one(tmp_path,
                                                                                             bdframe_registry):
    """With ``clean_unlearn`` the clean model is trained by the ``mixed`` stage with the recipe's
    [train] settings, the kept set as its learned set and exactly the flagged set as its forget
    set (per-sample weights, ascent bounded at ``-ln(clean_unlearn_below)``); starting from the
    same detection, the clean model then fits the flagged samples' labels less than the paper's
    clean training does."""
    from bdframe import scoring
    from bdframe.interfaces import ScoreContext

    models, stages = {}, []
    for lam in (0.0, 2.0):
        recipe, ctx, train = make_ctx(tmp_path / str(lam), bdframe_registry, train_size=200)
        spy_on_trainers(ctx, lambda made, data, kw, lam=lam: stages.append(
            (lam, made.name, made.config, data, kw.get("forget"))))
        config = attrs.evolve(recipe.defense.config, iterations=1, clean_unlearn=lam, clean_unlearn_below=0.05)
        res = MeCa(config).run(train, ctx)
        models[lam] = (res, train, recipe)
    res0, train, recipe = models[0.0]
    res1 = models[2.0][0]
    assert torch.equal(res0.suspected_ids, res1.suspected_ids)  # same detection: only the clean stage differs
    flagged = res1.suspected_ids
    assert 0 < len(flagged) < len(train)
    clean = [s for s in stages if s[0] == 2.0 and s[1] == "mixed" and s[2].lam == 2.0]
    assert len(clean) == 1
    _, _, cfg, kept, forget = clean[0]
    assert sorted(forget.ids.tolist()) == sorted(flagged.tolist())
    assert set(kept.ids.tolist()).isdisjoint(forget.ids.tolist()) and len(kept) + len(forget) == len(train)
    own = recipe.train.config
    assert (cfg.lam, cfg.normalize, cfg.forget_ceiling) == (2.0, "batch", pytest.approx(-math.log(0.05)))
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.schedule) == (own.epochs, own.lr, own.batch_size, own.schedule)
    paper = [s for s in stages if s[0] == 0.0 and s[1] == "standard" and len(s[3]) < len(train)]
    assert len(paper) == 1 and paper[0][4] is None
    assert f"unlearning the {len(flagged)} flagged" in res1.summary[-1] and "unlearning" not in res0.summary[-1]

    sctx = ScoreContext(seed=0, device=torch.device("cpu"), batch_size=256, progress=False)
    rows = train.subset(train.contains(flagged))

    def fit_of_flagged(model):
        return torch.softmax(scoring.logits(model, rows, sctx), 1).gather(1, rows.labels.view(-1, 1)).mean()

    assert fit_of_flagged(res1.model) < fit_of_flagged(res0.model)


def test_split_side_reaches_the_split_with_the_enhanced_models_class_probabilities(tmp_path, bdframe_registry):
    """``split_side = "runner-up"``: the flagged set is :func:`flag_label_aware` of the enhanced
    model (with no iteration, the warm-up model) with that side and its softmax over all classes."""
    from bdframe import scoring
    from bdframe.interfaces import ScoreContext
    from bdframe_defense_meca.plugin import flag_label_aware

    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry, train_size=200)
    config = attrs.evolve(recipe.defense.config, iterations=0, detection="label-aware", class_test="warmup",
                          class_stat="gap", spread_k=0.5, inside="clusters", split_side="runner-up", warmup_epochs=6)
    MeCa(config).run(train, ctx)
    saved = torch.load(tmp_path / "meca_scores.pt")
    pos = train.positions(saved["ids"])
    labels, subset = train.labels[pos], train.subset(pos)
    sctx = ScoreContext(seed=0, device=torch.device("cpu"), batch_size=256, progress=False)
    warm = ctx.new_model(state_dict=torch.load(tmp_path / "meca_warmup_model.pt"))
    prob = torch.softmax(scoring.logits(warm, subset, sctx).double(), 1)
    rec = [r for r in ctx.history if r.get("stage") == "meca-detect"][0]
    assert rec["suspicious_classes"], "the test needs a picked class"
    kw = {"classes": rec["suspicious_classes"], "inside": "clusters", "features": scoring.features(warm, subset, sctx),
          "ids": saved["ids"], "seed": ctx.seed}
    want, _ = flag_label_aware(saved["enhanced_prob"], labels, side="runner-up", class_prob=prob, **kw)
    assert torch.equal(saved["detected_poison"], want)
    confident, _ = flag_label_aware(saved["enhanced_prob"], labels, **kw)
    assert int(want.sum()) > 0 and not torch.equal(want, confident), "the test needs the two sides to differ"


@pytest.mark.parametrize("side", ["confident", "far"])
def test_clean_unlearn_core_unlearns_the_cores_and_leaves_the_rest_of_the_flagged_set_out(tmp_path,
                                                                                          bdframe_registry, side):
    """``clean_unlearn_core``: detection is unchanged and is what the run reports; the clean
    training learns the kept set and unlearns exactly :func:`cluster_cores` of the flagged set
    (the picked classes split once more on the warm-up model's features); the flagged samples
    outside the cores are in neither set; the core's size is logged."""
    from bdframe import scoring
    from bdframe.interfaces import ScoreContext
    from bdframe_defense_meca.plugin import cluster_cores

    results, stages = {}, []
    for core in (False, True):
        recipe, ctx, train = make_ctx(tmp_path / str(core), bdframe_registry, train_size=200)
        spy_on_trainers(ctx, lambda made, data, kw, core=core: stages.append(
            (core, made.name, made.config, data, kw.get("forget"))))
        config = attrs.evolve(recipe.defense.config, iterations=1, detection="label-aware", class_test="warmup",
                              class_stat="gap", spread_k=0.5, inside="clusters", clean_unlearn=1.0,
                              clean_unlearn_core=core, core_side=side if core else "confident")
        results[core] = (MeCa(config).run(train, ctx), ctx, train)
    whole, (res, ctx, train) = results[False][0], results[True]
    assert torch.equal(whole.suspected_ids, res.suspected_ids)
    saved = torch.load(tmp_path / "True" / "meca_scores.pt")
    pos = train.positions(saved["ids"])
    labels, subset = train.labels[pos], train.subset(pos)
    sctx = ScoreContext(seed=0, device=torch.device("cpu"), batch_size=256, progress=False)
    warm = ctx.new_model(state_dict=torch.load(tmp_path / "True" / "meca_warmup_model.pt"))
    feats = scoring.features(warm, subset, sctx).double()
    rec = [r for r in ctx.history if r.get("stage") == "meca-detect"][0]
    assert rec["suspicious_classes"], "the test needs a picked class"
    core = cluster_cores(feats, saved["enhanced_prob"], labels, saved["ids"], saved["detected_poison"],
                         rec["suspicious_classes"], seed=ctx.seed, side=side)
    assert 0 < int(core.sum()) < int(saved["detected_poison"].sum())
    clean = [s for s in stages if s[0] and s[1] == "mixed" and s[2].lam == 1.0]
    assert len(clean) == 1
    _, _, _, kept, forget = clean[0]
    assert sorted(forget.ids.tolist()) == sorted(saved["ids"][core].tolist())
    assert sorted(kept.ids.tolist()) == sorted(saved["ids"][~saved["detected_poison"]].tolist())
    assert rec["unlearn_core"] == int(core.sum())
    assert res.metrics["split"]["unlearned"] == int(core.sum())
    assert whole.metrics["split"]["unlearned"] == int(saved["detected_poison"].sum())
    flagged = int(saved["detected_poison"].sum())  # detection's; the second look's come after
    assert any(f"unlearning {int(core.sum())} of the {flagged} flagged" in line for line in res.summary)


def test_clean_unlearn_refuses_a_train_stage_setting_the_mixed_stage_lacks(tmp_path, bdframe_registry):
    from bdframe.build import materialise
    from bdframe.recipe import loads_dict

    data = tomllib.loads(recipe_text(tmp_path, train_size=120, attack=False, relearn=False))
    data["train"]["cutmix_prob"] = 0.5
    data["defense"]["clean_unlearn"] = 1.0
    recipe = loads_dict(data, bdframe_registry)
    parts = materialise(recipe, bdframe_registry)
    ctx = runner.RunContext.for_parts(parts, torch.device("cpu"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="cutmix_prob"):
        MeCa(recipe.defense.config).run(parts.train, ctx)
    assert not (tmp_path / "state").exists()  # refused before any training


def test_the_relearning_fine_tunes_with_the_train_stages_settings_or_mecas_own(tmp_path, bdframe_registry):
    """``relearn_settings = "train"`` (the default): the relearn stage takes the recipe's ``[train]``
    batch size, optimiser, momentum, weight decay, label smoothing and augmentation, and its own
    epochs, ``relearn_lr`` and cosine schedule; ``"meca"``: MeCa's own settings. Both weigh the
    classes the same with ``relearn_balance``."""
    import attrs

    from bdframe.build import materialise
    from bdframe.recipe import loads_dict

    data = tomllib.loads(recipe_text(tmp_path, train_size=120, attack=False, relearn=False))
    data["train"].update(batch_size=48, momentum=0.8, nesterov=True, weight_decay=1e-3, label_smoothing=0.1,
                         crop_padding=2, schedule="onecycle", lr=0.3, epochs=9)
    recipe = loads_dict(data, bdframe_registry)
    ctx = runner.RunContext.for_parts(materialise(recipe, bdframe_registry), torch.device("cpu"), tmp_path,
                                      progress=False)
    assert recipe.defense.config.relearn_settings == "train" and recipe.defense.config.relearn_balance
    for settings, balance in (("train", True), ("meca", False)):
        c = attrs.evolve(recipe.defense.config, relearn_settings=settings, relearn_balance=balance, relearn=True,
                         relearn_epochs=7, relearn_lr=0.003)
        stage = MeCa(c).relearn_stage(ctx).config
        assert (stage.epochs, stage.lr, stage.schedule, stage.class_balance) == (7, 0.003, "cosine", balance)
        got = (stage.batch_size, stage.momentum, stage.nesterov, stage.weight_decay, stage.label_smoothing,
               stage.crop_padding, stage.flip)
        if settings == "train":
            assert got == (48, 0.8, True, 1e-3, 0.1, 2, True)
        else:
            assert got == (c.batch_size, c.momentum, False, c.weight_decay, 0.0, 4, True)


def test_clean_stage_semi_trains_the_clean_model_on_the_kept_set_with_the_flagged_set_unlabelled(tmp_path,
                                                                                               bdframe_registry):
    """``clean_stage = "semi"``: the clean model is trained from scratch by the ``mixmatch`` stage
    with the ``semi`` table's parameters, the kept set as its labelled input and exactly the flagged
    set as its unlabelled input; detection is the same as with the paper's clean training, and
    the run reports how many samples were unlabelled."""
    stages = []
    results = {}
    for stage in ("train", "semi"):
        recipe, ctx, train = make_ctx(tmp_path / stage, bdframe_registry, train_size=200)
        spy_on_trainers(ctx, lambda made, data, kw, stage=stage: stages.append(
            (stage, made.name, made.config, data, kw.get("unlabelled"))))
        semi = {"epochs": 2, "batch_size": 32, "lambda_u": 5.0} if stage == "semi" else {}
        config = attrs.evolve(recipe.defense.config, iterations=1, clean_stage=stage, semi=semi)
        results[stage] = (MeCa(config).run(train, ctx), ctx, train)
    paper, semi_res = results["train"][0], results["semi"][0]
    ctx, train = results["semi"][1], results["semi"][2]
    assert torch.equal(paper.suspected_ids, semi_res.suspected_ids)  # only the clean stage differs
    flagged = semi_res.suspected_ids
    assert 0 < len(flagged) < len(train)
    mm = [s for s in stages if s[1] == "mixmatch"]
    assert len(mm) == 1 and mm[0][0] == "semi"
    _, _, cfg, kept, unlabelled = mm[0]
    assert (cfg.epochs, cfg.batch_size, cfg.lambda_u, cfg.credible_share) == (2, 32, 5.0, 0.0)
    assert sorted(unlabelled.ids.tolist()) == sorted(flagged.tolist())
    assert set(kept.ids.tolist()).isdisjoint(unlabelled.ids.tolist()) and len(kept) + len(unlabelled) == len(train)
    assert [s for s in stages if s[0] == "train" and s[4] is not None] == []
    rec = [r for r in ctx.history if r.get("stage") == "meca-clean" and "train_size" in r]
    assert rec[-1]["unlabelled"] == len(flagged) and rec[-1]["train_size"] == len(kept)
    epochs = [r for r in ctx.history if r.get("stage") == "meca-clean" and "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert f"with the {len(flagged)} flagged as unlabelled data" in semi_res.summary[-1]
    assert "unlabelled" not in paper.summary[-1]


@pytest.mark.parametrize("change, field, message", [
    ({"clean_stage": "semi", "semi": {"epoch": 3}}, "semi.epoch", "unknown parameter"),
    ({"clean_stage": "semi", "semi": {"credible_share": 0.5}}, "semi", "set by the defense itself"),
    ({"semi": {"epochs": 3}}, "semi", 'used only with clean_stage = "semi"'),
    ({"clean_stage": "mixmatch"}, "clean_stage", "semi"),
    ({"clean_stage": "repair", "relearn": True}, "relearn", 'must be false with clean_stage = "repair"'),
    ({"clean_stage": "repair", "semi": {"epochs": 3}}, "semi", 'used only with clean_stage = "semi"'),
    ({"clean_stage": "repair", "repair_poison": 0.0}, "repair_poison", ""),
    ({"clean_stage": "repair", "repair_clean": 1.0}, "repair_clean", ""),
    ({"repair_model": "model.pt"}, "repair_model", 'used only with clean_stage = "repair"'),
    ({"clean_unlearn_core": True, "clean_unlearn": 0.6, "detection": "label-aware"}, "clean_unlearn_core",
     'inside = "clusters"'),
    ({"clean_unlearn_core": True, "clean_unlearn": 0.6, "inside": "clusters"}, "clean_unlearn_core",
     'detection = "label-aware"'),
    ({"clean_stage": "semi", "repair_model": "model.pt"}, "repair_model", 'used only with clean_stage = "repair"'),
    ({"core_side": "near"}, "core_side", "far"),
    ({"split_side": "larger"}, "split_side", "runner-up"),
    ({"split_side_cut": 0.5}, "split_side_cut", 'used only with split_side = "auto"'),
])
def test_clean_stage_settings_are_checked_with_the_recipe(tmp_path, bdframe_registry, change, field, message):
    from bdframe.errors import RecipeError
    from bdframe.recipe import loads_dict

    data = tomllib.loads(recipe_text(tmp_path, attack=False, relearn=False))
    data["defense"].update(change)
    with pytest.raises(RecipeError) as ei:
        loads_dict(data, bdframe_registry)
    assert any(p.startswith(f"$.defense.{field}") and message in p for p in ei.value.problems), ei.value.problems


@pytest.mark.parametrize("change", [{}, {"clean_stage": "semi"}, {"clean_stage": "repair"}, {"clean_unlearn": 0.0},
                                    {"clean_unlearn_core": False, "detection": "argmax"},
                                    {"detection": "confidence", "clean_unlearn": 0.0}])
def test_the_defaults_validate_alone_and_beside_another_clean_stage_or_rule(tmp_path, bdframe_registry, change):
    """bdframe's defaults (clean_unlearn, its cores, the split side) are unused, not refused,
    where another clean stage or no unlearning is chosen."""
    from bdframe.recipe import loads_dict

    data = tomllib.loads(recipe_text(tmp_path, attack=False, relearn=False))
    data["defense"] = {"name": "meca", **change}
    recipe = loads_dict(data, bdframe_registry)
    c = recipe.defense.config
    assert MeCa.unlearns(c) == (c.clean_stage == "train" and c.clean_unlearn > 0)
    assert MeCa.cores(c) == (MeCa.unlearns(c) and c.clean_unlearn_core)


def test_the_papers_rule_alone_asks_for_a_clean_training_it_can_do(tmp_path, bdframe_registry):
    """``detection = "argmax"`` over the defaults: the flagged cores need the clusters, and the
    message names both ways out."""
    from bdframe.errors import RecipeError
    from bdframe.recipe import loads_dict

    data = tomllib.loads(recipe_text(tmp_path, attack=False, relearn=False))
    data["defense"] = {"name": "meca", "detection": "argmax"}
    with pytest.raises(RecipeError) as ei:
        loads_dict(data, bdframe_registry)
    [problem] = ei.value.problems
    assert problem.startswith("$.defense.clean_unlearn_core") and "clean_unlearn = 0" in problem and "false" in problem


# -- clean_stage = "repair" ---------------------------------------------------------------------

def _repair_case(n, classes, seed, flag_p):
    g = torch.Generator().manual_seed(seed)
    prob = torch.rand(n, generator=g, dtype=torch.float64).round(decimals=2)  # ties are common
    labels = torch.randint(0, classes, (n,), generator=g)
    ids = torch.randperm(10 * n, generator=g)[:n]
    flagged = torch.rand(n, generator=g) < flag_p
    return prob, labels, ids, flagged


@SET
@given(st.integers(1, 300), st.integers(1, 6), st.integers(0, 10 ** 6), st.floats(0.0, 1.0),
       st.floats(0.01, 0.5), st.floats(0.01, 0.9))
def test_repair_split_takes_the_most_confident_flagged_and_each_classs_least_confident(n, classes, seed, flag_p,
                                                                                      poison, clean):
    prob, labels, ids, flagged = _repair_case(n, classes, seed, flag_p)
    forget, learn = repair_split(prob, labels, ids, flagged, poison_share=poison, clean_share=clean)
    f, l_ = set(forget.tolist()), set(learn.tolist())
    assert f.isdisjoint(l_) and torch.equal(forget, forget.sort().values) and torch.equal(learn, learn.sort().values)
    # the unlearned set: flagged rows only, as many as the share allows, the highest p_e
    assert all(bool(flagged[i]) for i in f)
    assert len(f) == min(forget_count(poison, n), int(flagged.sum()))
    if f:
        left = [i for i in range(n) if flagged[i] and i not in f]
        assert all(prob[i] <= prob[forget].min() for i in left)
    # the relearned set: per class the share of the class, the lowest p_e outside the unlearned set
    for c in range(classes):
        rows = [i for i in range(n) if labels[i] == c]
        mine = [i for i in l_ if labels[i] == c]
        assert len(mine) == min(forget_count(clean, len(rows)), len([i for i in rows if i not in f]))
        if mine:
            top = max(prob[i] for i in mine)
            assert all(prob[i] >= top for i in rows if i not in f and i not in mine)


@SET
@given(st.integers(2, 200), st.integers(1, 5), st.integers(0, 10 ** 6))
def test_repair_split_depends_on_the_samples_not_their_order_or_class_names(n, classes, seed):
    prob, labels, ids, flagged = _repair_case(n, classes, seed, 0.6)
    forget, learn = repair_split(prob, labels, ids, flagged, poison_share=0.1, clean_share=0.2)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    renamed = (labels + 3) % classes
    f2, l2 = repair_split(prob[perm], renamed[perm], ids[perm], flagged[perm], poison_share=0.1, clean_share=0.2)
    assert sorted(ids[forget].tolist()) == sorted(ids[perm][f2].tolist())
    assert sorted(ids[learn].tolist()) == sorted(ids[perm][l2].tolist())


def test_repair_split_with_nothing_flagged_unlearns_nothing_and_refuses_bad_input():
    prob, labels, ids, _ = _repair_case(50, 2, 0, 0.0)
    forget, learn = repair_split(prob, labels, ids, torch.zeros(50, dtype=torch.bool), poison_share=0.1,
                                 clean_share=0.2)
    assert len(forget) == 0 and len(learn) == sum(forget_count(0.2, int((labels == c).sum())) for c in (0, 1))
    with pytest.raises(ValueError, match="one entry per sample"):
        repair_split(prob[:-1], labels, ids, torch.zeros(50, dtype=torch.bool), poison_share=0.1, clean_share=0.2)
    bad = prob.clone()
    bad[3] = float("nan")
    with pytest.raises(FloatingPointError):
        repair_split(bad, labels, ids, torch.ones(50, dtype=torch.bool), poison_share=0.1, clean_share=0.2)


def test_clean_stage_repair_repairs_the_warm_up_model_with_the_split_of_the_enhanced_model(tmp_path,
                                                                                         bdframe_registry):
    """``clean_stage = "repair"``: no model is trained from scratch; the warm-up model is repaired
    by rounds of one ``unlearning`` pass (gradient ascent) over the split's unlearned set and one
    ``relearn`` pass over its relearned set, exactly :func:`repair_split` of the enhanced model's
    p_e and the detection, at ``repair_lr``; the suspects reported are the unlearned samples, and
    detection itself is the same as with the paper's clean training."""
    import numpy as np

    stages, results = [], {}
    for stage in ("train", "repair"):
        recipe, ctx, train = make_ctx(tmp_path / stage, bdframe_registry, train_size=200)
        spy_on_trainers(ctx, lambda made, data, kw, stage=stage: stages.append((stage, made.name, made.config, data)))
        config = attrs.evolve(recipe.defense.config, iterations=1, clean_stage=stage, repair_rounds=3,
                              repair_lr=0.01, repair_poison=0.1, repair_clean=0.25, repair_plateau_rounds=0)
        results[stage] = (MeCa(config).run(train, ctx), ctx, train, config)
    paper = results["train"][0]
    res, ctx, train, config = results["repair"]
    assert [s for s in stages if s[0] == "repair" and s[1] == "standard" and len(s[3]) < len(train)] == []
    scores = torch.load(tmp_path / "repair" / "meca_scores.pt")
    assert torch.equal(scores["detected_poison"], torch.load(tmp_path / "train" / "meca_scores.pt")["detected_poison"])
    pos = train.positions(scores["ids"])
    prob = torch.empty(len(train), dtype=torch.float64)
    prob[pos] = scores["enhanced_prob"].double()
    flagged = torch.zeros(len(train), dtype=torch.bool)
    flagged[pos] = scores["detected_poison"]
    want_f, want_l = repair_split(prob, train.labels, train.ids, flagged, poison_share=0.1, clean_share=0.25)
    unlearn = [s for s in stages if s[0] == "repair" and s[1] == "unlearning"]
    relearn = [s for s in stages if s[0] == "repair" and s[1] == "relearn"]
    assert len(unlearn) == len(relearn) == 3
    for _, _, cfg, d in unlearn:
        assert sorted(d.ids.tolist()) == sorted(train.ids[want_f].tolist())
        assert (cfg.objective, cfg.lr, cfg.epochs) == ("ascent", 0.01, 1)
    for _, _, cfg, d in relearn:
        assert sorted(d.ids.tolist()) == sorted(train.ids[want_l].tolist()) and cfg.lr == 0.01
    assert 0 < len(res.suspected_ids) <= forget_count(0.1, len(train))
    assert sorted(res.suspected_ids.tolist()) == sorted(train.ids[want_f].tolist())
    rep = res.metrics["repair"]
    assert (rep["unlearned"], rep["relearned"], rep["rounds"], rep["stopped"]) == (len(want_f), len(want_l), 3, False)
    assert res.metrics["clean_model"]["clean_acc"] == rep["trend"][-1]["clean_acc"]
    assert f"{len(want_f)} unlearned, {len(want_l)} relearned, 3 rounds" in res.summary[-1]
    assert paper.metrics["repair"] is None
    # the result is the repaired warm-up model, not the warm-up model itself
    warm = torch.load(tmp_path / "repair" / "meca_warmup_model.pt")
    final = res.model.state_dict()
    assert any(not torch.equal(warm[k], final[k]) for k in warm if warm[k].is_floating_point())
    assert np.isfinite(res.metrics["stage_seconds"]["repair"])


def test_repair_model_is_repaired_while_detection_reads_the_own_warm_up(tmp_path, bdframe_registry):
    """``repair_model``: the warm-up, enhancement and detection are those of a run without it
    (the saved model is checked without drawing random numbers), and the model repaired is the
    saved one: with no rounds the result is that model exactly, and the repair's first figures
    are its own."""
    stages, runs = [], {}
    for name in ("own", "given"):
        recipe, ctx, train = make_ctx(tmp_path / name, bdframe_registry, train_size=200)
        spy_on_trainers(ctx, lambda made, data, kw, name=name: stages.append((name, made.name)))
        extra = {}
        if name == "given":
            given = ctx.new_model()  # a model the run would not make itself
            with torch.no_grad():
                for p in given.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            saved = tmp_path / "plain-model.pt"
            torch.save({k: v.clone() for k, v in given.state_dict().items()}, saved)
            _, ctx, _ = make_ctx(tmp_path / name, bdframe_registry, train_size=200)  # a fresh model counter
            spy_on_trainers(ctx, lambda made, data, kw, name=name: stages.append((name, made.name)))
            extra = {"repair_model": str(saved)}
        config = attrs.evolve(recipe.defense.config, iterations=1, clean_stage="repair", repair_rounds=0, **extra)
        runs[name] = (MeCa(config).run(train, ctx), ctx)
    own, given_res = runs["own"][0], runs["given"][0]
    for f in ("meca_warmup_model.pt", "meca_enhanced_model.pt"):
        a, b = torch.load(tmp_path / "own" / f), torch.load(tmp_path / "given" / f)
        assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = torch.load(tmp_path / "own" / "meca_scores.pt"), torch.load(tmp_path / "given" / "meca_scores.pt")
    assert torch.equal(sa["detected_poison"], sb["detected_poison"]) and torch.equal(sa["enhanced_prob"], sb["enhanced_prob"])
    final = given_res.model.state_dict()
    assert all(torch.equal(final[k].cpu(), v) for k, v in given.state_dict().items())
    warm = torch.load(tmp_path / "given" / "meca_warmup_model.pt")
    assert any(not torch.equal(warm[k], final[k].cpu()) for k in warm if warm[k].is_floating_point())
    ctx = runs["given"][1]
    start = [r for r in ctx.history if r.get("stage") == "meca-repair-start"]
    assert len(start) == 1 and start[0]["loaded_from"] == str(saved)
    assert start[0]["clean_acc"] == pytest.approx(ctx.evaluate(given)["clean_acc"])
    assert given_res.metrics["repair"]["model"] == str(saved) and own.metrics["repair"]["model"] == "warm-up"
    assert f"meca: model {saved} repaired" in given_res.summary[-1]
    assert "meca: warm-up model repaired" in own.summary[-1]


def test_repair_model_that_is_missing_or_does_not_fit_fails_before_training(tmp_path, bdframe_registry):
    from bdframe.errors import UserError

    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry)
    with pytest.raises(UserError, match=r"\$\.defense\.repair_model: .*nope\.pt.* does not exist"):
        MeCa(attrs.evolve(recipe.defense.config, clean_stage="repair", repair_model=str(tmp_path / "nope.pt"))).run(train, ctx)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(UserError, match=r"\$\.defense\.repair_model: .*other\.pt.* does not fit the recipe's \[model\]"):
        MeCa(attrs.evolve(recipe.defense.config, clean_stage="repair", repair_model=str(other))).run(train, ctx)
    assert not [r for r in ctx.history if r.get("stage") == "meca-warmup"]


@pytest.mark.parametrize("below", [0.0, 1.0, -0.1])
def test_clean_unlearn_below_must_be_a_probability_strictly_inside_0_1(tmp_path, bdframe_registry, below):
    from bdframe.errors import RecipeError
    from bdframe.recipe import loads_dict

    data = tomllib.loads(recipe_text(tmp_path, attack=False, relearn=False))
    data["defense"]["clean_unlearn_below"] = below
    with pytest.raises(RecipeError) as ei:
        loads_dict(data, bdframe_registry)
    assert any("clean_unlearn_below" in p and "(0, 1)" in p for p in ei.value.problems), ei.value.problems


@pytest.mark.parametrize("class_test", ["both", "warmup"])
def test_class_test_picks_classes_with_the_warm_up_models_fit(tmp_path, bdframe_registry, class_test):
    """``class_test = "both"``: detection computes the warm-up model's ``p(y|x)`` (saved in
    ``meca_scores.pt``), and a class is picked only where both models single it out;
    ``"warmup"``: where the warm-up model does."""
    from bdframe import scoring
    from bdframe.interfaces import ScoreContext
    from bdframe_defense_meca.plugin import detect as rule, flag_label_aware, suspicious_classes

    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry, train_size=200)
    config = attrs.evolve(recipe.defense.config, iterations=1, detection="label-aware", class_test=class_test)
    res = MeCa(config).run(train, ctx)
    saved = torch.load(tmp_path / "meca_scores.pt")
    pos = train.positions(saved["ids"])
    labels = train.labels[pos]
    warm = ctx.new_model(state_dict=torch.load(tmp_path / "meca_warmup_model.pt"))
    sctx = ScoreContext(seed=0, device=torch.device("cpu"), batch_size=256, progress=False)
    _, p_w = rule(scoring.logits(warm, train.subset(pos), sctx), labels)
    assert torch.allclose(saved["warmup_prob"], p_w, atol=1e-6)
    pick = "both" if class_test == "both" else "confirm"
    want, classes = flag_label_aware(saved["enhanced_prob"], labels, confirm=p_w, pick=pick)
    assert torch.equal(saved["detected_poison"], want)
    rec = [r for r in ctx.history if r.get("stage") == "meca-detect"][0]
    assert rec["suspicious_classes"] == classes
    if class_test == "both":
        assert set(classes) <= set(suspicious_classes(p_w, labels)) & set(suspicious_classes(saved["enhanced_prob"],
                                                                                            labels))
    else:
        assert classes == suspicious_classes(p_w, labels)
    assert sorted(res.suspected_ids.tolist()) == sorted(saved["ids"][want].tolist())


@pytest.mark.parametrize("class_stat, class_test, inside", [
    ("spread", "warmup", "otsu"), ("spread", "both", "otsu"), ("spread", "warmup", "clusters"),
    ("gap", "warmup", "clusters"), ("gap", "both", "otsu"), ("gap-separation", "warmup", "clusters"),
    ("gap-separation-floor", "warmup", "clusters"), ("gap-separation-floor", "both", "clusters")])
def test_class_stat_spread_or_gap_picks_the_classes_whose_statistic_stands_out(tmp_path, bdframe_registry, class_stat,
                                                                               class_test, inside):
    """``class_stat = "spread"`` or ``"gap"``: the warm-up model's margins are saved in
    ``meca_scores.pt``, the classes picked are those the test picks in the warm-up model (and in
    the enhanced model with ``"both"``; the gap always splits the warm-up model's features), the
    split inside them is Otsu's on the enhanced model's ``p_e`` (or, with ``inside =
    "clusters"``, the 2-means split of the warm-up model's features), and the per-class robust
    z-scores are logged."""
    from bdframe import scoring
    from bdframe.interfaces import ScoreContext
    from bdframe_defense_meca.plugin import (classes_above, flag_label_aware, floor_z, gap_separation_z, gap_z, margins,
                                             spread_classes)

    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry, train_size=200)
    config = attrs.evolve(recipe.defense.config, iterations=1, detection="label-aware", class_test=class_test,
                          class_stat=class_stat, spread_k=0.5, inside=inside)
    res = MeCa(config).run(train, ctx)
    saved = torch.load(tmp_path / "meca_scores.pt")
    pos = train.positions(saved["ids"])
    labels, subset = train.labels[pos], train.subset(pos)
    sctx = ScoreContext(seed=0, device=torch.device("cpu"), batch_size=256, progress=False)
    m, probs, feats = {}, {}, None
    for tag in ("warmup", "enhanced"):
        model = ctx.new_model(state_dict=torch.load(tmp_path / f"meca_{tag}_model.pt"))
        out = scoring.logits(model, subset, sctx)
        m[tag], probs[tag] = margins(out, labels), torch.softmax(out.double(), 1)
        if tag == "warmup":
            feats = scoring.features(model, subset, sctx).double()
    assert torch.allclose(saved["warmup_margin"], m["warmup"], atol=1e-4)

    def picks(tag):
        margin = m[tag]
        if class_stat == "spread":
            return set(spread_classes(margin, labels, k=0.5))
        key = ("meca-clusters", ctx.seed)
        if class_stat.startswith("gap-separation"):
            classes, z, _ = gap_separation_z(feats, margin, labels, saved["ids"], key)
            if class_stat == "gap-separation-floor":  # the largest of three z-scores
                z = torch.maximum(z, floor_z(probs[tag], labels)[1])
            return set(classes_above(classes, z, k=0.5))
        return set(classes_above(*gap_z(feats, margin, labels, saved["ids"], key), k=0.5))

    want = picks("warmup")
    if class_test == "both":
        want &= picks("enhanced")
    rec = [r for r in ctx.history if r.get("stage") == "meca-detect"][0]
    assert rec["suspicious_classes"] == sorted(want)
    tags = {"warmup", "enhanced"} if class_test == "both" else {"warmup"}
    if class_stat.startswith("gap-separation"):  # the largest z-score and its parts
        parts = ("gap", "separation") + (("floor",) if class_stat == "gap-separation-floor" else ())
        tags |= {f"{t}-{part}" for t in tags for part in parts}
    assert set(rec[f"class_{class_stat}_z"]) == tags
    assert want, "the test needs a picked class to split"
    flags, _ = flag_label_aware(saved["enhanced_prob"], labels, classes=sorted(want), inside=inside,
                                features=feats, ids=saved["ids"], seed=ctx.seed)
    assert flags.any() and torch.equal(saved["detected_poison"], flags)
    assert sorted(res.suspected_ids.tolist()) == sorted(saved["ids"][flags].tolist())


class _Stop(Exception):
    pass


@pytest.mark.parametrize("train_amp, own, want", [("auto", "auto", "auto"), ("on", "auto", "on"),
                                                  ("on", "off", "off"), ("off", "on", "on")])
def test_own_stages_take_the_defense_amp_or_the_train_stages(tmp_path, bdframe_registry, train_amp, own, want):
    """``amp = "auto"`` gives MeCa's warm-up, mixed steps and relearning the recipe's ``[train]``
    amp setting; ``on`` / ``off`` set them whatever ``[train]`` says."""
    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry)
    real = ctx.component
    given_amp = {}

    def component(kind, name=None, **params):
        if kind == "trainer" and name is None:
            return real(kind, None, **{"amp": train_amp, **params})
        if kind == "trainer":
            given_amp[name] = params.get("amp")
        return real(kind, name, **params)

    def new_model(**kw):
        raise _Stop  # every component is built before the first model: stop there

    ctx.component, ctx.new_model = component, new_model
    config = attrs.evolve(recipe.defense.config, amp=own, relearn=True)
    with pytest.raises(_Stop):
        MeCa(config).run(train, ctx)
    assert given_amp == {"standard": want, "mixed": want, "relearn": want}


def test_scoring_runs_under_bfloat16_autocast_exactly_when_amp_gives_bfloat16():
    """Consistency scoring autocasts to bfloat16 where the stages' amp setting gives bfloat16 on
    the device, never to float16 (input gradients would underflow to a zero sign)."""
    cpu = torch.device("cpu")
    for amp, on in (("auto", False), ("off", False), ("on", True)):
        with MeCa._score_autocast(amp, cpu):
            assert torch.is_autocast_enabled("cpu") is on
            if on:
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    if torch.cuda.is_available():
        with MeCa._score_autocast("auto", torch.device("cuda")):
            assert torch.is_autocast_enabled("cuda") is torch.cuda.is_bf16_supported()


@pytest.mark.skipif(not cpu_bf16_supported(),
                    reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX); emulated bfloat16 is too slow "
                           "to be an option here")
def test_amp_on_scores_under_bfloat16_and_ranks_like_float32(tmp_path, bdframe_registry, monkeypatch):
    """With ``amp = "on"`` each iteration's consistency scores are computed under bfloat16
    autocast; scoring the same model both ways ranks the samples nearly alike."""
    from bdframe_scorer_adv_kl.plugin import AdvKL

    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry, train_size=200)
    states = []
    real_score = AdvKL.score

    def score(self, model, data, sctx):
        states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_score(self, model, data, sctx)

    monkeypatch.setattr(AdvKL, "score", score)
    config = attrs.evolve(recipe.defense.config, iterations=1, amp="on")
    res = MeCa(config).run(train, ctx)
    assert states == [(True, torch.bfloat16)]
    assert res.metrics["split"]["clean"] + res.metrics["split"]["poison"] == len(train)
    # the enhanced model scored in float32 and in bfloat16: the rankings agree
    from bdframe.interfaces import ScoreContext

    model = ctx.new_model(state_dict=torch.load(tmp_path / "meca_enhanced_model.pt"))
    scorer = bdframe_registry.create("scorer", "adv-kl", iteration=2)
    sctx = ScoreContext(seed=0, device=torch.device("cpu"), batch_size=64, progress=False)
    a = real_score(scorer, model, train, sctx)
    with MeCa._score_autocast("on", "cpu"):
        b = real_score(scorer, model, train, sctx)
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    assert float(torch.corrcoef(ranks)[0, 1]) > 0.9


def test_with_no_enhancement_iteration_detection_reads_the_warm_up_model(tmp_path, bdframe_registry, monkeypatch):
    """``iterations = 0``: no enhancement stage runs, the saved "enhanced" fit is the warm-up
    model's, the warm-up model's fit is computed once (not a second pass over the data), the
    flags are the warm-up split's, and the report's trend holds the warm-up point alone."""
    from bdframe import scoring
    from bdframe_defense_meca.plugin import flag_label_aware

    passes = []
    real = scoring.logits

    def counting(model, data, ctx, *a, **kw):
        passes.append(kw.get("desc"))
        return real(model, data, ctx, *a, **kw)

    monkeypatch.setattr(scoring, "logits", counting)
    recipe, ctx, train = make_ctx(tmp_path, bdframe_registry, train_size=200)
    config = attrs.evolve(recipe.defense.config, iterations=0, detection="label-aware", class_test="warmup",
                          class_stat="gap-separation", spread_k=0.5, inside="clusters", clean_unlearn=1.0,
                          clean_unlearn_core=True)
    res = MeCa(config).run(train, ctx)
    assert not [r for r in ctx.history if str(r.get("stage", "")).startswith("meca-iter")]
    assert "meca warm-up fit" not in passes and passes.count("meca detect") == 1
    saved = torch.load(tmp_path / "meca_scores.pt")
    assert saved["iterations"] == [] and torch.equal(saved["enhanced_prob"], saved["warmup_prob"])
    warm = torch.load(tmp_path / "meca_warmup_model.pt")
    enhanced = torch.load(tmp_path / "meca_enhanced_model.pt")
    assert all(torch.equal(warm[k], enhanced[k]) for k in warm)
    rec = [r for r in ctx.history if r.get("stage") == "meca-detect"][0]
    assert rec["suspicious_classes"], "the test needs a picked class"
    from bdframe import scoring as sc
    from bdframe.interfaces import ScoreContext
    pos = train.positions(saved["ids"])
    sctx = ScoreContext(seed=0, device=torch.device("cpu"), batch_size=256, progress=False)
    feats = sc.features(ctx.new_model(state_dict=warm), train.subset(pos), sctx).double()
    flags, _ = flag_label_aware(saved["warmup_prob"], train.labels[pos], classes=rec["suspicious_classes"],
                                inside="clusters", features=feats, ids=saved["ids"], seed=ctx.seed)
    assert torch.equal(saved["detected_poison"], flags)
    assert len(res.metrics["trend"]) == 1


def _quickstart(tmp_path, tag, *, attack=True, **changes) -> Path:
    """Run the README quickstart's MeCa recipe on the CPU with the top-level ``changes`` laid
    over it (without its attack if ``attack`` is false); returns the run directory."""
    import toml

    data = tomllib.loads((Path(__file__).resolve().parents[2] / "examples" / "meca-quickstart.toml").read_text())
    data.update(device="cpu", **changes)
    if not attack:
        data.pop("attack")
    f = tmp_path / f"{tag}.toml"
    f.write_text(toml.dumps(data))
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / tag)]) == 0
    return tmp_path / tag


@pytest.mark.slow
def test_the_defaults_keep_more_accuracy_than_the_papers_rule_and_flag_little_of_clean_data(tmp_path):
    """The README quickstart's data (synthetic, BadNet at 10%), the same seed and warm-up: bdframe's
    defaults keep far more clean accuracy than the paper's pipeline (its rule, a five-iteration
    enhancement as in examples/meca-paper-quickstart.toml) at an ASR as low, or both under 2%;
    on the same data without the attack the defaults flag under 10%."""
    def run(tag, defense, attack=True):
        out = _quickstart(tmp_path, tag, attack=attack, defense={"name": "meca", **defense})
        return json.loads((out / "metrics.json").read_text())

    ours = run("defaults", {})
    paper = run("paper", {**PAPER_SETTINGS, "iterations": 5, "alpha_step": 0.1})
    assert ours["defense_metrics"]["trend"][0]["asr"] > 0.5  # the warm-up learned the backdoor
    assert ours["clean_acc"] > paper["clean_acc"]
    assert ours["asr"] <= max(paper["asr"], 0.02)
    clean = run("clean", {}, attack=False)
    assert clean["defense_metrics"]["split"]["poison_share"] < 0.10


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 5])
def test_the_default_cut_picks_no_class_of_clean_data_where_a_cut_of_2_did(tmp_path, seed):
    """The README quickstart's recipe without its attack, at two seeds where a clean class's
    z-score in the class test lies between 2 and 3 (2.45 and 2.83 when measured): the default
    cut (spread_k = 3) picks no class, and the clean data loses almost nothing to detection."""
    out = _quickstart(tmp_path, "run", attack=False, seed=seed)
    detect = next(r for r in map(json.loads, (out / "history.jsonl").read_text().splitlines())
                  if r.get("stage") == "meca-detect")
    z = detect["class_gap-separation-floor_z"]["warmup"]
    assert 2.0 < max(v for v in z.values() if v is not None) <= 3.0  # a cut of 2 would pick a clean class
    assert detect["suspicious_classes"] == []
    m = json.loads((out / "metrics.json").read_text())
    assert m["defense_metrics"]["split"]["poison_share"] < 0.01
    # no class picked: no second look and no relearning, the clean model is the result
    assert m["defense_metrics"]["relearn"] is None
    assert (m["clean_acc"], m.get("asr")) == (m["defense_metrics"]["clean_model"]["clean_acc"],
                                          m["defense_metrics"]["clean_model"].get("asr"))


@pytest.mark.slow
def test_the_second_look_flags_what_the_clean_model_doubts_in_the_picked_class_and_relearns_it(tmp_path):
    """``recheck_below``: after the clean training, the kept samples of the picked class to which
    the clean model (``meca_clean_model.pt``) gives their label a probability below the cut are
    flagged too, exactly those; the whole flagged set is relabelled and relearned for
    ``recheck_epochs``, and the suspects reported are both sets."""
    from bdframe import scoring
    from bdframe.interfaces import ScoreContext
    from bdframe.scan import load_run

    # recheck_moved = false: every doubted sample, so that a clean quickstart class gives some
    out = _quickstart(tmp_path, "recheck", defense={"name": "meca", "recheck_below": 0.95, "recheck_epochs": 2,
                                                    "recheck_moved": False})
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    detect = next(r for r in history if r.get("stage") == "meca-detect")
    recheck = next(r for r in history if r.get("stage") == "meca-recheck")
    assert detect["suspicious_classes"] == recheck["classes"] == [1]
    m = json.loads((out / "metrics.json").read_text())
    relearn = m["defense_metrics"]["relearn"]
    assert relearn["rechecked"] == recheck["flagged"] > 0
    assert relearn["relabelled"] == detect["detected_poison"] + recheck["flagged"] == m["detection"]["flagged"]
    assert len([r for r in history if r.get("stage") == "meca-relearn" and "epoch" in r]) == 2
    # relabel = "changed" (the default): only the flagged samples the clean model relabels are relearned
    done = next(r for r in history if r.get("stage") == "meca-relearn" and "train_size" in r)
    n = m["train_size"]
    assert done["train_size"] == n - relearn["relabelled"] + relearn["label_changed"]
    assert 0 < relearn["label_changed"] < relearn["relabelled"]
    assert (m["clean_acc"], m["asr"]) == (relearn["clean_acc"], relearn["asr"])
    # the rechecked samples are exactly the kept ones of class 1 the clean model doubts
    parts, _ = load_run(out, device="cpu")
    data = parts.poisoned
    saved = torch.load(out / "meca_scores.pt", weights_only=False)
    detected = set(saved["ids"][saved["detected_poison"]].tolist())
    suspected = set(json.loads((out / "suspected.json").read_text())["suspected_ids"])
    rechecked = suspected - detected
    assert detected <= suspected and len(rechecked) == recheck["flagged"]
    clean = parts.build_model()
    clean.load_state_dict(torch.load(out / "meca_clean_model.pt", map_location="cpu", weights_only=True))
    # read as the defense reads them: the picked class's kept samples, and with the class-relative
    # cut all kept samples, whose median p(label) outside the class scales the cut
    relative = recheck["cut"] == "class"
    keep = ~data.contains(sorted(detected))
    part = data.subset(torch.nonzero(keep if relative else keep & (data.labels == 1)).flatten())
    prob = torch.softmax(scoring.logits(clean.eval(), part, ScoreContext(progress=False)).double(), 1)
    own = prob[torch.arange(len(part)), part.labels]
    mine = part.labels == 1
    cut = 0.95 * min(1.0, float(own[mine].median()) / float(own[~mine].median())) if relative else 0.95
    assert recheck["cuts"] == {"1": pytest.approx(cut)}
    doubted = mine & (own < cut)
    if recheck["moved"]:  # only those it calls by another class
        others = prob.clone()
        others[torch.arange(len(part)), part.labels] = -1
        doubted &= others.max(1).values > own
    assert rechecked == set(part.ids[doubted].tolist())
    assert any(line.startswith(f"meca: second look: the clean model flagged {len(rechecked)} more of class 1")
               for line in m["defense_summary"])


@pytest.mark.slow
def test_more_rounds_of_the_second_look_keep_the_first_and_look_again_at_what_is_still_kept(tmp_path):
    """``recheck_rounds = 2``: the first round is the one-round run's, to the last digit (the same
    stage, the same seed); the second looks only at the picked class's samples still kept, adds
    what it flags to the suspects and relearns everything flagged so far for ``recheck_epochs``
    under its own stage."""
    def run(tag, rounds):
        out = _quickstart(tmp_path, tag, defense={"name": "meca", "recheck_below": 0.95, "recheck_epochs": 1,
                                                  "recheck_moved": False, "recheck_rounds": rounds})
        history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
        return out, history, json.loads((out / "metrics.json").read_text())

    one, h1, m1 = run("one", 1)
    two, h2, m2 = run("two", 2)
    looks = [r for r in h2 if r.get("stage") == "meca-recheck"]
    assert [r["round"] for r in looks] == [1, 2]
    first = next(r for r in h1 if r.get("stage") == "meca-recheck")
    assert looks[0]["flagged"] == first["flagged"] > 0
    done = [r for r in h2 if r.get("stage") in ("meca-relearn", "meca-relearn-2") and "train_size" in r]
    assert [r["stage"] for r in done] == ["meca-relearn", "meca-relearn-2"]
    once = next(r for r in h1 if r.get("stage") == "meca-relearn" and "train_size" in r)
    assert done[0] == once  # round 1 unchanged by the later rounds
    assert len([r for r in h2 if r.get("stage") == "meca-relearn-2" and "epoch" in r]) == 1
    rounds = m2["defense_metrics"]["relearn"]["rounds"]
    assert [r["rechecked"] for r in rounds] == [looks[0]["flagged"], looks[0]["flagged"] + looks[1]["flagged"]]
    assert m2["defense_metrics"]["relearn"]["rechecked"] == rounds[-1]["rechecked"]
    assert done[1]["relabelled"] == m2["detection"]["flagged"] == m1["detection"]["flagged"] + looks[1]["flagged"]
    assert (m2["clean_acc"], m2["asr"]) == (done[1]["clean_acc"], done[1]["asr"])
    assert "rounds" not in m1["defense_metrics"]["relearn"]
    s1 = set(json.loads((one / "suspected.json").read_text())["suspected_ids"])
    s2 = set(json.loads((two / "suspected.json").read_text())["suspected_ids"])
    assert s1 <= s2 and len(s2 - s1) == looks[1]["flagged"]
    # what the second round adds lies in the picked class
    from bdframe.scan import rebuild_parts

    data = rebuild_parts(two).poisoned
    extra = data.labels[data.contains(sorted(s2 - s1))]
    assert bool((extra == looks[1]["classes"][0]).all())
    assert any(" in 2 rounds" in line for line in m2["defense_summary"])

"""scan, the SCAn scorer (docs/scorers.md): planted poison, aux rules, equivariance."""

import torch
from hypothesis import given, settings, strategies as st

from bdframe.testing import score_ctx
from bdframe_scorer_scan.plugin import Scan, ScanConfig
from scorers.scorer_helpers import make


def planted(n=600, d=8, k=10, n_poison=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % k
    x = means[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    poison = torch.zeros(n, dtype=torch.bool)
    poison[torch.nonzero(y != 2).flatten()[:n_poison]] = True
    y = y.clone()
    y[poison] = 2  # relabelled to the target class; the trigger dominates their features
    trigger = means[2] + 6.0 * torch.randn(d, generator=g, dtype=torch.float64).sign()
    x[poison] = trigger + torch.randn(n_poison, d, generator=g, dtype=torch.float64)
    aux_y = torch.arange(300) % k
    aux_x = means[aux_y] + torch.randn(300, d, generator=g, dtype=torch.float64)
    return x, y, torch.arange(n), poison, aux_x, aux_y


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 1000))
def test_planted_target_class_is_flagged(seed):
    x, y, ids, poison, ax, ay = planted(seed=seed)
    sc = Scan(ScanConfig(upper_only=True, statistic="posterior"))
    r = sc.analyse(x, y, ids, seed, aux_feats=ax, aux_labels=ay)
    j = dict(zip(r["classes"], r["j_star"]))
    assert all(v >= 0 for v in j.values())
    assert j[2] > sc.config.threshold and j[2] == max(j.values())
    f = r["flagged"]
    assert bool(f[poison].all()) and int(f[~poison & (y == 2)].sum()) <= 2
    assert torch.equal(sc.flag(r["scores"]), f)
    perm = torch.randperm(len(x))
    r2 = sc.analyse(x[perm], y[perm], ids[perm], seed, aux_feats=ax, aux_labels=ay)
    assert torch.allclose(r2["scores"], r["scores"][perm], atol=1e-6, rtol=1e-6)


def test_aux_drawn_from_inspected_set():
    x, y, ids, poison, _, _ = planted()
    sc = Scan(ScanConfig(aux_size=150))
    r = sc.analyse(x, y, ids, 0)
    assert len(r["aux_rows"]) == 150
    assert bool((r["scores"] >= 0).all())
    perm = torch.randperm(len(x))
    r2 = sc.analyse(x[perm], y[perm], ids[perm], 0)
    assert set(ids[perm][r2["aux_rows"]].tolist()) == set(ids[r["aux_rows"]].tolist())
    assert torch.allclose(r2["scores"], r["scores"][perm], atol=1e-6, rtol=1e-6)


def test_classes_only_in_aux_are_never_flagged_and_binary_mode():
    x, y, ids, poison, ax, ay = planted()
    keep = y != 4  # the inspected set has no class 4; the aux set does
    sc = Scan(ScanConfig(score_mode="binary"))
    r = sc.analyse(x[keep], y[keep], ids[keep], 0, aux_feats=ax, aux_labels=ay)
    assert 4 not in r["classes"]
    assert set(r["scores"].unique().tolist()) <= {0.0, 1.0} and torch.equal(r["scores"] == 1, r["flagged"])


def test_constant_model_gives_finite_constant_scores():
    data, model = make(30, constant=True)
    s = Scan().score(model, data, score_ctx(0))
    assert bool(torch.isfinite(s).all()) and bool((s == s[0]).all())


def test_reference_statistic_runs_and_is_equivariant():
    x, y, ids, poison, ax, ay = planted()
    sc = Scan(ScanConfig(statistic="reference"))
    r = sc.analyse(x, y, ids, 0, aux_feats=ax, aux_labels=ay)
    assert all(v >= 0 for v in r["j_star"]) and bool(torch.isfinite(r["scores"]).all())
    perm = torch.randperm(len(x))
    r2 = sc.analyse(x[perm], y[perm], ids[perm], 0, aux_feats=ax, aux_labels=ay)
    assert torch.allclose(r2["scores"], r["scores"][perm], atol=1e-6, rtol=1e-6)

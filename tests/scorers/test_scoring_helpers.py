"""bdframe.scoring: per-id randomness, order-independent draws, anomaly index."""

import torch
from hypothesis import given, settings, strategies as st

from bdframe.scoring import anomaly_index, balanced_draw, id_normal, id_uniform, order_by_key
from bdframe.testing import tiny_imageset

SET = settings(max_examples=15, deadline=None)


@SET
@given(st.lists(st.integers(0, 2 ** 40), min_size=1, max_size=50, unique=True), st.integers(0, 2 ** 62),
       st.integers(1, 9))
def test_id_uniform_is_a_function_of_seed_id_and_column(ids, seed, n):
    ids = torch.tensor(ids)
    u = id_uniform(("t", seed), ids, n)
    assert u.shape == (len(ids), n) and u.dtype == torch.float32
    assert bool((u >= 0).all() and (u < 1).all())
    perm = torch.randperm(len(ids))
    assert torch.equal(id_uniform(("t", seed), ids[perm], n), u[perm])  # row order / batch independent
    assert torch.equal(id_uniform(("t", seed), ids[:1], n), u[:1])
    assert torch.equal(id_uniform(("t", seed), ids, n + 3)[:, :n], u)  # columns are stable


def test_id_uniform_statistics_and_seed_dependence():
    ids = torch.arange(20000)
    u = id_uniform(("t", 1), ids, 2)
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert abs(float(torch.corrcoef(u.T)[0, 1])) < 0.03
    assert float((u != id_uniform(("t", 2), ids, 2)).float().mean()) > 0.99
    z = id_normal(("t", 1), ids, 1)
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03 and bool(torch.isfinite(z).all())


@SET
@given(st.integers(10, 80), st.integers(1, 100), st.integers(2, 5), st.integers(0, 1000))
def test_balanced_draw_is_order_independent_and_balanced(n, size, k, seed):
    data = tiny_imageset(n, num_classes=k, size=4, seed=seed)
    rows = balanced_draw(data, size, ("d", seed))
    assert len(rows) == min(size, n) and len(set(rows.tolist())) == len(rows)
    counts = torch.bincount(data.labels[rows], minlength=k)
    avail = torch.bincount(data.labels, minlength=k)
    short = counts < avail  # classes not exhausted get at least the largest quota minus one
    assert bool((counts[short] >= counts.max() - 1).all())
    perm = torch.randperm(n)
    again = balanced_draw(data.subset(perm), size, ("d", seed))
    assert set(data.subset(perm).ids[again].tolist()) == set(data.ids[rows].tolist())


def test_order_by_key_ignores_row_order():
    ids = torch.arange(50) * 7
    o = order_by_key(("k", 3), ids)
    perm = torch.randperm(50)
    assert torch.equal(ids[perm][order_by_key(("k", 3), ids[perm])], ids[o])


def test_anomaly_index_is_finite_and_nonnegative():
    assert torch.equal(anomaly_index(torch.ones(5)), torch.zeros(5, dtype=torch.float64))
    a = anomaly_index(torch.tensor([1.0, 1.0, 1.0, 1.0, 9.0]))  # MAD 0: falls back to the mean deviation
    assert bool(torch.isfinite(a).all()) and float(a[-1]) > 1 and bool((a >= 0).all())

"""MeCa's detection rules without a poison rate: the confidence rule (robust outlier cut or
Otsu's split of logit(p_e)) and the label-aware rule. Properties: order and class-renaming
invariance, the fallback, determinism on ties, and no access to ground truth."""

import inspect

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe_defense_meca.plugin import (MeCaConfig, flag_confident, flag_label_aware, otsu_threshold,
                                         outlier_threshold, suspicious_classes)

SET = settings(max_examples=60, deadline=None)
PROBS = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=2, max_size=80)


@st.composite
def labelled(draw, k_max=6):
    p = draw(PROBS)
    k = draw(st.integers(2, k_max))
    labels = draw(st.lists(st.integers(0, k - 1), min_size=len(p), max_size=len(p)))
    return torch.tensor(p, dtype=torch.float64), torch.tensor(labels)


def test_otsu_splits_two_groups_at_the_gap_and_refuses_a_constant():
    v = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1], dtype=torch.float64)
    assert otsu_threshold(v) == pytest.approx(2.6)
    assert otsu_threshold(torch.full((7,), 3.0)) is None and otsu_threshold(torch.tensor([1.0])) is None


@SET
@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=2, max_size=60), st.randoms())
def test_otsu_is_order_invariant_and_lies_between_distinct_values(values, rnd):
    v = torch.tensor(values, dtype=torch.float64)
    perm = list(range(len(values)))
    rnd.shuffle(perm)
    t = otsu_threshold(v)
    assert t == otsu_threshold(v[perm])
    if len(set(values)) < 2:
        assert t is None
    else:
        assert min(values) <= t < max(values) and (v > t).any() and (v <= t).any()


@SET
@given(labelled(), st.sampled_from(["mad", "otsu"]), st.randoms())
def test_the_rules_are_order_invariant(data, threshold, rnd):
    prob, labels = data
    perm = torch.tensor(rnd.sample(range(len(prob)), len(prob)))
    f = flag_confident(prob, threshold=threshold)
    assert torch.equal(flag_confident(prob[perm], threshold=threshold), f[perm])
    g, classes = flag_label_aware(prob, labels, threshold=threshold)
    g2, classes2 = flag_label_aware(prob[perm], labels[perm], threshold=threshold)
    assert torch.equal(g2, g[perm]) and classes2 == classes


@SET
@given(labelled(), st.randoms())
def test_renaming_classes_renames_the_suspicious_ones_and_changes_no_flag(data, rnd):
    prob, labels = data
    k = int(labels.max()) + 1
    names = rnd.sample(range(100), k)
    renamed = torch.tensor([names[int(c)] for c in labels])
    g, classes = flag_label_aware(prob, labels)
    g2, classes2 = flag_label_aware(prob, renamed)
    assert torch.equal(g, g2) and sorted(classes2) == sorted(names[c] for c in classes)


@SET
@given(labelled())
def test_with_no_outlier_class_the_label_aware_rule_is_the_global_rule(data):
    prob, labels = data
    flags, classes = flag_label_aware(prob, labels)
    if not classes:
        assert torch.equal(flags, flag_confident(prob))


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_equal_confidences_flag_nothing_deterministically(p):
    prob = torch.full((50,), p, dtype=torch.float64)
    labels = torch.arange(50) % 5
    for threshold in ("mad", "otsu"):
        assert not flag_confident(prob, threshold=threshold).any()
    flags, classes = flag_label_aware(prob, labels)
    assert classes == [] and not flags.any()


def test_a_target_class_that_stands_out_is_found_and_split():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(1000) % 10
    prob = torch.rand(1000, generator=g) * 0.9  # clean: spread out, rarely above 0.99
    poisoned = (labels == 3) & (torch.arange(1000) < 500)  # half of class 3 fitted with certainty
    prob[poisoned] = 0.9999
    assert suspicious_classes(prob, labels) == [3]
    flags, classes = flag_label_aware(prob, labels)
    assert classes == [3] and torch.equal(flags, poisoned)


def test_the_rules_cannot_see_ground_truth():
    for fn in (flag_confident, flag_label_aware, suspicious_classes, otsu_threshold, outlier_threshold):
        params = set(inspect.signature(fn).parameters)
        assert params <= {"prob", "labels", "rows", "threshold", "k", "high", "z", "values"}, (fn, params)


def test_the_papers_rule_stays_the_default():
    assert MeCaConfig().detection == "argmax"

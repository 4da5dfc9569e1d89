"""bdframe.detection: AUROC, TPR at FPR, precision/recall, checked against brute force."""

import math

import torch
from hypothesis import given, settings, strategies as st

from bdframe.detection import auroc, flag_metrics, roc_curve, summary, tpr_at_fpr

SET = settings(max_examples=30, deadline=None)
scores_truth = st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 6).map(float), min_size=n, max_size=n),  # few values: many ties
    st.lists(st.booleans(), min_size=n, max_size=n)))


def brute_auc(s, t):
    pos = [a for a, b in zip(s, t) if b]
    neg = [a for a, b in zip(s, t) if not b]
    if not pos or not neg:
        return math.nan
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


@SET
@given(scores_truth)
def test_auroc_matches_mann_whitney(st_):
    s, t = st_
    a, b = auroc(torch.tensor(s), torch.tensor(t)), brute_auc(s, t)
    assert (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-12


@SET
@given(scores_truth, st.sampled_from([0.0, 0.01, 0.1, 0.3, 1.0]))
def test_tpr_at_fpr_is_best_admissible_threshold(st_, target):
    s, t = st_
    if all(t) or not any(t):
        return
    got = tpr_at_fpr(torch.tensor(s), torch.tensor(t), [target])[f"{target:g}"]
    npos, nneg = sum(t), len(t) - sum(t)
    best = 0.0
    for thr in set(s) | {math.inf}:
        fp = sum(1 for a, b in zip(s, t) if a >= thr and not b)
        tp = sum(1 for a, b in zip(s, t) if a >= thr and b)
        if fp / nneg <= target + 1e-12:
            best = max(best, tp / npos)
    assert abs(got - best) < 1e-12


def test_known_values():
    s = torch.tensor([0.9, 0.8, 0.7, 0.1])
    t = torch.tensor([True, True, False, False])
    assert auroc(s, t) == 1.0 and auroc(-s, t) == 0.0
    assert auroc(torch.zeros(4), t) == 0.5
    assert math.isnan(auroc(s, torch.ones(4, dtype=torch.bool)))
    fpr, tpr, thr = roc_curve(s, t)
    assert fpr.tolist() == [0, 0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1, 1] and math.isinf(thr[0])
    pr = flag_metrics(s >= 0.75, t)
    assert pr["precision"] == 1.0 and pr["recall"] == 1.0 and pr["flagged"] == 2
    m = flag_metrics(torch.tensor([True, False, True, False]), t)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["fpr"] == 0.5
    sm = summary(s, t, flagged=s > 0.5)
    assert sm["auroc"] == 1.0 and sm["tpr_at_fpr"] == {"0.01": 1.0, "0.05": 1.0, "0.1": 1.0}
    assert sm["split"]["recall"] == 1.0 and sm["split"]["precision"] == 2 / 3


def test_detection_of_flagged_ids():
    """bdframe.metrics.detection: flag_metrics over ids, in metrics.json's key order."""
    from bdframe.metrics import detection

    m = detection([11, 12], [12, 13], torch.tensor([10, 11, 12, 13, 14]))
    assert list(m) == ["flagged", "true_positives", "false_positives", "recall", "precision", "fpr"]
    assert m == {"flagged": 2, "true_positives": 1, "false_positives": 1, "recall": 0.5, "precision": 0.5,
                 "fpr": 1 / 3}

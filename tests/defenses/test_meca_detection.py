"""MeCa's detection rules without a poison rate: the confidence rule (robust outlier cut or
Otsu's split of logit(p_e)) and the label-aware rule. Properties: order and class-renaming
invariance, the fallback, determinism on ties, and no access to ground truth."""

import inspect

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe_defense_meca.plugin import (_separation, class_spreads, classes_above, cluster_cores,
                                         cluster_gaps, gap_separation_z,
                                         cluster_split, floor_z, runner_up_entropy, runner_up_floor, split_side,
                                         confidence_scores, flag_confident, flag_label_aware, gap_z, margins,
                                         otsu_threshold, outlier_threshold, robust_class_z, second_look, second_look_cuts,
                                         spread_classes, spread_z,
                                         student_t_quantile, suspicious_classes, upper_outliers)

SET = settings(max_examples=60, deadline=None)
PROBS = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=2, max_size=80)


@st.composite
def labelled(draw, k_max=6):
    p = draw(PROBS)
    k = draw(st.integers(2, k_max))
    labels = draw(st.lists(st.integers(0, k - 1), min_size=len(p), max_size=len(p)))
    return torch.tensor(p, dtype=torch.float64), torch.tensor(labels)


def split_inputs(prob, inside, ids=None):
    """For ``inside = "clusters"``: ids and per-sample features that depend on the sample alone
    (its probability and its id), so that permuting the samples permutes them."""
    if inside != "clusters":
        return {}
    ids = torch.arange(len(prob)) if ids is None else ids
    feats = torch.stack([prob, (ids * 7919 % 13).double() / 13, torch.cos(ids.double())], 1)
    return {"features": feats, "ids": ids}


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
@given(labelled(), st.sampled_from(["mad", "otsu"]), st.sampled_from(["otsu", "reference", "clusters"]), st.randoms())
def test_the_rules_are_order_invariant(data, threshold, inside, rnd):
    prob, labels = data
    perm = torch.tensor(rnd.sample(range(len(prob)), len(prob)))
    f = flag_confident(prob, threshold=threshold)
    assert torch.equal(flag_confident(prob[perm], threshold=threshold), f[perm])
    g, classes = flag_label_aware(prob, labels, threshold=threshold, inside=inside, **split_inputs(prob, inside))
    g2, classes2 = flag_label_aware(prob[perm], labels[perm], threshold=threshold, inside=inside,
                                    **split_inputs(prob[perm], inside, torch.arange(len(prob))[perm]))
    assert torch.equal(g2, g[perm]) and classes2 == classes


@SET
@given(labelled(), st.sampled_from(["otsu", "reference", "clusters"]), st.randoms())
def test_renaming_classes_renames_the_suspicious_ones_and_changes_no_flag(data, inside, rnd):
    prob, labels = data
    k = int(labels.max()) + 1
    names = rnd.sample(range(100), k)
    renamed = torch.tensor([names[int(c)] for c in labels])
    g, classes = flag_label_aware(prob, labels, inside=inside, **split_inputs(prob, inside))
    g2, classes2 = flag_label_aware(prob, renamed, inside=inside, **split_inputs(prob, inside))
    assert torch.equal(g, g2) and sorted(classes2) == sorted(names[c] for c in classes)


@SET
@given(labelled(), st.sampled_from(["otsu", "reference", "clusters"]))
def test_with_no_outlier_class_the_label_aware_rule_is_the_global_rule(data, inside):
    prob, labels = data
    flags, classes = flag_label_aware(prob, labels, inside=inside, **split_inputs(prob, inside))
    if not classes:
        assert torch.equal(flags, flag_confident(prob))


@SET
@given(labelled(), st.floats(0.05, 0.95))
def test_the_reference_split_flags_only_inside_the_classes_that_stand_out(data, q):
    """Nothing outside the classes that stand out is flagged; inside them exactly the samples
    above the quantile of the other classes' logit(p_e); a higher quantile flags a subset."""
    prob, labels = data
    flags, classes = flag_label_aware(prob, labels, inside="reference", quantile=q)
    if not classes:
        return
    out = torch.isin(labels, torch.tensor(classes))
    z = confidence_scores(prob)
    assert not flags[~out].any()
    assert torch.equal(flags, out & (z > torch.quantile(z[~out], q)))
    higher, _ = flag_label_aware(prob, labels, inside="reference", quantile=min(0.99, q + 0.04))
    assert not (higher & ~flags).any()


@SET
@given(labelled(), labelled(), st.sampled_from(["otsu", "reference"]), st.randoms())
def test_a_confirming_model_only_removes_classes_and_agrees_with_itself(data, other, inside, rnd):
    """``confirm``: a class is picked only where it also stands out in the confirming model's
    probabilities; confirming with the same probabilities changes nothing; the rule stays order
    invariant; a class that is not confirmed is never split (with none left: the global rule)."""
    prob, labels = data
    other_prob = torch.cat([other[0], torch.rand(max(0, len(prob) - len(other[0])), dtype=torch.float64)])[:len(prob)]
    plain, classes = flag_label_aware(prob, labels, inside=inside)
    same, same_classes = flag_label_aware(prob, labels, inside=inside, confirm=prob)
    assert torch.equal(same, plain) and same_classes == classes
    flags, confirmed = flag_label_aware(prob, labels, inside=inside, confirm=other_prob)
    assert confirmed == [c for c in classes if c in suspicious_classes(other_prob, labels)]
    if not confirmed:
        assert torch.equal(flags, flag_confident(prob))
    elif inside == "otsu":
        assert not flags[~torch.isin(labels, torch.tensor(confirmed))].any()
    perm = torch.tensor(rnd.sample(range(len(prob)), len(prob)))
    flags2, confirmed2 = flag_label_aware(prob[perm], labels[perm], inside=inside, confirm=other_prob[perm])
    assert torch.equal(flags2, flags[perm]) and confirmed2 == confirmed
    # pick = "confirm": the confirming model's classes alone, split by prob as usual
    alone, picked = flag_label_aware(prob, labels, inside=inside, confirm=other_prob, pick="confirm")
    assert picked == suspicious_classes(other_prob, labels)
    if not picked:
        assert torch.equal(alone, flag_confident(prob))
    elif inside == "otsu":
        assert not alone[~torch.isin(labels, torch.tensor(picked))].any()
        for c in picked:
            assert torch.equal(alone[labels == c], flag_confident(prob, labels == c, threshold="otsu")[labels == c])
    same, same_classes = flag_label_aware(prob, labels, inside=inside, confirm=prob, pick="confirm")
    assert torch.equal(same, plain) and same_classes == classes


def two_models(seed, picked, n_picked):
    """1,000 samples in 10 classes, each fitted by a warm-up and an enhanced model with
    probabilities spread over [0, 0.9); and the mask of the first ``n_picked`` samples overall
    that are in class ``picked`` (about a tenth of them), for a test to fit confidently."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(1000) % 10
    warm = torch.rand(1000, generator=g) * 0.9
    enhanced = torch.rand(1000, generator=g) * 0.9
    return labels, warm, enhanced, (labels == picked) & (torch.arange(1000) < n_picked)


def test_a_class_only_the_enhanced_model_singles_out_is_not_split_when_the_warm_up_disagrees():
    """The clean-data failure the confirmation exists for: the enhanced model fits one clean
    class far more confidently than the others, the warm-up model does not."""
    labels, warm, enhanced, easy = two_models(1, 8, 400)
    enhanced[easy] = 0.999
    flags, classes = flag_label_aware(enhanced, labels)
    assert classes == [8] and flags[easy].all()
    flags, classes = flag_label_aware(enhanced, labels, confirm=warm)
    assert classes == [] and torch.equal(flags, flag_confident(enhanced))
    with pytest.raises(ValueError, match="one probability per sample"):
        flag_label_aware(enhanced, labels, confirm=warm[:10])
    with pytest.raises(ValueError, match="pick"):
        flag_label_aware(enhanced, labels, confirm=warm, pick="either")


def test_the_warm_up_models_class_is_split_even_where_the_enhanced_model_does_not_single_it_out():
    """``pick = "confirm"``: the warm-up model singles out the target class, the enhanced model
    (which fits it no better than the others) does not; the class is still split, by the
    enhanced model's confidences."""
    labels, warm, enhanced, poisoned = two_models(2, 3, 500)
    warm[poisoned] = 0.999
    enhanced[poisoned] = 0.98  # fitted, but below the 0.99 that the class test counts
    assert suspicious_classes(enhanced, labels) == []
    flags, classes = flag_label_aware(enhanced, labels, confirm=warm)
    assert classes == []
    flags, classes = flag_label_aware(enhanced, labels, confirm=warm, pick="confirm")
    assert classes == [3] and flags[poisoned].all() and not flags[labels != 3].any()


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_equal_confidences_flag_nothing_deterministically(p):
    prob = torch.full((50,), p, dtype=torch.float64)
    labels = torch.arange(50) % 5
    for threshold in ("mad", "otsu"):
        assert not flag_confident(prob, threshold=threshold).any()
    for inside in ("otsu", "reference"):
        flags, classes = flag_label_aware(prob, labels, inside=inside)
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
    # the reference split: class 3's samples fitted better than the median sample elsewhere
    flags, classes = flag_label_aware(prob, labels, inside="reference")
    clean_3 = (labels == 3) & ~poisoned
    assert classes == [3] and not (flags & (labels != 3)).any() and (flags & poisoned).sum() == poisoned.sum()
    assert 0 < (flags & clean_3).sum() < clean_3.sum()  # about half of the clean samples of the class


def test_the_rules_cannot_see_ground_truth():
    for fn in (flag_confident, flag_label_aware, suspicious_classes, otsu_threshold, outlier_threshold,
               upper_outliers, margins, class_spreads, spread_z, spread_classes, cluster_split, cluster_gaps, gap_z,
               robust_class_z, gap_separation_z, cluster_cores, split_side, runner_up_entropy):
        params = set(inspect.signature(fn).parameters)
        assert params <= {"prob", "labels", "rows", "threshold", "k", "high", "alpha", "values", "inside",
                          "quantile", "confirm", "pick", "classes", "logits", "margin", "q", "limit", "features",
                          "ids", "seed", "n_components", "feats", "signal", "seed_parts", "stat", "floor", "separation", "flags", "side",
                          "side_cut", "cut", "class_prob", "label", "assign"}, (fn, params)


@pytest.mark.parametrize("q,df,want", [(0.975, 10, 2.2281389), (0.995, 8, 3.3553873), (0.995, 1, 63.6567412),
                                       (0.95, 2, 2.9199856), (0.5, 5, 0.0)])
def test_student_t_quantiles_match_the_tables(q, df, want):
    assert student_t_quantile(q, df) == pytest.approx(want, abs=2e-6)


def test_grubbs_critical_values_match_the_published_table():
    """One-sided Grubbs critical values at 5% for n = 10 and n = 20 (2.176 and 2.557 in the
    published tables): a largest value whose statistic is just above them is an outlier, just
    below is not."""
    def with_statistic(n, g):
        v = torch.zeros(n, dtype=torch.float64)
        v[: n - 1] = torch.linspace(-1, 1, n - 1, dtype=torch.float64)
        lo, hi = 1.0, 100.0
        for _ in range(200):  # the statistic grows with the last value: bisect for G = g
            v[-1] = (lo + hi) / 2
            stat = (float(v[-1]) - float(v.mean())) / float(v.std())
            lo, hi = (float(v[-1]), hi) if stat < g else (lo, float(v[-1]))
        return v

    for n, crit in ((10, 2.176), (20, 2.557)):
        assert upper_outliers(with_statistic(n, crit + 0.01)) == [n - 1]
        assert upper_outliers(with_statistic(n, crit - 0.01)) == []


def test_grubbs_stops_at_the_first_value_that_does_not_stand_out():
    """One target class far above a lower group that is itself two clusters (the shape seen on
    CIFAR-10: most classes near 0, a few near 0.07): only the target is an outlier."""
    shares = torch.tensor([0.005, 0.404, 0.002, 0.0, 0.0, 0.066, 0.002, 0.059, 0.108, 0.0], dtype=torch.float64)
    assert upper_outliers(shares) == [1]
    assert upper_outliers(torch.full((10,), 0.3)) == []
    assert upper_outliers(torch.tensor([0.0, 1.0])) == []  # too few values to test


@SET
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=3, max_size=30), st.randoms())
def test_outliers_are_order_invariant_a_minority_and_the_largest(values, rnd):
    v = torch.tensor(values, dtype=torch.float64)
    perm = rnd.sample(range(len(values)), len(values))
    out = upper_outliers(v)
    assert sorted(v[out].tolist()) == sorted(v[perm][upper_outliers(v[perm])].tolist())
    assert len(out) <= (len(values) - 1) // 2
    if out:  # the outliers are the largest values
        rest = [x for i, x in enumerate(values) if i not in out]
        assert min(v[out].tolist()) >= max(rest)


# -- the spread class test (class_stat = "spread") ------------------------------------------------


def test_margins_are_the_labels_logit_minus_the_best_other_and_do_not_saturate():
    logits = torch.tensor([[5.0, 1.0, 2.0], [0.0, 3.0, -1.0], [60.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    assert margins(logits, labels).tolist() == [3.0, -3.0, 59.0, 0.0]
    # p(y|x) is 1.0 in float32 for both of these, the margins still order them
    far = margins(torch.tensor([[40.0, 0.0], [80.0, 0.0]]), torch.tensor([0, 0]))
    assert far[1] > far[0]
    with pytest.raises(ValueError, match="one label per row"):
        margins(logits, labels[:2])


@st.composite
def margins_in_classes(draw, k_min=3, k_max=8):
    k = draw(st.integers(k_min, k_max))
    n = draw(st.integers(2 * k, 90))
    m = draw(st.lists(st.floats(-30, 30, allow_nan=False), min_size=n, max_size=n))
    labels = list(range(k)) + draw(st.lists(st.integers(0, k - 1), min_size=n - k, max_size=n - k))
    return torch.tensor(m, dtype=torch.float64), torch.tensor(labels)


@SET
@given(margins_in_classes(), st.randoms(), st.floats(0.55, 0.95), st.floats(0.5, 4.0))
def test_the_spread_test_is_order_invariant_and_ignores_class_names(data, rnd, q, k):
    margin, labels = data
    picked = spread_classes(margin, labels, q=q, k=k)
    perm = torch.tensor(rnd.sample(range(len(margin)), len(margin)))
    assert spread_classes(margin[perm], labels[perm], q=q, k=k) == picked
    names = torch.tensor(rnd.sample(range(100), int(labels.max()) + 1))  # any distinct integers
    assert spread_classes(margin, names[labels], q=q, k=k) == sorted(int(names[c]) for c in picked)
    # a larger k never picks more; only classes above the median spread can be picked
    assert set(spread_classes(margin, labels, q=q, k=k + 1)) <= set(picked)
    classes, spread = class_spreads(margin, labels, q=q)
    assert all(float(spread[list(classes).index(c)]) > float(spread.median()) for c in picked)


def difficulty_classes(seed):
    """5,000 samples in 10 classes whose margins are centred on different values (some classes
    are much easier than others), each spread the same way around its centre."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(5000) % 10
    centre = torch.linspace(-2.0, 6.0, 10)[labels]
    return labels, centre + torch.randn(5000, generator=g)


def test_a_confidently_fitted_group_is_picked_and_an_easy_class_is_not():
    """The point of the spread: the easiest class (9) is fitted more confidently than any other
    as a whole and is not picked; a third of a hard class (2) fitted far beyond its own samples
    (a trigger the model learns more easily than the class) is."""
    labels, margin = difficulty_classes(0)
    assert spread_classes(margin, labels) == []
    poisoned = (labels == 2) & (torch.arange(5000) < 1650)
    margin[poisoned] = 12.0 + torch.rand(int(poisoned.sum()), generator=torch.Generator().manual_seed(1))
    assert spread_classes(margin, labels) == [2]
    # the picked class is still fitted less confidently than the easy one as a whole
    assert margin[labels == 2].median() < margin[labels == 9].median()


def two_groups(n_small: int, n_large: int, seed: int = 0):
    """Features of two well separated groups (the first ``n_small`` rows, then ``n_large``)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n_small + n_large, 8, generator=g, dtype=torch.float64)
    f[:n_small, 0] += 12.0
    return f


@pytest.mark.parametrize("n_small,n_large", [(40, 120), (100, 100), (120, 40)])
def test_the_cluster_split_flags_the_confidently_fitted_group_whatever_its_size(n_small, n_large):
    """A group that is a third, half (a clean-label attack) or three quarters of its class is
    flagged when the model fits it more confidently; the same clusters with the confidences
    swapped flag the other group."""
    f = two_groups(n_small, n_large)
    group = torch.arange(n_small + n_large) < n_small
    signal = torch.where(group, 8.0, 1.0).double() + torch.linspace(0, 0.5, n_small + n_large, dtype=torch.float64)
    ids = torch.arange(n_small + n_large) * 3 + 11
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0)), group)
    assert torch.equal(cluster_split(f, -signal, ids, ("t", 0)), ~group)


@SET
@given(st.integers(0, 2 ** 16), st.randoms())
def test_the_cluster_split_is_order_invariant(seed, rnd):
    f = torch.randn(60, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    signal = f[:, 1] + 0.3 * f[:, 0]
    ids = torch.arange(60) * 5 + 2
    perm = torch.tensor(rnd.sample(range(60), 60))
    flags = cluster_split(f, signal, ids, ("t", seed))
    assert torch.equal(cluster_split(f[perm], signal[perm], ids[perm], ("t", seed)), flags[perm])


def test_the_cluster_split_reads_the_tail_when_both_medians_sit_on_the_ceiling():
    """Most of both clusters fitted at the clamp ceiling: the medians tie, and the cluster with
    the less confidently fitted tail (a third of it well below) is the clean one."""
    f = two_groups(40, 60)
    ceiling = float(confidence_scores(torch.ones(1))[0])
    signal = torch.full((100,), ceiling, dtype=torch.float64)
    signal[40:60] = 0.5  # a third of the large group is fitted far less confidently
    group = torch.arange(100) < 40
    assert float(signal[group].median()) == float(signal[~group].median())
    assert torch.equal(cluster_split(f, signal, torch.arange(100), ("t", 0)), group)


def test_the_cluster_split_flags_nothing_when_it_cannot_tell_the_groups_apart():
    f = two_groups(50, 50)
    ids = torch.arange(100)
    assert not cluster_split(f, torch.full((100,), 3.0, dtype=torch.float64), ids, ("t", 0)).any()  # equal means
    assert not cluster_split(torch.ones(100, 8, dtype=torch.float64), torch.arange(100.0), ids, ("t", 0)).any()
    assert not cluster_split(f[:1], torch.ones(1), ids[:1], ("t", 0)).any()


def test_the_cluster_split_works_inside_the_picked_class_only():
    labels = torch.arange(600) % 6
    f = torch.randn(600, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    poisoned = (labels == 4) & (torch.arange(600) < 300)
    f[poisoned, 2] += 15.0
    prob = torch.where(poisoned, 0.9999, 0.6).double()
    flags, classes = flag_label_aware(prob, labels, classes=[4], inside="clusters", features=f, ids=torch.arange(600))
    assert classes == [4] and torch.equal(flags, poisoned)
    with pytest.raises(ValueError, match="one feature row and one id per sample"):
        flag_label_aware(prob, labels, classes=[4], inside="clusters", features=f[:10], ids=torch.arange(600))


def flagged_group(seed: int = 0, *, edge_near: bool = False):
    """600 samples in 6 classes. Class 4's flagged group: a tight trigger group (the first 40 of
    the class's 100, fitted near certainty) and clean samples of the class swept in with it (the
    next 30, fitted less confidently, spread out and apart from it in feature space); the class's other
    samples are not flagged. Two samples of class 2 are flagged by the confidence rule. With
    ``edge_near`` the swept-in clean samples border the class's unflagged samples and are fitted
    more confidently than the trigger group (a trigger the model fits less surely than the
    class's easiest images)."""
    g = torch.Generator().manual_seed(seed)
    n = 600
    labels = torch.arange(n) % 6
    rank = torch.arange(n) // 6  # position inside the class
    f = torch.randn(n, 8, generator=g, dtype=torch.float64)
    trigger = (labels == 4) & (rank < 40)
    edge = (labels == 4) & (rank >= 40) & (rank < 70)
    f[trigger, 2] += 20.0
    f[trigger] *= 0.3
    f[edge, 5] += 2.0 if edge_near else 8.0
    prob = torch.full((n,), 0.7, dtype=torch.float64)
    prob[trigger] = 0.99 if edge_near else 0.9999
    prob[edge] = 0.9999 if edge_near else 0.95
    flags = trigger | edge
    flags[(labels == 2) & (rank < 2)] = True
    return f, prob, labels, torch.arange(n) * 5 + 1, flags, trigger


def test_the_core_keeps_the_confidently_fitted_part_of_the_flagged_group():
    """Inside the picked class the core is the trigger group, the clean samples swept in with it
    are left out of it; flagged samples of other classes (the confidence rule's) are their own core."""
    f, prob, labels, ids, flags, trigger = flagged_group()
    core = cluster_cores(f, prob, labels, ids, flags, [4])
    assert torch.equal(core[labels == 4], trigger[labels == 4])
    assert torch.equal(core[labels != 4], flags[labels != 4])
    assert not (core & ~flags).any()
    assert torch.equal(cluster_cores(f, prob, labels, ids, flags, []), flags)  # no class picked: all flagged


def test_the_far_core_is_the_half_away_from_the_rest_of_the_class_however_confidently_it_is_fitted():
    """When the clean samples swept into the flagged group are fitted more confidently than the
    trigger group, the confident half is those clean samples; the far half is still the trigger
    group, since the clean ones border the class's unflagged samples."""
    f, prob, labels, ids, flags, trigger = flagged_group(edge_near=True)
    edge = flags & (labels == 4) & ~trigger
    assert torch.equal(cluster_cores(f, prob, labels, ids, flags, [4])[labels == 4], edge[labels == 4])
    far = cluster_cores(f, prob, labels, ids, flags, [4], side="far")
    assert torch.equal(far[labels == 4], trigger[labels == 4])
    assert torch.equal(far[labels != 4], flags[labels != 4])
    # on the group whose edge lies apart from the class both sides agree
    f, prob, labels, ids, flags, trigger = flagged_group()
    assert torch.equal(cluster_cores(f, prob, labels, ids, flags, [4], side="far")[labels == 4], trigger[labels == 4])
    with pytest.raises(ValueError, match="side"):
        cluster_cores(f, prob, labels, ids, flags, [4], side="near")


@SET
@given(st.integers(0, 2 ** 16), st.randoms(), st.sampled_from(["confident", "far"]))
def test_the_core_is_order_invariant_and_ignores_class_names(seed, rnd, side):
    f, prob, labels, ids, flags, _ = flagged_group(seed % 50, edge_near=side == "far")
    f = f + 0.5 * torch.randn(f.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    core = cluster_cores(f, prob, labels, ids, flags, [4], seed=seed, side=side)
    perm = torch.tensor(rnd.sample(range(len(prob)), len(prob)))
    assert torch.equal(cluster_cores(f[perm], prob[perm], labels[perm], ids[perm], flags[perm], [4], seed=seed,
                                     side=side), core[perm])
    rename = torch.tensor(rnd.sample(range(6), 6))
    assert torch.equal(cluster_cores(f, prob, rename[labels], ids, flags, [int(rename[4])], seed=seed, side=side),
                       core)
    assert not (core & ~flags).any()


def test_a_flagged_group_that_cannot_be_split_is_its_own_core():
    f, prob, labels, ids, flags, _ = flagged_group()
    same = torch.ones_like(f)
    assert torch.equal(cluster_cores(same, prob, labels, ids, flags, [4]), flags)  # all features equal
    assert torch.equal(cluster_cores(same, prob, labels, ids, flags, [4], side="far"), flags)
    one = torch.zeros_like(flags)
    one[torch.nonzero(labels == 4)[0]] = True
    assert torch.equal(cluster_cores(f, prob, labels, ids, one, [4]), one)  # a single flagged sample


def gap_classes(seed: int = 0, *, poisoned_class: int | None = None):
    """600 samples in 6 classes; each class's features form two groups (a sub-type split) that
    the model fits about equally well (margins 1-3), except, with ``poisoned_class``, a third of
    that class, a group of its own in feature space fitted far more confidently (margins 9-10)."""
    g = torch.Generator().manual_seed(seed)
    n = 600
    labels = torch.arange(n) % 6
    f = torch.randn(n, 8, generator=g, dtype=torch.float64)
    f[torch.arange(n) % 2 == 0, 0] += 10.0  # every class: two sub-types
    margin = 1.0 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    if poisoned_class is not None:
        group = (labels == poisoned_class) & (torch.arange(n) < 200)
        f[group, 3] += 30.0
        margin[group] = 9.0 + torch.rand(int(group.sum()), generator=g, dtype=torch.float64)
    return f, margin, labels, torch.arange(n) * 7 + 3


def test_the_gap_picks_the_class_with_a_confidently_fitted_group_and_no_class_on_clean_data():
    f, margin, labels, ids = gap_classes(0)
    classes, z = gap_z(f, margin, labels, ids, ("t", 0))
    assert classes.tolist() == list(range(6)) and classes_above(classes, z, k=2.0) == []
    f, margin, labels, ids = gap_classes(0, poisoned_class=4)
    classes, z = gap_z(f, margin, labels, ids, ("t", 0))
    assert classes_above(classes, z, k=2.0) == [4]
    _, gaps = cluster_gaps(f, margin, labels, ids, ("t", 0))
    assert float(gaps[4]) > 6.0 and float(gaps.max()) == float(gaps[4])
    # the same 2-means keys as the split inside the class: the split flags the poisoned group
    rows = labels == 4
    group = (torch.arange(600) < 200)[rows]
    assert torch.equal(cluster_split(f[rows], margin[rows], ids[rows], ("t", 0)), group)


@SET
@given(st.integers(0, 2 ** 16), st.randoms(), st.sampled_from([None, 0, 3]))
def test_the_gap_is_order_invariant_and_ignores_class_names(seed, rnd, poisoned_class):
    f, margin, labels, ids = gap_classes(seed % 50, poisoned_class=poisoned_class)
    classes, gaps = cluster_gaps(f, margin, labels, ids, ("t", seed))
    perm = torch.tensor(rnd.sample(range(600), 600))
    _, gaps_perm = cluster_gaps(f[perm], margin[perm], labels[perm], ids[perm], ("t", seed))
    assert torch.allclose(gaps_perm, gaps, rtol=0, atol=1e-12)
    names = torch.tensor(rnd.sample(range(100), 6))
    renamed, gaps_renamed = cluster_gaps(f, margin, names[labels], ids, ("t", seed))
    order = torch.argsort(names)  # renamed classes come out sorted by their new names
    assert renamed.tolist() == sorted(names.tolist())
    assert torch.allclose(gaps_renamed, gaps[order], rtol=0, atol=1e-12)


def test_a_class_that_cannot_be_split_has_no_gap():
    labels = torch.arange(90) % 3
    f = torch.randn(90, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f[labels == 1] = 1.0  # every feature of class 1 equal
    _, gaps = cluster_gaps(f, torch.arange(90.0), labels, torch.arange(90), ("t", 0))
    assert float(gaps[1]) == 0.0 and bool((gaps[[0, 2]] > 0).all())
    with pytest.raises(ValueError, match="one feature row, margin and id per label"):
        cluster_gaps(f[:10], torch.arange(90.0), labels, torch.arange(90), ("t", 0))
    # fewer than three classes: nothing to compare a class with
    assert gap_z(f[labels < 2], torch.arange(60.0), labels[labels < 2], torch.arange(60), ("t", 0))[1] is None


def clean_label_classes(seed: int = 0, *, poisoned_class: int | None = None, n: int = 2400):
    """``n`` samples in 6 classes, each class one blob in feature space whose margins are all
    alike (1-3); with ``poisoned_class``, half of that class a group of its own in feature space
    (a clean-label trigger) fitted as well as the rest (the same margins)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 6
    f = torch.randn(n, 8, generator=g, dtype=torch.float64)
    margin = 1.0 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    if poisoned_class is not None:
        f[(labels == poisoned_class) & (torch.arange(n) < n // 2), 5] += 12.0
    return f, margin, labels, torch.arange(n) * 5 + 1


def test_one_blob_cut_in_two_has_separation_near_seven_and_two_groups_more():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    assert abs(_separation(z * 3.0 + 5.0, z[:, 0] > 0) - 7.0) < 0.3  # any scale, any centre
    two = torch.cat([z[:10000] - 4.0, z[10000:] + 4.0])
    assert _separation(two, torch.arange(20000) >= 10000) > 50.0
    assert _separation(torch.zeros(4, 2, dtype=torch.float64), torch.tensor([0, 0, 1, 1])) == 0.0


def test_the_separation_picks_a_clean_label_target_the_gap_misses_and_nothing_on_clean_data():
    f, margin, labels, ids = clean_label_classes(0)
    classes, z, parts = gap_separation_z(f, margin, labels, ids, ("t", 0))
    assert classes_above(classes, z, k=2.0) == []
    f, margin, labels, ids = clean_label_classes(0, poisoned_class=2)
    classes, z, parts = gap_separation_z(f, margin, labels, ids, ("t", 0))
    assert classes_above(classes, parts["gap"], k=2.0) == []  # both groups fitted alike: no gap
    assert classes_above(classes, parts["separation"], k=2.0) == [2]
    assert classes_above(classes, z, k=2.0) == [2] and torch.equal(z, torch.maximum(parts["gap"], parts["separation"]))
    # the gap's z-scores are gap_z's, from the same 2-means
    assert torch.equal(parts["gap"], gap_z(f, margin, labels, ids, ("t", 0))[1])
    # a dirty-label target (a confidently fitted group) is still picked, by its gap
    f, margin, labels, ids = gap_classes(0, poisoned_class=4)
    classes, z, parts = gap_separation_z(f, margin, labels, ids, ("t", 0))
    assert classes_above(classes, z, k=2.0, limit=1) == [4]


@SET
@given(st.integers(0, 2 ** 16), st.randoms(), st.sampled_from([None, 0, 3]))
def test_the_separation_is_order_invariant_and_ignores_class_names(seed, rnd, poisoned_class):
    f, margin, labels, ids = clean_label_classes(seed % 50, poisoned_class=poisoned_class, n=600)
    classes, _, seps = cluster_gaps(f, margin, labels, ids, ("t", seed), separation=True)
    perm = torch.tensor(rnd.sample(range(600), 600))
    _, _, seps_perm = cluster_gaps(f[perm], margin[perm], labels[perm], ids[perm], ("t", seed), separation=True)
    assert torch.allclose(seps_perm, seps, rtol=1e-12, atol=0)
    names = torch.tensor(rnd.sample(range(100), 6))
    _, _, seps_renamed = cluster_gaps(f, margin, names[labels], ids, ("t", seed), separation=True)
    assert torch.allclose(seps_renamed, seps[torch.argsort(names)], rtol=1e-12, atol=0)


def test_with_no_picked_class_label_aware_detection_is_the_global_rule():
    labels, margin = difficulty_classes(3)
    prob = torch.sigmoid(margin)
    assert spread_classes(margin, labels) == []
    for threshold in ("mad", "otsu"):
        flags, classes = flag_label_aware(prob, labels, threshold=threshold, classes=[])
        assert classes == [] and torch.equal(flags, flag_confident(prob, threshold=threshold))


def test_given_classes_replace_the_share_test_and_its_confirmation():
    labels, warm, enhanced, poisoned = two_models(4, 6, 600)
    enhanced[poisoned] = 0.9999
    flags, classes = flag_label_aware(enhanced, labels, classes=[6], confirm=warm, pick="both")
    assert classes == [6] and torch.equal(flags, flag_confident(enhanced, labels == 6, threshold="otsu"))
    flags, classes = flag_label_aware(enhanced, labels, classes=[6, 6], inside="reference")
    assert classes == [6] and not (flags & (labels != 6)).any()
    with pytest.raises(ValueError, match="not picked"):
        flag_label_aware(enhanced, labels, classes=list(range(10)), inside="reference")


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_equal_spreads_pick_nothing_deterministically(value):
    labels = torch.arange(60) % 6
    assert spread_classes(torch.full((60,), value), labels) == []
    assert spread_z(torch.full((60,), value), labels)[1] is None
    # fewer than three classes: nothing to compare a class with
    two = torch.arange(40) % 2
    assert spread_classes(torch.arange(40.0), two) == [] and spread_z(torch.arange(40.0), two)[1] is None


def test_nearly_equal_spreads_are_not_stretched_into_outliers():
    """Spreads that differ by a hair (MAD tiny) are scored against a tenth of the median
    spread: the class whose spread is 5% larger is not picked, one whose spread is twice the
    others' is."""
    base = torch.tensor([-1.0, 0.0, 1.0] * 4)  # every class: the same margins, spread 1.0 at q = 0.9
    labels = torch.arange(60) // 12
    margin = base.repeat(5).clone()
    margin[(labels == 4) & (margin > 0)] *= 1.05
    assert spread_classes(margin, labels) == []
    margin[(labels == 4) & (margin > 0)] *= 2
    assert spread_classes(margin, labels) == [4]


def test_the_spread_quantile_must_lie_above_the_median():
    with pytest.raises(ValueError, match=r"\(0.5, 1\)"):
        class_spreads(torch.zeros(10), torch.arange(10) % 5, q=0.5)


def test_a_class_limit_keeps_the_classes_that_stand_out_most():
    labels, margin = difficulty_classes(5)
    g = torch.Generator().manual_seed(2)
    for c, n in ((2, 1650), (6, 900)):  # two stretched classes, 2 more than 6
        group = (labels == c) & (torch.arange(5000) < n)
        margin[group] = margin[group] + 10.0 + torch.rand(int(group.sum()), generator=g)
    both = spread_classes(margin, labels)
    assert both == [2, 6]
    _, z = spread_z(margin, labels)
    assert float(z[2]) > float(z[6])
    assert spread_classes(margin, labels, limit=1) == [2]
    assert spread_classes(margin, labels, limit=2) == both == spread_classes(margin, labels, limit=5)
    assert spread_classes(margin, labels, k=100.0, limit=1) == []  # the limit never adds a class


# -- which of a class's two groups is the poison (split_side) ------------------------------------

def runner_up_probs(group_runner_ups, label: int, n_classes: int = 10, seed: int = 0):
    """Rows of ``p(.|x)`` whose largest entry is ``label`` and whose second largest is the given
    runner-up class of each row."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(len(group_runner_ups), n_classes, generator=g, dtype=torch.float64) * 0.01
    p[torch.arange(len(p)), torch.as_tensor(group_runner_ups)] = 0.2
    p[:, label] = 0.7
    return p / p.sum(1, keepdim=True)


def test_runner_up_entropy_counts_the_most_likely_other_class():
    one = runner_up_probs([3] * 50, label=1)
    assert runner_up_entropy(one, 1) == 0.0
    every = runner_up_probs([c for c in range(10) if c != 1] * 5, label=1)
    assert runner_up_entropy(every, 1) == pytest.approx(torch.log(torch.tensor(9.0)).item())
    assert runner_up_entropy(every[:0], 1) == 0.0


@SET
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.randoms())
def test_runner_up_entropy_ignores_the_row_order_and_the_class_names(runner_ups, rnd):
    label = 6
    p = runner_up_probs(runner_ups, label, n_classes=7)
    perm = torch.tensor(rnd.sample(range(len(p)), len(p)))
    names = rnd.sample(range(7), 7)  # class c is renamed names[c]
    renamed = torch.empty_like(p)
    renamed[:, torch.tensor(names)] = p
    want = runner_up_entropy(p, label)
    assert runner_up_entropy(p[perm], label) == want
    assert runner_up_entropy(renamed, names[label]) == want


def floor_classes(poisoned: int | None, *, n_per_class: int = 300, poison_share: float = 0.3, seed: int = 0):
    """Ten classes whose runner-ups are mostly their two neighbours (c - 1 and c + 1, mod 10)
    and now and then (one sample in 30) any class; with ``poisoned``, that class also holds
    relabelled samples (``poison_share`` of it) whose runner-ups cycle through every other class."""
    g = torch.Generator().manual_seed(seed)
    labels, runner_ups = [], []
    for c in range(10):
        k = int(n_per_class * poison_share) if c == poisoned else 0
        others = [j for j in range(10) if j != c]
        for i in range(n_per_class):
            if i < k:
                r = others[i % 9]
            elif int(torch.randint(30, (1,), generator=g)) == 0:
                r = others[int(torch.randint(9, (1,), generator=g))]
            else:
                r = (c + (1 if int(torch.randint(2, (1,), generator=g)) else -1)) % 10
            labels.append(c)
            runner_ups.append(r)
    labels = torch.tensor(labels)
    p = torch.rand(len(labels), 10, generator=g, dtype=torch.float64) * 0.01
    p[torch.arange(len(p)), torch.tensor(runner_ups)] = 0.2
    p[torch.arange(len(p)), labels] = 0.7
    return p / p.sum(1, keepdim=True), labels


def test_runner_up_floor_is_the_share_whose_runner_ups_cover_every_other_class():
    # 90 rows whose runner-ups cycle through all nine other classes and 210 on one neighbour: floor 90/300
    runner_ups = [c for c in range(10) if c != 1] * 10 + [2] * 210
    classes, floor = runner_up_floor(runner_up_probs(runner_ups, label=1), torch.ones(300, dtype=torch.int64))
    assert classes.tolist() == [1] and floor.tolist() == pytest.approx([9 * 10 / 300])
    _, floor = runner_up_floor(runner_up_probs([2] * 40 + [3] * 20, label=1), torch.ones(60, dtype=torch.int64))
    assert floor.tolist() == [0.0]  # a class that never has some other class as runner-up
    with pytest.raises(ValueError, match="one row of probabilities per label"):
        runner_up_floor(torch.rand(5, 3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="a 2-D tensor"):
        runner_up_floor(torch.rand(4), torch.zeros(4, dtype=torch.int64))


def test_the_floor_picks_the_class_that_draws_from_every_class_and_nothing_on_clean_data():
    for seed in range(3):
        prob, labels = floor_classes(None, seed=seed)
        classes, z = floor_z(prob, labels)
        assert classes_above(classes, z, k=2.0) == []
        prob, labels = floor_classes(6, seed=seed)
        classes, z = floor_z(prob, labels)
        assert classes_above(classes, z, k=2.0) == [6]
    # a few percent more than the other classes is under the least scale: not picked
    prob, labels = floor_classes(6, poison_share=0.06)
    assert classes_above(*floor_z(prob, labels), k=2.0) == []
    assert classes_above(*floor_z(prob, labels, min_scale=0.01), k=2.0) == [6]


@SET
@given(st.integers(0, 2 ** 16), st.randoms(), st.sampled_from([None, 0, 7]))
def test_the_floor_ignores_the_sample_order_and_the_class_names(seed, rnd, poisoned):
    prob, labels = floor_classes(poisoned, n_per_class=40, seed=seed)
    classes, floor = runner_up_floor(prob, labels)
    perm = torch.tensor(rnd.sample(range(len(labels)), len(labels)))
    assert torch.equal(runner_up_floor(prob[perm], labels[perm])[1], floor)
    names = torch.tensor(rnd.sample(range(10), 10))  # class c is renamed names[c]
    renamed = torch.empty_like(prob)
    renamed[:, names] = prob
    _, floor_renamed = runner_up_floor(renamed, names[labels])
    assert torch.equal(floor_renamed, floor[torch.argsort(names)])


def poisoned_class(*, poison_confident: bool, poison_sources: int):
    """One class of 160 rows split into two feature groups: 60 'poison' rows whose runner-ups
    cycle through ``poison_sources`` other classes and 100 of the class's own rows whose
    runner-up is class 9 for nine in ten of them (the class resembles one neighbour); the
    poison is fitted more (or less) confidently than the class's own rows."""
    f = two_groups(60, 100)
    group = torch.arange(160) < 60
    others = [c for c in range(10) if c != 1][:poison_sources]
    runner_ups = [others[i % len(others)] for i in range(60)] + [9 if i % 10 else 4 for i in range(100)]
    prob = runner_up_probs(runner_ups, label=1)
    signal = torch.where(group == poison_confident, 6.0, 2.0).double() + torch.linspace(0, 0.3, 160,
                                                                                        dtype=torch.float64)
    return f, signal, prob, group, torch.arange(160) * 3 + 5


@pytest.mark.parametrize("poison_confident", [True, False])
def test_each_side_rule_flags_the_group_its_signal_points_to(poison_confident):
    """The poison from eight other classes: runner-up and auto flag it whether or not it is
    fitted more confidently (its runner-up entropy is ln 8 against about 0.33); confident flags
    it only when it is."""
    f, signal, prob, group, ids = poisoned_class(poison_confident=poison_confident, poison_sources=8)
    kw = {"class_prob": prob, "label": 1}
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0), side="runner-up", **kw), group)
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0), side="auto", **kw), group)
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0), side="confident", **kw),
                       group if poison_confident else ~group)
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0)), group if poison_confident else ~group)


def test_auto_keeps_the_confident_side_when_the_runner_up_entropies_are_close():
    """The poison from one source class (a source-specific attack): its runner-up entropy is 0,
    below the class's own (about 0.33), so runner-up flags the class's own rows; the difference
    is under the cut, so auto follows the confidence, which finds the poison. A cut of 0 makes
    auto the runner-up rule, a cut above every difference the confident rule."""
    f, signal, prob, group, ids = poisoned_class(poison_confident=True, poison_sources=1)
    kw = {"class_prob": prob, "label": 1}
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0), side="runner-up", **kw), ~group)
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0), side="auto", **kw), group)
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0), side="auto", cut=0.0, **kw), ~group)
    f8, s8, p8, g8, i8 = poisoned_class(poison_confident=False, poison_sources=8)
    assert torch.equal(cluster_split(f8, s8, i8, ("t", 0), side="auto", cut=10.0, class_prob=p8, label=1), ~g8)


def test_auto_floor_flags_the_group_whose_runner_ups_cover_every_class():
    """A class that resembles many others: its own 100 rows have runner-ups spread over five
    classes (entropy ln 5 = 1.61), the 60 poison rows over all nine (ln 9 = 2.20), a difference
    under auto's cut, and the poison is fitted less confidently, so auto flags the class's own
    rows. The own rows never have four of the other classes as runner-up (floor 0); the poison's
    60 rows give each other class 6 or 7 (floor 9 * 6 / 60 = 0.9), so auto-floor flags the
    poison. Where the floors are close it is auto."""
    f = two_groups(60, 100)
    group = torch.arange(160) < 60
    others = [c for c in range(10) if c != 1]
    runner_ups = [others[i % 9] for i in range(60)] + [[0, 2, 3, 4, 5][i % 5] for i in range(100)]
    prob = runner_up_probs(runner_ups, label=1)
    signal = torch.where(group, 2.0, 6.0).double() + torch.linspace(0, 0.3, 160, dtype=torch.float64)
    ids, kw = torch.arange(160) * 3 + 5, {"class_prob": prob, "label": 1}
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0), side="auto", **kw), ~group)
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0), side="auto-floor", **kw), group)
    # one source class: both floors 0, auto-floor is auto (the confident side here)
    f1, s1, p1, g1, i1 = poisoned_class(poison_confident=True, poison_sources=1)
    kw1 = {"class_prob": p1, "label": 1}
    assert torch.equal(cluster_split(f1, s1, i1, ("t", 0), side="auto-floor", **kw1),
                       cluster_split(f1, s1, i1, ("t", 0), side="auto", **kw1))


def test_auto_moved_flags_the_group_the_model_mostly_calls_by_another_class():
    """Poison from one source class whose trigger the model has not learned: 60 rows it calls
    class 0 (0.6 against 0.3 for the label), fitted less confidently than the class's 100 own
    rows, which it calls by their label. Every other rule flags the own rows (the runner-ups
    come from one class each, so the confidence decides); auto-moved flags the poison. Where
    neither group, or both, is mostly called something else, auto-moved is auto-floor."""
    f = two_groups(60, 100)
    group = torch.arange(160) < 60
    prob = runner_up_probs([0] * 60 + [9] * 100, label=1)
    g = torch.Generator().manual_seed(1)
    moved = torch.rand(60, 10, generator=g, dtype=torch.float64) * 0.01
    moved[:, 0], moved[:, 1] = 0.6, 0.3
    prob[:60] = moved / moved.sum(1, keepdim=True)
    signal = torch.log(prob[:, 1] / (1 - prob[:, 1]))
    ids, kw = torch.arange(160) * 3 + 5, {"class_prob": prob, "label": 1}
    for side in ("confident", "auto", "auto-floor"):
        assert torch.equal(cluster_split(f, signal, ids, ("t", 0), side=side, **kw), ~group)
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0), side="auto-moved", **kw), group)
    # both groups mostly called something else (a model that has learned little): auto-floor decides
    both = prob.clone()
    both[60:, 9], both[60:, 1] = 0.7, 0.2
    assert torch.equal(cluster_split(f, signal, ids, ("t", 0), side="auto-moved", class_prob=both, label=1),
                       cluster_split(f, signal, ids, ("t", 0), side="auto-floor", class_prob=both, label=1))
    # neither: a learned trigger (the poisoned_class rows are all called by their label)
    f1, s1, p1, g1, i1 = poisoned_class(poison_confident=True, poison_sources=1)
    kw1 = {"class_prob": p1, "label": 1}
    assert torch.equal(cluster_split(f1, s1, i1, ("t", 0), side="auto-moved", **kw1),
                       cluster_split(f1, s1, i1, ("t", 0), side="auto-floor", **kw1))


def test_a_tie_with_the_label_is_not_called_by_another_class():
    """One group exactly tied between the label (2) and a class with a smaller index (1), the
    other called by the label: argmax would call the tied group class 1, but a tie is not being
    called something else, so auto-moved falls through to the next rule, which (every runner-up
    signal equal) flags the group with the higher signal, the other one."""
    assign = (torch.arange(100) < 50).long()
    prob = torch.full((100, 4), 0.1, dtype=torch.float64)
    prob[:, 2] = 0.7
    prob[:50, 1], prob[:50, 2] = 0.4, 0.4
    assert split_side(assign, torch.arange(100.0), prob, 2, side="auto-floor") == 0
    assert split_side(assign, torch.arange(100.0), prob, 2, side="auto-moved") == 0


def test_equal_runner_up_entropies_flag_nothing_and_the_inputs_are_checked():
    f = two_groups(50, 50)
    assign = (torch.arange(100) < 50).long()
    prob = runner_up_probs([3, 4] * 50, label=1)  # both groups: half 3, half 4
    assert split_side(assign, torch.arange(100.0), prob, 1, side="runner-up") is None
    assert split_side(assign, torch.arange(100.0), prob, 1, side="auto", cut=0.0) == 0  # falls to confident
    with pytest.raises(ValueError, match="side must be one of"):
        split_side(assign, torch.arange(100.0), prob, 1, side="larger")
    with pytest.raises(ValueError, match="class_prob"):
        cluster_split(f, torch.arange(100.0), torch.arange(100), ("t", 0), side="auto")
    labels = torch.arange(100) % 2
    with pytest.raises(ValueError, match="one row of class_prob per sample"):
        flag_label_aware(torch.rand(100, dtype=torch.float64), labels, classes=[1], inside="clusters", features=f,
                         ids=torch.arange(100), side="auto")
    with pytest.raises(ValueError, match="inside = 'clusters'"):
        flag_label_aware(torch.rand(100, dtype=torch.float64), labels, classes=[1], side="auto", class_prob=prob)


@SET
@given(st.integers(0, 2 ** 16), st.randoms(), st.sampled_from(["runner-up", "auto", "auto-floor", "auto-moved"]))
def test_the_side_rules_are_order_invariant_and_ignore_class_names(seed, rnd, side):
    g = torch.Generator().manual_seed(seed)
    n, k = 240, 4
    labels = torch.arange(n) % k
    f = torch.randn(n, 6, generator=g, dtype=torch.float64)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    marked = (labels == 2) & (torch.arange(n) < 100)
    f[marked, 1] += 9.0
    logits[marked, 2] += 3.0
    prob = torch.softmax(logits, 1)
    p_y = prob[torch.arange(n), labels]
    ids = torch.arange(n) * 7 + 3
    kw = {"classes": [2], "inside": "clusters", "side": side, "seed": seed}
    flags, _ = flag_label_aware(p_y, labels, features=f, ids=ids, class_prob=prob, **kw)
    perm = torch.tensor(rnd.sample(range(n), n))
    again, _ = flag_label_aware(p_y[perm], labels[perm], features=f[perm], ids=ids[perm], class_prob=prob[perm],
                                **kw)
    assert torch.equal(again, flags[perm])
    names = torch.tensor(rnd.sample(range(k), k))
    renamed = torch.empty_like(prob)
    renamed[:, names] = prob
    same, classes = flag_label_aware(p_y, names[labels], features=f, ids=ids, class_prob=renamed,
                                     **{**kw, "classes": [int(names[2])]})
    assert classes == [int(names[2])] and torch.equal(same, flags)


# -- the second look by the clean model ------------------------------------------------------------

@st.composite
def prob_rows(draw, k_max=6):
    k = draw(st.integers(2, k_max))
    n = draw(st.integers(1, 60))
    raw = draw(st.lists(st.floats(0.01, 10.0, allow_nan=False), min_size=n * k, max_size=n * k))
    prob = torch.tensor(raw, dtype=torch.float64).view(n, k)
    prob = prob / prob.sum(1, keepdim=True)
    labels = torch.tensor(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    picked = sorted(draw(st.sets(st.integers(0, k - 1), max_size=k)))
    return prob, labels, picked


def _lower_median(values):
    values = sorted(values)
    return values[(len(values) - 1) // 2]


@SET
@given(prob_rows(), st.floats(0.05, 0.95), st.sampled_from(["fixed", "class"]), st.booleans(), st.integers(0, 10 ** 6))
def test_the_second_look_flags_picked_rows_below_the_cut_whatever_the_order_or_class_names(case, below, cut, moved,
                                                                                           seed):
    """Exactly the rows of the picked classes whose label's probability is below the class's cut
    (``fixed``: ``below``; ``class``: ``below`` times the class's median over the other rows'
    median, at most 1), with ``moved`` only those where another class is more likely than the
    label; the same rows when the samples are shuffled or the classes renamed (columns permuted
    with them)."""
    prob, labels, picked = case
    n, k = prob.shape
    flags = second_look(prob, labels, picked, below=below, cut=cut, moved=moved)
    own = prob[torch.arange(n), labels].tolist()
    rest = [own[i] for i in range(n) if int(labels[i]) not in picked]
    cuts = {}
    for c in picked:
        mine = [own[i] for i in range(n) if int(labels[i]) == c]
        cuts[c] = below if cut == "fixed" or not rest or not mine else below * min(1.0, _lower_median(mine) / _lower_median(rest))
    other = [max(float(prob[i, j]) for j in range(k) if j != int(labels[i])) for i in range(n)]
    want = torch.tensor([int(labels[i]) in picked and own[i] < cuts[int(labels[i])] and (not moved or other[i] > own[i])
                         for i in range(n)], dtype=torch.bool)
    assert torch.equal(flags, want)
    # the class-relative cut never flags what the fixed one leaves
    assert not (flags & ~second_look(prob, labels, picked, below=below)).any()
    g = torch.Generator().manual_seed(seed)
    perm, rename = torch.randperm(n, generator=g), torch.randperm(k, generator=g)
    renamed = torch.empty_like(prob)
    renamed[:, rename] = prob  # class c is now called rename[c]
    again = second_look(renamed[perm], rename[labels][perm], [int(rename[c]) for c in picked], below=below, cut=cut,
                        moved=moved)
    assert torch.equal(again, flags[perm])


def test_the_class_relative_cut_spares_a_hard_class_and_keeps_the_cut_of_an_easy_one():
    """A hard picked class (its clean images at 0.4, the others' at 0.8) gets half the cut, so
    only the images the model calls by another class (0.05) are flagged, not its clean ones; an
    easy picked class keeps ``below``."""
    def rows(p_own, label, n):
        r = torch.full((n, 3), (1 - p_own) / 2, dtype=torch.float64)
        r[:, label] = p_own
        return r, torch.full((n,), label)
    parts = [rows(0.4, 0, 8), rows(0.05, 0, 2), rows(0.8, 1, 10), rows(0.8, 2, 10)]
    prob, labels = torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts])
    assert second_look(prob, labels, [0]).sum() == 10  # the fixed cut takes the whole class
    assert second_look_cuts(prob, labels, [0], cut="class") == {0: pytest.approx(0.25)}
    assert second_look(prob, labels, [0], cut="class").tolist() == [False] * 8 + [True] * 2 + [False] * 20
    easy = torch.cat([prob[:10], rows(0.3, 1, 1)[0], prob[11:]]), labels
    assert second_look_cuts(*easy, [1], cut="class") == {1: 0.5}
    assert second_look(*easy, [1], cut="class").tolist() == second_look(*easy, [1]).tolist()
    # moved: of two doubted images of class 0 at 0.4, only the one another class is likelier for
    tie = torch.tensor([[0.4, 0.35, 0.25], [0.4, 0.5, 0.1], [0.8, 0.1, 0.1]], dtype=torch.float64)
    assert second_look(tie, torch.tensor([0, 0, 1]), [0]).tolist() == [True, True, False]
    assert second_look(tie, torch.tensor([0, 0, 1]), [0], moved=True).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="cut must be 'fixed' or 'class'"):
        second_look(prob, labels, [0], cut="median")


def test_the_second_look_flags_nothing_without_a_picked_class_and_refuses_bad_input():
    prob = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    assert not second_look(prob, labels, []).any()
    # even odds is not "less than even": the cut is strict
    assert second_look(prob, labels, [0, 1]).tolist() == [True, False, False]
    assert second_look(prob[:0], labels[:0], [0]).tolist() == []
    with pytest.raises(ValueError, match="one row of probabilities per label"):
        second_look(prob[:2], labels, [0])

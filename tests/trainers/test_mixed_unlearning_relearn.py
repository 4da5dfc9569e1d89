"""The mixed, unlearning and relearn training stages (docs/training-stages.md)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from bdframe.interfaces import StageContext
from bdframe.testing import state_snapshot, tiny_classifier, tiny_imageset
from bdframe_trainer_mixed.plugin import Mixed, MixedConfig, mixed_loss
from bdframe_trainer_relearn.plugin import Relearn, RelearnConfig
from bdframe_trainer_unlearning.plugin import Unlearning, UnlearningConfig, unlearning_loss

SET = settings(max_examples=10, deadline=None)
PLAIN = dict(momentum=0.0, weight_decay=0.0, crop_padding=0, flip=False, schedule="constant", amp="off")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stage(name="s", seed=0):
    return StageContext(seed=seed, name=name, progress=False)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def batch(n=16, seed=0):
    data = tiny_imageset(n, num_classes=4, size=8, seed=seed)
    return data, data.images.float() / 255


# -- mixed -------------------------------------------------------------------------------------

@SET
@given(st.integers(0, 10 ** 6), st.lists(st.booleans(), min_size=16, max_size=16))
def test_mixed_with_lambda_zero_has_the_gradient_of_standard_ce_on_the_learn_rows(seed, flags):
    data, x = batch(16, seed % 11)
    model = tiny_classifier(data, seed=seed % 7)  # eval mode: rows do not interact through BatchNorm
    mask = torch.tensor(flags)
    g_mixed = grads(model, mixed_loss(model(x), data.labels, mask, 0.0))
    learn = ~mask
    if bool(learn.any()):
        g_ref = grads(model, F.cross_entropy(model(x[learn]), data.labels[learn]))
    else:  # no learn row: the standard loss over an empty set is 0, with zero gradient
        g_ref = [torch.zeros_like(p) for p in model.parameters()]
    for a, b in zip(g_mixed, g_ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@SET
@given(st.integers(0, 10 ** 6), st.floats(0.0, 2.0), st.lists(st.booleans(), min_size=12, max_size=12))
def test_mixed_loss_is_learn_mean_minus_lambda_forget_mean(seed, lam, flags):
    data, x = batch(12, seed % 5)
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(seed))
    mask = torch.tensor(flags)
    ce = F.cross_entropy(logits, data.labels, reduction="none")
    learn = ce[~mask].mean() if bool((~mask).any()) else torch.tensor(0.0)
    forget = ce[mask].mean() if bool(mask.any()) else torch.tensor(0.0)
    assert torch.allclose(mixed_loss(logits, data.labels, mask, lam), learn - lam * forget, atol=1e-6)


@SET
@given(st.integers(0, 10 ** 6), st.floats(0.0, 2.0), st.lists(st.booleans(), min_size=12, max_size=12))
def test_mixed_loss_batch_normalisation_weighs_every_forget_row_lambda_times_a_learn_row(seed, lam, flags):
    data, x = batch(12, seed % 5)
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(seed))
    mask = torch.tensor(flags)
    ce = F.cross_entropy(logits, data.labels, reduction="none")
    expected = (ce[~mask].sum() - lam * ce[mask].sum()) / 12
    assert torch.allclose(mixed_loss(logits, data.labels, mask, lam, normalize="batch"), expected, atol=1e-6)
    with pytest.raises(ValueError, match="normalize"):
        mixed_loss(logits, data.labels, mask, lam, normalize="mean")


@SET
@given(st.integers(0, 10 ** 6), st.floats(0.05, 2.0), st.floats(0.1, 4.0),
       st.lists(st.booleans(), min_size=12, max_size=12), st.sampled_from(["subset", "batch"]))
def test_mixed_forget_ceiling_caps_each_forget_row_and_stops_its_gradient(seed, lam, ceiling, flags, normalize):
    data, x = batch(12, seed % 5)
    logits = (3 * torch.randn(12, 4, generator=torch.Generator().manual_seed(seed))).requires_grad_()
    mask = torch.tensor(flags)
    ce = F.cross_entropy(logits, data.labels, reduction="none").detach()
    n_l, n_f = (12, 12) if normalize == "batch" else (max(int((~mask).sum()), 1), max(int(mask.sum()), 1))
    expected = ce[~mask].sum() / n_l - lam * ce[mask].clamp(max=ceiling).sum() / n_f
    loss = mixed_loss(logits, data.labels, mask, lam, normalize=normalize, forget_ceiling=ceiling)
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    loss.backward()
    above = mask & (ce > ceiling)
    assert torch.count_nonzero(logits.grad[above]) == 0  # a forgotten row is pushed no further
    below = mask & (ce < ceiling)
    assert bool((logits.grad[below].abs().sum(1) > 0).all())  # rows under the ceiling are still unlearned
    # a ceiling above every CE is the unbounded objective
    high = float(ce.max()) + 1
    assert torch.allclose(mixed_loss(logits, data.labels, mask, lam, normalize=normalize, forget_ceiling=high),
                          mixed_loss(logits, data.labels, mask, lam, normalize=normalize), atol=1e-6)


def test_empty_subset_terms_are_zero():
    data, x = batch(10)
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ce = F.cross_entropy(logits, data.labels, reduction="none")
    none = torch.zeros(10, dtype=torch.bool)
    every = torch.ones(10, dtype=torch.bool)
    assert torch.allclose(mixed_loss(logits, data.labels, none, 0.3), ce.mean())  # no forget rows
    assert torch.allclose(mixed_loss(logits, data.labels, every, 0.3), -0.3 * ce.mean())  # no learn rows
    for m in (none, every):
        for lam in (0.0, 0.3):
            loss = mixed_loss(logits, data.labels, m, lam)
            assert torch.isfinite(loss)
            loss.backward()  # always connected to the graph
            assert torch.isfinite(logits.grad).all()
            logits.grad = None
    assert float(mixed_loss(logits, data.labels, every, 0.0).detach()) == 0.0


def test_mixed_with_lambda_zero_and_no_forget_set_trains_like_standard(bdframe_registry):
    data = tiny_imageset(40, num_classes=4, size=8, seed=3)
    kw = dict(epochs=2, batch_size=8, lr=0.05, amp="off")
    a, b = tiny_classifier(data, seed=1), tiny_classifier(data, seed=1)
    bdframe_registry.create("trainer", "standard", **kw).fit(a, data, stage("x"))
    Mixed(MixedConfig(lam=0.0, **kw)).fit(b, data, stage("x"))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)


def test_mixed_unlearning_only_step_raises_the_forget_loss():
    data = tiny_imageset(24, num_classes=4, size=8, seed=2)
    empty = data.subset(torch.zeros(len(data), dtype=torch.bool))
    model = tiny_classifier(data, seed=2).train()
    x = data.images.float() / 255
    with torch.no_grad():
        before = float(F.cross_entropy(model(x), data.labels))
    Mixed(MixedConfig(lam=1.0, epochs=1, batch_size=len(data), lr=1e-3, **PLAIN)).fit(model, empty, stage(),
                                                                                       forget=data)
    model.train()
    with torch.no_grad():
        after = float(F.cross_entropy(model(x), data.labels))
    assert after > before


def test_mixed_rejects_overlapping_sets_and_records_history():
    data = tiny_imageset(20, num_classes=4, size=8)
    model = tiny_classifier(data)
    with pytest.raises(ValueError, match="share"):
        Mixed(MixedConfig(epochs=1)).fit(model, data, stage(), forget=data.subset(torch.arange(3)))
    hist = Mixed(MixedConfig(epochs=2, batch_size=8, amp="off")).fit(
        model, data.subset(torch.arange(5, 20)), stage(), forget=data.subset(torch.arange(5)))
    assert [h["epoch"] for h in hist] == [1, 2] and all(h["images"] == 20 for h in hist)


# -- unlearning --------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["ascent", "flooding", "lga"])
def test_one_unlearning_step_with_small_lr_raises_the_forget_loss(objective):
    data = tiny_imageset(24, num_classes=4, size=8, seed=5)
    model = tiny_classifier(data, seed=3).train()
    x = data.images.float() / 255
    with torch.no_grad():
        before = float(F.cross_entropy(model(x), data.labels))
    # flooding/LGA ascend only below their level: put the level above the current loss
    cfg = UnlearningConfig(epochs=1, batch_size=len(data), lr=1e-3, objective=objective,
                           flood_level=before + 1, lga_gamma=before + 1, **PLAIN)
    empty = data.subset(torch.zeros(len(data), dtype=torch.bool))
    Unlearning(cfg).fit(model, empty, stage(), forget=data)
    model.train()
    with torch.no_grad():
        after = float(F.cross_entropy(model(x), data.labels))
    assert after > before


def test_unlearning_objectives():
    y = torch.tensor([0, 1, 2])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, -3.0]], requires_grad=True)
    ce = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(unlearning_loss(logits, y, "ascent"), -ce.mean())
    b = 0.5
    assert torch.allclose(unlearning_loss(logits, y, "flooding", flood_level=b), (ce.mean() - b).abs() + b)
    assert torch.allclose(unlearning_loss(logits, y, "flooding", flood_level=b, per_sample=True),
                          ((ce - b).abs() + b).mean())
    assert torch.allclose(unlearning_loss(logits, y, "lga", lga_gamma=b, per_sample=True),
                          (torch.sign(ce - b) * ce).mean())
    # above the level, flooding/LGA give plain CE gradients (descent)
    g_ce = torch.autograd.grad(ce.mean(), logits, retain_graph=True)[0]
    low = float(ce.mean().detach()) - 0.1
    for obj in ("flooding", "lga"):
        g = torch.autograd.grad(unlearning_loss(logits, y, obj, flood_level=low, lga_gamma=low), logits)[0]
        assert torch.allclose(g, g_ce)


def test_unlearning_uses_data_when_no_forget_set_and_rejects_two_sets():
    data = tiny_imageset(16, num_classes=4, size=8)
    model = tiny_classifier(data)
    hist = Unlearning(UnlearningConfig(epochs=1, batch_size=8, amp="off")).fit(model, data, stage())
    assert hist[0]["images"] == 16 and hist[0]["loss"] < 0
    with pytest.raises(ValueError, match="unlearns one set"):
        Unlearning(UnlearningConfig(epochs=1)).fit(model, data.subset(torch.arange(8)), stage(),
                                                   forget=data.subset(torch.arange(8, 16)))
    with pytest.raises(ValueError, match="share sample ids"):
        Unlearning(UnlearningConfig(epochs=1)).fit(model, data, stage(), forget=data)


# -- relearn -----------------------------------------------------------------------------------

def test_relearn_defaults_and_loss(bdframe_registry):
    c = RelearnConfig()
    assert (c.epochs, c.lr, c.momentum, c.weight_decay) == (20, 0.01, 0.9, 5e-4)
    data = tiny_imageset(32, num_classes=4, size=8, seed=4)
    kw = dict(epochs=1, batch_size=8, lr=0.01, amp="off")
    a, b = tiny_classifier(data, seed=5), tiny_classifier(data, seed=5)
    bdframe_registry.create("trainer", "standard", **kw).fit(a, data, stage("ft"))
    Relearn(RelearnConfig(**kw)).fit(b, data, stage("ft"))
    sa, sb = state_snapshot(a), state_snapshot(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="no forget set"):
        Relearn(c).fit(b, data, stage(), forget=data)


def test_stages_are_registered_by_their_distributions(bdframe_registry):
    for name in ("mixed", "unlearning", "relearn"):
        e = bdframe_registry.entry("trainer", name)
        assert e.provider.distribution == f"bdframe-trainer-{name}"
    m = bdframe_registry.create("trainer", "mixed")
    assert m.config.lam == 0.05


# -- class balance -----------------------------------------------------------------------------

@SET
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.integers(6, 9))
def test_class_weights_make_every_present_class_weigh_the_same(labels, num_classes):
    """``n_c * w_c`` is ``n / K`` for each of the ``K`` classes present, 0 for an absent one; the
    mean weight over the samples is 1; a balanced set gets weight 1 everywhere."""
    from bdframe.training import class_weights

    y = torch.tensor(labels)
    w = class_weights(y, num_classes).double()
    counts = torch.bincount(y, minlength=num_classes).double()
    present = counts > 0
    k = int(present.sum())
    assert w.shape == (num_classes,)
    assert torch.allclose((counts * w)[present], torch.full((k,), len(labels) / k, dtype=torch.float64), rtol=1e-5)
    assert torch.all(w[~present] == 0)
    assert float(w[y].mean()) == pytest.approx(1.0, rel=1e-5)
    balanced = torch.arange(num_classes).repeat(3)
    assert torch.allclose(class_weights(balanced, num_classes), torch.ones(num_classes))


def test_class_weights_refuse_a_label_outside_the_model():
    from bdframe.training import class_weights

    with pytest.raises(ValueError, match="outside the model's 3 classes"):
        class_weights(torch.tensor([0, 3]), 3)


def test_relearn_class_balance_takes_the_class_weighted_gradient_step():
    """One full-batch step of ``relearn`` with ``class_balance`` is one SGD step on the
    cross-entropy with each sample weighted by its class's weight (weighted mean over the batch);
    without it, the plain mean; the two steps differ on an unbalanced set."""
    from bdframe.training import class_weights

    data = tiny_imageset(24, num_classes=4, size=8, seed=6)
    data = data.subset(torch.nonzero(data.labels != 1).flatten().tolist() + [1])  # class 1: a single sample
    x = data.images.float() / 255
    kw = dict(PLAIN, epochs=1, batch_size=len(data), lr=0.5)
    stepped = {}
    for balance in (False, True):
        model = tiny_classifier(data, seed=7)
        ref = tiny_classifier(data, seed=7).train()  # as the stage trains: batch statistics
        Relearn(RelearnConfig(**kw, class_balance=balance)).fit(model, data, stage("cb"))
        w = class_weights(data.labels, 4) if balance else None
        g = grads(ref, F.cross_entropy(ref(x), data.labels, weight=w))
        with torch.no_grad():
            for p, gp in zip(ref.parameters(), g):
                p -= 0.5 * gp
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-5)
        stepped[balance] = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(stepped[False], stepped[True]))

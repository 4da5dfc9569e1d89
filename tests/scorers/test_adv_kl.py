"""adv-kl (MeCa Eq. 3): its invariants and the SampleScorer contract (docs/scorers.md)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe.scoring import float64_copy
from bdframe.testing import assert_state_unchanged, score_ctx, state_snapshot
from bdframe_scorer_adv_kl.plugin import AdvKL, AdvKLConfig
from scorers.scorer_helpers import make

SET = settings(max_examples=8, deadline=None)
MODES = st.sampled_from(["grid", "single"])
LOSSES = st.sampled_from(["ce_label", "ce_pred", "kl_random_start"])


def scorer(**kw):
    return AdvKL(AdvKLConfig(**kw))


@SET
@given(MODES, LOSSES, st.floats(0, 0.3), st.integers(1, 4), st.integers(0, 10 ** 6))
def test_perturbation_stays_in_ball_mask_and_box(mode, loss, eps, r, seed):
    data, model = make(12, seed=seed % 7)
    sc = scorer(mask_mode=mode, grad_loss=loss, epsilon=eps, patch_size=r)
    x = data.images.float() / 255
    xt, mask, _ = sc.perturb(model, x, data.labels, data.ids, seed)
    d = xt - x
    assert float(d.abs().max()) <= eps + 1e-6
    assert bool((d * (1 - mask) == 0).all()), "perturbation outside the mask"
    assert bool((xt >= 0).all() and (xt <= 1).all())
    assert mask.shape == (12, 1, 8, 8) and bool(((mask == 0) | (mask == 1)).all())
    kl = sc.kl(model, data, score_ctx(seed))
    assert bool((kl >= 0).all()) and bool(torch.isfinite(kl).all())
    assert torch.equal(sc.score(model, data, score_ctx(seed)), -kl)


@SET
@given(MODES, LOSSES, st.integers(0, 10 ** 6))
def test_zero_epsilon_or_empty_mask_gives_exactly_zero(mode, loss, seed):
    data, model = make(10, seed=seed % 5)
    assert torch.equal(scorer(mask_mode=mode, grad_loss=loss, epsilon=0.0).kl(model, data, score_ctx(seed)),
                       torch.zeros(10, dtype=torch.float64))
    empty = scorer(mask_mode="grid", grad_loss=loss, keep_prob=0.0, epsilon=0.1)
    assert torch.equal(empty.kl(model, data, score_ctx(seed)), torch.zeros(10, dtype=torch.float64))


def test_positive_kl_for_a_real_perturbation():
    data, model = make(16)
    kl = scorer(epsilon=0.1).kl(model, data, score_ctx(0))
    assert bool((kl > 0).any())


@pytest.mark.parametrize("loss", ["ce_label", "ce_pred", "kl_random_start"])
def test_constant_model_gives_zero(loss):
    data, model = make(12, constant=True)
    assert torch.equal(scorer(grad_loss=loss, epsilon=0.1).kl(model, data, score_ctx(0)),
                       torch.zeros(12, dtype=torch.float64))


def test_masks_grid_and_single():
    sc = scorer(mask_mode="grid", patch_size=2)
    ids = torch.arange(400)
    m = sc.masks(ids, (400, 3, 9, 9), seed=1, device="cpu")
    cells = m[:, :, :8:2, :8:2]
    assert torch.equal(m[:, :, :8, :8], cells.repeat_interleave(2, 2).repeat_interleave(2, 3))  # constant per cell
    assert 0.45 < float(cells.mean()) < 0.55
    single = scorer(mask_mode="single", patch_size=3).masks(ids, (400, 3, 9, 9), seed=1, device="cpu")
    assert bool((single.sum((1, 2, 3)) == 9).all())
    # different seeds and MeCa iterations draw different masks; the same ones are reproducible
    assert not torch.equal(m, sc.masks(ids, (400, 3, 9, 9), seed=2, device="cpu"))
    assert not torch.equal(m, scorer(iteration=1).masks(ids, (400, 3, 9, 9), seed=1, device="cpu"))
    assert torch.equal(m, sc.masks(ids, (400, 3, 9, 9), seed=1, device="cpu"))


def kl_tolerance(sc, model, data):
    """Per-sample bound on float32 rounding in ``KL_i`` when only the order of summation changes
    (batch size, other samples in the batch).

    The KL is a quadratic form in the logit difference ``d = z~ - z``; rounding moves each logit
    by a few units in the last place of ``max|z|``, so the KL moves by about
    ``2 * ulps * eps32 * max|z| / max|d|`` of itself. We allow 16 ulps of accumulated rounding
    (measured: 4 to 7), so the factor is 32.
    """
    x = data.images.float() / 255
    model.eval()
    x_t, _, z = sc.perturb(model, x, data.labels, data.ids, 3)
    with torch.no_grad():
        d = model(x_t) - z
    ratio = z.abs().amax(1) / d.abs().amax(1).clamp(min=1e-30)
    return 32 * torch.finfo(torch.float32).eps * ratio.double()


@pytest.mark.parametrize("mode", ["grid", "single"])
@pytest.mark.parametrize("loss", ["ce_label", "ce_pred", "kl_random_start"])
def test_batch_size_order_and_other_samples_do_not_matter(mode, loss):
    data, model = make(30)
    sc = scorer(mask_mode=mode, grad_loss=loss, epsilon=0.05)
    snap = state_snapshot(model)
    ref = sc.kl(model, data, score_ctx(3, 128))
    assert bool((ref > 0).any())
    tol = kl_tolerance(sc, model, data) * ref + 1e-15

    def close(a, b, t):
        return bool(((a - b).abs() <= t).all())

    for bs in (1, 7):
        assert close(sc.kl(model, data, score_ctx(3, bs)), ref, tol), f"batch size {bs}"
    perm = torch.randperm(30)
    assert close(sc.kl(model, data.subset(perm), score_ctx(3)), ref[perm], tol[perm])
    part = torch.arange(0, 30, 3)
    assert close(sc.kl(model, data.subset(part), score_ctx(3)), ref[part], tol[part])
    assert_state_unchanged(model, snap)
    assert not torch.equal(sc.kl(model, data, score_ctx(4)), ref)  # another seed, other masks


def test_random_start_gradient_is_float64():
    """The random-start gradient's sign must not follow float32 rounding: with the float32
    computation enough entries flipped sign between batch sizes to move KL by 3%."""
    data, model = make(30)
    sc = scorer(grad_loss="kl_random_start")
    x = data.images.float() / 255
    model.eval()
    model64 = float64_copy(model)
    g_all = sc._random_start_grad(model64, x, (x + 1e-3).clamp(0, 1))
    g_one = torch.cat([sc._random_start_grad(model64, x[i:i + 1], (x[i:i + 1] + 1e-3).clamp(0, 1)) for i in range(30)])
    assert torch.equal(torch.sign(g_all), torch.sign(g_one))


def test_model_mode_restored_and_no_grads_left():
    data, model = make(8)
    model.train()
    scorer().score(model, data, score_ctx(0))
    assert model.training
    assert all(p.grad is None for p in model.parameters())

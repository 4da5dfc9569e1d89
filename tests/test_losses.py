"""The shared losses: properties the contrastive, symmetric-CE and MixMatch pieces must have."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bdframe import losses

SEEDS = st.integers(0, 2 ** 31 - 1)


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- contrastive --------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(seed=SEEDS, n=st.integers(2, 12), d=st.integers(2, 16), temperature=st.sampled_from([0.1, 0.5, 1.0]))
def test_nt_xent_is_lower_when_the_views_are_paired_than_for_any_other_pairing(seed, n, d, temperature):
    z = randn(seed, n, d)
    mask = losses.positive_mask(torch.zeros(n, dtype=torch.long))
    paired = losses.info_nce(torch.cat([z, z]), mask, temperature=temperature)
    perm = torch.roll(torch.arange(n), 1)  # every sample's second view is another sample's
    other = losses.info_nce(torch.cat([z, z[perm]]), mask, temperature=temperature)
    assert paired < other


@settings(max_examples=50, deadline=None)
@given(seed=SEEDS, n=st.integers(2, 12), mode=st.sampled_from(["simclr", "supcon", "ss-ctl"]),
       clean_only=st.booleans())
def test_contrastive_loss_does_not_depend_on_batch_order(seed, n, mode, clean_only):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    clean = torch.rand(n, generator=g) < 0.5
    perm = torch.randperm(n, generator=g)

    def loss(a, b, lab, cl):
        m = losses.positive_mask(lab, mode=mode, clean=cl, clean_positives_only=clean_only)
        return losses.info_nce(torch.cat([a, b]), m)

    assert loss(z1, z2, labels, clean) == pytest.approx(float(loss(z1[perm], z2[perm], labels[perm], clean[perm])),
                                                        rel=1e-5)


def test_nt_xent_matches_its_definition():
    z = F.normalize(randn(0, 3, 4), dim=1)
    w = F.normalize(randn(1, 3, 4), dim=1)
    f = torch.cat([z, w])
    t = 0.5
    total = 0.0
    for i in range(6):
        j = (i + 3) % 6
        num = math.exp(float(f[i] @ f[j]) / t)
        den = sum(math.exp(float(f[i] @ f[k]) / t) for k in range(6) if k != i)
        total += -math.log(num / den)
    got = losses.info_nce(f, losses.positive_mask(torch.zeros(3, dtype=torch.long)), temperature=t)
    assert float(got) == pytest.approx(total / 6, rel=1e-5)


@settings(max_examples=50, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 10), k=st.integers(1, 4), clean_only=st.booleans())
def test_ss_ctl_masks(seed, n, k, clean_only):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    clean = torch.rand(n, generator=g) < 0.5
    m = losses.positive_mask(labels, mode="ss-ctl", clean=clean, clean_positives_only=clean_only)
    simclr = losses.positive_mask(labels, mode="simclr")
    supcon = losses.positive_mask(labels, mode="supcon")
    assert not m.diagonal().any() and m.shape == (2 * n, 2 * n)
    c2 = clean.repeat(2)
    assert torch.equal(m[~c2], simclr[~c2])  # a non-clean anchor: its other view only
    assert (m[~c2].sum(1) == 1).all()
    assert (m[c2] >= simclr[c2]).all() and (m[c2] <= supcon[c2]).all()
    if clean_only:
        assert not (m[c2][:, ~c2] & ~simclr[c2][:, ~c2]).any()  # no non-clean positive besides the own view
    else:
        assert torch.equal(m[c2], supcon[c2])
    everyone = torch.ones(n, dtype=torch.bool)
    assert torch.equal(losses.positive_mask(labels, mode="ss-ctl", clean=everyone), supcon)
    assert torch.equal(losses.positive_mask(labels, mode="ss-ctl", clean=~everyone), simclr)


def test_mask_arguments_are_checked():
    with pytest.raises(ValueError, match="mode must be"):
        losses.positive_mask(torch.zeros(2, dtype=torch.long), mode="byol")
    with pytest.raises(ValueError, match="clean flag per sample"):
        losses.positive_mask(torch.zeros(2, dtype=torch.long), mode="ss-ctl")


# -- symmetric cross-entropy --------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 10), k=st.integers(2, 10), alpha=st.floats(0, 2), beta=st.floats(0, 2))
def test_symmetric_ce_is_alpha_ce_plus_a_bounded_reverse_term(seed, n, k, alpha, beta):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 3
    y = torch.randint(0, k, (n,), generator=g)
    got = losses.symmetric_cross_entropy(z, y, alpha=alpha, beta=beta, reduction="none")
    p_y = z.softmax(1).gather(1, y[:, None]).squeeze(1)
    want = alpha * F.cross_entropy(z, y, reduction="none") + beta * losses.RCE_MAX * (1 - p_y)
    assert torch.allclose(got, want, atol=1e-5)
    rce = losses.symmetric_cross_entropy(z, y, alpha=0.0, beta=1.0, reduction="none")
    assert (rce >= 0).all() and (rce <= losses.RCE_MAX + 1e-5).all()


def test_soft_cross_entropy_with_one_hot_targets_is_cross_entropy():
    z, y = randn(3, 5, 4), torch.tensor([0, 3, 1, 1, 2])
    assert torch.allclose(losses.soft_cross_entropy(z, F.one_hot(y, 4).float()), F.cross_entropy(z, y))


# -- MixMatch -----------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(seed=SEEDS, n=st.integers(1, 8), k=st.integers(2, 10), t=st.floats(0.05, 1.0))
def test_sharpened_guesses_sum_to_one_and_sharpen_monotonically(seed, n, k, t):
    p = randn(seed, n, k).softmax(1)
    s = losses.sharpen(p, t)
    assert torch.allclose(s.sum(1), torch.ones(n), atol=1e-5)
    assert torch.allclose(losses.sharpen(p, 1.0), p, atol=1e-6)
    lower = losses.sharpen(p, t / 2)
    assert (lower.max(1).values >= s.max(1).values - 1e-6).all()
    assert (s.argmax(1) == p.argmax(1)).all()  # sharpening never changes the guess


@settings(max_examples=100, deadline=None)
@given(seed=SEEDS, alpha=st.floats(0.05, 4.0))
def test_mixup_weight_is_at_least_a_half_and_follows_the_seed(seed, alpha):
    w = losses.mixup_weight(alpha, torch.Generator().manual_seed(seed))
    assert 0.5 <= w <= 1.0
    assert w == losses.mixup_weight(alpha, torch.Generator().manual_seed(seed))


def test_mixup_of_a_batch_with_itself_is_the_batch():
    x, t = randn(0, 4, 3, 8, 8), randn(1, 4, 10).softmax(1)
    mx, mt = losses.mixup(x, t, x, t, 0.7)
    assert torch.allclose(mx, x) and torch.allclose(mt, t)


def test_mixmatch_loss_and_ramp():
    zx, zu = randn(0, 4, 5), randn(1, 6, 5)
    tx, tu = randn(2, 4, 5).softmax(1), randn(3, 6, 5).softmax(1)
    total, lx, lu = losses.mixmatch_loss(zx, tx, zu, tu, lambda_u=15 * losses.linear_ramp(3, 190))
    assert float(lx) == pytest.approx(float(losses.soft_cross_entropy(zx, tx)))
    assert float(lu) == pytest.approx(float(((zu.softmax(1) - tu) ** 2).mean()))
    assert float(total) == pytest.approx(float(lx) + 15 * 3 / 190 * float(lu), rel=1e-6)
    assert losses.linear_ramp(-1, 10) == 0.0 and losses.linear_ramp(20, 10) == 1.0 and losses.linear_ramp(1, 0) == 1.0

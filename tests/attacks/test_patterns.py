"""Built-in trigger patterns (bdframe_attack_common.patterns; docs/attacks.md, "Built-in trigger patterns")."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe_attack_common import patterns as P
from bdframe_attack_common.triggers import trigger_hash

SET = settings(max_examples=20, deadline=None)


def _box(mask):
    idx = torch.nonzero(mask[0])
    return tuple(idx.min(0).values.tolist()), tuple(idx.max(0).values.tolist())


@pytest.mark.parametrize("name", P.NAMES)
def test_deterministic_shapes_ranges_and_copies(name):
    p, m = P.get(name)
    assert p.shape == (3, 32, 32) and m.shape == (1, 32, 32)
    assert p.dtype == torch.float32 and 0 <= p.min() and p.max() <= 1
    assert set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 0
    assert (p[:, m[0] == 0] == 0).all(), "pattern outside its mask"
    p2, m2 = P.get(name)
    assert trigger_hash(p, m) == trigger_hash(p2, m2)
    p.zero_()  # callers get copies: the cache is not affected
    assert torch.equal(P.get(name)[0], p2)


def test_firefox_corner_geometry_and_split():
    p, m = P.get("firefox-corner")
    assert _box(m) == ((1, 18), (13, 30)) and int(m.sum()) == 137
    assert torch.equal(m, (p > 0).any(0, keepdim=True).float()), "mask = non-black pixels"
    regions = {1: (slice(1, 8), slice(18, 25)), 2: (slice(1, 8), slice(25, 31)),
               3: (slice(8, 14), slice(18, 25)), 4: (slice(8, 14), slice(25, 31))}
    total_p, total_m = torch.zeros_like(p), torch.zeros_like(m)
    for k, (rows, cols) in regions.items():
        pk, mk = P.get(f"firefox-corner-split-{k}")
        inside = torch.zeros_like(m, dtype=torch.bool)
        inside[0, rows, cols] = True
        assert (mk[~inside] == 0).all() and mk.sum() > 0
        total_p += pk
        total_m += mk
    assert torch.equal(total_p, p) and torch.equal(total_m, m), "the four quadrants rebuild the icon"
    # colours: warm (red channel dominates on average) with a dark-blue part
    assert p[0].sum() > p[1].sum() > p[2].sum()
    assert ((p[2] > p[0]) & (m[0] > 0)).any()


def test_firefox_icon_8px_disc():
    p, m = P.get("firefox-icon")
    assert int(m.sum()) == 52 and _box(m) == ((24, 24), (31, 31))
    _, m2 = P.get("firefox-icon", position="top-left")
    assert _box(m2) == ((0, 0), (7, 7))


def test_hellokitty_substitute_statistics():
    p, m = P.get("hellokitty")
    assert m.sum() == 32 * 32 and p.min() > 0.04  # never black: every derived mask is all ones
    means = p.mean(dim=(1, 2))
    assert torch.allclose(means, torch.tensor([0.78, 0.69, 0.59]), atol=0.03)
    assert ((p.std(dim=(1, 2)) > 0.12) & (p.std(dim=(1, 2)) < 0.25)).all()
    quads = [P.get(f"hellokitty-split-{k}") for k in (1, 2, 3, 4)]
    assert torch.equal(sum(q[0] for q in quads), p) and torch.equal(sum(q[1] for q in quads), m)
    assert _box(quads[0][1]) == ((16, 16), (31, 31))  # split 1 = bottom-right
    assert _box(quads[2][1]) == ((0, 0), (15, 15))  # split 3 = top-left


def test_small_patches_geometry():
    p, m = P.get("phoenix-corner")
    assert _box(m) == ((27, 27), (31, 31)) and m.sum() == 25
    vals = p[:, m[0] > 0]
    assert vals.min() >= 0.25 and (vals > 0.8).float().mean() > 0.5
    p2, m2 = P.get("phoenix-corner2")
    assert m2.sum() == 50 and torch.equal(p2[:, 27:, 27:], p[:, 27:, 27:])
    assert torch.equal(p2[:, 27:, :5], p[:, 27:, 27:])
    _, mt = P.get("trojan-square")
    assert _box(mt) == ((21, 21), (28, 28)) and mt.sum() == 64
    pw, mw = P.get("white-square")
    assert _box(mw) == ((29, 29), (31, 31)) and (pw[:, 29:, 29:] == 1).all() and pw.sum() == 27
    px, mx = P.get("badnet-x")
    assert {tuple(i) for i in torch.nonzero(px[0]).tolist()} == {(29, 31), (30, 30), (31, 29), (31, 31)}
    assert mx.sum() == 9
    p4, m4 = P.get("badnet-patch4")
    assert m4.sum() == 36 and p4[0].sum() == 16
    assert torch.equal(p4[0, 29:, 29:], px[0, 29:, 29:])
    assert torch.equal(p4[0, :3, :3], px[0, 29:, 29:].flip(0).flip(1))


@SET
@given(size=st.integers(14, 64), channels=st.sampled_from([1, 3]))
def test_other_resolutions_anchor_to_the_same_corner(size, channels):
    p, m = P.get("firefox-corner", channels, size, size)
    assert p.shape == (channels, size, size) and _box(m) == ((1, size - 14), (13, size - 2))
    _, mt = P.get("trojan-square", channels, size, size)
    assert _box(mt) == ((size - 11, size - 11), (size - 4, size - 4))
    ph, mh = P.get("hellokitty", channels, size, size)
    assert mh.sum() == size * size and ph.min() > 0


def test_grey_is_luma_of_rgb():
    rgb, _ = P.get("trojan-square")
    grey, _ = P.get("trojan-square", 1)
    expected = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).clamp(0, 1)
    assert torch.allclose(grey[0], expected)


def test_errors():
    with pytest.raises(ValueError, match="unknown built-in pattern"):
        P.get("kitty")
    with pytest.raises(ValueError, match="at least 14x14"):
        P.get("firefox-corner", 3, 12, 12)
    assert P.size_problem("white-square", 8, 8, size=9) is not None
    assert P.size_problem("white-square", 8, 8, size=8) is None

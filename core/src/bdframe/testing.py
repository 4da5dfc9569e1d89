"""Test helpers for bdframe and for third-party plugins (an opt-in pytest plugin).

Enable in a ``conftest.py`` with ``pytest_plugins = ["bdframe.testing"]``. Provides:

- fixture ``bdframe_registry``: a registry built from installed plugins (fresh per test);
- :func:`registry_with`: a registry with extra plugin objects/modules registered for a test
  (``autoload=False`` gives one with only those);
- :func:`tiny_imageset`: a small random :class:`~bdframe.data.ImageSet`;
- :func:`check_attack_contract`: the invariants every Attack must satisfy, so a new attack
  plugin gets them by calling it on its component.
- scorers: :func:`tiny_classifier` (a 2-layer conv net, or a constant-output net, wrapped in
  :class:`~bdframe.nn.Classifier`), :func:`check_scorer_contract` (the SampleScorer invariants),
  :func:`score_ctx`, :func:`state_snapshot` / :func:`assert_state_unchanged`, and the fixtures
  ``tiny_scorer_data`` / ``tiny_scorer_model``.
"""

from __future__ import annotations

import pytest
import torch

from bdframe.data import DatasetInfo, ImageSet


def registry_with(*plugins, autoload: bool = True, block=()):
    from bdframe.plugins import load_registry

    return load_registry(plugins=plugins, autoload=autoload, block=block)


def tiny_imageset(n: int = 120, num_classes: int = 4, size: int = 16, channels: int = 3, seed: int = 0,
                  id_offset: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    return ImageSet(images, labels.to(torch.int64), torch.arange(n, dtype=torch.int64) + id_offset,
                    tuple(f"c{i}" for i in range(num_classes)))


def info_for(data: ImageSet) -> DatasetInfo:
    _, c, h, w = data.images.shape
    return DatasetInfo(data.num_classes, c, h, w, (0.5,) * c, (0.25,) * c, data.classes)


def check_attack_contract(attack, train: ImageSet, test: ImageSet, *, seed: int = 0) -> None:
    """Invariants every Attack satisfies (listed in docs/attacks.md, "Invariants")."""
    assert attack.check_dataset(info_for(train)) == [], "attack rejects a valid dataset"
    ps = attack.poison_train(train, seed=seed)
    d = ps.data
    assert d.images.dtype == torch.uint8 and d.images.shape == train.images.shape, "shape/dtype changed"
    assert torch.equal(d.ids, train.ids), "ids changed or reordered"
    poison, cover = set(ps.poison_ids.tolist()), set(ps.cover_ids.tolist())
    assert len(poison) == len(ps.poison_ids) and len(cover) == len(ps.cover_ids), "duplicate ids"
    assert not (poison & cover), "poison and cover overlap"
    assert (poison | cover) <= set(train.ids.tolist()), "unknown ids"
    touched = poison | cover
    untouched = ~d.contains(torch.tensor(sorted(touched), dtype=torch.int64))
    assert torch.equal(d.images[untouched], train.images[untouched]), "clean samples modified"
    assert torch.equal(d.labels[untouched], train.labels[untouched]), "clean labels modified"
    if cover:
        cpos = d.contains(ps.cover_ids)
        assert torch.equal(d.labels[cpos], train.labels[cpos]), "cover samples must keep their labels"
    again = attack.poison_train(train, seed=seed)
    assert torch.equal(again.poison_ids, ps.poison_ids) and torch.equal(again.data.images, d.images), \
        "not deterministic under a seed"
    asr = attack.poison_test(test)
    assert asr.images.dtype == torch.uint8 and asr.images.shape[1:] == test.images.shape[1:]
    assert len(asr) <= len(test)
    assert set(asr.ids.tolist()) <= set(test.ids.tolist())


@pytest.fixture
def bdframe_registry():
    from bdframe.plugins import load_registry

    return load_registry()


# ---------------------------------------------------------------------------------------------
# Scorers: tiny models and the SampleScorer contract (docs/scorers.md, "The SampleScorer contract")
# ---------------------------------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    """A 2-layer conv net (conv-BN-ReLU, strided conv-ReLU, average pool) with a linear head:
    ``forward_features`` / ``forward_head`` as model plugins provide. The BatchNorm makes a
    scorer that forgets ``eval()`` visible (its running statistics would change)."""

    def __init__(self, channels: int = 3, num_classes: int = 4, width: int = 8):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(2 * width, num_classes)

    def forward_features(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward_head(self, f):
        return self.fc(f)


class ConstantNet(torch.nn.Module):
    """A network whose features and logits do not depend on the input (but stay connected to
    it in the autograd graph, with a zero gradient)."""

    def __init__(self, num_classes: int = 4, dim: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.feat = torch.nn.Parameter(torch.randn(dim, generator=g))
        self.fc = torch.nn.Linear(dim, num_classes)

    def forward_features(self, x):
        return self.feat.expand(len(x), -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)

    def forward_head(self, f):
        return self.fc(f)


def tiny_classifier(data: ImageSet | None = None, *, channels: int = 3, num_classes: int = 4, width: int = 8,
                    seed: int = 0, constant: bool = False):
    """A :class:`~bdframe.nn.Classifier` around :class:`TinyNet` (or :class:`ConstantNet`), in eval
    mode, with seeded weights and non-trivial BatchNorm running statistics."""
    from bdframe.nn import Classifier

    if data is not None:
        channels, num_classes = data.images.shape[1], data.num_classes
    torch.manual_seed(seed)
    net = ConstantNet(num_classes, seed=seed) if constant else TinyNet(channels, num_classes, width)
    if not constant:
        g = torch.Generator().manual_seed(seed + 1)
        net.bn1.running_mean.copy_(0.1 * torch.randn(width, generator=g))
        net.bn1.running_var.copy_(0.5 + torch.rand(width, generator=g))
    model = Classifier(net, (0.5,) * channels, (0.25,) * channels)
    return model.eval()


def state_snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model, snapshot: dict) -> None:
    now = model.state_dict()
    assert now.keys() == snapshot.keys(), "state_dict keys changed"
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), f"model state {k!r} changed"


def score_ctx(seed: int = 0, batch_size: int = 128, device="cpu"):
    from bdframe.interfaces import ScoreContext

    return ScoreContext(seed=seed, device=device, batch_size=batch_size, progress=False)


def _close(a, b, atol):
    a, b = a.double(), b.double()
    return bool(torch.allclose(a, b, atol=atol, rtol=atol))


def check_scorer_contract(scorer, model, data: ImageSet, *, seed: int = 0, atol: float = 1e-4,
                          batch_sizes=(1, 7, 128), device="cpu", check_batch: bool = True) -> torch.Tensor:
    """Invariants every SampleScorer satisfies (listed in docs/scorers.md); returns the
    scores at batch size 128.

    - one finite float per row, in row order; the model's state and train/eval mode unchanged;
    - the same seed gives identical scores;
    - batch sizes ``batch_sizes`` agree within ``atol`` (absolute and relative);
    - permuting the rows permutes the scores (per-sample and set-level scorers alike);
    - per-sample scorers (``set_level = False``): deleting other rows does not change a row's
      score. Rows the scorer names in ``reference_ids(data, ctx)`` (e.g. STRIP's overlay pool
      drawn from the inspected set) are kept;
    - ``flag(scores, data)``, where a scorer has a split rule, gives one bool per row.
    """
    n = len(data)
    snap = state_snapshot(model)
    was_training = model.training
    ctx = score_ctx(seed, 128, device)
    s = scorer.score(model, data, ctx)
    assert isinstance(s, torch.Tensor) and s.dtype.is_floating_point, f"scores must be a float tensor, got {s!r}"
    assert s.shape == (n,), f"expected shape ({n},), got {tuple(s.shape)}"
    assert bool(torch.isfinite(s).all()), "scores must be finite"
    assert_state_unchanged(model, snap)
    assert model.training == was_training, "the scorer must restore the model's train/eval mode"
    again = scorer.score(model, data, score_ctx(seed, 128, device))
    assert torch.equal(again.cpu(), s.cpu()), "same seed must give identical scores"
    if check_batch:
        for bs in batch_sizes:
            sb = scorer.score(model, data, score_ctx(seed, bs, device))
            assert _close(sb.cpu(), s.cpu(), atol), f"batch size {bs} changes the scores: {(sb - s).abs().max()}"
    g = torch.Generator().manual_seed(seed + 12345)
    perm = torch.randperm(n, generator=g)
    sp = scorer.score(model, data.subset(perm), ctx)
    assert _close(sp.cpu(), s[perm].cpu(), atol), f"not permutation-equivariant: {(sp - s[perm]).abs().max()}"
    if not getattr(scorer, "set_level", False) and n > 2:
        keep = torch.zeros(n, dtype=torch.bool)
        keep[perm[: max(1, n // 2)]] = True
        ref = getattr(scorer, "reference_ids", None)
        if ref is not None:
            keep |= data.contains(ref(data, ctx))
        rows = torch.nonzero(keep).flatten()
        ss = scorer.score(model, data.subset(rows), ctx)
        assert _close(ss.cpu(), s[rows].cpu(), atol), "a per-sample score changed when other samples were removed"
    flag = getattr(scorer, "flag", None)
    if flag is not None:
        f = flag(s, data)
        assert isinstance(f, torch.Tensor) and f.dtype == torch.bool and f.shape == (n,), "flag: one bool per row"
    assert_state_unchanged(model, snap)
    return s


@pytest.fixture
def tiny_scorer_data():
    """48 random 8x8 RGB images, 4 classes, ids 100..147."""
    return tiny_imageset(48, num_classes=4, size=8, seed=0, id_offset=100)


@pytest.fixture
def tiny_scorer_model(tiny_scorer_data):
    """A seeded :func:`tiny_classifier` for ``tiny_scorer_data``."""
    return tiny_classifier(tiny_scorer_data, seed=0)

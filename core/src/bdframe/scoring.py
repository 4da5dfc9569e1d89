"""Shared machinery for :class:`~bdframe.interfaces.SampleScorer` plugins.

- :func:`id_uniform` / :func:`id_normal`: per-sample random numbers keyed by ``(seed, id)``,
  computed as batched integer hashing on any device. A sample's numbers depend only on the
  seed parts, its id and the column index, never on the batch it is in, its position or the
  other samples, so scores that use them are batch-size and order invariant by construction.
- :func:`id_keys`: a per-id hash used for order-independent selections (auxiliary draws from
  the inspected set, k-means restarts).
- :func:`batches`: evaluation batches (no augmentation, no attack transform) with a progress bar.
- :func:`eval_mode`: run a model in ``eval()`` and restore its previous mode afterwards.
- :func:`features` / :func:`logits`: batched penultimate features or logits for a whole set.
- :func:`pca_project` / :func:`two_means`: the projection and the order-independent 2-means of
  activation clustering, shared by every method that splits a class in feature space.
- :func:`balanced_draw`: a class-balanced draw from an ImageSet: order-independent (how scorers
  that need clean auxiliary data take it from the inspected set, as an approximation) or the
  seeded draw of the datasets' ``train_size`` subset.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from bdframe.data import Batches, ImageSet
from bdframe.progress import Progress
from bdframe.seeding import derive_seed

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 tensors holding values < 2**32, without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (Wellons' "lowbias32"); a bijection on [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def id_hash(seed_parts: tuple, ids: torch.Tensor, n: int, *, device=None) -> torch.Tensor:
    """``(len(ids), n)`` int64 hashes in [0, 2**32) keyed by ``derive_seed(*seed_parts)``, the id
    and the column index."""
    device = torch.device(device) if device is not None else ids.device
    base = derive_seed(*seed_parts)
    k = [(base >> s) & _M32 for s in (0, 32)]
    ids = torch.as_tensor(ids, dtype=torch.int64).to(device)
    id_lo = (ids & _M32)[:, None]
    id_hi = ((ids >> 32) & _M32)[:, None]
    col = torch.arange(n, dtype=torch.int64, device=device)[None, :]
    h = _mix32(col ^ k[0])
    h = _mix32(h ^ id_lo)
    h = _mix32(h ^ k[1])
    h = _mix32(h ^ id_hi)
    h = _mix32((h + 0x9E3779B9) & _M32 ^ k[0])
    return h


def id_uniform(seed_parts: tuple, ids: torch.Tensor, n: int, *, device=None) -> torch.Tensor:
    """``(len(ids), n)`` float32 uniforms in [0, 1) (24-bit resolution), one row per id."""
    return (id_hash(seed_parts, ids, n, device=device) >> 8).to(torch.float32) * (1.0 / 2 ** 24)


def id_normal(seed_parts: tuple, ids: torch.Tensor, n: int, *, device=None) -> torch.Tensor:
    """``(len(ids), n)`` float32 standard normals (Box-Muller on per-id uniforms)."""
    u = id_uniform(seed_parts, ids, 2 * n, device=device)
    u1 = (u[:, :n] + 1.0 / 2 ** 24).clamp(max=1.0)  # (0, 1]
    u2 = u[:, n:]
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)


def id_keys(seed_parts: tuple, ids: torch.Tensor) -> torch.Tensor:
    """One int64 hash per id (ties between distinct ids are broken by the id itself in
    :func:`order_by_key`)."""
    return id_hash(seed_parts, ids, 1)[:, 0]


def order_by_key(seed_parts: tuple, ids: torch.Tensor) -> torch.Tensor:
    """Positions of ``ids`` sorted by their hash key (then id): an order that does not depend on
    the row order of the set."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    keys = id_keys(seed_parts, ids)
    composite = keys * (2 ** 31) + (ids % (2 ** 31))  # keys < 2**32, so this fits in int64
    return torch.argsort(composite, stable=True)


def balanced_draw(data: ImageSet, size: int, seed_parts: tuple | None = None, *, seed: int | None = None,
                  num_classes: int | None = None) -> torch.Tensor:
    """Positions (ascending) of a class-balanced draw of ``size`` rows (every row if ``size >= len``).

    Each class keeps the first rows of a per-class order, up to its quota. Two draws (give one of
    ``seed_parts`` and ``seed``):

    - ``seed_parts`` (scorers): rows ordered by per-id hash keys, so the same ids are drawn
      whatever the row order; classes that run short give their quota to the others.
    - ``seed`` (the datasets' ``train_size`` subset): class by class, ``torch.randperm`` of its
      rows with one generator seeded with ``seed``; class ``c`` gets ``size // k`` rows plus one
      if ``c < size % k``, and a class that runs short leaves its shortfall undrawn.
    """
    if (seed_parts is None) == (seed is None):
        raise ValueError("balanced_draw needs exactly one of seed_parts and seed")
    n = len(data)
    if size >= n:
        return torch.arange(n)
    k = num_classes or data.num_classes
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        order = torch.cat([pos[torch.randperm(len(pos), generator=g)]
                           for pos in (torch.nonzero(data.labels == c).flatten() for c in range(k))])
        quota = size // k + (torch.arange(k) < size % k).to(torch.int64)
    else:
        order = order_by_key(seed_parts, data.ids)
        counts = torch.bincount(data.labels, minlength=k)
        # fill per-class quotas; classes that run short give their quota to the others
        quota = torch.zeros(k, dtype=torch.int64)
        remaining = size
        active = counts > 0
        while remaining > 0 and bool(active.any()):
            share = max(remaining // int(active.sum()), 1)
            add = torch.minimum(counts - quota, torch.full_like(quota, share)) * active
            if remaining < int(add.sum()):  # last partial round: the lowest active classes get one more
                add = torch.zeros_like(quota)
                idx = torch.nonzero(active & (counts > quota)).flatten()[:remaining]
                add[idx] = 1
            quota += add
            remaining -= int(add.sum())
            active = counts > quota
    # rank of each row within its class in that order
    labels = data.labels[order]
    by_class = torch.argsort(labels, stable=True)
    starts = torch.cumsum(torch.bincount(labels, minlength=k), 0) - torch.bincount(labels, minlength=k)
    rank_in_class = torch.empty_like(labels)
    rank_in_class[by_class] = torch.arange(len(labels)) - starts[labels[by_class]]
    chosen = rank_in_class < quota[labels]
    return torch.sort(order[chosen]).values


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put ``model`` in eval mode for the block; restore its previous mode afterwards."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def batches(data: ImageSet, ctx, desc: str, *, batch_size: int | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x, labels, ids)`` evaluation batches on ``ctx.device`` with a progress bar."""
    bs = int(batch_size or ctx.batch_size)
    it = Batches(data, bs, device=ctx.device, apply_transform=False)
    with Progress(len(data), desc, unit="img", enabled=None if ctx.progress else False) as p:
        for x, y, ids in it:
            yield x, y, ids
            p.update(len(ids))


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` (same mode, weights frozen); the model itself is untouched.
    For computations whose result amplifies float32 rounding."""
    import copy

    net = copy.deepcopy(model).double()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@torch.no_grad()
def features(model, data: ImageSet, ctx, desc: str = "features", *, float64: bool = False) -> torch.Tensor:
    """Penultimate features (``model.features``) for every row, float32 on the CPU.

    ``float64=True`` runs a float64 copy of the model (the model itself is untouched) and
    returns float64 features: for analyses whose result amplifies rounding (covariance
    inverses, ratios of small spreads), where float32's batch-size-dependent last bits would
    otherwise show in the scores.
    """
    net = float64_copy(model) if float64 else model
    out = []
    with eval_mode(net):
        for x, _, _ in batches(data, ctx, desc):
            f = net.features(x.double() if float64 else x)
            out.append((f if float64 else f.float()).flatten(1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64 if float64 else torch.float32)


@torch.no_grad()
def logits(model, data: ImageSet, ctx, desc: str = "logits") -> torch.Tensor:
    out = []
    with eval_mode(model):
        for x, _, _ in batches(data, ctx, desc):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def sce_losses(model, data: ImageSet, ctx, *, alpha: float = 0.1, beta: float = 1.0, desc: str = "sce") -> torch.Tensor:
    """Each sample's symmetric cross-entropy ``alpha * CE + beta * RCE`` under ``model`` (eval
    mode, no augmentation), float32 on the CPU. A sample's value does not depend on the other
    samples. DBD keeps the labels of the samples where it is lowest."""
    from bdframe.losses import symmetric_cross_entropy

    z = logits(model, data, ctx, desc)
    if len(data) == 0:
        return torch.empty(0)
    return symmetric_cross_entropy(z, data.labels, alpha=alpha, beta=beta, reduction="none")


def anomaly_index(a: torch.Tensor) -> torch.Tensor:
    """``|a - median| / (1.4826 * MAD)``; where the MAD is 0 the mean absolute deviation is used
    instead, and an all-equal input gives all zeros (never inf or nan)."""
    a = a.to(torch.float64)
    med = a.median()
    b = (a - med).abs()
    mm = b.median() * 1.4826
    if mm <= 0:
        mm = b.mean()
    if mm <= 0:
        return torch.zeros_like(a)
    return b / mm


def pca_project(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """``x`` (n, d) centred and projected onto its top ``k`` principal directions, in float64;
    None when every row is the same (nothing to project)."""
    x = x.to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    if not bool(x.abs().max() > 0):
        return None
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return x @ vh[:k].T


def two_means(z: torch.Tensor, ids: torch.Tensor, seed_parts: tuple, *, n_init: int = 10,
              max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """2-means on ``z`` (n, d) float64: ``(assign, centres)`` of the restart with the lowest
    inertia. Each restart seeds k-means++ from keys of ``(seed_parts, restart, sample id)``: the
    first centre is the sample with the smallest hash, the second is drawn with probability
    proportional to its squared distance (Efraimidis-Spirakis keys), then Lloyd iterations. No
    choice depends on the row order, so the clustering of a permuted input is the permuted
    clustering."""
    n = len(z)
    best = None
    h = id_hash(seed_parts + ("first",), ids, n_init)  # (n, R)
    u = id_uniform(seed_parts + ("second",), ids, n_init).to(torch.float64)
    idlow = (ids % (2 ** 31)).to(torch.int64)
    for r in range(n_init):
        first = int(torch.argmin(h[:, r] * (2 ** 31) + idlow))
        d2 = ((z - z[first]) ** 2).sum(1)
        if bool(d2.max() > 0):
            key = torch.log(u[:, r] + 2.0 ** -25) / d2  # the max of u^(1/w)
            key = torch.where(d2 > 0, key, torch.full_like(key, -float("inf")))
            second = int(torch.argmax(key))
        else:
            second = first
        centres = torch.stack([z[first], z[second]])
        assign = None
        for _ in range(max_iter):
            new = torch.cdist(z, centres).argmin(1)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            for k in range(2):
                sel = assign == k
                if bool(sel.any()):
                    centres[k] = z[sel].mean(0)
        inertia = float(((z - centres[assign]) ** 2).sum())
        if best is None or inertia < best[0] - 1e-12 * max(abs(best[0]), 1.0):
            best = (inertia, assign, centres.clone())
    return best[1], best[2]

"""Losses shared by training stages, as plain functions of tensors.

- :func:`soft_cross_entropy`: cross-entropy against a probability vector per sample;
- :func:`symmetric_cross_entropy`: ``alpha * CE + beta * RCE``, the reverse term computed
  against a one-hot label whose zeros are clamped to ``1e-4`` (DBD's linear stage and its
  sample scores);
- :func:`positive_mask` and :func:`info_nce`: contrastive learning over two views per sample,
  with the positives given by a mask: SimCLR (a sample's other view), SupCon (every sample of
  the same label) or SS-CTL (same-label samples for anchors flagged clean, the other view only
  for the rest);
- :func:`sharpen`, :func:`mixup_weight`, :func:`mixup`, :func:`linear_ramp` and
  :func:`mixmatch_loss`: the pieces of MixMatch (DBD's semi-supervised stage);
- :func:`class_centre_similarity`: DBR's intra-class loss, which pushes class centres apart;
- :func:`lowest_share`: the exact-size split of a set by a per-sample value (DBD keeps the
  labels of the lowest-loss share).

Every function takes and returns tensors on the caller's device; none draws from torch's global
random state (:func:`mixup_weight` takes a generator).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

#: the value a one-hot label's zeros are clamped to in the reverse cross-entropy
RCE_CLAMP = 1e-4
#: the reverse cross-entropy's ceiling per sample, ``-log(1e-4)``
RCE_MAX = -math.log(RCE_CLAMP)


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``-sum_k q_k log softmax(z)_k`` per sample, for target distributions ``q`` (rows of
    ``targets``, each summing to 1). With one-hot targets it is the usual cross-entropy."""
    return _reduce(-(targets * F.log_softmax(logits.float(), dim=1)).sum(1), reduction)


def symmetric_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, alpha: float = 0.1, beta: float = 1.0,
                            reduction: str = "mean") -> torch.Tensor:
    """Symmetric cross-entropy ``alpha * CE + beta * RCE``.

    The reverse term swaps the roles of prediction and label: ``RCE = -sum_k p_k log y_k`` with
    the one-hot label's zeros clamped to ``1e-4``, which makes it
    ``-log(1e-4) * (1 - p_label)``: bounded, so a few mislabelled samples cannot dominate it.
    Per sample it is also the score DBD ranks samples by (a low loss = a credible label).
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    p = logits.softmax(1)
    one_hot = F.one_hot(labels, logits.shape[1]).float().clamp(min=RCE_CLAMP)
    rce = -(p * one_hot.log()).sum(1)
    return _reduce(alpha * ce + beta * rce, reduction)


def positive_mask(labels: torch.Tensor, *, mode: str = "simclr", clean: torch.Tensor | None = None,
                  clean_positives_only: bool = True) -> torch.Tensor:
    """The ``(2N, 2N)`` boolean positive mask of a batch of ``N`` samples seen twice (rows
    ``0..N-1`` the first views, ``N..2N-1`` the second views, in the same sample order).

    - ``simclr``: an anchor's only positive is its own other view (labels ignored);
    - ``supcon``: every other view of a sample with the anchor's label, its own included;
    - ``ss-ctl``: like ``supcon`` for anchors flagged ``clean`` (a boolean per sample), like
      ``simclr`` for the others. With ``clean_positives_only`` (the method's intent) a clean
      anchor's same-label positives are clean samples only; without it, any same-label sample
      (what the reference code computes).

    The diagonal (an anchor and itself) is never positive.
    """
    n = labels.shape[0]
    device = labels.device
    own = torch.arange(n, device=device).repeat(2)
    same_sample = own[:, None] == own[None, :]
    if mode == "simclr":
        mask = same_sample
    elif mode in ("supcon", "ss-ctl"):
        lab = labels.repeat(2)
        same_label = lab[:, None] == lab[None, :]
        if mode == "supcon":
            mask = same_label
        else:
            if clean is None or clean.shape != (n,):
                raise ValueError(f"mode 'ss-ctl' needs a boolean clean flag per sample (shape ({n},))")
            c = clean.to(device=device, dtype=torch.bool).repeat(2)
            extra = same_label & c[:, None]
            if clean_positives_only:
                extra = extra & c[None, :]
            mask = same_sample | extra
    else:
        raise ValueError(f"mode must be 'simclr', 'supcon' or 'ss-ctl', got {mode!r}")
    return mask & ~torch.eye(2 * n, dtype=torch.bool, device=device)


def info_nce(features: torch.Tensor, mask: torch.Tensor, *, temperature: float = 0.5,
             reduction: str = "mean") -> torch.Tensor:
    """Contrastive loss of ``(2N, D)`` features (L2-normalised here) under a positive ``mask``
    (:func:`positive_mask`): per anchor, minus the mean over its positives of the log-softmax of
    its cosine similarities divided by ``temperature``, the anchor itself left out of the
    softmax. With the ``simclr`` mask this is NT-Xent; with ``supcon`` the supervised
    contrastive loss. An anchor without positives contributes 0."""
    z = F.normalize(features.float(), dim=1)
    sim = z @ z.t() / temperature
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    m = mask.to(sim.dtype)
    count = m.sum(1)
    per_anchor = -(log_prob.masked_fill(eye, 0.0) * m).sum(1) / count.clamp(min=1)
    return _reduce(per_anchor, reduction)


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch's sharpening of guessed label distributions: ``p^(1/T)``, renormalised per row.
    ``T = 1`` keeps ``p``; lower ``T`` moves each row towards its argmax."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = p.float().clamp(min=1e-12).log() / temperature
    return (logp - logp.logsumexp(1, keepdim=True)).exp()


def beta_draw(alpha: float, beta: float, generator: torch.Generator) -> float:
    """One draw from Beta(alpha, beta) that follows ``generator`` (torch has no generator-driven
    Beta sampler; the draw seeds Python's)."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return random.Random(seed).betavariate(alpha, beta)


def mixup_weight(alpha: float, generator: torch.Generator) -> float:
    """``lambda' = max(lambda, 1 - lambda)`` with ``lambda ~ Beta(alpha, alpha)``, drawn from
    ``generator`` (so a run's sequence of weights follows its seed). Always >= 0.5: the mix
    stays closer to its first input."""
    if alpha <= 0:
        return 1.0
    lam = beta_draw(alpha, alpha, generator)
    return max(lam, 1.0 - lam)


def mixup(x1: torch.Tensor, t1: torch.Tensor, x2: torch.Tensor, t2: torch.Tensor,
          weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * x1 + (1 - weight) * x2, weight * t1 + (1 - weight) * t2)``."""
    return weight * x1 + (1 - weight) * x2, weight * t1 + (1 - weight) * t2


def linear_ramp(step: float, length: float) -> float:
    """``step / length`` clipped to [0, 1] (1 when ``length`` is 0)."""
    if length <= 0:
        return 1.0
    return float(min(max(step / length, 0.0), 1.0))


def mixmatch_loss(logits_x: torch.Tensor, targets_x: torch.Tensor, logits_u: torch.Tensor,
                  targets_u: torch.Tensor, lambda_u: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MixMatch's objective: ``L_x + lambda_u * L_u`` with ``L_x`` the soft cross-entropy of the
    mixed labelled batch and ``L_u`` the mean squared error between the predicted and the
    guessed (sharpened, mixed) distributions of the unlabelled batch. ``lambda_u`` is the
    caller's (ramped with :func:`linear_ramp`). Returns ``(total, L_x, L_u)``."""
    lx = soft_cross_entropy(logits_x, targets_x)
    lu = ((logits_u.float().softmax(1) - targets_u) ** 2).mean() if logits_u.numel() else logits_x.new_zeros(())
    return lx + lambda_u * lu, lx, lu


def class_centre_similarity(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DBR's intra-class loss ``L_intra`` on one batch: the L2-normalised mean feature of every
    class present in the batch, then the mean of the matrix of their pairwise cosine
    similarities with its diagonal set to 0. Minimising it pushes the class centres apart,
    which separates poisoned samples from the genuine samples of the target class in feature
    space. 0 for a batch with one class; in [-1, 1] otherwise."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    k = classes.shape[0]
    f = features.float()
    sums = torch.zeros(k, f.shape[1], device=f.device, dtype=f.dtype).index_add_(0, inverse, f)
    counts = torch.bincount(inverse, minlength=k).to(f.dtype).clamp(min=1)
    centres = F.normalize(sums / counts[:, None], dim=1)
    sim = centres @ centres.t()
    return sim.masked_fill(torch.eye(k, dtype=torch.bool, device=f.device), 0.0).mean()


def lowest_share(values: torch.Tensor, share: float, ids: torch.Tensor,
                 groups: torch.Tensor | None = None) -> torch.Tensor:
    """A boolean mask over ``values`` selecting exactly ``floor(share * N)`` rows with the
    lowest values, ties broken by the lower id (so the choice is a function of the samples, not
    of their order). DBD keeps the labels of the lowest-loss share this way.

    With ``groups`` (one integer per row, e.g. the given labels) the share is taken within each
    group instead: ``floor(share * N_g)`` rows of each group ``g``, so no group is left out
    because its values are higher overall."""
    n = values.shape[0]
    if groups is not None:
        groups = groups.detach().cpu()
        if groups.shape != (n,):
            raise ValueError(f"lowest_share: groups has shape {tuple(groups.shape)}, expected ({n},)")
        values, ids = values.detach().cpu(), ids.cpu()
        keep = torch.zeros(n, dtype=torch.bool)
        for g in torch.unique(groups):
            rows = torch.nonzero(groups == g).flatten()
            keep[rows] = lowest_share(values[rows], share, ids[rows])
        return keep
    k = int(math.floor(share * n + 1e-9))
    keep = torch.zeros(n, dtype=torch.bool)
    if k:
        by_id = torch.argsort(ids.cpu())
        order = by_id[torch.argsort(values.detach().cpu().double()[by_id], stable=True)]
        keep[order[:k]] = True
    return keep


__all__ = ["soft_cross_entropy", "symmetric_cross_entropy", "positive_mask", "info_nce", "sharpen",
           "beta_draw", "mixup_weight", "mixup", "linear_ramp", "mixmatch_loss", "lowest_share", "class_centre_similarity", "RCE_CLAMP", "RCE_MAX"]

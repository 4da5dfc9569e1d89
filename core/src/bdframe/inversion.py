"""Trigger inversion in the style of Neural Cleanse, for every class, and the choice of the
target class by the median-absolute-deviation anomaly index.

For a class ``k`` it looks for the smallest stamp that sends clean images to ``k``: a mask
``m_k`` in [0,1]^(H x W) and a pattern ``p_k`` in [0,1]^(C x H x W), applied in *pixel space*
as ``x' = (1 - m_k) * x + m_k * p_k``, minimising

    cross-entropy(f(x'), k) + lam * ||m_k||_1

with Adam, both clipped to [0,1] after every step. A backdoor's target class needs a much
smaller mask than any other class (the trigger is a shortcut to it); the anomaly index of each
class's mask norm, ``(median - norm_k) / (1.4826 * MAD)``, says how far below the others it
lies, and the class with the largest index is the inverted target.

Every class is inverted in the same pass: each batch of clean images is stamped with all the
classes' triggers at once (a ``K x B`` batch; the classes' parameters are independent, so this
is K separate optimisations sharing forward passes). A class stops when the norm of its best
mask has not improved for ``patience`` epochs; its best mask is the smallest one whose stamp
sent at least ``success`` of an epoch's images to the class.
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch
import torch.nn.functional as F

from bdframe.data import ImageSet
from bdframe.seeding import generator

#: the normal-consistency constant of the median absolute deviation
MAD_SCALE = 1.4826


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * x + mask * pattern``: ``x`` (B,C,H,W) in [0,1], ``mask`` (1,H,W) or
    (B,1,H,W), ``pattern`` (C,H,W) or (B,C,H,W). A zero mask returns ``x`` unchanged."""
    return (1 - mask) * x + mask * pattern


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """How far each norm lies *below* the median, in units of the scaled median absolute
    deviation: ``(median - norm) / (1.4826 * MAD)`` (negative above the median). When the
    MAD is zero, or so small against the norms (below 1e-12 of the largest) that it is float
    rounding rather than a spread, every index is 0: dividing by it would blow rounding up into
    indices of 1e15."""
    norms = norms.double()
    med = norms.median()
    mad = (norms - med).abs().median() * MAD_SCALE
    if float(mad) <= 1e-12 * float(norms.abs().max()):
        return torch.zeros_like(norms)
    return (med - norms) / mad


@attrs.define
class Inversion:
    """The result of :func:`invert`, one row per class.

    ``masks`` (K,1,H,W) and ``patterns`` (K,C,H,W) in [0,1]; ``norms`` the masks' L1 norms;
    ``success`` the share of an epoch's stamped images the model gave to the class (the epoch
    of the kept mask); ``anomaly`` the anomaly index of each norm; ``target`` the class with the
    largest index; ``epochs`` how many epochs each class ran."""

    masks: torch.Tensor
    patterns: torch.Tensor
    norms: torch.Tensor
    success: torch.Tensor
    anomaly: torch.Tensor
    target: int
    epochs: list

    def index(self) -> float:
        """The target's anomaly index (Neural Cleanse calls a model backdoored above 2)."""
        return float(self.anomaly[self.target])

    def to_dict(self) -> dict:
        return {"target": self.target, "anomaly_index": self.index(), "norms": self.norms.tolist(),
                "anomaly": self.anomaly.tolist(), "success": self.success.tolist(), "epochs": list(self.epochs)}


def invert(model: torch.nn.Module, data: ImageSet, *, lam: float = 0.01, lr: float = 0.1, epochs: int = 30,
           patience: int = 10, success: float = 0.95, batch_size: int = 64, max_batch: int = 1024,
           seed: int = 0, device="cpu", progress: bool = True, desc: str = "trigger inversion") -> Inversion:
    """Invert a trigger for every class of ``model`` on the clean images ``data`` (their labels
    are not used). The model is put in eval mode and its parameters are left unchanged; a class
    stops after ``patience`` epochs without a smaller successful mask, or after ``epochs``.
    ``max_batch`` bounds the stamped images per forward pass (classes are done in chunks)."""
    from bdframe.progress import Progress

    if len(data) == 0:
        raise ValueError("trigger inversion needs at least one clean image")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    num_classes = data.num_classes
    _, c, h, w = data.images.shape
    g = generator(seed, "inversion", "init")
    mask = torch.rand(num_classes, 1, h, w, generator=g).to(device).requires_grad_(True)
    pattern = torch.rand(num_classes, c, h, w, generator=g).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask, pattern], lr=lr, betas=(0.5, 0.9))
    best_mask = mask.detach().clone()
    best_pattern = pattern.detach().clone()
    best_norm = torch.full((num_classes,), float("inf"))
    best_success = torch.zeros(num_classes)
    stale = [0] * num_classes
    ran = [0] * num_classes
    active = list(range(num_classes))
    chunk = max(1, max_batch // batch_size)
    try:
        with Progress(epochs, desc, unit="epoch", enabled=progress if progress else False) as bar:
            for epoch in range(epochs):
                if not active:
                    break
                order = torch.randperm(len(data), generator=generator(seed, "inversion", "epoch", epoch))
                hits = torch.zeros(num_classes)
                seen = 0
                for start in range(0, len(data), batch_size):
                    rows = order[start:start + batch_size]
                    x = data.images[rows].to(device).float().div_(255)
                    opt.zero_grad(set_to_none=True)
                    for i in range(0, len(active), chunk):
                        ks = torch.tensor(active[i:i + chunk], device=device)
                        m, p = mask[ks], pattern[ks]  # (k,1,H,W), (k,C,H,W)
                        stamped = stamp(x.unsqueeze(0), m.unsqueeze(1), p.unsqueeze(1)).flatten(0, 1)
                        logits = model(stamped)
                        target = ks.repeat_interleave(len(x))
                        ce = F.cross_entropy(logits, target, reduction="none").view(len(ks), len(x)).mean(1)
                        loss = (ce + lam * m.abs().flatten(1).sum(1)).sum()
                        loss.backward()
                        pred = logits.detach().argmax(1).view(len(ks), len(x))
                        hits[ks.cpu()] += (pred == ks.view(-1, 1)).sum(1).float().cpu()
                    opt.step()
                    with torch.no_grad():
                        mask.clamp_(0, 1)
                        pattern.clamp_(0, 1)
                    seen += len(x)
                rate = hits / seen
                norms = mask.detach().abs().flatten(1).sum(1).cpu()
                for k in list(active):
                    ran[k] += 1
                    if rate[k] >= success and norms[k] < best_norm[k] * (1 - 1e-4):
                        best_norm[k] = norms[k]
                        best_success[k] = rate[k]
                        best_mask[k] = mask.detach()[k]
                        best_pattern[k] = pattern.detach()[k]
                        stale[k] = 0
                    else:
                        stale[k] += 1
                        if stale[k] >= patience:
                            active.remove(k)
                bar.update(1, active=len(active))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    # a class that never reached the success rate keeps its last mask
    for k in range(num_classes):
        if not torch.isfinite(best_norm[k]):
            best_mask[k] = mask.detach()[k]
            best_pattern[k] = pattern.detach()[k]
            best_norm[k] = float(best_mask[k].abs().sum())
    index = anomaly_index(best_norm)
    return Inversion(masks=best_mask.cpu(), patterns=best_pattern.cpu(), norms=best_norm, success=best_success,
                     anomaly=index.float(), target=int(torch.argmax(index)), epochs=ran)


def save_pictures(inv: Inversion, examples: ImageSet, path, *, classes=(), title: str = "") -> Optional[dict]:
    """A picture of the inversion (matplotlib; nothing without it): a row per class, the chosen
    target first, labelled with the class, its mask norm and anomaly index; columns: mask,
    pattern, mask x pattern, a clean image and that image stamped."""
    from bdframe import plots

    x = examples.images[:1].float() / 255
    order = [inv.target] + [k for k in range(len(inv.norms)) if k != inv.target]
    rows = []
    for k in order:
        m, p = inv.masks[k], inv.patterns[k]
        name = classes[k] if k < len(classes) else str(k)
        label = (f"{'target: ' if k == inv.target else ''}{k} {name}\n"
                 f"norm {float(inv.norms[k]):.1f}, index {float(inv.anomaly[k]):.2f}")
        rows.append((label, [m, p, m * p, x[0], stamp(x, m, p)[0]]))
    return plots.image_grid(rows, ["mask", "pattern", "mask x pattern", "clean image", "stamped"], path,
                            title=title or "Trigger inversion: the smallest stamp that sends clean images to each class")


def apply_trigger(data_x: torch.Tensor, inv: Inversion, k: Optional[int] = None) -> torch.Tensor:
    """``data_x`` (B,C,H,W in [0,1]) stamped with class ``k``'s inverted trigger (the target by
    default)."""
    k = inv.target if k is None else k
    return stamp(data_x, inv.masks[k].to(data_x.device), inv.patterns[k].to(data_x.device))

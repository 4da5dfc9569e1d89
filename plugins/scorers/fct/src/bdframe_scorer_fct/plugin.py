"""``fct``: feature consistency towards transformations (Chen, Wu & Wang 2022; docs/scorers.md, fct).

``FCT(x) = mean_d (g(x) - g(tau(x)))^2``: the per-dimension mean of the squared difference of the
penultimate features of an image and of a randomly transformed copy (``metric = "cosine"``
gives ``1 - cos`` in [0, 2] instead). Poisoned samples move further in feature space, so higher
= more likely poisoned. ``tau`` is the composition of ``transforms`` in order; the reference
default is a random rotation (+-180 degrees) followed by a random translation (up to 20% of the
width and height, whole pixels), both with nearest-neighbour sampling and zero fill. Other
choices: ``flip`` (horizontal, p = 0.5), ``crop`` (random crop with zero padding), ``blur``
(Gaussian, kernel 15, sigma ~ U[0.1, 2], reflect padding), ``erase`` (one zero rectangle
of 20-30% of the area, aspect ratio log-uniform in [0.3, 3.3]). ``transforms = []`` is the
identity, which gives exactly 0.

All random parameters come from the sample's own stream (seed, id, transform index), so the
score of a sample does not depend on the batch or on the other samples.

The authors' FCT defense scores with its *own* backdoored model trained without augmentation
(2 epochs, then 10 epochs of L_intra); that training belongs to the D-BR/D-ST defenses. This
scorer measures FCT on whatever model it is given.

Split rule (:meth:`Fct.partition`): sort the N scores; ``gamma_c = sorted[floor(alpha_c N)]`` and
``gamma_p = sorted[N - floor(alpha_p N)]``; ``FCT >= gamma_p`` is poisoned, ``FCT <= gamma_c``
clean, the rest uncertain (poisoned wins ties). :meth:`Fct.flag` returns the poisoned part.
"""

from __future__ import annotations

import math

import attrs

from bdframe import hookimpl
from bdframe.config import each, in_range, one_of
from bdframe.interfaces import SampleScorer

TRANSFORMS = ("rotate", "affine", "flip", "crop", "blur", "erase")


@attrs.frozen
class FctConfig:
    transforms: tuple[str, ...] = attrs.field(default=("rotate", "affine"), validator=each(one_of(*TRANSFORMS)),
                                              metadata={"help": "random transformations applied in order"})
    rotate_degrees: float = attrs.field(default=180.0, validator=in_range(0, 180))
    translate: float = attrs.field(default=0.2, validator=in_range(0, 1),
                                   metadata={"help": "affine: max shift as a fraction of width/height"})
    crop_padding: int = attrs.field(default=4, validator=in_range(0, None))
    blur_kernel: int = attrs.field(default=15, validator=in_range(1, None))
    blur_sigma: tuple[float, float] = attrs.field(default=(0.1, 2.0), validator=each(in_range(0, None, lo_open=True)))
    erase_scale: tuple[float, float] = attrs.field(default=(0.2, 0.3), validator=each(in_range(0, 1)))
    metric: str = attrs.field(default="mse", validator=one_of("mse", "cosine"),
                              metadata={"help": "mse: mean squared feature difference; cosine: 1 - cos"})
    alpha_clean: float = attrs.field(default=0.20, validator=in_range(0, 1),
                                     metadata={"help": "split: fraction taken as clean (lowest FCT)"})
    alpha_poison: float = attrs.field(default=0.05, validator=in_range(0, 1),
                                      metadata={"help": "split: fraction flagged as poisoned (highest FCT)"})

    def check(self):
        out = []
        if self.blur_kernel % 2 == 0:
            out.append(("blur_kernel", f"must be odd, got {self.blur_kernel}"))
        for f in ("blur_sigma", "erase_scale"):
            v = getattr(self, f)
            if len(v) != 2 or v[0] > v[1]:
                out.append((f, f"must be [low, high] with low <= high, got {list(v)}"))
        if self.alpha_clean + self.alpha_poison > 1:
            out.append(("alpha_poison", "alpha_clean + alpha_poison must be <= 1"))
        return out


def _affine(x, theta):
    import torch.nn.functional as F

    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class Fct(SampleScorer):
    name = "fct"
    Config = FctConfig
    summary = "FCT: feature distance between an image and a randomly transformed copy"
    set_level = False

    def transform(self, x, ids, seed: int):
        """Apply ``tau`` to a batch of [0,1] images; randomness keyed by (seed, id)."""
        import torch
        import torch.nn.functional as F

        from bdframe.scoring import id_uniform

        c = self.config
        b, ch, h, w = x.shape
        dev = x.device
        for k, name in enumerate(c.transforms):
            u = id_uniform(("fct", int(seed), k, name), ids, 4, device=dev)
            if name == "rotate":
                a = (2 * u[:, 0] - 1) * math.radians(c.rotate_degrees)
                cos, sin = torch.cos(a), torch.sin(a)
                theta = torch.zeros(b, 2, 3, device=dev)
                theta[:, 0, 0] = cos
                theta[:, 0, 1] = -sin * h / w
                theta[:, 1, 0] = sin * w / h
                theta[:, 1, 1] = cos
                x = _affine(x, theta)
            elif name == "affine":
                tx = torch.round((2 * u[:, 0] - 1) * c.translate * w)
                ty = torch.round((2 * u[:, 1] - 1) * c.translate * h)
                theta = torch.zeros(b, 2, 3, device=dev)
                theta[:, 0, 0] = 1
                theta[:, 1, 1] = 1
                theta[:, 0, 2] = -2 * tx / w
                theta[:, 1, 2] = -2 * ty / h
                x = _affine(x, theta)
            elif name == "flip":
                x = torch.where((u[:, 0] < 0.5)[:, None, None, None], x.flip(3), x)
            elif name == "crop":
                p = c.crop_padding
                padded = F.pad(x, (p, p, p, p))
                oy = (u[:, 0] * (2 * p + 1)).floor().long().clamp(max=2 * p)
                ox = (u[:, 1] * (2 * p + 1)).floor().long().clamp(max=2 * p)
                rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
                cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
                bi = torch.arange(b, device=dev)[:, None, None, None]
                ci = torch.arange(ch, device=dev)[None, :, None, None]
                x = padded[bi, ci, rows, cols]
            elif name == "blur":
                kmax = 2 * min(h, w) - 1  # reflect padding needs pad < size
                ks = min(c.blur_kernel, kmax if kmax % 2 else kmax - 1)
                lo, hi = c.blur_sigma
                sigma = lo + (hi - lo) * u[:, 0]
                r = torch.arange(ks, device=dev, dtype=torch.float32) - ks // 2
                k1 = torch.exp(-0.5 * (r[None, :] / sigma[:, None]) ** 2)
                k1 = k1 / k1.sum(1, keepdim=True)  # (B, ks)
                kk = k1.repeat_interleave(ch, 0)  # (B*C, ks)
                y = F.pad(x.reshape(1, b * ch, h, w), (ks // 2,) * 4, mode="reflect")
                y = F.conv2d(y, kk[:, None, :, None], groups=b * ch)
                y = F.conv2d(y, kk[:, None, None, :], groups=b * ch)
                x = y.view(b, ch, h, w)
            elif name == "erase":
                lo, hi = c.erase_scale
                area = (lo + (hi - lo) * u[:, 0]) * h * w
                ratio = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * u[:, 1])
                eh = torch.sqrt(area * ratio).round().clamp(1, h).long()
                ew = torch.sqrt(area / ratio).round().clamp(1, w).long()
                top = (u[:, 2] * (h - eh + 1)).floor().long()
                left = (u[:, 3] * (w - ew + 1)).floor().long()
                rr = torch.arange(h, device=dev)[None, :]
                cc = torch.arange(w, device=dev)[None, :]
                in_r = (rr >= top[:, None]) & (rr < (top + eh)[:, None])
                in_c = (cc >= left[:, None]) & (cc < (left + ew)[:, None])
                box = (in_r[:, :, None] & in_c[:, None, :])[:, None]
                x = x.masked_fill(box, 0.0)
        return x

    def score(self, model, data, ctx):
        import torch
        import torch.nn.functional as F

        from bdframe.scoring import batches, eval_mode

        out = []
        with eval_mode(model), torch.no_grad():
            for x, _, ids in batches(data, ctx, "fct"):
                if not self.config.transforms:
                    out.append(torch.zeros(len(ids)))
                    continue
                f0 = model.features(x).float().flatten(1)
                f1 = model.features(self.transform(x, ids, ctx.seed)).float().flatten(1)
                if self.config.metric == "mse":
                    d = (f0 - f1).pow(2).mean(1)
                else:
                    d = (1 - F.cosine_similarity(f0, f1, dim=1, eps=1e-12)).clamp(0, 2)
                out.append(d.cpu())
        return torch.cat(out) if out else torch.empty(0)

    # -- split ---------------------------------------------------------------------------------
    def partition(self, scores):
        """``(clean, uncertain, poisoned)`` boolean masks over the rows (the FCT three-way split)."""
        import torch

        n = len(scores)
        s = torch.sort(scores).values
        nc, np_ = int(self.config.alpha_clean * n), int(self.config.alpha_poison * n)
        poisoned = scores >= s[n - np_] if np_ > 0 else torch.zeros(n, dtype=torch.bool)
        clean = (scores <= s[nc]) & ~poisoned if n and nc < n else torch.zeros(n, dtype=torch.bool)
        return clean, ~(clean | poisoned), poisoned

    def flag(self, scores, data=None):
        """Rows the FCT split calls poisoned (the top ``alpha_poison`` fraction)."""
        return self.partition(scores)[2]


@hookimpl
def bdframe_register_scorers(registry):
    registry.add(Fct)

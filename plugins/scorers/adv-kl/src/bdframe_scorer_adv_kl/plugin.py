"""``adv-kl``: MeCa's adversarial-KL consistency metric (Pu et al. 2024, Eq. 3; docs/scorers.md).

For every sample, ``KL_i = KL( p(x_i) || p(x~_i) )`` with ``x~_i = clip01(x_i + m_i * delta_i)``:
``m_i`` is a random patch mask drawn from the sample's own random stream (seed, id, iteration)
and ``delta_i = epsilon * sign(grad_x loss)`` is a single-step adversarial perturbation.
Poisoned samples are *more* consistent (low KL), so the score is ``-KL`` (<= 0; higher = more
likely poisoned). :meth:`AdvKL.kl` returns the KL itself.

Choices bdframe reconstructed (the paper does not give them) and their options:

- ``mask_mode = "grid"`` (default): the image is cut into ``patch_size`` x ``patch_size`` cells and
  each cell is switched on independently with probability ``keep_prob``; ``"single"``: one
  ``patch_size`` square at a uniformly random position. The mask is shared by all channels.
- ``grad_loss = "ce_label"`` (default): CE against the given label; ``"ce_pred"``: CE against the
  model's own prediction; ``"kl_random_start"``: the KL gradient taken at a random start
  ``x + m * sigma * N(0, 1)`` (the KL gradient is exactly zero at delta = 0), computed in
  float64 because at so small a start float32 rounding would decide the sign of its entries.
- ``iteration``: MeCa's outer iteration k; it is part of the mask seed, so every iteration of
  Algorithm 2 draws fresh masks while staying reproducible.

The KL is computed from log-softmax in float64, clamped at 0, and set to exactly 0 for samples
whose perturbed image equals the original (epsilon = 0, an empty mask, a zero gradient).
Gradients use a summed (not averaged) loss, so their sign does not depend on the batch size.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import SampleScorer


@attrs.frozen
class AdvKLConfig:
    epsilon: float = attrs.field(default=8 / 255, validator=in_range(0, 1),
                                 metadata={"help": "L-inf bound of the perturbation, in [0,1] pixel units"})
    patch_size: int = attrs.field(default=2, validator=in_range(1, None),
                                  metadata={"help": "side of a mask cell (grid) or of the single patch"})
    mask_mode: str = attrs.field(default="grid", validator=one_of("grid", "single"),
                                 metadata={"help": "grid: random 50% of patch cells; single: one random patch"})
    keep_prob: float = attrs.field(default=0.5, validator=in_range(0, 1),
                                   metadata={"help": "grid mode: probability that a cell is perturbed"})
    grad_loss: str = attrs.field(default="ce_label", validator=one_of("ce_label", "ce_pred", "kl_random_start"),
                                 metadata={"help": "loss whose input-gradient sign gives the perturbation"})
    random_start_sigma: float = attrs.field(default=1e-3, validator=in_range(0, None),
                                            metadata={"help": "kl_random_start: std of the random start"})
    iteration: int = attrs.field(default=0, validator=in_range(0, None),
                                 metadata={"help": "MeCa iteration k, mixed into the mask seed"})


class AdvKL(SampleScorer):
    name = "adv-kl"
    Config = AdvKLConfig
    summary = "MeCa adversarial-KL consistency: -KL(p(x) || p(x + m*eps*sign(grad)))"
    set_level = False

    # -- randomness -------------------------------------------------------------------------
    def _parts(self, seed: int, what: str) -> tuple:
        return ("adv-kl", int(seed), what, self.config.iteration)

    def masks(self, ids, shape, seed: int, device) -> "torch.Tensor":
        """``(B, 1, H, W)`` float masks for the given ids (depends only on seed, id, iteration)."""
        import torch

        from bdframe.scoring import id_uniform

        b, _, h, w = shape
        r = self.config.patch_size
        if self.config.mask_mode == "grid":
            gh, gw = -(-h // r), -(-w // r)
            u = id_uniform(self._parts(seed, "grid"), ids, gh * gw, device=device)
            cells = (u < self.config.keep_prob).to(torch.float32).view(b, 1, gh, gw)
            return cells.repeat_interleave(r, 2).repeat_interleave(r, 3)[:, :, :h, :w].contiguous()
        rh, rw = min(r, h), min(r, w)
        u = id_uniform(self._parts(seed, "single"), ids, 2, device=device)
        top = (u[:, 0] * (h - rh + 1)).floor().long().clamp(max=h - rh)
        left = (u[:, 1] * (w - rw + 1)).floor().long().clamp(max=w - rw)
        rows = torch.arange(h, device=device)[None, :]
        cols = torch.arange(w, device=device)[None, :]
        in_r = (rows >= top[:, None]) & (rows < top[:, None] + rh)
        in_c = (cols >= left[:, None]) & (cols < left[:, None] + rw)
        return (in_r[:, :, None] & in_c[:, None, :]).to(torch.float32)[:, None]

    # -- one batch ---------------------------------------------------------------------------
    def perturb(self, model, x, y, ids, seed: int, *, model64=None):
        """``(x_tilde, mask, clean_logits)`` for a batch of [0,1] images (model in eval mode).
        ``model64``: the model's float64 copy for ``kl_random_start`` (made here if not given)."""
        import torch
        import torch.nn.functional as F

        from bdframe.scoring import id_normal

        c = self.config
        mask = self.masks(ids, x.shape, seed, x.device)
        if c.epsilon == 0 or not bool(mask.any()):
            with torch.no_grad():
                return x.clone(), mask, model(x).detach()
        with torch.enable_grad():
            if c.grad_loss == "kl_random_start":
                with torch.no_grad():
                    clean = model(x).detach()
                noise = id_normal(self._parts(seed, "start"), ids, x[0].numel(), device=x.device).view_as(x)
                if model64 is None:
                    from bdframe.scoring import float64_copy

                    model64 = float64_copy(model)
                g = self._random_start_grad(model64, x, (x + mask * c.random_start_sigma * noise).clamp(0, 1))
            else:
                xg = x.detach().clone().requires_grad_(True)
                out = model(xg)
                target = y if c.grad_loss == "ce_label" else out.detach().argmax(1)
                loss = F.cross_entropy(out.float(), target, reduction="sum")
                g = torch.autograd.grad(loss, xg)[0]
                clean = out.detach()
        x_t = (x + mask * (c.epsilon * torch.sign(g))).clamp(0, 1)
        return x_t.detach(), mask, clean

    @staticmethod
    def _random_start_grad(model64, x, x0):
        """Input gradient of ``KL(p(x) || p(x0))`` at the random start ``x0``, in float64.

        At a start ``sigma`` away from ``x`` the gradient is of order ``sigma`` and is the
        difference of two nearly equal softmax outputs; in float32 its rounding noise (about
        1e-7 of the logits) is then about 1e-3 of its size, so ``sign()`` of its small entries
        would follow the noise and change with the batch size. In float64 the noise is about
        1e-16 of the logits, far below any entry that matters. ``model64`` is the model's float64
        copy (:func:`bdframe.scoring.float64_copy`).
        """
        import torch
        import torch.nn.functional as F

        x0 = x0.detach().double().requires_grad_(True)
        with torch.no_grad():
            logp = F.log_softmax(model64(x.double()), 1)
        logq = F.log_softmax(model64(x0), 1)
        loss = (logp.exp() * (logp - logq)).sum()
        return torch.autograd.grad(loss, x0)[0].to(x.dtype)

    def batch_kl(self, model, x, y, ids, seed: int, *, model64=None):
        """KL per sample (float64) for one batch."""
        import torch
        import torch.nn.functional as F

        x_t, _, clean = self.perturb(model, x, y, ids, seed, model64=model64)
        same = (x_t == x).flatten(1).all(1)
        with torch.no_grad():
            pert = model(x_t) if not bool(same.all()) else clean
            logp = F.log_softmax(clean.double(), 1)
            logq = F.log_softmax(pert.double(), 1)
            kl = (logp.exp() * (logp - logq)).sum(1).clamp(min=0)
        return torch.where(same, torch.zeros_like(kl), kl)

    # -- whole set ---------------------------------------------------------------------------
    def kl(self, model, data, ctx):
        """``KL_i`` for every row of ``data`` (float64, >= 0)."""
        import torch

        from bdframe.scoring import batches, eval_mode, float64_copy

        out = []
        with eval_mode(model):
            # the float64 copy for the random start is made once per set, not per batch
            model64 = float64_copy(model) if self.config.grad_loss == "kl_random_start" else None
            for x, y, ids in batches(data, ctx, "adv-kl"):
                out.append(self.batch_kl(model, x, y, ids, ctx.seed, model64=model64).cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)

    def score(self, model, data, ctx):
        return -self.kl(model, data, ctx)


@hookimpl
def bdframe_register_scorers(registry):
    registry.add(AdvKL)

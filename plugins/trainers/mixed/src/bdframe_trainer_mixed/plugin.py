"""``mixed``: learn one set while unlearning another (see docs/training-stages.md, mixed).

The objective on a batch drawn from the union ``learn ∪ forget`` is

    mean_{learn rows} CE  -  lam * mean_{forget rows} CE

computed within the batch; a term is 0 when the batch holds no row of its subset
(``normalize = "subset"``, MeCa's objective). With ``normalize = "batch"`` both sums are
divided by the batch size instead, ``(sum_learn CE - lam * sum_forget CE) / B``, so every
forget row weighs ``lam`` times a learn row whatever the two subsets' sizes (with subset means
that ratio is ``lam * |learn| / |forget|``, which swings by 19x as MeCa's forget share grows
from 5% to 50%). With
``lam = 0`` this is standard cross-entropy on the learn set (the forget rows then only add
zero-gradient terms).

``forget_ceiling = b > 0`` bounds the ascent per sample: each forget row's CE enters as
``min(CE, b)``, so a row whose CE already exceeds ``b`` adds a constant and no gradient (with
``b >= ln C`` such a row is certainly misclassified, since ``p_y < 1/C``). Unbounded gradient
ascent otherwise keeps pushing rows that are already forgotten, which is how a large ``lam``
drives a model to a constant predictor. ``0`` (default) leaves the ascent unbounded, MeCa's
objective. MeCa's backdoor enhancement (Eq. 11) is this stage with ``lam = 0.05``;
D-ST uses ``lam = 0.001``.

``fit(model, learn, ctx, forget=forget)``: ``data`` is the learn set, ``forget`` the set to
unlearn (None or empty: plain CE on ``data``). A sample id may not be in both sets.
``label_smoothing`` applies to the learn term only; the forget term is plain CE.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import Trainer
from bdframe.training import OptimSettings


@attrs.frozen
class MixedConfig(OptimSettings):
    lam: float = attrs.field(default=0.05, validator=in_range(0, None),
                             metadata={"help": "weight of the unlearning term (lambda); MeCa: 0.05"})
    normalize: str = attrs.field(default="subset", validator=one_of("subset", "batch"), metadata={
        "help": "subset: mean CE per subset (MeCa's objective); batch: both sums divided by the batch size"})
    forget_ceiling: float = attrs.field(default=0.0, validator=in_range(0, None), metadata={
        "help": "cap on each forget row's CE (rows above it get no gradient); 0: unbounded ascent"})


def mixed_loss(logits, y, forget_mask, lam: float, label_smoothing: float = 0.0, normalize: str = "subset",
               forget_ceiling: float = 0.0):
    """``mean CE(learn rows) - lam * mean CE(forget rows)``; an empty subset contributes 0.
    ``normalize="batch"``: ``(sum CE(learn rows) - lam * sum CE(forget rows)) / batch size``.
    ``forget_ceiling > 0``: each forget row's CE is replaced by ``min(CE, forget_ceiling)``.

    ``forget_mask`` is a boolean tensor over the batch rows (True: the row is to be unlearned).
    Both terms stay connected to the graph, so ``backward()`` works for any mask.
    """
    import torch.nn.functional as F

    logits = logits.float()
    f = forget_mask.to(device=logits.device, dtype=logits.dtype)
    l = 1.0 - f
    ce_learn = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
    if normalize == "batch":
        n_learn = n_forget = float(max(len(y), 1))
    elif normalize == "subset":
        n_learn, n_forget = l.sum().clamp(min=1.0), f.sum().clamp(min=1.0)
    else:
        raise ValueError(f"normalize must be 'subset' or 'batch', got {normalize!r}")
    learn = (ce_learn * l).sum() / n_learn
    if lam == 0:
        return learn
    ce_forget = F.cross_entropy(logits, y, reduction="none") if label_smoothing else ce_learn
    if forget_ceiling > 0:
        ce_forget = ce_forget.clamp(max=forget_ceiling)
    forget = (ce_forget * f).sum() / n_forget
    return learn - lam * forget


class Mixed(Trainer):
    name = "mixed"
    Config = MixedConfig
    summary = "learn one set while unlearning another: mean CE(learn) - lambda * mean CE(forget)"
    inputs = ("labelled", "forget")

    def train(self, model, inputs, ctx):
        import torch

        from bdframe.data import ImageSet
        from bdframe.training import run_epochs

        c = self.config
        data, forget = inputs.labelled, inputs.forget
        if forget is not None and len(forget):
            union = ImageSet.concat(data, forget) if len(data) else forget
            forget_ids = forget.ids.clone()
        else:
            union = data
            forget_ids = torch.empty(0, dtype=torch.int64)

        def loss_fn(model, b):
            logits = model(b.x)
            mask = torch.isin(b.ids, forget_ids).to(b.x.device)
            return mixed_loss(logits, b.y, mask, c.lam, c.label_smoothing, c.normalize, c.forget_ceiling), logits

        return run_epochs(model, union, ctx, c, loss_fn)


@hookimpl
def bdframe_register_trainers(registry):
    registry.add(Mixed)

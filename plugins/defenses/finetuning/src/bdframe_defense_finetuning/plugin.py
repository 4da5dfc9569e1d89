"""``fine-tuning`` and ``fine-pruning``: repair a trained model with trusted clean data
(baselines from Liu, Dolan-Gavitt & Garg, "Fine-Pruning", RAID 2018).

Both start from the model a plain run trains (trained here by the recipe's ``[train]`` stage,
or loaded: ``model = "runs/x/model.pt"``) and need the recipe's ``[clean]`` data.

``fine-tuning`` trains every layer on the clean data with the ``standard`` stage: ``epochs``
(10) at ``lr`` (0.01), SGD with momentum 0.9, weight decay 5e-4, batch 128, cosine schedule.

``fine-pruning`` first prunes, then fine-tunes the same way:

1. the clean images go through the model (eval mode, no augmentation) and each channel of the
   penultimate feature (the last convolutional block's pooled output, which the classifier
   head reads) gets its mean activation;
2. channels are pruned in order of increasing mean activation, ``step`` (1%) of the channels at
   a time, for as long as the model's accuracy *on the clean data* stays above ``(1 -
   acc_drop)`` times its accuracy before pruning (``acc_drop`` 0.1, relative); the largest
   such pruning is kept. A pruned channel is cut from the head: its column of the head's weight
   is set to 0 and kept at 0 during fine-tuning, so the channel no longer reaches the output;
   nothing else changes. (Cutting the head's input columns is how BackdoorBench prunes.)
3. fine-tuning as above.

The test set is never used to choose anything: pruning stops by the clean data's accuracy.
Neither defense flags training samples.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl, steps
from bdframe.config import in_range, starting_model_field
from bdframe.errors import UserError
from bdframe.interfaces import Defense, DefenseResult


@attrs.frozen
class FineTuningConfig:
    model: str = starting_model_field()
    epochs: int = attrs.field(default=10, validator=in_range(0, None), metadata={
        "help": "epochs of fine-tuning on the clean data"})
    lr: float = attrs.field(default=0.01, validator=in_range(0, None, lo_open=True), metadata={
        "help": "peak learning rate of the fine-tuning (standard stage, cosine)"})
    batch_size: int = attrs.field(default=128, validator=in_range(1, None))


@attrs.frozen
class FinePruningConfig(FineTuningConfig):
    acc_drop: float = attrs.field(default=0.1, validator=in_range(0, 1, hi_open=True), metadata={
        "help": "prune while clean-data accuracy stays above (1 - acc_drop) x its value before pruning"})
    step: float = attrs.field(default=0.01, validator=in_range(0, 1, lo_open=True), metadata={
        "help": "share of the channels pruned per step"})
    max_rate: float = attrs.field(default=0.95, validator=in_range(0, 1, lo_open=True), metadata={
        "help": "never prune more than this share of the channels"})


def _fine_tune(ctx, name, model, clean, c):
    trainer = ctx.component("trainer", "standard", epochs=c.epochs, lr=c.lr, batch_size=c.batch_size,
                            momentum=0.9, weight_decay=5e-4, schedule="cosine")
    return steps.train(ctx, name, model, trainer, clean, lr_setting="[defense] lr")


class FineTuning(Defense):
    name = "fine-tuning"
    Config = FineTuningConfig
    clean_data = "required"
    summary = "FineTuning: train plainly, then fine-tune every layer on trusted clean data (needs [clean])"

    def run(self, data, ctx):
        """The model to repair, then fine-tuning on the clean data."""
        c = self.config
        clean = steps.clean_data(ctx, "fine-tuning")
        model, start = steps.starting_model(ctx, "ft-train", data, path=c.model)
        done = _fine_tune(ctx, "ft-tune", model, clean, c)
        summary = [steps.start_line("fine-tuning", c.model, start["eval"]),
                   f"fine-tuning: after {c.epochs} epochs on {len(clean)} clean images: {steps.figures(done['eval'])}"]
        metrics = {"clean_images": len(clean),
                   "trend": [{"step": "start", **start["eval"]}, {"step": "tuned", **done["eval"]}],
                   "stage_seconds": {"train": start["seconds"], "tune": done["seconds"]}}
        return DefenseResult(model=model, metrics=metrics, summary=summary)


def head_weight(model, features):
    """The name and tensor of the head's weight that reads the penultimate features: the one
    head parameter of shape (classes, feature size). Raises :class:`UserError` when the head has
    no such single weight (a head fine-pruning cannot cut)."""
    from bdframe.nn import head_parameter_names

    names = head_parameter_names(model, features)
    params = dict(model.named_parameters())
    k = model.head(features[:1]).shape[1]
    found = [n for n in names if params[n].dim() == 2 and tuple(params[n].shape) == (k, features.shape[1])]
    if len(found) != 1:
        raise UserError(f"fine-pruning: cannot find the head's weight of shape ({k}, {features.shape[1]}) "
                        f"among the head's parameters {names}; fine-pruning needs a linear head on the "
                        f"pooled features")
    return found[0], params[found[0]]


def clean_features(model, data, ctx):
    """Penultimate features of ``data`` (eval mode, no augmentation), on the model's device."""
    from bdframe.interfaces import ScoreContext
    from bdframe.scoring import features

    return features(model, data, ScoreContext(device=ctx.device, progress=False), "clean features").to(ctx.device)


def mean_activations(model, data, ctx):
    """Each penultimate channel's mean activation over ``data`` (eval mode, no augmentation)."""
    return clean_features(model, data, ctx).mean(0).cpu()


def prune(model, clean, ctx, c) -> dict:
    """Rank channels by mean clean activation and cut the lowest ones from the head while the
    clean-data accuracy holds; see the module text. Returns the pruned channels and figures.
    The backbone runs once: every step's accuracy is the head on the cached features."""
    import torch

    feats = clean_features(model, clean, ctx)
    acts = feats.mean(0).cpu()
    name, weight = head_weight(model, feats[:2])
    labels = clean.labels.to(ctx.device)

    def accuracy() -> float:
        with torch.no_grad():
            return float((model.head(feats).argmax(1) == labels).float().mean())

    order = torch.argsort(acts, stable=True)
    channels = len(acts)
    step = max(1, int(round(c.step * channels)))
    original = weight.detach().clone()
    was_training = model.training
    model.eval()
    base = accuracy()
    kept, kept_acc = 0, base
    curve = [{"pruned": 0, "clean_data_acc": base}]
    n = step
    while n <= int(c.max_rate * channels):
        with torch.no_grad():
            weight.copy_(original)
            weight[:, order[:n].to(weight.device)] = 0
        acc = accuracy()
        curve.append({"pruned": n, "clean_data_acc": acc})
        if acc < (1 - c.acc_drop) * base:
            break
        kept, kept_acc = n, acc
        n += step
    with torch.no_grad():
        weight.copy_(original)
        weight[:, order[:kept].to(weight.device)] = 0
    model.train(was_training)
    return {"weight": name, "channels": channels, "pruned": sorted(int(i) for i in order[:kept]),
            "clean_data_acc": {"before": base, "after": kept_acc}, "curve": curve}


class FinePruning(Defense):
    name = "fine-pruning"
    Config = FinePruningConfig
    clean_data = "required"
    summary = "FinePruning: prune the channels clean data leave dormant, then fine-tune on trusted clean data (needs [clean])"

    def run(self, data, ctx):
        """The model to repair, pruning by clean activations, fine-tuning with the cut kept."""
        import torch

        c = self.config
        clean = steps.clean_data(ctx, "fine-pruning")
        model, start = steps.starting_model(ctx, "fp-train", data, path=c.model)
        pruned = steps.run(ctx, "fp-prune", model, lambda: {"pruning": prune(model, clean, ctx, c)})["pruning"]
        weight = dict(model.named_parameters())[pruned["weight"]]
        cut = torch.tensor(pruned["pruned"], dtype=torch.int64, device=weight.device)

        def keep_cut(grad):
            grad = grad.clone()
            grad[:, cut] = 0
            return grad

        handle = weight.register_hook(keep_cut)  # the pruned columns stay 0 while fine-tuning
        try:
            done = _fine_tune(ctx, "fp-tune", model, clean, c)
        finally:
            handle.remove()
        n, total = len(pruned["pruned"]), pruned["channels"]
        acc = pruned["clean_data_acc"]
        summary = [steps.start_line("fine-pruning", c.model, start["eval"]),
                   f"fine-pruning: pruned {n} of {total} channels (clean-data accuracy {100 * acc['before']:.2f}% -> "
                   f"{100 * acc['after']:.2f}%)",
                   f"fine-pruning: after {c.epochs} epochs on {len(clean)} clean images: {steps.figures(done['eval'])}"]
        metrics = {"clean_images": len(clean), "pruning": pruned,
                   "trend": [{"step": "start", **start["eval"]}, {"step": "tuned", **done["eval"]}],
                   "stage_seconds": {"train": start["seconds"], "tune": done["seconds"]}}
        return DefenseResult(model=model, metrics=metrics, summary=summary)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(FineTuning)
    registry.add(FinePruning)

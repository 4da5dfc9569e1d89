"""``clp``: channel Lipschitzness pruning (Zheng et al., ECCV 2022), data-free.

A backdoor tends to live in a few channels that react very strongly to their input. For each
convolution followed directly by a BatchNorm (found by tracing the model's computation graph),
channel ``k``'s upper bound on its Lipschitz constant is

    UCLC_k = largest singular value of  W_k * |gamma_k / sqrt(running_var_k)|

with ``W_k`` the channel's kernel reshaped to (input channels, kernel height x width) and
``gamma_k`` its BatchNorm scale (BatchNorm's epsilon left out, as the reference code does).
Within each layer, channels with ``UCLC_k > mean + u * std`` (the layer's own statistics,
``u = 3``) are pruned: their BatchNorm scale and shift are set to 0, so the channel outputs 0
before the activation.

Pairs are taken from the data flow, not from the order modules are declared in, so in
pre-activation blocks (BatchNorm -> ReLU -> convolution) a BatchNorm that reads a residual sum
rather than a convolution is skipped, and each convolution is paired with the BatchNorm that
normalises its output. A model that cannot be traced, or has no convolution -> BatchNorm pair, is
refused with a message naming the model.

The defense trains the model plainly first (exactly the model the ``none`` defense trains with
the recipe: the model a user would otherwise deploy), prunes it and optionally fine-tunes it for ``repair_epochs`` on the
(untrusted) training data. It flags no samples.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl, steps
from bdframe.config import in_range, starting_model_field
from bdframe.errors import UserError
from bdframe.interfaces import Defense, DefenseResult


@attrs.frozen
class CLPConfig:
    model: str = starting_model_field("prune")
    u: float = attrs.field(default=3.0, validator=in_range(0, None), metadata={
        "help": "prune channels whose UCLC exceeds the layer's mean + u * std"})
    repair_epochs: int = attrs.field(default=0, validator=in_range(0, None), metadata={
        "help": "epochs of fine-tuning after pruning, on the training data (0: none)"})
    repair_lr: float = attrs.field(default=0.01, validator=in_range(0, None, lo_open=True), metadata={
        "help": "peak learning rate of the repair fine-tuning"})
    evaluate_each_epoch: bool = attrs.field(default=True, metadata={
        "help": "log clean ACC and ASR after every epoch (costs one pass over the test sets)"})


def conv_bn_pairs(model) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` for every BatchNorm2d whose input is the output of a
    Conv2d used nowhere else (possibly through max-pooling, which keeps each channel's
    Lipschitz bound), in the order of the traced graph. Raises ``ValueError`` when the model
    cannot be traced."""
    import torch.fx
    from torch import nn

    class Tracer(torch.fx.Tracer):
        # subclasses of Conv2d / BatchNorm2d (a model's own BatchNorm variant) are leaves too
        def is_leaf_module(self, m, qualname):
            return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)

    modules = dict(model.named_modules())
    try:
        graph = Tracer().trace(model)
    except Exception as e:  # fx raises many kinds for untraceable code
        raise ValueError(f"cannot trace the model's computation ({type(e).__name__}: {str(e).splitlines()[0]})")
    import torch.nn.functional as F

    def max_pool(n) -> bool:  # per channel and 1-Lipschitz: the bound passes through it
        return ((n.op == "call_function" and n.target in (F.max_pool2d, torch.max_pool2d))
                or (n.op == "call_module" and isinstance(modules.get(n.target), nn.MaxPool2d)))

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        while isinstance(src, torch.fx.Node) and max_pool(src) and len(src.users) == 1:
            src = src.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1):
            pairs.append((src.target, node.target))
    return pairs


def uclc(conv, bn):
    """Each output channel's upper bound on its Lipschitz constant (see the module text)."""
    import torch

    with torch.no_grad():
        w = conv.weight.detach().double()
        w = w.reshape(w.shape[0], w.shape[1], -1)
        scale = (bn.weight.detach().double() / bn.running_var.detach().double().sqrt()).abs()
        return torch.linalg.matrix_norm(w * scale[:, None, None], ord=2)


def prune(model, u: float) -> list[dict]:
    """Prune every Conv -> BatchNorm layer of ``model`` in place; returns per layer its names,
    channel count, the UCLC mean, std and threshold, and the pruned channels."""
    import torch

    modules = dict(model.named_modules())
    report = []
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = modules[conv_name], modules[bn_name]
        values = uclc(conv, bn)
        mean, std = float(values.mean()), float(values.std()) if values.numel() > 1 else 0.0
        threshold = mean + u * std
        pruned = torch.nonzero(values > threshold).flatten()
        with torch.no_grad():
            bn.weight[pruned] = 0.0
            bn.bias[pruned] = 0.0
        report.append({"conv": conv_name, "bn": bn_name, "channels": int(values.numel()), "uclc_mean": mean,
                       "uclc_std": std, "threshold": threshold, "pruned": pruned.tolist()})
    return report


class CLP(Defense):
    name = "clp"
    Config = CLPConfig
    summary = "CLP: prune the channels with an outlying Lipschitz upper bound (data-free)"

    def run(self, data, ctx):
        c = self.config
        repairer = ctx.component("trainer", epochs=c.repair_epochs, lr=c.repair_lr) if c.repair_epochs else None

        def analysable(model):
            try:
                pairs = conv_bn_pairs(model)
            except ValueError as e:
                raise UserError(f"$.model: clp cannot analyse this model: {e}") from None
            if not pairs:
                raise UserError("$.model: clp needs convolutions followed directly by BatchNorm; this model has none")

        trend, seconds = [], {}

        def record(name, done):
            trend.append({"step": name.removeprefix("clp-"), **done["eval"]})
            seconds[name.removeprefix("clp-")] = done["seconds"]
            return done

        def train(name, trainer, setting):
            return record(name, steps.train(ctx, name, model, trainer, data, lr_setting=setting,
                                            evaluate_each_epoch=c.evaluate_each_epoch))

        # the model the none defense trains with this recipe
        model, done = steps.starting_model(ctx, "clp-train", data, path=c.model, check=analysable,
                                           evaluate_each_epoch=c.evaluate_each_epoch)
        record("clp-train", done)
        pruned = record("clp-prune", steps.run(ctx, "clp-prune", model, lambda: {"layers": prune(model, c.u)}))["layers"]
        if repairer is not None:
            train("clp-repair", repairer, "[defense] repair_lr")

        total = sum(len(layer["pruned"]) for layer in pruned)
        channels = sum(layer["channels"] for layer in pruned)

        summary = [steps.start_line("clp", c.model, trend[0]),
                   f"clp: pruned {total} of {channels} channels in {len(pruned)} layers (u = {c.u:g}): {steps.figures(trend[1])}"]
        if repairer is not None:
            summary.append(f"clp: after {c.repair_epochs} epochs of repair: {steps.figures(trend[2])}")
        metrics = {"trend": trend, "pruned_channels": total, "channels": channels, "layers": pruned,
                   "stage_seconds": seconds}
        return DefenseResult(model=model, metrics=metrics, summary=summary)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(CLP)

"""Helpers for defenses built from steps: a step that changes a model, saved as a checkpoint
when it finishes (so ``bdframe run --resume`` loads it instead of redoing it), evaluated for
reporting and logged.

    done = steps.train(ctx, "abl-finetune", model, trainer, others, lr_setting="[train] lr")
    done = steps.run(ctx, "clp-prune", model, lambda: {"layers": prune(model, u)})
    summary.append(f"after fine-tuning: {steps.figures(done['eval'])}")
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional


def cpu_state(model) -> dict:
    """A detached CPU copy of ``model``'s state dict (what a checkpoint keeps)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def run(ctx, name: str, model, work: Callable[[], Optional[dict]], *, evaluate: bool = True) -> dict:
    """The step ``name``: unless its checkpoint holds the result, ``work()`` changes ``model``
    in place and may return extra figures to keep; then the model is evaluated on the test sets
    (reporting only; ``evaluate = False`` skips it and keeps ``"eval": None``) and the result
    saved. On resume the saved model is loaded into ``model``.
    Returns ``{"model", "eval", "seconds", **extra}``."""
    cp = ctx.checkpoint(name)
    done = cp.load()
    if done is not None:
        model.load_state_dict(done["model"])
        return done
    t0 = time.perf_counter()
    extra = work() or {}
    ev = ctx.evaluate(model) if evaluate else None
    if ev is not None:
        ctx.log({"stage": name, **ev})
    done = {"model": cpu_state(model), "eval": ev, "seconds": time.perf_counter() - t0, **extra}
    cp.save(done)
    return done


def train(ctx, name: str, model, trainer, data, *, lr_setting: str, evaluate_each_epoch: bool = False,
          forget: Any = None) -> dict:
    """:func:`run` with a training stage as the work: ``trainer.fit(model, data, ctx.stage(name),
    forget=forget)``; ``data`` may be a :class:`~bdframe.interfaces.StageData`. The result keeps
    the stage's per-epoch history as ``"history"``."""
    def work():
        stage = ctx.stage(name, evaluate_each_epoch=evaluate_each_epoch, lr_setting=lr_setting)
        return {"history": trainer.fit(model, data, stage, forget=forget)}

    return run(ctx, name, model, work)


def starting_model(ctx, name: str, data, *, path: str = "", evaluate_each_epoch: bool = False,
                   field: str = "$.defense.model", check: Optional[Callable[[Any], None]] = None):
    """The model a defense that repairs a trained model starts from: the weights saved by an
    earlier run (``path``, a ``model.pt``; it must fit the recipe's ``[model]``, else a
    :class:`~bdframe.errors.UserError` naming ``field``), or a fresh model trained on ``data``
    with the recipe's ``[train]`` stage as the step ``name``. Returns ``(model, done)``, ``done``
    holding ``"eval"`` and ``"seconds"`` as :func:`run` does.

    The trained model is exactly the one the ``none`` defense trains with the same recipe (the
    same initialisation, the stage named ``"train"`` and so the same data order and
    augmentation), so a repair defense starts from the model a plain run gives, whether it
    trains it or loads that run's ``model.pt``; call it before the defense's other steps create
    models. ``check(model)``, if given, runs on the fresh model before any training (a defense
    that cannot work with the recipe's model raises there, before the training is spent)."""
    model = ctx.new_model()
    if check is not None:
        check(model)
    if not path:
        def work():
            stage = ctx.stage("train", evaluate_each_epoch=evaluate_each_epoch, lr_setting="[train] lr")
            return {"history": ctx.component("trainer").fit(model, data, stage)}

        return model, run(ctx, name, model, work)
    load_saved(model, path, field)
    return model, {"eval": ctx.evaluate(model), "seconds": 0.0}


def load_saved(model, path: str, field: str) -> dict:
    """Load the weights saved at ``path`` (a run's ``model.pt``) into ``model`` and return them
    (CPU tensors). A missing file, or one that does not fit the recipe's ``[model]``, is a
    :class:`~bdframe.errors.UserError` naming the recipe ``field`` that gave the path."""
    from pathlib import Path

    import torch

    from bdframe.errors import UserError

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{field}: {str(p)!r} does not exist")
    state = torch.load(p, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{field}: {str(p)!r} does not fit the recipe's [model]: {str(e).splitlines()[0]}") from None
    return state


def plateaued(fits, rounds: int, share: float, least_fall: float = 0.0) -> bool:
    """The stopping rule of :func:`repair`: ``fits`` are the model's accuracies on the
    suspected-poisoned set after round 0 (the model it repairs), 1, ..., r. Unlearning first
    removes what only the poison taught (those samples fall to another class), while the split's
    clean samples stay fitted through relearning, so the accuracy falls and then levels off. The
    rule: with ``low`` the lowest accuracy so far, ``low`` moved by less than ``share`` of
    ``fits[0] - low`` over the last ``rounds`` rounds. Never before ``rounds`` rounds, never
    while the accuracy has not fallen at all, or by less than ``least_fall`` (a dip of a few
    points in the first rounds, within the measurement's noise on a few hundred samples, is not
    yet the fall the repair is after); a rise counts as no fall."""
    if rounds < 1 or len(fits) <= rounds:
        return False
    low, low_before = min(fits), min(fits[:-rounds])
    fall = fits[0] - low
    return fall > 0 and fall >= least_fall and low_before - low < share * fall


#: the registry's training stages :func:`repair` uses (a defense checks them before it trains)
REPAIR_STAGES = ("unlearning", "relearn")


def repair(ctx, prefix: str, model, forget, learn, *, start: dict, lr: float, rounds: int, batch_size: int = 128,
           lr_setting: str, plateau_rounds: int = 0, plateau_share: float = 0.05, plateau_fall: float = 0.0,
           evaluate_each_round: bool = False) -> dict:
    """Backdoor removal by alternating passes, in place on ``model``: ``rounds`` times, one pass of
    gradient ascent on ``forget`` (the suspected-poisoned samples; skipped when empty) and one
    pass of cross-entropy on ``learn`` (the suspected-clean ones), SGD at the fixed ``lr``
    (momentum 0.9, weight decay 5e-4), the ``unlearning`` and ``relearn`` stages of the registry.
    Each round is a step ``{prefix}-round-NN`` (a checkpoint: a resumed run goes on from the last
    finished round). With ``plateau_rounds`` the repair ends once the model's accuracy on
    ``forget`` (its given labels, no augmentation) has levelled off (:func:`plateaued`), a rule
    that reads the training data only. ``start`` is the evaluation of the model before the first
    round. The last round's model is the result: nothing is selected on the test set.

    Returns ``{"trend", "rounds", "stopped", "seconds", "fit_seconds"}``: ``trend`` starts with
    round 0 (``start``) and holds every evaluated round (all of them with
    ``evaluate_each_round``, else the last), each with ``fit_poisoned`` and ``fit_clean`` (the
    accuracies on ``forget`` and ``learn``, None when nothing watches them); ``stopped`` is True
    when the plateau rule ended the repair before ``rounds``."""
    from bdframe.metrics import accuracy

    optim = dict(epochs=1, lr=lr, momentum=0.9, weight_decay=5e-4, schedule="constant", batch_size=batch_size)
    unlearn = ctx.component("trainer", "unlearning", objective="ascent", **optim)
    relearn = ctx.component("trainer", "relearn", **optim)
    watch = plateau_rounds > 0 or evaluate_each_round

    def fit() -> dict:
        """The model's accuracy on both sets (training data alone; None where a set is empty or
        nobody asked: two forward passes per round), and the seconds it took."""
        t0 = time.perf_counter()
        out = {f"fit_{k}": accuracy(model, d, device=ctx.device) if watch and len(d) else None
               for k, d in (("poisoned", forget), ("clean", learn))}
        return {**out, "fit_seconds": time.perf_counter() - t0}

    first = fit()
    trend = [{"round": 0, **start, "fit_poisoned": first["fit_poisoned"], "fit_clean": first["fit_clean"]}]
    fits = [trend[0]["fit_poisoned"]]
    t_repair, t_fit = 0.0, first["fit_seconds"]
    for r in range(1, rounds + 1):
        def work(r=r):
            if len(forget):
                unlearn.fit(model, forget, ctx.stage(f"{prefix}-round-{r:02d}-unlearn", lr_setting=lr_setting))
            relearn.fit(model, learn, ctx.stage(f"{prefix}-round-{r:02d}-relearn", lr_setting=lr_setting))
            return fit()

        # whether this round is the last is only known after it (plateau_rounds), so a round
        # that stops is evaluated after its step
        done = run(ctx, f"{prefix}-round-{r:02d}", model, work, evaluate=evaluate_each_round)
        t_repair += done["seconds"]
        t_fit += done.get("fit_seconds", 0.0)
        ev = done["eval"]
        fits.append(done.get("fit_poisoned"))
        last = r == rounds or (plateau_rounds > 0 and None not in fits
                               and plateaued(fits, plateau_rounds, plateau_share, plateau_fall))
        if last and ev is None:
            ev = ctx.evaluate(model)
            ctx.log({"stage": f"{prefix}-round-{r:02d}", **ev})
        if watch:
            ctx.log({"stage": f"{prefix}-round-{r:02d}-fit", "fit_poisoned": fits[-1],
                     "fit_clean": done.get("fit_clean")})
        if ev is not None:
            trend.append({"round": r, **ev, "fit_poisoned": fits[-1], "fit_clean": done.get("fit_clean")})
        if last:
            break
    final = trend[-1]
    return {"trend": trend, "rounds": final["round"], "stopped": final["round"] < rounds,
            "seconds": t_repair, "fit_seconds": t_fit}


def unlearning_trainer(ctx, lam: float, below: float, who: str, field: str):
    """The ``mixed`` stage that trains a fresh model on a kept set while unlearning a flagged
    one (its ``forget`` input), with the recipe's ``[train]`` stage's optimisation settings: each
    flagged sample weighs ``lam`` times a kept one and its ascent is capped at ``-ln(below)``.
    The recipe's stage must be one with the standard optimisation settings and no setting the
    ``mixed`` stage lacks; otherwise a ``ValueError`` naming the defense ``who`` and its option
    ``field`` that asked for the unlearning."""
    import math

    import attrs

    settings, own = train_settings(ctx, who, field)
    extra = [f.name for f in attrs.fields(type(own)) if f.name not in settings and getattr(own, f.name) != f.default]
    if extra:
        raise ValueError(f"{who}: {field} trains with the mixed stage, which has no [train] "
                         f"{', '.join(extra)}; leave {'it' if len(extra) == 1 else 'them'} at the default "
                         f"or set {field} = 0")
    return ctx.component("trainer", "mixed", **settings, lam=lam, normalize="batch", forget_ceiling=-math.log(below))


def train_settings(ctx, who: str, field: str) -> tuple[dict, Any]:
    """The recipe's ``[train]`` stage's shared optimisation settings (every
    :class:`~bdframe.training.OptimSettings` field, by name) and its whole config. A stage without
    them is a ``ValueError`` naming the defense ``who`` and its option ``field`` that needs them."""
    import attrs

    from bdframe.training import OptimSettings

    trainer = ctx.component("trainer")
    own = trainer.config
    if not isinstance(own, OptimSettings):
        raise ValueError(f"{who}: {field} needs a [train] stage with the standard optimisation settings; "
                         f"the recipe's {trainer.name!r} stage has none")
    return {f.name: getattr(own, f.name) for f in attrs.fields(OptimSettings)}, own


#: what a fine-tuning stage sets itself rather than taking from the [train] stage
FINE_TUNING_OWN = ("epochs", "lr", "schedule", "milestones", "gamma", "warmup_epochs")


def fine_tuning_settings(ctx, who: str, field: str, *, amp: str) -> dict:
    """The settings under which a fine-tuning stage continues a model the recipe's ``[train]``
    stage trained: that stage's batch size, optimiser, momentum, weight decay, label smoothing,
    look-ahead and augmentation (:func:`train_settings`), at precision ``amp``; the epochs,
    learning rate and schedule (:data:`FINE_TUNING_OWN`) are left to the caller. Settings of
    the ``[train]`` stage beyond the shared ones (e.g. CutMix) are not carried over."""
    settings, _ = train_settings(ctx, who, field)
    return {k: v for k, v in settings.items() if k not in FINE_TUNING_OWN} | {"amp": amp}


def clean_data(ctx, defense: str):
    """The recipe's trusted clean data (``ctx.clean``) for a defense that needs it; a
    ``ValueError`` naming the defense when there is none (validation refuses such recipes, so
    this guards calls from outside ``bdframe run``)."""
    if ctx.clean is None or len(ctx.clean) == 0:
        raise ValueError(f"{defense} needs trusted clean data (the recipe's [clean] section)")
    return ctx.clean


def start_line(defense: str, path: str, ev: dict) -> str:
    """The summary line of a repair defense's starting model (:func:`starting_model`)."""
    return f"{defense}: the model to repair ({'loaded from ' + path if path else 'trained here'}): {figures(ev)}"


def figures(ev: dict) -> str:
    """``"ACC 76.10%, ASR 1.20%"`` (ASR left out without an attack)."""
    line = f"ACC {100 * ev['clean_acc']:.2f}%"
    return line + (f", ASR {100 * ev['asr']:.2f}%" if ev.get("asr") is not None else "")

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
    from pathlib import Path

    import torch

    from bdframe.errors import UserError

    model = ctx.new_model()
    if check is not None:
        check(model)
    if not path:
        def work():
            stage = ctx.stage("train", evaluate_each_epoch=evaluate_each_epoch, lr_setting="[train] lr")
            return {"history": ctx.component("trainer").fit(model, data, stage)}

        return model, run(ctx, name, model, work)
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{field}: {str(p)!r} does not exist")
    state = torch.load(p, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{field}: {str(p)!r} does not fit the recipe's [model]: {str(e).splitlines()[0]}") from None
    return model, {"eval": ctx.evaluate(model), "seconds": 0.0}


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

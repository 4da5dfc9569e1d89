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


def run(ctx, name: str, model, work: Callable[[], Optional[dict]]) -> dict:
    """The step ``name``: unless its checkpoint holds the result, ``work()`` changes ``model``
    in place and may return extra figures to keep; then the model is evaluated on the test sets
    (reporting only) and the result saved. On resume the saved model is loaded into ``model``.
    Returns ``{"model", "eval", "seconds", **extra}``."""
    cp = ctx.checkpoint(name)
    done = cp.load()
    if done is not None:
        model.load_state_dict(done["model"])
        return done
    t0 = time.perf_counter()
    extra = work() or {}
    ev = ctx.evaluate(model)
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


def figures(ev: dict) -> str:
    """``"ACC 76.10%, ASR 1.20%"`` (ASR left out without an attack)."""
    line = f"ACC {100 * ev['clean_acc']:.2f}%"
    return line + (f", ASR {100 * ev['asr']:.2f}%" if ev.get("asr") is not None else "")

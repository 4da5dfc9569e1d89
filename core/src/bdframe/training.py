"""Shared machinery for training stages: optimiser settings, schedules, and a resumable
epoch loop with progress, timing and per-epoch history.

Trainer plugins (standard, unlearning, mixed, relearning, contrastive, MixMatch, ...) differ in
the loss they compute on a :class:`Batch` (passed as ``loss_fn`` to :func:`run_epochs`), in the
augmentation and streams they ask for, and in which parameters they train.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import attrs
import torch

from bdframe.config import in_range, increasing, one_of
from bdframe.data import Augment, Batches, ImageSet
from bdframe.errors import DivergedError
from bdframe.interfaces import StageContext
from bdframe.progress import Progress
from bdframe.runs import save_atomic
from bdframe.seeding import generator


@attrs.frozen
class OptimSettings:
    """Optimiser, schedule and augmentation fields shared by every training stage."""

    epochs: int = attrs.field(default=30, validator=in_range(0, None))
    batch_size: int = attrs.field(default=128, validator=in_range(1, None))
    optimizer: str = attrs.field(default="sgd", validator=one_of("sgd", "adam", "adamw"))
    lr: float = attrs.field(default=0.1, validator=in_range(0, None, lo_open=True))
    momentum: float = attrs.field(default=0.9, validator=in_range(0, 1, hi_open=True))
    nesterov: bool = False
    weight_decay: float = attrs.field(default=5e-4, validator=in_range(0, None))
    schedule: str = attrs.field(default="cosine",
                                validator=one_of("cosine", "multistep", "linear", "onecycle", "constant"))
    milestones: tuple[int, ...] = attrs.field(default=(), validator=increasing)
    gamma: float = attrs.field(default=0.1, validator=in_range(0, 1, lo_open=True))
    warmup_epochs: float = attrs.field(default=0.0, validator=in_range(0, None))
    label_smoothing: float = attrs.field(default=0.0, validator=in_range(0, 1, hi_open=True))
    lookahead: float = attrs.field(default=0.0, validator=in_range(0, 1))
    lookahead_steps: int = attrs.field(default=5, validator=in_range(1, None))
    amp: str = attrs.field(default="auto", validator=one_of("auto", "on", "off"))
    crop_padding: int = attrs.field(default=4, validator=in_range(0, None))
    flip: bool = True

    def check(self):
        if self.milestones and self.epochs and max(self.milestones) > self.epochs:
            return [("milestones", f"must be <= epochs ({self.epochs}), got {list(self.milestones)}")]
        return []


def param_groups(model: torch.nn.Module, s: OptimSettings) -> list[dict]:
    """The model's trainable parameters grouped by learning-rate multiplier.

    A module may declare ``lr_scale = {"bias": 64.0}`` (its own parameter names): under SGD
    those parameters train at that multiple of the stage's lr, with their weight decay divided
    by it so the per-step decay stays the stage's. The multiplier makes up for a parameter
    whose gradient is small for its role, which SGD's step inherits; Adam and AdamW divide every
    step by the gradient's running scale, so their step is about ``lr`` for every parameter
    whatever its gradient, and a multiplier would only make that parameter's steps larger:
    under them every parameter trains at the stage's lr. Every group carries its ``lr_scale``."""
    adaptive = s.optimizer in ("adam", "adamw")
    scales: dict[float, list] = {}
    for module in model.modules():
        own = {} if adaptive else (getattr(module, "lr_scale", None) or {})
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                scales.setdefault(float(own.get(pname, 1.0)), []).append(p)
    return [{"params": ps, "lr_scale": k, "weight_decay": s.weight_decay / k} for k, ps in sorted(scales.items())]


def make_optimizer(params, s: OptimSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov and s.momentum > 0,
                               weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def lr_factor(s: OptimSettings, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at a global step (a pure function, so resume is exact)."""
    total = max(s.epochs * steps_per_epoch, 1)
    warm = int(round(s.warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    if s.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    if s.schedule == "linear":
        return max(1.0 - t, 0.0)
    if s.schedule == "onecycle":  # linear up over the first 25%, then linearly down to 0
        u = step / total
        return u / 0.25 if u < 0.25 else max((1.0 - u) / 0.75, 0.0)
    if s.schedule == "multistep":
        epoch = step // steps_per_epoch
        return s.gamma ** sum(1 for m in s.milestones if epoch >= m)
    return 1.0


class Lookahead:
    """Lookahead (Zhang et al., 2019) around any optimiser: every ``k`` steps the slow copy of
    the model's state moves the share ``alpha`` of the way to the fast (trained) weights, and
    the fast weights restart from it. Floating-point buffers (BatchNorm statistics) are
    averaged the same way. ``alpha = 1`` is plain training."""

    def __init__(self, model: torch.nn.Module, alpha: float, k: int):
        self.model, self.alpha, self.k = model, alpha, k
        self.slow = {n: t.detach().clone() for n, t in model.state_dict().items() if t.is_floating_point()}

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Call after optimiser step number ``step`` (0-based, global)."""
        if (step + 1) % self.k == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """Move the slow state towards the fast one and restart the fast one from it (also
        called once after the last step, so the trained model is the slow one)."""
        fast = self.model.state_dict()
        for n, slow in self.slow.items():
            slow.lerp_(fast[n], self.alpha)
            fast[n].copy_(slow)

    def state_dict(self) -> dict:
        return self.slow

    def load_state_dict(self, state: dict) -> None:
        for n, t in state.items():
            self.slow[n].copy_(t)


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere bfloat16
    autocast on the CPU is emulated and many times slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def emulated_bf16_warning(amps: dict[str, str], device: torch.device) -> str | None:
    """One warning line when a setting asks for bfloat16 autocast on the CPU (``amp = "on"``)
    and this CPU only emulates bfloat16, else None. ``amps``: ``{setting name: amp value}``.

    Emulated bfloat16 is many times slower than float32 (the fast recipe's training measured
    about 55 images/s on an AVX2 CPU, against a few thousand in float32), so a run that asks for
    it on such a CPU should say so before it starts rather than look stalled."""
    on = [name for name, amp in amps.items() if amp == "on"]
    if device.type != "cpu" or not on or cpu_bf16_supported():
        return None
    return (f"warning: {', '.join(on)} = \"on\" asks for bfloat16 autocast, which this CPU does not "
            f"compute natively (no AVX512-BF16 or AMX): it is emulated and many times slower than "
            f"float32; set it to \"auto\" or \"off\" on this machine")


def amp_dtype(s: OptimSettings | str, device: torch.device):
    """The autocast dtype of a stage (its settings, or an ``amp`` value), or None for float32.

    ``auto``: bfloat16 (or float16 where bfloat16 is missing) on CUDA, float32 elsewhere.
    ``on``: the same on CUDA, bfloat16 on the CPU (fast only where :func:`cpu_bf16_supported`).
    ``off``: float32.
    """
    amp = s if isinstance(s, str) else s.amp
    if amp == "off" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cpu":
        return torch.bfloat16 if amp == "on" else None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


DATA_INIT_IMAGES = 5000


class _Initialised(Exception):
    pass


def init_from_data(model: torch.nn.Module, data: ImageSet, device: torch.device,
                   n: int = DATA_INIT_IMAGES) -> list[str]:
    """Data-dependent initialisation: each module that defines ``init_from_input(x)`` and whose
    ``initialised`` flag is false receives, once, the input it sees when the first ``n`` images
    of ``data`` (in the set's order, no augmentation) go through ``model`` in eval mode. The
    forward pass stops at that module, so nothing after it runs. Returns the modules' names.
    Deterministic: the same data give the same initialisation whatever the seed."""
    todo = [(name, m) for name, m in model.named_modules()
            if callable(getattr(m, "init_from_input", None)) and not bool(getattr(m, "initialised", True))]
    if not todo or len(data) == 0:
        return []
    x = data.images[:n].to(device=device, dtype=torch.float32) / 255.0
    was_training = model.training
    model.eval()
    try:
        for name, m in todo:
            def hook(module, args):
                module.init_from_input(args[0])
                raise _Initialised

            handle = m.register_forward_pre_hook(hook)
            try:
                with torch.no_grad():
                    model(x)
            except _Initialised:
                pass
            finally:
                handle.remove()
    finally:
        model.train(was_training)
    return [name for name, _ in todo]


@attrs.frozen
class Batch:
    """One training step's input, as a stage's loss function receives it.

    ``x, y, ids``: the batch of the stage's main stream (augmented as the stage asked);
    ``u_x, u_ids``: the batch of its companion stream (an unlabelled set, not augmented), or
    None; ``epoch`` (0-based) and ``step`` (global, 0-based); ``generator``: a generator seeded
    from the run seed, the stage name and the step, for the stage's own random draws (views,
    mixing weights), so that a resumed stage draws exactly what an uninterrupted one would.
    """

    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor
    epoch: int
    step: int
    generator: torch.Generator
    u_x: Optional[torch.Tensor] = None
    u_ids: Optional[torch.Tensor] = None


#: ``loss_fn(model, batch) -> (loss, logits)``; ``logits`` (or None) give the train accuracy on ``batch.y``
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, Optional[torch.Tensor]]]
#: ``split(model, epoch) -> (main, companion, figures)``: the streams of one epoch
SplitFn = Callable[[torch.nn.Module, int], tuple[ImageSet, Optional[ImageSet], dict]]

_SETTINGS = "settings"


class _Cycle:
    """Endless batches of a companion stream: a fresh shuffle (from the epoch's generator) each
    time the set is used up, so a small unlabelled set wraps around a long labelled one."""

    def __init__(self, data: ImageSet, batch_size: int, device: torch.device, g: torch.Generator):
        self.data, self.batch_size, self.g = data, batch_size, g
        self.images = data.images.to(device)
        self.order = torch.empty(0, dtype=torch.int64)
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        need = min(self.batch_size, len(self.data))
        while need > 0:
            if self.pos >= len(self.order):
                self.order, self.pos = torch.randperm(len(self.data), generator=self.g), 0
            take = self.order[self.pos:self.pos + need]
            self.pos += len(take)
            need -= len(take)
            parts.append(take)
        idx = torch.cat(parts)
        x = self.images[idx.to(self.images.device)].float().div_(255.0)
        ids = self.data.ids[idx]
        if self.data.transform is not None:
            x = self.data.transform(x, ids, self.g)
        return x, ids


def run_epochs(model: torch.nn.Module, data: ImageSet, ctx: StageContext, s: OptimSettings,
               loss_fn: LossFn, *, desc: Optional[str] = None, augment=_SETTINGS,
               companion: Optional[ImageSet] = None, modules: Optional[dict] = None,
               split: Optional[SplitFn] = None, stop: Optional[Callable[[dict], bool]] = None) -> list[dict]:
    """Train ``model`` for ``s.epochs`` epochs; an epoch is one pass over the main stream ``data``.

    ``loss_fn(model, batch) -> (loss, logits)``: the stage's objective on one :class:`Batch`.
    ``augment``: what is applied to the main stream's images: by default the settings' crop
    and flip; None for nothing (a stage that draws its own views); or any
    ``(x, generator) -> x``. ``companion``: a second stream (e.g. unlabelled data) of which each
    step gets a batch of the same size (``batch.u_x``), reshuffled whenever it is used up.
    ``modules``: extra modules trained with the model and kept in its resumable state (a
    projection head), by name. ``split(model, epoch)``: called before every epoch to choose
    that epoch's ``(main, companion)`` streams from the current model, returning figures for
    the epoch's history record too (a stage that re-splits its data each epoch).
    ``stop(record)``: called with each epoch's history record (it may add figures to it); True
    ends the stage after that epoch, before ``s.epochs``. The record then holds
    ``"stopped": True``, and a resumed stage whose last saved epoch stopped trains no further.

    The optimiser trains every parameter of ``model`` and ``modules`` that requires a gradient.
    Saves resumable state to ``ctx.state_path`` after each epoch and resumes from it; replays
    past epochs' history to ``ctx.on_epoch`` on resume. Each history record holds loss,
    train accuracy, lr, images/s and the share of time spent outside forward+backward+step.
    """
    device = torch.device(ctx.device)
    model.to(device)
    modules = dict(modules or {})
    for m in modules.values():
        m.to(device)
    if (len(data) == 0 and split is None) or s.epochs == 0:
        return []
    groups = param_groups(model, s)
    for m in modules.values():
        groups += param_groups(m, s)
    optimizer = make_optimizer(groups, s)
    dtype = amp_dtype(s, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    history: list[dict] = []
    lookahead = None
    start_epoch = 0
    state_path = Path(ctx.state_path) if ctx.state_path else None
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        for name, m in modules.items():
            m.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        if s.lookahead and state.get("lookahead") is not None:
            lookahead = Lookahead(model, s.lookahead, s.lookahead_steps)
            lookahead.load_state_dict(state["lookahead"])
        if ctx.on_epoch:
            for rec in history:
                ctx.on_epoch(dict(rec, replayed=True))
    else:
        init_from_data(model, data, device)
    if s.lookahead and lookahead is None:
        lookahead = Lookahead(model, s.lookahead, s.lookahead_steps)
    if augment is _SETTINGS:
        augment = Augment(s.crop_padding, s.flip) if (s.crop_padding or s.flip) else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    last_epoch = start_epoch if history and history[-1].get("stopped") else s.epochs
    # the schedule's length in steps is fixed by the first epoch's stream (a split may change sizes)
    batches_per_epoch = -(-len(data) // s.batch_size) if len(data) else 1
    step = start_epoch * batches_per_epoch
    for epoch in range(start_epoch, last_epoch):
        figures: dict = {}
        main, extra = data, companion
        if split is not None:
            main, extra, figures = split(model, epoch)
        model.train()
        for m in modules.values():
            m.train()
        g = generator(ctx.seed, ctx.name, "epoch", epoch)
        loader = Batches(main, s.batch_size, device=device, shuffle=True, generator=g, augment=augment)
        cycle = _Cycle(extra, s.batch_size, device, g) if extra is not None and len(extra) else None
        t_epoch = time.perf_counter()
        compute = 0.0
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        label = desc or ctx.name
        with Progress(len(main), f"{label} epoch {epoch + 1}/{s.epochs}", unit="img",
                      enabled=None if ctx.progress else False) as bar:
            for i, (x, y, ids) in enumerate(loader):
                step = epoch * batches_per_epoch + i
                for group in optimizer.param_groups:
                    group["lr"] = s.lr * group["lr_scale"] * lr_factor(s, step, batches_per_epoch)
                u_x = u_ids = None
                if cycle is not None:
                    u_x, u_ids = cycle.next()
                batch = Batch(x, y, ids, epoch, step, generator(ctx.seed, ctx.name, "step", step), u_x, u_ids)
                sync()
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss, logits = loss_fn(model, batch)
                # on the CPU every step is checked; on a GPU every 20th (a check waits for the GPU)
                if (device.type == "cpu" or i % 20 == 0) and not bool(torch.isfinite(loss.detach())):
                    raise _diverged(ctx, s, f"the loss became {float(loss.detach())}", epoch, i)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                if lookahead is not None:
                    lookahead.step(step)
                sync()
                compute += time.perf_counter() - t0
                loss_sum += loss.detach() * len(y)
                if logits is not None:
                    correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if i % 20 == 0:
                    bar.update(len(y), loss=float(loss.detach()))
                else:
                    bar.update(len(y))
        wall = time.perf_counter() - t_epoch
        if not math.isfinite(float(loss_sum)):
            raise _diverged(ctx, s, f"the loss became {float(loss_sum)}", epoch, None)
        named = list(model.named_parameters()) + [(f"{k}.{n}", p) for k, m in modules.items()
                                                  for n, p in m.named_parameters()]
        bad = next((n for n, p in named if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise _diverged(ctx, s, f"weight {bad!r} became non-finite", epoch, None)
        rec = {"stage": ctx.name, "epoch": epoch + 1, "loss": float(loss_sum) / max(seen, 1),
               "train_acc": float(correct) / max(seen, 1), "lr": s.lr * lr_factor(s, step, batches_per_epoch),
               "images": seen, "seconds": wall, "images_per_s": seen / wall if wall > 0 else 0.0,
               "compute_seconds": compute, "non_compute_share": max(0.0, 1.0 - compute / wall) if wall > 0 else 0.0,
               **figures}
        stopped = bool(stop(rec)) if stop is not None else False
        if stopped:
            rec["stopped"] = True
        if ctx.evaluate is not None:
            rec.update(ctx.evaluate(model))
            model.train()
        history.append(rec)
        if state_path is not None:
            save_atomic({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "modules": {k: m.state_dict() for k, m in modules.items()},
                          "scaler": scaler.state_dict() if scaler is not None else None, "history": history,
                          "lookahead": lookahead.state_dict() if lookahead is not None else None},
                         state_path)
        if ctx.on_epoch:
            ctx.on_epoch(rec)
        if stopped:
            break
    if lookahead is not None:
        lookahead.sync()
    model.eval()
    for m in modules.values():
        m.eval()
    return history


def _diverged(ctx: StageContext, s: OptimSettings, what: str, epoch: int, step: Optional[int]) -> DivergedError:
    where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
    setting = ctx.lr_setting or "the stage's lr"
    return DivergedError(f"training stage {ctx.name!r} diverged: {what} in {where} (lr {s.lr:g}); "
                         f"lower {setting} (or add warmup_epochs) and run again")


def class_weights(labels, num_classes: int) -> torch.Tensor:
    """Per-class loss weights that make every class present in ``labels`` weigh the same:
    ``n / (K * n_c)``, with ``n`` the number of labels, ``K`` the number of classes present and
    ``n_c`` the count of class ``c`` (0 for a class absent from ``labels``). On a balanced set
    every weight is 1; the weighted mean of the per-sample weights is always 1."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.int64).cpu(), minlength=num_classes).double()
    if len(counts) > num_classes:
        raise ValueError(f"a label ({len(counts) - 1}) is outside the model's {num_classes} classes")
    present = counts > 0
    w = torch.zeros(num_classes, dtype=torch.float64)
    w[present] = counts.sum() / (int(present.sum()) * counts[present])
    return w.float()


def fit_cross_entropy(model: torch.nn.Module, data: ImageSet, ctx: StageContext, s: OptimSettings, *,
                      class_balance: bool = False) -> list[dict]:
    """Plain (label-smoothed) cross-entropy training: the loss of the standard and relearn stages.
    ``class_balance``: each sample's loss is weighted by :func:`class_weights` over ``data``'s
    labels (a batch's loss is the weighted mean), so a class with few samples in ``data`` is not
    learned as a rarer class than the others."""
    import torch.nn.functional as F

    weight = None  # the class weights, computed at the first batch (the model's output size and device)

    def loss_fn(model, b):
        nonlocal weight
        logits = model(b.x)
        if class_balance and weight is None:
            weight = class_weights(data.labels, logits.shape[1]).to(logits.device)
        return F.cross_entropy(logits, b.y, weight=weight, label_smoothing=s.label_smoothing), logits

    return run_epochs(model, data, ctx, s, loss_fn)

"""Execute a recipe: dataset -> attack -> defense -> metrics, written to a run directory."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import bdframe
from bdframe.data import ImageSet
from bdframe.errors import UserError
from bdframe.interfaces import DefenseContext, StageContext
from bdframe.metrics import accuracy, detection
from bdframe.nn import Classifier, resolve_device
from bdframe.recipe import Recipe
from bdframe.registry import Registry
from bdframe.runs import RunDir, write_json_atomic, write_text_atomic
from bdframe.seeding import derive_seed, seed_everything


class RunContext(DefenseContext):
    """The :class:`~bdframe.interfaces.DefenseContext` the runner hands to a defense."""

    def __init__(self, registry: Registry, recipe: Recipe, info, device: torch.device,
                 run_dir: Optional[Path], test: ImageSet, asr_set: Optional[ImageSet], progress: bool = True):
        self.registry = registry
        self.recipe = recipe
        self.seed = recipe.seed
        self.info = info
        self.device = device
        self.run_dir = run_dir
        self.progress = progress
        self._test = test
        self._asr_set = asr_set
        self.history: list[dict] = []
        self._models_built = 0

    def new_model(self) -> Classifier:
        """A freshly initialised model (initialisation seeded by the run seed and a counter)."""
        spec = self.recipe.model
        seed_everything(derive_seed(self.seed, "model-init", self._models_built))
        self._models_built += 1
        net = self.registry.get("model", spec.name)(spec.config).build(self.info)
        return Classifier(net, self.info.mean, self.info.std).to(self.device)

    @property
    def trainer(self):
        spec = self.recipe.train
        return self.registry.get("trainer", spec.name)(spec.config)

    def component(self, kind: str, name: str, **params):
        return self.registry.create(kind, name, **params)

    def stage(self, name: str, *, evaluate_each_epoch: bool = False) -> StageContext:
        state = self.run_dir / "state" / f"{name}.pt" if self.run_dir else None
        return StageContext(seed=derive_seed(self.seed, "stage", name), device=self.device, name=name,
                            progress=self.progress, state_path=state, on_epoch=self.log,
                            evaluate=self.evaluate if evaluate_each_epoch else None)

    def evaluate(self, model) -> dict:
        """Clean accuracy and ASR on the held-out test sets (reporting only)."""
        bs = self.recipe.eval.batch_size
        out = {"clean_acc": accuracy(model, self._test, batch_size=bs, device=self.device)}
        if self._asr_set is not None:
            out["asr"] = accuracy(model, self._asr_set, batch_size=bs, device=self.device)
        return out

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.run_dir is not None:
            text = "".join(json.dumps({k: v for k, v in r.items() if k != "replayed"}) + "\n" for r in self.history)
            write_text_atomic(self.run_dir / "history.jsonl", text)


def environment(device: torch.device) -> dict:
    env = {"bdframe": bdframe.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def provenance(registry: Registry, recipe: Recipe) -> dict:
    out = {}
    for section in ("dataset", "model", "attack", "train", "defense"):
        spec = getattr(recipe, section)
        if spec is None:
            continue
        e = registry.entry(spec.kind, spec.name)
        out[section] = {"name": spec.name, "plugin": e.provider.plugin, "distribution": e.provider.distribution,
                        "version": e.provider.version}
    return out


def run(recipe: Recipe, registry: Registry, *, out: Optional[Path] = None, resume: bool = False,
        overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Run a validated recipe and return its metrics. The run directory is ``out`` or
    ``<output_dir>/<name>``; it appears only when the run completes."""
    t_start = time.perf_counter()
    device = resolve_device(recipe.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"$.device: {recipe.device!r} requested but CUDA is not available; use device = \"auto\"")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"$.device: 'mps' requested but MPS is not available; use device = \"auto\"")
    final = Path(out) if out else Path(recipe.output_dir) / recipe.name
    rd = RunDir(final, resume=resume, overwrite=overwrite, recipe_toml=recipe.to_toml())
    try:
        return _run(recipe, registry, rd, device, resume=resume, progress=progress, log=log, t_start=t_start)
    except UserError:
        if not resume:  # a user error leaves no half-written run directory behind
            rd.discard()
        raise


def _run(recipe: Recipe, registry: Registry, rd: RunDir, device, *, resume: bool, progress: bool, log,
         t_start: float) -> dict:
    seeds = {"run": recipe.seed, "attack": derive_seed(recipe.seed, "attack")}
    run_info = {"name": recipe.name, "seeds": seeds, "plugins": provenance(registry, recipe),
                "environment": environment(device), "status": "running", "resumed": resume}
    write_json_atomic(rd.file("run.json"), run_info)

    timings: dict[str, float] = {}
    t = time.perf_counter()
    dataset = registry.get("dataset", recipe.dataset.name)(recipe.dataset.config)
    train, test = dataset.load()
    info = dataset.describe()  # after load: a dataset may compute its statistics while loading
    timings["load_data"] = time.perf_counter() - t
    log(f"dataset {recipe.dataset.name}: {len(train)} train / {len(test)} test images, "
        f"{info.num_classes} classes, {info.channels}x{info.height}x{info.width}; device {device}")

    poisoned_train, asr_set, poison_ids, cover_ids = train, None, torch.empty(0, dtype=torch.int64), None
    poison_info: dict = {"attack": None}
    if recipe.attack is not None:
        t = time.perf_counter()
        attack = registry.get("attack", recipe.attack.name)(recipe.attack.config)
        ps = attack.poison_train(train, seed=seeds["attack"])
        poisoned_train, poison_ids, cover_ids = ps.data, ps.poison_ids, ps.cover_ids
        asr_set = attack.poison_test(test)
        timings["poison"] = time.perf_counter() - t
        poison_info = {"attack": recipe.attack.name, "poison_ids": sorted(int(i) for i in poison_ids),
                       "cover_ids": sorted(int(i) for i in cover_ids), "meta": ps.meta}
        log(f"attack {recipe.attack.name}: {len(poison_ids)} poisoned, {len(cover_ids)} cover samples; "
            f"ASR set {len(asr_set)} images")
    write_json_atomic(rd.file("poison.json"), poison_info)

    ctx = RunContext(registry, recipe, info, device, rd.path, test, asr_set, progress=progress)
    defense = registry.get("defense", recipe.defense.name)(recipe.defense.config)
    t = time.perf_counter()
    result = defense.run(poisoned_train, ctx)
    timings["defense"] = time.perf_counter() - t

    metrics: dict = {"name": recipe.name, "dataset": recipe.dataset.name, "model": recipe.model.name,
                     "attack": recipe.attack.name if recipe.attack else None, "defense": recipe.defense.name,
                     "train_size": len(train), "test_size": len(test), "num_poison": int(len(poison_ids)),
                     "num_cover": int(len(cover_ids)) if cover_ids is not None else 0}
    metrics.update(ctx.evaluate(result.model))
    if asr_set is not None:
        metrics["asr_set_size"] = len(asr_set)
    trained = [r for r in ctx.history if "images_per_s" in r]
    if trained:
        secs = sum(r["seconds"] for r in trained)
        comp = sum(r["compute_seconds"] for r in trained)
        metrics["train_images_per_s"] = sum(r["images"] for r in trained) / secs if secs else 0.0
        metrics["train_non_compute_share"] = 1.0 - comp / secs if secs else 0.0
    if result.suspected_ids is not None:
        sus = sorted(int(i) for i in result.suspected_ids)
        write_json_atomic(rd.file("suspected.json"), {"suspected_ids": sus})
        if recipe.attack is not None:
            metrics["detection"] = detection(sus, poison_ids, poisoned_train.ids)
    metrics["defense_metrics"] = result.metrics
    if result.summary:
        metrics["defense_summary"] = [str(line) for line in result.summary]
    timings["total"] = time.perf_counter() - t_start
    metrics["seconds"] = timings
    torch.save(result.model.state_dict(), rd.file("model.pt.tmp"))
    rd.file("model.pt.tmp").replace(rd.file("model.pt"))
    write_json_atomic(rd.file("metrics.json"), metrics)
    run_info["status"] = "complete"
    write_json_atomic(rd.file("run.json"), run_info)
    final_path = rd.finish()
    metrics["run_dir"] = str(final_path)
    return metrics

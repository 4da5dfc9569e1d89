"""Execute a recipe: dataset -> attack -> defense -> metrics, written to a run directory."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Optional

import attrs
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
    """The :class:`~bdframe.interfaces.DefenseContext` the runner hands to a defense.

    It is sealed: it holds the run seed, the device, the dataset's description, the recipe's
    ``[model]``, ``[train]`` and ``[eval]`` sections and the registry, and nothing about the
    attack (no recipe ``[attack]`` section, poison ids, target or trigger). The held-out test
    sets used by :meth:`evaluate` (the ASR set is triggered and labelled with the target) live
    only inside a closure, not in an attribute a defense could read.
    """

    def __init__(self, registry: Registry, *, seed: int, model_spec, train_spec, info, device: torch.device,
                 run_dir: Optional[Path], evaluate, progress: bool = True):
        self.registry = registry
        self.seed = seed
        self.info = info
        self.device = device
        self.run_dir = run_dir
        self.progress = progress
        self._model_spec = model_spec
        self._train_spec = train_spec
        self._evaluate = evaluate
        self.history: list[dict] = []
        self._models_built = 0

    @classmethod
    def for_recipe(cls, registry: Registry, recipe: Recipe, info, device, run_dir: Optional[Path], test: ImageSet,
                   asr_set: Optional[ImageSet], *, progress: bool = True) -> "RunContext":
        """The context a run of ``recipe`` gives its defense (for tools that run a defense
        outside ``bdframe run``, such as benchmarks)."""
        evaluate = make_evaluator(test, asr_set, batch_size=recipe.eval.batch_size, device=device)
        return cls(registry, seed=recipe.seed, model_spec=recipe.model, train_spec=recipe.train, info=info,
                   device=device, run_dir=run_dir, evaluate=evaluate, progress=progress)

    def new_model(self) -> Classifier:
        """A freshly initialised model (initialisation seeded by the run seed and a counter)."""
        spec = self._model_spec
        seed_everything(derive_seed(self.seed, "model-init", self._models_built))
        self._models_built += 1
        net = self.registry.get("model", spec.name)(spec.config).build(self.info)
        return Classifier(net, self.info.mean, self.info.std).to(self.device)

    @property
    def trainer(self):
        spec = self._train_spec
        return self.registry.get("trainer", spec.name)(spec.config)

    def component(self, kind: str, name: str, **params):
        return self.registry.create(kind, name, **params)

    def stage(self, name: str, *, evaluate_each_epoch: bool = False, lr_setting: str = "[train] lr") -> StageContext:
        state = self.run_dir / "state" / f"{name}.pt" if self.run_dir else None
        return StageContext(seed=derive_seed(self.seed, "stage", name), device=self.device, name=name,
                            progress=self.progress, state_path=state, on_epoch=self.log,
                            evaluate=self.evaluate if evaluate_each_epoch else None, lr_setting=lr_setting)

    def evaluate(self, model) -> dict:
        """Clean accuracy and ASR on the held-out test sets (reporting only)."""
        return self._evaluate(model)

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.run_dir is not None:
            text = "".join(json.dumps({k: v for k, v in r.items() if k != "replayed"}) + "\n" for r in self.history)
            write_text_atomic(self.run_dir / "history.jsonl", text)


def make_evaluator(test: ImageSet, asr_set: Optional[ImageSet], *, batch_size: int, device):
    """``model -> {"clean_acc", "asr"}`` over sets held only by the returned closure."""

    def evaluate(model) -> dict:
        out = {"clean_acc": accuracy(model, test, batch_size=batch_size, device=device)}
        if asr_set is not None:
            out["asr"] = accuracy(model, asr_set, batch_size=batch_size, device=device)
        return out

    return evaluate


def sealed(data: ImageSet) -> ImageSet:
    """``data`` as a defense may see it: images, labels, ids and classes. A train-time transform
    that an attack attached (it knows the poison ids and the attack's settings) is kept working
    but reachable only through a closure."""
    inner = data.transform
    if inner is None:
        return data

    def transform(x, ids, g):
        return inner(x, ids, g)

    return attrs.evolve(data, transform=transform)


def environment(device: torch.device) -> dict:
    env = {"bdframe": bdframe.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def provenance(registry: Registry, recipe: Recipe, sections=("dataset", "model", "attack", "train", "defense")) -> dict:
    out = {}
    for section in sections:
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
        raise UserError("$.device: 'mps' requested but MPS is not available; use device = \"auto\"")
    final = Path(out) if out else Path(recipe.output_dir) / recipe.name
    rd = RunDir(final, resume=resume, overwrite=overwrite, recipe_toml=recipe.to_toml(),
                field="--out" if out else "$.output_dir")
    try:
        return _run(recipe, registry, rd, device, resume=resume, progress=progress, log=log, t_start=t_start)
    except UserError:
        if not resume:  # a user error leaves no half-written run directory behind
            rd.discard()
        raise


def _run(recipe: Recipe, registry: Registry, rd: RunDir, device, *, resume: bool, progress: bool, log,
         t_start: float) -> dict:
    """Everything that names the attack (``poison.json``, the full ``recipe.toml`` and
    ``run.json``) is written only after the defense has returned, so nothing the defense could
    read while it runs (its context, its data, the run directory) carries the ground truth."""
    seeds = {"run": recipe.seed, "attack": derive_seed(recipe.seed, "attack")}
    run_info = {"name": recipe.name, "seeds": {"run": recipe.seed},
                "plugins": provenance(registry, recipe, ("dataset", "model", "train", "defense")),
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

    ctx = RunContext.for_recipe(registry, recipe, info, device, rd.path, test, asr_set, progress=progress)
    defense = registry.get("defense", recipe.defense.name)(recipe.defense.config)
    t = time.perf_counter()
    result = defense.run(sealed(poisoned_train), ctx)
    timings["defense"] = time.perf_counter() - t

    # -- the defense has returned: from here on the ground truth may be written ------------------
    write_json_atomic(rd.file("poison.json"), poison_info)
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
        files = dataset.sample_files("train")
        write_suspected(rd.path, poisoned_train, result.suspected_ids, result.scores, files)
        if recipe.attack is not None:
            metrics["detection"] = detection(sorted(int(i) for i in result.suspected_ids), poison_ids,
                                             poisoned_train.ids)
    metrics["defense_metrics"] = result.metrics
    if result.summary:
        metrics["defense_summary"] = [str(line) for line in result.summary]
    timings["total"] = time.perf_counter() - t_start
    metrics["seconds"] = timings
    torch.save(result.model.state_dict(), rd.file("model.pt.tmp"))
    rd.file("model.pt.tmp").replace(rd.file("model.pt"))
    write_json_atomic(rd.file("metrics.json"), metrics)
    run_info.update(seeds=seeds, plugins=provenance(registry, recipe), status="complete")
    write_json_atomic(rd.file("run.json"), run_info)
    final_path = rd.finish()
    metrics["run_dir"] = str(final_path)
    return metrics


def write_suspected(run_dir: Path, data: ImageSet, suspected_ids, scores, files: Optional[dict]) -> None:
    """``suspected.json`` and ``suspected.csv``: the flagged samples, most suspicious first.

    Each row: rank, id, the file (relative to the dataset root, for datasets made of files),
    the label the sample carries in the training set, and the defense's score where it gives
    one (higher = more suspicious). Without scores the rows are in id order.
    """
    import csv
    import io

    ids = data.ids.tolist()
    labels = dict(zip(ids, data.labels.tolist()))
    flagged = sorted({int(i) for i in suspected_ids})
    score_of: dict = {}
    if scores is not None:
        sc = torch.as_tensor(scores).detach().double().cpu()
        if sc.shape != (len(data),):
            raise ValueError(f"DefenseResult.scores must have one value per training row ({len(data)}), "
                             f"got shape {tuple(sc.shape)}")
        score_of = dict(zip(ids, sc.tolist()))
        flagged.sort(key=lambda i: (-score_of[i], i))
    classes = data.classes
    rows = []
    for rank, i in enumerate(flagged, 1):
        label = labels[i]
        rows.append({"rank": rank, "id": i, "path": (files or {}).get(i),
                     "label": label, "class": classes[label] if label < len(classes) else str(label),
                     "score": score_of.get(i)})
    write_json_atomic(run_dir / "suspected.json",
                      {"suspected_ids": sorted(r["id"] for r in rows), "count": len(rows),
                       "scored": scores is not None, "paths": files is not None,
                       "order": "most suspicious first" if scores is not None else "by id",
                       "samples": rows})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "id", "path", "label", "class", "score"])
    for r in rows:
        w.writerow([r["rank"], r["id"], r["path"] or "", r["label"], r["class"],
                    "" if r["score"] is None else f"{r['score']:.9g}"])
    write_text_atomic(run_dir / "suspected.csv", buf.getvalue())

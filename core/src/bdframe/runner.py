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
from bdframe.build import materialise
from bdframe.data import ImageSet
from bdframe.errors import UserError
from bdframe.interfaces import SECTIONS, StageContext
from bdframe.metrics import accuracy, detection
from bdframe.nn import Classifier, device_problem, resolve_device
from bdframe.recipe import Recipe
from bdframe.registry import Registry
from bdframe.runs import RunDir, save_atomic, write_json_atomic, write_text_atomic
from bdframe.seeding import derive_seed, seed_everything
from bdframe.training import emulated_bf16_warning


class RunContext:
    """The :class:`~bdframe.interfaces.DefenseContext` the runner hands to a defense.

    It is sealed: it holds the run seed, the device, the dataset's description, the run's
    artifacts directory, and (in closures and private attributes) the registry, the recipe's
    ``[model]``/``[train]``/``[defense]`` sections and the held-out test sets used by
    :meth:`evaluate`. Nothing about the attack: no recipe ``[attack]`` section, poison ids,
    target or trigger.
    """

    def __init__(self, registry: Registry, *, seed: int, own: dict, build_model, info, device: torch.device,
                 artifacts: Optional[Path], evaluate, progress: bool = True, clean: Optional[ImageSet] = None):
        self.seed = seed
        self.clean = clean
        self.device = device
        self.info = info
        self.progress = progress
        self.artifacts = artifacts
        self.history: list[dict] = []
        self._registry = registry
        self._own = own
        self._build_model = build_model
        self._evaluate = evaluate
        self._models_built = 0
        self._names: set[str] = set()
        self._stage_order: list[str] = []

    @classmethod
    def for_parts(cls, parts, device, artifacts: Optional[Path], *, progress: bool = True) -> "RunContext":
        """The context a run of ``parts`` (:func:`bdframe.build.materialise`) gives its defense;
        also for tools that run a defense outside ``bdframe run``, such as benchmarks."""
        recipe = parts.recipe
        evaluate = make_evaluator(parts.test, parts.asr_set, batch_size=recipe.eval.batch_size, device=device)
        own = {spec.kind: spec for spec in (recipe.model, recipe.train, recipe.defense)}
        build = parts.build_model
        # a lambda, not the bound method: ``build_model.__self__`` would be the parts, ground truth included
        return cls(parts.registry, seed=recipe.seed, own=own, build_model=lambda **kw: build(**kw), info=parts.info,
                   device=device, artifacts=artifacts, evaluate=evaluate, progress=progress,
                   clean=parts.clean)

    def _claim(self, what: str, name: str) -> None:
        key = f"{what}:{name}"
        if key in self._names:
            raise ValueError(f"{what} name {name!r} is already used in this run; give each {what} its own name "
                             f"(a second {what} with the same name would reuse the first one's saved state)")
        self._names.add(key)

    def new_model(self, *, num_classes: Optional[int] = None, state_dict: Optional[dict] = None) -> Classifier:
        """A freshly initialised model (the k-th call seeds with ``derive_seed(seed, "model-init", k)``)."""
        seed_everything(derive_seed(self.seed, "model-init", self._models_built))
        self._models_built += 1
        model = self._build_model(num_classes=num_classes)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.to(self.device)

    def component(self, kind: str, name: Optional[str] = None, **params):
        if name is None:
            spec = self._own.get(kind)
            if spec is None:
                raise ValueError(f"the recipe names no {kind} a defense can use; give the component's name")
            from bdframe.recipe import config_to_dict

            return self._registry.create(kind, spec.name, **{**config_to_dict(spec.config), **params})
        return self._registry.create(kind, name, **params)

    def stage(self, name: str, *, evaluate_each_epoch: bool = False, lr_setting: str = "[train] lr") -> StageContext:
        self._claim("stage", name)
        self._stage_order.append(name)
        state = self.artifacts / "state" / f"{name}.pt" if self.artifacts else None
        return StageContext(seed=derive_seed(self.seed, "stage", name), device=self.device, name=name,
                            progress=self.progress, state_path=state, on_epoch=self.log,
                            evaluate=self.evaluate if evaluate_each_epoch else None, lr_setting=lr_setting)

    def checkpoint(self, name: str) -> "StepCheckpoint":
        self._claim("checkpoint", name)
        return StepCheckpoint(self, name)

    def evaluate(self, model) -> dict:
        """Clean accuracy and ASR on the held-out test sets (reporting only)."""
        return self._evaluate(model)

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.artifacts is not None:
            text = "".join(json.dumps({k: v for k, v in r.items() if k != "replayed"}) + "\n" for r in self.history)
            write_text_atomic(self.artifacts / "history.jsonl", text)


class StepCheckpoint:
    """A :class:`~bdframe.interfaces.Checkpoint` kept in ``<run dir>/state/steps/<name>.pt``."""

    def __init__(self, ctx: RunContext, name: str):
        self.name = name
        self._ctx = ctx
        self._path = ctx.artifacts / "state" / "steps" / f"{name}.pt" if ctx.artifacts else None
        self._first_record = len(ctx.history)
        self._first_stage = len(ctx._stage_order)

    def load(self):
        if self._path is None or not self._path.exists():
            return None
        saved = torch.load(self._path, map_location="cpu", weights_only=False)
        for rec in saved["records"]:
            self._ctx.log(dict(rec, replayed=True))
        return saved["result"]

    def save(self, result) -> None:
        if self._path is None:
            return
        records = [{k: v for k, v in r.items() if k != "replayed"} for r in self._ctx.history[self._first_record:]]
        save_atomic({"result": result, "records": records}, self._path)
        for stage in self._ctx._stage_order[self._first_stage:]:  # their per-epoch state is no longer needed
            (self._ctx.artifacts / "state" / f"{stage}.pt").unlink(missing_ok=True)


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


def cpu_name() -> str:
    """The CPU's model name (Linux: ``/proc/cpuinfo``; elsewhere what ``platform`` knows), so that
    times measured on different machines are not compared as if they were one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device) -> dict:
    env = {"bdframe": bdframe.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "cpu": cpu_name(), "device": str(device),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def peak_memory(device: torch.device) -> dict:
    """The peak memory of this process so far, in MiB: ``rss`` (resident memory, where the
    platform reports it) and, on CUDA, ``gpu`` (what PyTorch allocated on the device). A run made
    by ``bdframe run`` or by a sweep's worker is its own process, so these are the run's peaks;
    a run made inside a longer process (a script, a test) reports that process's peak."""
    out: dict = {}
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rss"] = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB elsewhere
    except (ImportError, OSError):  # no resource module (Windows)
        pass
    if device.type == "cuda":
        out["gpu"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def provenance(registry: Registry, recipe: Recipe, *, without_attack: bool = False) -> dict:
    """Component name, plugin, distribution and version per recipe section (``without_attack``:
    as ``run.json`` holds it while the defense runs)."""
    out = {}
    for section in SECTIONS:
        spec = getattr(recipe, section)
        if spec is None or (without_attack and spec.kind == "attack"):
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
    problem = device_problem(recipe.device)
    if problem:
        raise UserError(problem)
    device = resolve_device(recipe.device)
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
    run_info = {"name": recipe.name, "seeds": {"run": recipe.seed},
                "plugins": provenance(registry, recipe, without_attack=True),
                "environment": environment(device), "status": "running", "resumed": resume}
    write_json_atomic(rd.file("run.json"), run_info)

    log(f"device {device}")
    amps = {f"[{section}] amp": spec.config.amp for section in SECTIONS
            if (spec := getattr(recipe, section, None)) is not None and isinstance(getattr(spec.config, "amp", None), str)}
    warning = emulated_bf16_warning(amps, device)
    if warning:
        log(warning)
    parts = materialise(recipe, registry, log=log)
    train, test, poisoned_train, poison_ids, cover_ids = (parts.train, parts.test, parts.poisoned, parts.poison_ids,
                                                          parts.cover_ids)
    timings: dict[str, float] = dict(parts.seconds)
    ctx = RunContext.for_parts(parts, device, rd.path, progress=progress)
    defense = registry.get("defense", recipe.defense.name)(recipe.defense.config)
    if parts.clean is not None:  # the clean data's ids, so any run's clean data can be checked
        source = ({"source": "reserve", "fraction": recipe.clean.fraction} if recipe.clean.fraction
                  else {"source": "folder", "folder": recipe.clean.folder})
        write_json_atomic(rd.file("clean.json"), {**source, "size": len(parts.clean),
                                                  "ids": sorted(int(i) for i in parts.clean.ids)})
    t = time.perf_counter()
    result = defense.run(sealed(poisoned_train), ctx)
    timings["defense"] = time.perf_counter() - t

    # -- the defense has returned: from here on the ground truth may be written ------------------
    write_json_atomic(rd.file("poison.json"), parts.poison_info())
    if parts.asr_set is not None and len(parts.asr_set):
        write_attack_example(rd.file("attack_example.png"), test, parts.asr_set)
    metrics: dict = {"name": recipe.name, "dataset": recipe.dataset.name, "model": recipe.model.name,
                     "attack": recipe.attack.name if recipe.attack else None, "defense": recipe.defense.name,
                     "train_size": len(train), "test_size": len(test), "num_poison": int(len(poison_ids)),
                     "num_cover": int(len(cover_ids)) if cover_ids is not None else 0}
    if parts.clean is not None:
        metrics["clean_data"] = {"size": len(parts.clean), "fraction": recipe.clean.fraction,
                                 "source": "reserve" if recipe.clean.fraction else "folder",
                                 "used": getattr(type(defense), "clean_data", "none") != "none"}
    metrics.update(ctx.evaluate(result.model))
    if parts.asr_set is not None:
        metrics["asr_set_size"] = len(parts.asr_set)
    trained = [r for r in ctx.history if "images_per_s" in r]
    if trained:
        secs = sum(r["seconds"] for r in trained)
        comp = sum(r["compute_seconds"] for r in trained)
        metrics["train_images_per_s"] = sum(r["images"] for r in trained) / secs if secs else 0.0
        metrics["train_non_compute_share"] = 1.0 - comp / secs if secs else 0.0
    if result.suspected_ids is not None:
        n_flagged = len({int(i) for i in result.suspected_ids})
        metrics["suspected"] = {"count": n_flagged, "share": n_flagged / len(poisoned_train) if len(poisoned_train) else 0.0}
        files = parts.dataset.sample_files("train")
        write_suspected(rd.path, poisoned_train, result.suspected_ids, result.scores, files)
        if recipe.attack is not None:
            metrics["detection"] = detection(sorted(int(i) for i in result.suspected_ids), poison_ids,
                                             poisoned_train.ids)
    if result.scores is not None and recipe.attack is not None:
        metrics.setdefault("detection", {}).update(score_quality(result.scores, poisoned_train.ids, poison_ids))
    metrics["defense_metrics"] = result.metrics
    if result.summary:
        metrics["defense_summary"] = [str(line) for line in result.summary]
    timings["total"] = time.perf_counter() - t_start
    metrics["seconds"] = timings
    metrics["peak_memory_mb"] = peak_memory(device)
    torch.save(result.model.state_dict(), rd.file("model.pt.tmp"))
    rd.file("model.pt.tmp").replace(rd.file("model.pt"))
    write_json_atomic(rd.file("metrics.json"), metrics)
    run_info.update(seeds={"run": recipe.seed, "attack": parts.attack_seed}, plugins=provenance(registry, recipe),
                    status="complete")
    write_json_atomic(rd.file("run.json"), run_info)
    final_path = rd.finish()
    metrics["run_dir"] = str(final_path)
    return metrics


def score_quality(scores, ids, poison_ids) -> dict:
    """AUROC and TPR at 1/5/10% FPR of a defense's per-sample scores (one per row of the
    training set, higher = more suspicious) against the poison ids; cover samples count as
    clean. Empty when the set has no poison or nothing else."""
    from bdframe.detection import summary

    truth = torch.isin(torch.as_tensor(ids), torch.as_tensor(poison_ids, dtype=torch.int64))
    if not bool(truth.any()) or bool(truth.all()):
        return {}
    s = summary(torch.as_tensor(scores).detach().double().cpu(), truth)
    return {"auroc": s["auroc"], "tpr_at_fpr": s["tpr_at_fpr"]}


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


def write_attack_example(path: Path, test: ImageSet, asr_set: ImageSet, n: int = 4, scale: int = 4) -> None:
    """A picture of the attack for reporting: ``n`` test images (columns) clean, triggered (the
    ASR set's version of the same image) and their absolute difference times 4 (rows)."""
    import torch.nn.functional as F
    from torchvision.utils import save_image

    poisoned = asr_set.subset(torch.arange(min(n, len(asr_set))))
    clean = test.select_ids(poisoned.ids).images.float() / 255
    dirty = poisoned.images.float() / 255
    grid = torch.cat([clean, dirty, ((dirty - clean).abs() * 4).clamp(0, 1)])
    if scale > 1:
        grid = F.interpolate(grid, scale_factor=scale, mode="nearest")
    tmp = path.with_name(path.name + ".tmp.png")
    save_image(grid, str(tmp), nrow=len(poisoned), padding=2, pad_value=1.0)
    tmp.replace(path)

"""Helpers shared by the benchmark scripts: locating CIFAR-10, running recipes, printing tables."""

from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TARBALL = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def cifar10_tree(data: str | None) -> Path:
    """Path of the CIFAR-10 image-folder tree (extracting the shared tarball once if needed)."""
    src = Path(data) if data else DEFAULT_TARBALL
    if src.is_dir():
        return src
    if not src.is_file():
        raise SystemExit(f"CIFAR-10 not found at {src}; pass --data <cifar10 tree or cifar10-jpeg.tar.gz>")
    dest = Path(os.environ.get("BDFRAME_CACHE_DIR") or Path.home() / ".cache" / "bdframe") / "cifar10-jpeg"
    tree = dest / "cifar10"
    if not (tree / "test").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(src) as tf:
            tf.extractall(dest, filter="data")
    return tree


def run_recipe(data: dict, out: Path, progress: bool = False) -> dict:
    from bdframe import runner
    from bdframe.plugins import load_registry
    from bdframe.recipe import loads_dict

    registry = load_registry()
    recipe = loads_dict(data, registry=registry, source=data.get("name"))
    t = time.perf_counter()
    metrics = runner.run(recipe, registry, out=out, overwrite=True, progress=progress, log=lambda m: None)
    metrics["wall_seconds"] = time.perf_counter() - t
    return metrics


def print_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    """cols: (key, header, format)."""
    cells = [[h for _, h, _ in cols]] + [[(f.format(r[k]) if r.get(k) is not None else "-") for k, _, f in cols]
                                         for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def meca_detect_record(run_dir: Path) -> dict | None:
    """The ``meca-detect`` record of a MeCa run's ``history.jsonl`` (the class test's pick and
    z-scores), or None when the run has none."""
    for line in (Path(run_dir) / "history.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == "meca-detect":
            return rec
    return None


def read_json(path: Path, default):
    """A results file's content, or ``default`` when it does not exist yet."""
    return json.loads(path.read_text()) if path.exists() else default


def add_results_args(ap, filename: str) -> None:
    """``--recompute`` and ``--out`` (default ``benchmarks/results/<filename>``) of a benchmark
    that keeps computed rows in a JSON file."""
    ap.add_argument("--recompute", action="store_true", help="redo rows already in the JSON")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / filename))


def parse_key_values(items: list[str], what: str = "") -> dict:
    """``["lam=0.3", 'unlearn_norm="batch"']`` -> ``{"lam": 0.3, "unlearn_norm": "batch"}`` (JSON values)."""
    out = {}
    for kv in items:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"{what}{kv!r}: expected KEY=VALUE")
        out[k] = json.loads(v)
    return out


def cpu_recipe(root: Path, *, train_size: int, epochs: int, width: int, device: str, seed: int) -> dict:
    """The CPU-sized CIFAR-10 configuration every CIFAR-10 benchmark here uses."""
    return {
        "seed": seed, "device": device,
        "dataset": {"name": "imagefolder", "root": str(root), "train_size": train_size},
        "model": {"name": "simple-cnn", "width": width},
        "train": {"name": "standard", "epochs": epochs, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                  "nesterov": True, "weight_decay": 5e-4, "schedule": "onecycle", "label_smoothing": 0.1},
        "defense": {"name": "none", "evaluate_each_epoch": False},
    }


def fast_recipe(root: Path, *, train_size: int | None, epochs: int, widths: tuple[int, int, int], lr: float,
                device: str, seed: int, bn_lr_scale: float = 64.0) -> dict:
    """The fast CPU configuration: ``fast-cnn`` (whitened stem, three conv groups of
    ``widths``), batch 256, Nesterov SGD (peak ``lr``, momentum 0.85,
    weight decay 1.3e-3, BatchNorm shifts at ``bn_lr_scale`` times the lr), one-cycle schedule, label smoothing
    0.2, random crop with padding 2 and horizontal flip. ``train_size`` None: all training
    images."""
    dataset = {"name": "imagefolder", "root": str(root)}
    if train_size:
        dataset["train_size"] = train_size
    return {
        "seed": seed, "device": device, "dataset": dataset,
        "model": {"name": "fast-cnn", "widths": list(widths), "bn_lr_scale": bn_lr_scale},
        "train": {"name": "standard", "epochs": epochs, "batch_size": 256, "lr": lr, "momentum": 0.85,
                  "nesterov": True, "weight_decay": 1.3e-3, "schedule": "onecycle", "label_smoothing": 0.2,
                  "crop_padding": 2},
        "defense": {"name": "none", "evaluate_each_epoch": False},
    }


def sweep_dir_problem(path: Path, script: str) -> str | None:
    """Why ``path`` is not a sweep directory written by ``bdframe sweep run`` (None if it is)."""
    if not (Path(path) / "sweep.json").is_file():
        return f"{script}: {str(path)!r} is not a sweep directory (no sweep.json)"
    return None

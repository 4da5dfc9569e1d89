"""From a validated recipe to the parts of a run, in one place.

``bdframe run``, ``bdframe scan``, ``bdframe poison`` (and anything else that needs a recipe's
data) call :func:`materialise`, so the poisoned set is built the same way everywhere: the
dataset is loaded, the attack poisons the training set with the seed derived from the run
seed, and the attack's test set (the ASR set) is made from the clean test set.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import attrs
import torch

from bdframe.data import DatasetInfo, ImageSet
from bdframe.seeding import derive_seed, generator


def attack_seed(run_seed: int) -> int:
    """The attack's seed: derived from the run seed, so the same recipe poisons the same samples."""
    return derive_seed(run_seed, "attack")


@attrs.define
class RunParts:
    """What a recipe materialises to. ``poisoned`` is the training set as a defense receives it
    (``train`` itself without an attack); ``poison_ids``/``cover_ids`` and ``asr_set`` are the
    ground truth, for reporting only."""

    recipe: Any
    registry: Any
    dataset: Any
    info: DatasetInfo
    train: ImageSet
    test: ImageSet
    poisoned: ImageSet
    poison_ids: torch.Tensor
    cover_ids: torch.Tensor
    asr_set: Optional[ImageSet]
    attack_seed: int
    meta: dict = attrs.field(factory=dict)
    seconds: dict = attrs.field(factory=dict)
    #: the trusted clean data reserved by ``[clean]`` (not in ``train``), or None
    clean: Optional[ImageSet] = None

    def poison_info(self) -> dict:
        """The content of ``poison.json``."""
        if self.recipe.attack is None:
            return {"attack": None}
        return {"attack": self.recipe.attack.name, "seed": self.attack_seed,
                "poison_ids": sorted(int(i) for i in self.poison_ids),
                "cover_ids": sorted(int(i) for i in self.cover_ids), "meta": self.meta}

    def build_model(self, *, num_classes: Optional[int] = None) -> torch.nn.Module:
        """A new (unseeded, CPU) model of the recipe's ``[model]`` wrapped with the dataset's
        normalisation; ``num_classes`` builds it with another head."""
        from bdframe.nn import Classifier

        info = self.info if num_classes is None else attrs.evolve(self.info, num_classes=num_classes, classes=())
        spec = self.recipe.model
        net = self.registry.get("model", spec.name)(spec.config).build(info)
        return Classifier(net, self.info.mean, self.info.std)


def materialise(recipe, registry, *, seed: Optional[int] = None,
                log: Callable[[str], None] = lambda message: None) -> RunParts:
    """Load the recipe's dataset and apply its attack. ``seed`` overrides the attack seed (a
    saved run's ``run.json``); by default it is derived from the recipe's seed."""
    seconds: dict = {}
    t = time.perf_counter()
    dataset = registry.get("dataset", recipe.dataset.name)(recipe.dataset.config)
    train, test = dataset.load()
    info = dataset.describe()  # after load: a dataset may compute its statistics while loading
    seconds["load_data"] = time.perf_counter() - t
    log(f"dataset {recipe.dataset.name}: {len(train)} train / {len(test)} test images, "
        f"{info.num_classes} classes, {info.channels}x{info.height}x{info.width}")
    clean = None
    if recipe.clean.fraction:
        keep = reserve_clean(train, recipe.clean.fraction, recipe.seed)
        clean, train = train.subset(keep), train.subset(~keep)
        log(f"clean data: {len(clean)} training images reserved before poisoning "
            f"({100 * recipe.clean.fraction:g}% of each class); {len(train)} left to the attack")
    elif recipe.clean.folder:
        first_id = int(train.ids.max()) + 1 if len(train) else 0
        clean = load_clean_folder(recipe.clean.folder, info, first_id)
        log(f"clean data: {len(clean)} trusted images from {recipe.clean.folder}")
    a_seed = attack_seed(recipe.seed) if seed is None else int(seed)
    empty = torch.empty(0, dtype=torch.int64)
    parts = RunParts(recipe, registry, dataset, info, train, test, train, empty, empty, None, a_seed,
                     seconds=seconds, clean=clean)
    if recipe.attack is not None:
        t = time.perf_counter()
        attack = registry.get("attack", recipe.attack.name)(recipe.attack.config)
        ps = attack.poison_train(train, seed=a_seed)
        parts.poisoned, parts.poison_ids, parts.cover_ids, parts.meta = ps.data, ps.poison_ids, ps.cover_ids, ps.meta
        parts.asr_set = attack.poison_test(test)
        seconds["poison"] = time.perf_counter() - t
        log(f"attack {recipe.attack.name}: {len(ps.poison_ids)} poisoned, {len(ps.cover_ids)} cover samples; "
            f"ASR set {len(parts.asr_set)} images")
    return parts


def reserve_clean(train: ImageSet, fraction: float, run_seed: int) -> torch.Tensor:
    """The rows of ``train`` reserved as trusted clean data: in every class, ``round(fraction *
    size)`` rows (at least one where the class has two or more) drawn by a generator seeded from
    the run seed alone, so every recipe with the same seed and dataset reserves the same
    images, whatever its attack and defense. A boolean mask over ``train``'s rows."""
    keep = torch.zeros(len(train), dtype=torch.bool)
    g = generator(run_seed, "clean-reserve")
    order = torch.argsort(train.ids)  # independent of the dataset's row order
    labels = train.labels[order]
    for c in torch.unique(labels).tolist():
        rows = order[labels == c]
        k = int(round(fraction * len(rows)))
        if k == 0 and len(rows) >= 2:
            k = 1
        k = min(k, len(rows) - 1)
        if k > 0:
            keep[rows[torch.randperm(len(rows), generator=g)[:k]]] = True
    return keep


#: file name endings read as images by :func:`load_clean_folder`
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def load_clean_folder(folder: str, info: DatasetInfo, first_id: int) -> ImageSet:
    """The images of ``<folder>/<class>/<image>`` as an ImageSet labelled by the dataset's
    classes (a sub-folder must be named after one of them; classes may be missing), ids from
    ``first_id`` on in (class, file name) order. Every image must have the dataset's channels
    and size; a problem raises :class:`~bdframe.errors.UserError` naming the file."""
    from pathlib import Path

    from torchvision.io import ImageReadMode, decode_image, read_file

    from bdframe.errors import UserError

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"$.clean.folder: {folder!r} is not a folder (expected <folder>/<class>/<image>)")
    classes = list(info.classes) or [str(i) for i in range(info.num_classes)]
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [d for d in subdirs if d not in classes]
    if unknown:
        raise UserError(f"$.clean.folder: sub-folders {unknown} of {folder!r} are not classes of the dataset; "
                        f"allowed: {', '.join(classes)}")
    mode = ImageReadMode.RGB if info.channels == 3 else ImageReadMode.GRAY
    images, labels = [], []
    for label, name in enumerate(classes):
        d = root / name
        if not d.is_dir():
            continue
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            try:
                img = decode_image(read_file(str(f)), mode=mode)
            except Exception:
                raise UserError(f"$.clean.folder: {str(f)!r} is not a readable image") from None
            if tuple(img.shape) != (info.channels, info.height, info.width):
                raise UserError(f"$.clean.folder: {str(f)!r} is {'x'.join(map(str, img.shape))}; the dataset's "
                                f"images are {info.channels}x{info.height}x{info.width}")
            images.append(img)
            labels.append(label)
    if not images:
        raise UserError(f"$.clean.folder: no images in {folder!r} (expected <folder>/<class>/<image>)")
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64),
                    torch.arange(first_id, first_id + len(images), dtype=torch.int64), tuple(info.classes))

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
from bdframe.seeding import derive_seed


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
    a_seed = attack_seed(recipe.seed) if seed is None else int(seed)
    empty = torch.empty(0, dtype=torch.int64)
    parts = RunParts(recipe, registry, dataset, info, train, test, train, empty, empty, None, a_seed,
                     seconds=seconds)
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

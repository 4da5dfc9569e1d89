"""The component interfaces every plugin implements.

Each component class has a ``name`` (the short name used in recipes, e.g. ``"badnet"``) and a
frozen attrs ``Config`` class whose fields are the component's validated parameters. A
component is constructed from its config: ``BadNet(BadNet.Config(poison_rate=0.1))``.

Interfaces (kept small on purpose; docs/plugin-hooks.md describes each in full):

- :class:`DatasetFactory`: describes and loads a dataset as two :class:`~bdframe.data.ImageSet`.
- :class:`ModelFactory`: builds a network for a :class:`~bdframe.data.DatasetInfo`.
- :class:`Attack`: poisons a training set (returning poison and cover ids) and builds the
  poisoned test set on which the attack success rate is measured.
- :class:`SampleScorer`: one score per sample, higher = more likely poisoned.
- :class:`Trainer`: a training stage (standard, unlearning, mixed, relearning, ...).
- :class:`Defense`: a pipeline that turns an untrusted training set into a model, using the
  other components only through the :class:`DefenseContext`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import attrs

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from bdframe.data import DatasetInfo, ImageSet
    from bdframe.nn import Classifier


@attrs.frozen
class EmptyConfig:
    """Config of a component without parameters."""


class Component:
    """Base of every component: a ``name`` and a ``Config``."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    summary: ClassVar[str] = ""

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class DatasetFactory(Component):
    kind = "dataset"

    def describe(self) -> "DatasetInfo":
        """Cheap metadata (classes, shape); may check that the root exists. No decoding."""
        raise NotImplementedError

    def load(self) -> tuple["ImageSet", "ImageSet"]:
        """Return ``(train, test)``; train ids are stable integers unique within the split."""
        raise NotImplementedError

    def sample_files(self, split: str) -> Optional[dict[int, str]]:
        """For datasets made of files: ``{sample id: path relative to the dataset root}`` of
        ``split`` (``"train"`` or ``"test"``), so results can name the files a user acts on.
        ``None`` (the default) for datasets without files (generated, packed archives)."""
        return None


class ModelFactory(Component):
    kind = "model"

    def build(self, info: "DatasetInfo") -> "torch.nn.Module":
        """A network taking *normalised* input, with ``forward_features(x) -> (B, D)`` and
        ``forward_head(features) -> logits``. Normalisation is added by the core's
        :class:`~bdframe.nn.Classifier` wrapper."""
        raise NotImplementedError


@attrs.frozen
class PoisonedSet:
    """A poisoned training set and the ground truth of what the attack did.

    ``data`` keeps every sample's id; ``poison_ids`` are samples carrying the trigger with the
    attack's label, ``cover_ids`` samples carrying a (train-time) trigger with their true label.
    ``meta`` holds per-attack details worth saving (trigger hash, per-sample trigger index, ...).
    """

    data: "ImageSet"
    poison_ids: "torch.Tensor"
    cover_ids: "torch.Tensor"
    meta: dict = attrs.field(factory=dict)


class Attack(Component):
    kind = "attack"

    def check_dataset(self, info: "DatasetInfo") -> list[tuple[str, str]]:
        """Dataset-dependent validation: ``(field, message)`` pairs (target class exists, ...)."""
        return []

    def poison_train(self, train: "ImageSet", *, seed: int) -> PoisonedSet:
        raise NotImplementedError

    def poison_test(self, test: "ImageSet") -> "ImageSet":
        """The test set on which ASR is measured: triggered images of the eligible classes
        (non-target for all-to-one attacks), labelled with the attack's target."""
        raise NotImplementedError


class SampleScorer(Component):
    kind = "scorer"
    #: True when a sample's score depends on the other samples (spectral, clustering, ...).
    set_level: ClassVar[bool] = False

    def score(self, model: "Classifier", data: "ImageSet", ctx: "ScoreContext") -> "torch.Tensor":
        """One float per row of ``data`` (same order), higher = more likely poisoned."""
        raise NotImplementedError


@attrs.define
class ScoreContext:
    seed: int = 0
    device: Any = "cpu"
    batch_size: int = 256
    progress: bool = True


@attrs.define
class StageContext:
    """What a training stage gets besides model and data.

    ``state_path``: where the stage saves its resumable state after each epoch (None: do not
    save). ``on_epoch``: called with a dict after each epoch (history, per-epoch metrics).
    ``evaluate``: optional ``model -> dict`` of metrics to log per epoch (reporting only).
    ``lr_setting``: the recipe setting that controls this stage's learning rate (e.g.
    ``"[train] lr"``), named in the error if training diverges.
    """

    seed: int = 0
    device: Any = "cpu"
    name: str = "train"
    progress: bool = True
    state_path: Any = None
    on_epoch: Optional[Callable[[dict], None]] = None
    evaluate: Optional[Callable[[Any], dict]] = None
    lr_setting: str = ""


class Trainer(Component):
    kind = "trainer"

    def fit(self, model: "Classifier", data: "ImageSet", ctx: StageContext, *,
            forget: Optional["ImageSet"] = None) -> list[dict]:
        """Train ``model`` in place; ``forget`` is the set to unlearn for stages that have one.
        Returns the per-epoch history."""
        raise NotImplementedError


@attrs.define
class DefenseResult:
    model: Any
    #: ids the defense flags as poisoned (None if it does not detect).
    suspected_ids: Any = None
    #: optional per-sample suspicion, one float per row of the data the defense was given, in
    #: that order (higher = more likely poisoned); ``suspected.csv`` is sorted by it.
    scores: Any = None
    #: extra figures for metrics.json (per-iteration trends, split sizes, stage times).
    metrics: dict = attrs.field(factory=dict)
    #: short human-readable lines that ``bdframe run`` prints after the final figures
    #: (e.g. the intermediate models' ACC/ASR); also stored as ``defense_summary`` in metrics.json.
    summary: list = attrs.field(factory=list)


class Defense(Component):
    kind = "defense"

    def run(self, data: "ImageSet", ctx: "DefenseContext") -> DefenseResult:
        """Produce a model from the untrusted ``data`` (no ground truth is available here)."""
        raise NotImplementedError


class DefenseContext:
    """What the runner gives a defense. Defined in :mod:`bdframe.runner`; documented here.

    Attributes/methods: ``seed``, ``device``, ``info`` (DatasetInfo), ``new_model()``,
    ``trainer`` (the recipe's ``[train]`` stage), ``component(kind, name, **params)`` (any
    registered component through the registry), ``stage(name)`` (a StageContext with resume
    state), ``evaluate(model)`` (clean ACC / ASR, for reporting only), ``log(record)``.
    """


KINDS = ("dataset", "model", "attack", "scorer", "trainer", "defense")

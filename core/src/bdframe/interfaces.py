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

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

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
    #: the component a recipe gets when it leaves out this kind's section (see :class:`Kind`);
    #: at most one installed component of a kind may set it
    default: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @classmethod
    def check_components(cls, config: Any, registry: Any) -> list[tuple[str, str]]:
        """Validation that needs the installed components, run when a recipe is validated: a
        component that creates another by name from its config checks here that it exists and
        takes the given parameters. ``(field, message)`` pairs; none by default."""
        return []


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


#: the named inputs a training stage may take (see :class:`StageData`)
STAGE_INPUTS = ("labelled", "unlabelled", "forget")


@attrs.frozen
class StageData:
    """The named inputs of one training stage.

    ``labelled``: samples whose labels the stage learns from (may be empty);
    ``unlabelled``: samples the stage may use but whose labels it must ignore (the
    low-credible share of semi-supervised training, or every sample of self-supervised
    pre-training); ``forget``: samples to unlearn. Sample ids are unique across the three.
    """

    labelled: "ImageSet"
    unlabelled: Optional["ImageSet"] = None
    forget: Optional["ImageSet"] = None

    def given(self) -> tuple[str, ...]:
        """The names of the non-empty inputs, in :data:`STAGE_INPUTS` order."""
        return tuple(n for n in STAGE_INPUTS if getattr(self, n) is not None and len(getattr(self, n)))

    def union(self, *names: str) -> "ImageSet":
        """The named inputs as one set, in the given order (empty inputs left out; an empty set
        like ``labelled`` when all are empty)."""
        from bdframe.data import ImageSet

        sets = [getattr(self, n) for n in names if getattr(self, n) is not None and len(getattr(self, n))]
        if not sets:
            return self.labelled.subset(self.labelled.ids[:0])
        out = sets[0]
        for s in sets[1:]:
            out = ImageSet.concat(out, s)
        return out

    def get(self, name: str) -> "ImageSet":
        """The input ``name``, or an empty set like ``labelled`` when it is not given."""
        v = getattr(self, name)
        return v if v is not None else self.labelled.subset(self.labelled.ids[:0])


class Trainer(Component):
    """A training stage. Callers use :meth:`fit`; a stage implements :meth:`train`.

    ``inputs`` names the :class:`StageData` inputs the stage trains on; :meth:`fit` refuses
    any other non-empty input with a message naming the stage and the input, so a defense
    cannot silently hand a forget set to a stage that would ignore it.
    """

    kind = "trainer"
    #: the named inputs this stage uses (a subset of :data:`STAGE_INPUTS`)
    inputs: ClassVar[tuple[str, ...]] = ("labelled",)

    def fit(self, model: "Classifier", data: "ImageSet | StageData", ctx: StageContext, *,
            forget: Optional["ImageSet"] = None, unlabelled: Optional["ImageSet"] = None) -> list[dict]:
        """Train ``model`` in place and return the per-epoch history. ``data`` is a
        :class:`StageData`, or an ImageSet taken as the labelled input with ``forget`` and
        ``unlabelled`` as the other inputs."""
        import torch

        if isinstance(data, StageData):
            if forget is not None or unlabelled is not None:
                raise TypeError("pass the inputs either as a StageData or as keyword arguments, not both")
            inputs = data
        else:
            inputs = StageData(data, unlabelled, forget)
        extra = [n for n in inputs.given() if n not in self.inputs]
        if extra:
            takes = " and ".join(self.inputs)
            raise ValueError(f"the {self.name} stage has no {extra[0]} set (it takes {takes} data); "
                             + {"forget": "use an unlearning or mixed stage to unlearn a set",
                                "unlabelled": "use a stage that takes unlabelled data (mixmatch, simclr)",
                                "labelled": "pass the data as the stage's own input"}[extra[0]])
        sets = [getattr(inputs, n) for n in inputs.given()]
        if len(sets) > 1:
            ids = torch.cat([s.ids for s in sets])
            if len(torch.unique(ids)) != len(ids):
                raise ValueError(f"the {self.name} stage's {' and '.join(inputs.given())} sets share sample ids")
        return self.train(model, inputs, ctx)

    def train(self, model: "Classifier", inputs: StageData, ctx: StageContext) -> list[dict]:
        """The stage itself (called by :meth:`fit` with checked inputs)."""
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
    #: whether the defense uses the recipe's trusted clean data (``ctx.clean``): ``"none"``,
    #: ``"optional"`` or ``"required"`` (a recipe without ``[clean]`` is then refused)
    clean_data: ClassVar[str] = "none"

    def run(self, data: "ImageSet", ctx: "DefenseContext") -> DefenseResult:
        """Produce a model from the untrusted ``data`` (no ground truth is available here)."""
        raise NotImplementedError


@runtime_checkable
class Checkpoint(Protocol):
    """A finished step of a defense, persisted so that ``--resume`` does not redo it.

    ``load()`` returns the saved result (or ``None`` if the step has not finished) and replays
    the history records the step logged into the run's history, marked ``replayed``.
    ``save(result)`` persists ``result`` (any ``torch.save``-able object) with every record
    logged since the checkpoint was created, and removes the per-epoch resume files of the
    stages created since then. ``save`` may be called again (an incremental step such as
    MeCa's enhancement loop); the last call wins.
    """

    name: str

    def load(self) -> Any: ...

    def save(self, result: Any) -> None: ...


@runtime_checkable
class DefenseContext(Protocol):
    """What a defense receives from the runner (``bdframe.runner.RunContext``), and nothing else.

    It carries nothing about the attack: no recipe, no poison ids, target or trigger.
    """

    #: the run seed (derive per-step seeds from it with ``bdframe.seeding.derive_seed``)
    seed: int
    #: the torch device models and batches go to
    device: Any
    #: the dataset's :class:`~bdframe.data.DatasetInfo`
    info: "DatasetInfo"
    #: show progress bars
    progress: bool
    #: a directory for the defense's own files (plots, scores, models), or None outside a run
    artifacts: Optional["Path"]
    #: the trusted clean data of the recipe's ``[clean]`` section (reserved from the training
    #: split before poisoning, so disjoint from ``data``), or None when the recipe gives none
    clean: Optional["ImageSet"]

    def new_model(self, *, num_classes: Optional[int] = None, state_dict: Optional[dict] = None) -> "Classifier":
        """A freshly initialised model of the recipe's ``[model]`` (seeded by the run seed and a
        counter), on the device; ``num_classes`` builds it with another head, ``state_dict``
        loads weights into it."""
        ...

    def component(self, kind: str, name: Optional[str] = None, **params) -> Component:
        """A component through the registry, ``params`` checked against its Config. Without a
        name, the recipe's own component of that kind (``component("trainer")`` is the
        ``[train]`` stage, with the recipe's parameters updated by ``params``)."""
        ...

    def stage(self, name: str, *, evaluate_each_epoch: bool = False, lr_setting: str = "[train] lr") -> StageContext:
        """A :class:`StageContext` for one training stage; a name can be used once per run."""
        ...

    def checkpoint(self, name: str) -> Checkpoint:
        """A :class:`Checkpoint` for one finished step of the defense."""
        ...

    def evaluate(self, model: Any) -> dict:
        """``{"clean_acc": ...}`` and ``"asr"`` (with an attack) on the held-out test sets, for
        reporting only: a defense must not select or tune anything on these figures."""
        ...

    def log(self, record: dict) -> None:
        """Append a record to the run's history (``history.jsonl``)."""
        ...


@attrs.frozen
class Kind:
    """One kind of component: its interface, the hook that registers it and its recipe section.

    ``when_missing`` says what a recipe without the section gets: ``"error"`` (required),
    ``"nothing"`` (optional; no component) or ``"default"`` (the installed component of this
    kind whose class sets ``default = True``; an error if there is none). ``section`` is None
    for kinds a recipe does not name (scorers: defenses and ``bdframe scan`` create them).
    """

    name: str
    interface: type
    hook: str
    section: Optional[str]
    when_missing: str = "error"


#: Every kind of component. Adding a kind is a row here plus its hookspec in ``hookspecs``.
KIND_TABLE = (
    Kind("dataset", DatasetFactory, "bdframe_register_datasets", "dataset"),
    Kind("model", ModelFactory, "bdframe_register_models", "model"),
    Kind("attack", Attack, "bdframe_register_attacks", "attack", "nothing"),
    Kind("scorer", SampleScorer, "bdframe_register_scorers", None),
    Kind("trainer", Trainer, "bdframe_register_trainers", "train", "default"),
    Kind("defense", Defense, "bdframe_register_defenses", "defense", "default"),
)
KINDS = tuple(k.name for k in KIND_TABLE)
KIND = {k.name: k for k in KIND_TABLE}
#: recipe section -> Kind, in recipe order
SECTIONS = {k.section: k for k in KIND_TABLE if k.section is not None}

"""TOML recipes: parsed with tomllib, structured with cattrs into attrs classes.

A recipe names one component per section as ``{name = "...", ...params}``; params are
structured into that component's ``Config`` with unknown keys forbidden. All problems are
collected and reported together, each with its path (``$.attack.poison_rate: ...``).
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Optional

import attrs
import cattrs

from bdframe.config import strict_converter, structure_problems, validate_all
from bdframe.errors import RecipeError, UserError
from bdframe.interfaces import SECTIONS

converter = strict_converter()


@attrs.frozen
class ComponentSpec:
    kind: str
    name: str
    config: Any

    def to_dict(self) -> dict:
        return {"name": self.name, **config_to_dict(self.config)}


@attrs.frozen
class EvalSettings:
    batch_size: int = attrs.field(default=512, validator=lambda i, a, v: _pos(v))


def _fraction(inst, attr, v):
    if not 0 <= v < 1:
        raise ValueError(f"must be a share of the training set in [0, 1), got {v!r}")


@attrs.frozen
class CleanSettings:
    """``[clean]``: the defender's trusted clean data, from one of two sources. ``fraction`` of
    the training split, drawn per class by the run seed, is set aside *before* the attack
    poisons the rest: it is clean by construction and is not part of the untrusted training set
    a defense receives. Or ``folder``: images the defender trusts, ``<folder>/<class>/<image>``
    with the dataset's class names and image shape. Neither (the default): no clean data."""

    fraction: float = attrs.field(default=0.0, validator=_fraction, metadata={
        "help": "share of the training split reserved as trusted clean data before poisoning (0: none)"})
    folder: str = attrs.field(default="", metadata={
        "help": "a folder <folder>/<class>/<image> of trusted images instead (the dataset's class names and shape)"})

    def check(self):
        if self.fraction and self.folder:
            return [("folder", "give either fraction (a reserve of the training split) or folder, not both")]
        return []

    @property
    def given(self) -> bool:
        return bool(self.fraction or self.folder)


@attrs.frozen
class PluginSettings:
    block: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()


def _pos(v):
    if v <= 0:
        raise ValueError(f"must be a positive integer, got {v!r}")


@attrs.frozen
class Recipe:
    """A validated recipe. The component of each section (``recipe.dataset``, ``recipe.attack``,
    ... for every section of ``bdframe.interfaces.SECTIONS``) is a :class:`ComponentSpec`, or
    None for an optional section left out."""

    name: str
    seed: int
    device: str
    output_dir: str
    components: dict = attrs.field(factory=dict)
    eval: EvalSettings = EvalSettings()
    plugins: PluginSettings = PluginSettings()
    clean: CleanSettings = CleanSettings()

    def __getattr__(self, section: str):
        if section in SECTIONS:
            return self.components.get(section)
        raise AttributeError(section)

    def to_dict(self) -> dict:
        """The resolved recipe (every default filled in), loadable again by :func:`loads_dict`."""
        out: dict[str, Any] = {"name": self.name, "seed": self.seed, "device": self.device,
                               "output_dir": self.output_dir}
        for section in SECTIONS:
            spec = self.components.get(section)
            if spec is not None:
                out[section] = spec.to_dict()
        if self.clean.given:
            out["clean"] = {k: v for k, v in config_to_dict(self.clean).items() if v}
        out["eval"] = config_to_dict(self.eval)
        plugins = config_to_dict(self.plugins)
        if any(plugins.values()):
            out["plugins"] = plugins
        return out

    def to_toml(self) -> str:
        import toml

        return toml.dumps(self.to_dict())


TOP_KEYS = {"name": str, "seed": int, "device": str, "output_dir": str}


def name_problems(name: str) -> list[str]:
    """A run name becomes a directory name: non-empty, no path separators, not ``.``/``..``."""
    if not name.strip():
        return ["must be a non-empty run name (it names the run directory)"]
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        return [f"must be a plain name without '/', '\\' or NUL and not '.' or '..', got {name!r}"]
    return []


def _clean(v):
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items() if x is not None}
    return v


def config_to_dict(config) -> dict:
    """Unstructure a Config for TOML: tuples become lists, None (the default) is omitted."""
    return _clean(converter.unstructure(config))


def _closest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def structure_config(cls: type, params: dict, path: str) -> Any:
    """Structure ``params`` into ``cls.Config``; raise :class:`RecipeError` with every problem."""
    problems = config_problems(cls, params, path)
    if problems:
        raise RecipeError(problems)
    return _structure(cls.Config, params)


def _structure(config_cls, params):
    with attrs.validators.disabled():
        return converter.structure(params, config_cls)


def config_problems(cls: type, params: dict, path: str) -> list[str]:
    config_cls = cls.Config
    allowed = [f.name for f in attrs.fields(config_cls)]
    problems = []
    for key in params:
        if key not in allowed:
            problems.append(f"{path}.{key}: unknown parameter for {cls.kind} {cls.name!r}{_closest(key, allowed)}; "
                            f"allowed: {', '.join(allowed) if allowed else '(none)'}")
    if problems:
        return problems
    try:
        obj = _structure(config_cls, params)
    except cattrs.BaseValidationError as e:
        return structure_problems(e, path)
    except (ValueError, TypeError) as e:
        return [f"{path}: {e}"]
    return [f"{path}.{field}: {msg}" for field, msg in validate_all(obj)]


def table_problems(registry, kind: str, name: str, field: str, given: dict, *, defaults: dict | None = None,
                   owned: tuple = ()) -> list[tuple[str, str]]:
    """``(field, message)`` problems of a component config's table ``field`` that holds the
    parameters of the component ``kind``/``name`` (a defense's stage or scorer settings), for
    :meth:`~bdframe.interfaces.Component.check_components`: the component must be installed,
    ``owned`` keys (set by the defense itself) may not appear, and ``defaults`` updated by the
    table must be valid parameters of the component."""
    problems = [(field, f"{k!r} is set by the defense itself, not here") for k in owned if k in given]
    if not registry.has(kind, name):
        return problems + [(field, registry.unknown_message(kind, name))]
    params = {**(defaults or {}), **{k: v for k, v in given.items() if k not in owned}}
    return problems + [tuple(m.split(": ", 1)) for m in config_problems(registry.get(kind, name), params, field)]


def parse_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe file {str(path)!r} does not exist" if not p.exists()
                        else f"recipe path {str(path)!r} is not a file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"recipe {str(path)!r} is not UTF-8 text") from None
    except Exception as e:  # tomllib.TOMLDecodeError carries line and column
        raise UserError(f"recipe {str(path)!r} is not valid TOML: {e}") from None


def load(path: str | Path, registry, *, check_dataset: bool = True) -> Recipe:
    data = parse_toml(path)
    return loads_dict(data, registry, source=str(path), default_name=Path(path).stem,
                      check_dataset=check_dataset)


def plugin_settings(data: dict) -> tuple[PluginSettings, list[str]]:
    raw = data.get("plugins", {})
    if not isinstance(raw, dict):
        return PluginSettings(), ["$.plugins: must be a table with 'block' and/or 'modules'"]
    problems = []
    for k in raw:
        if k not in ("block", "modules"):
            problems.append(f"$.plugins.{k}: unknown key; allowed: block, modules")
    vals = {}
    for k in ("block", "modules"):
        v = raw.get(k, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            problems.append(f"$.plugins.{k}: must be a list of strings, got {v!r}")
        else:
            vals[k] = tuple(v)
    return PluginSettings(**vals), problems


def loads_dict(data: dict, registry, *, source: str | None = None, default_name: str = "run",
               check_dataset: bool = True) -> Recipe:
    """Validate a parsed recipe against ``registry`` (build it with
    :func:`bdframe.plugins.load_registry`, honouring the recipe's ``[plugins]``; or use
    :func:`bdframe.plugins.load_recipe`). Collects every problem before raising
    :class:`RecipeError`."""
    problems: list[str] = []
    plugins, p = plugin_settings(data)
    problems += p

    allowed_top = list(TOP_KEYS) + list(SECTIONS) + ["clean", "eval", "plugins"]
    for key in data:
        if key not in allowed_top:
            problems.append(f"$.{key}: unknown key{_closest(key, allowed_top)}; allowed: {', '.join(allowed_top)}")
    head: dict[str, Any] = {"name": default_name, "seed": 0, "device": "auto", "output_dir": "runs"}
    for key, typ in TOP_KEYS.items():
        if key in data:
            v = data[key]
            if not isinstance(v, typ) or isinstance(v, bool):
                problems.append(f"$.{key}: must be {'an integer' if typ is int else 'a string'}, got {v!r}")
            else:
                head[key] = v
    problems += [f"$.name: {m}" for m in name_problems(head["name"])]
    if not head["output_dir"].strip():
        problems.append("$.output_dir: must name a directory, got an empty string")
    if isinstance(head["seed"], int) and head["seed"] < 0:
        problems.append(f"$.seed: must be >= 0, got {head['seed']}")
    dev = head["device"]
    if not (dev in ("auto", "cpu", "mps") or dev == "cuda" or dev.startswith("cuda:")):
        problems.append(f"$.device: must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {dev!r}")

    specs: dict[str, Optional[ComponentSpec]] = {}
    for section, kind_spec in SECTIONS.items():
        kind = kind_spec.name
        raw = data.get(section)
        path = f"$.{section}"
        if raw is None:
            default = registry.default(kind) if kind_spec.when_missing == "default" else None
            if default is not None:
                raw = {"name": default}
            elif kind_spec.when_missing == "nothing":
                specs[section] = None
                continue
            else:
                problems.append(f"{path}: missing section; give [{section}] with name = one of: "
                                f"{', '.join(registry.names(kind)) or '(none installed)'}")
                continue
        if not isinstance(raw, dict):
            problems.append(f"{path}: must be a table {{name = \"...\", ...}}, got {raw!r}")
            continue
        params = dict(raw)
        name = params.pop("name", None)
        if not isinstance(name, str):
            problems.append(f"{path}.name: missing component name; one of: {', '.join(registry.names(kind))}")
            continue
        if not registry.has(kind, name):
            problems.append(f"{path}.name: {registry.unknown_message(kind, name)}")
            continue
        cls = registry.get(kind, name)
        p = config_problems(cls, params, path)
        if p:
            problems += p
            continue
        spec = ComponentSpec(kind, name, _structure(cls.Config, params))
        p = [f"{path}.{f}: {m}" for f, m in cls.check_components(spec.config, registry)]
        if p:
            problems += p
            continue
        specs[section] = spec

    settings = {}
    for key, cls in (("eval", EvalSettings), ("clean", CleanSettings)):
        raw = data.get(key, {})
        settings[key] = cls()
        if isinstance(raw, dict):
            p = config_problems(type("S", (), {"Config": cls, "kind": "settings", "name": key}), raw, f"$.{key}")
            problems += p
            if not p:
                settings[key] = _structure(cls, raw)
        else:
            problems.append(f"$.{key}: must be a table")
    defense = specs.get("defense")
    folder = settings["clean"].folder
    if folder and not Path(folder).expanduser().is_dir():
        problems.append(f"$.clean.folder: {folder!r} is not a folder (expected <folder>/<class>/<image>)")
    if defense is not None and not settings["clean"].given:
        if getattr(registry.get("defense", defense.name), "clean_data", "none") == "required":
            problems.append(f"$.clean: defense {defense.name!r} needs trusted clean data and the recipe gives "
                            f"none; add [clean] with fraction = 0.05 (a share of the training set reserved "
                            f"before poisoning) or folder = \"...\" (a folder of trusted images)")

    if check_dataset and specs.get("dataset") is not None:
        ds = specs["dataset"]
        info = None
        try:
            info = registry.get("dataset", ds.name)(ds.config).describe()
        except UserError as e:
            problems += [f"$.dataset: {m}" for m in e.messages]
        if info is not None and specs.get("attack") is not None:
            at = specs["attack"]
            attack = registry.get("attack", at.name)(at.config)
            problems += [f"$.attack.{f}: {m}" for f, m in attack.check_dataset(info)]

    if problems:
        raise RecipeError(problems, source=source)
    return Recipe(components=specs, eval=settings["eval"], clean=settings["clean"], plugins=plugins, **head)

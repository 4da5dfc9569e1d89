"""Generate docs/recipe-reference.md from the plugin registry.

    python docs/gen_reference.py            # rewrite docs/recipe-reference.md
    python docs/gen_reference.py --check    # exit 1 if the committed file is out of date
    python docs/gen_reference.py --all --out my-reference.md
                                            # also document third-party plugins installed here

By default the reference covers the plugins bdframe ships: the distributions that
requirements-dev.txt installs from plugins/. It loads exactly those (BDFRAME_LOAD_PLUGINS and
BDFRAME_BLOCK_PLUGINS are ignored while it runs), so the output depends only on their Configs,
not on what else happens to be installed. Every list is sorted, so the output is deterministic.
tests/test_docs.py regenerates it and compares it with the committed file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tomllib
import typing
from pathlib import Path
from types import UnionType

import attrs

from bdframe.config import describe_fields
from bdframe.interfaces import KINDS, SECTIONS
from bdframe.plugins import load_registry
from bdframe.recipe import CleanSettings, EvalSettings, PluginSettings, config_problems, loads_dict

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "recipe-reference.md"

KIND_TITLES = {"dataset": "Datasets", "model": "Models", "attack": "Attacks", "scorer": "Sample scorers",
               "trainer": "Training stages", "defense": "Defenses"}
KIND_SECTION = {k.name: section for section, k in SECTIONS.items()}


def builtin_distributions() -> list[str]:
    """Distribution names of the plugins (distributions with a ``bdframe`` entry point)
    requirements-dev.txt installs from plugins/."""
    names = []
    for line in (ROOT / "requirements-dev.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("-e "):
            continue
        path = (ROOT / line[3:].strip()).resolve()
        if ROOT / "plugins" not in path.parents:
            continue
        project = tomllib.loads((path / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        if "bdframe" in project.get("entry-points", {}):  # libraries such as bdframe-attack-common register nothing
            names.append(project["name"])
    return sorted(names)


@contextlib.contextmanager
def _environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def builtin_registry():
    """A registry of the built-in plugins only; fails if one of them is missing or broken."""
    names = builtin_distributions()
    with _environ(BDFRAME_LOAD_PLUGINS=",".join(names), BDFRAME_BLOCK_PLUGINS=None):
        registry = load_registry()
    problems = [f"plugin {p} failed to load: {err}" for p, err in registry.failed]
    found = {e.provider.plugin for e in registry.entries()}
    problems += [f"built-in plugin {n} is not installed (or registers nothing)" for n in names if n not in found]
    if problems:
        raise RuntimeError("cannot generate the reference:\n  " + "\n  ".join(problems)
                           + "\ninstall everything with: pip install -r requirements-dev.txt")
    return registry


# -- formatting ----------------------------------------------------------------------------------

def toml_value(v) -> str:
    """A default as it would be written in a recipe."""
    if v is attrs.NOTHING:
        return "*required*"
    if v is None:
        return "*unset*"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v).lower()
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def _one_line(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def cell(text) -> str:
    """Prose for a table cell or paragraph: one line, pipes and ``<`` escaped."""
    return _one_line(text).replace("<", "&lt;")


def code(text) -> str:
    text = _one_line(text)
    return f"`{text}`" if text else ""


def sentence(text: str) -> str:
    text = cell(text)
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def type_name(t) -> str:
    """A field's annotation (``Optional[int]``, ``tuple[str, ...]``), spelt the same on every
    Python version."""
    if isinstance(t, str):
        return t
    if t is Ellipsis:
        return "..."
    if t is type(None):
        return "None"
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is None:
        return getattr(t, "__name__", str(t))
    if origin is typing.Union or origin is UnionType:
        rest = [a for a in args if a is not type(None)]
        inner = type_name(rest[0]) if len(rest) == 1 else f"Union[{', '.join(type_name(a) for a in rest)}]"
        return f"Optional[{inner}]" if len(rest) < len(args) else inner
    name = getattr(origin, "__name__", str(origin))
    return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name


def allowed(field) -> str:
    """What a field's validator accepts, in the validator's own words.

    The validators of :mod:`bdframe.config` say what is allowed when they reject a value; they
    are called with NaN (which every range and choice rejects) and the message is kept up to
    its ``, got ...`` part. Fields without such a validator give ""."""
    if field.validator is None:
        return ""
    for probe, prefix in ((math.nan, ""), ([math.nan], "each ")):
        try:
            field.validator(None, field, probe)
        except ValueError as e:
            msg = str(e)
        except TypeError:
            continue
        else:
            continue
        if msg.startswith("element 0: "):
            msg = msg[len("element 0: "):]
        if msg.startswith("must be") and ", got " in msg:
            return prefix + msg.rsplit(", got ", 1)[0][len("must be "):]
    return ""


def fields_table(config_cls, extra_help: dict | None = None) -> list[str]:
    # Resolve string annotations first: cattrs resolves a Config's types when it first
    # structures one, and the output must not depend on whether that has happened yet.
    attrs.resolve_types(config_cls)
    fields = {f.name: f for f in attrs.fields(config_cls)}
    rows = list(describe_fields(config_cls))
    if not rows:
        return ["No parameters."]
    out = ["| parameter | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, _, default, help_ in rows:
        f = fields[name]
        help_ = help_ or (extra_help or {}).get(name, "")
        d = toml_value(default)
        out.append(f"| `{name}` | {code(type_name(f.type))} | {d if d.startswith('*') else code(d)} | "
                   f"{cell(allowed(f))} | {cell(help_)} |")
    return out


# -- the document --------------------------------------------------------------------------------

def render(registry=None) -> str:
    """The reference as a string (the built-in plugins unless a registry is given)."""
    if registry is None:
        registry = builtin_registry()
    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated by `python docs/gen_reference.py` from the component Configs; do not edit by hand. -->",
        "",
        "Every component of the plugins bdframe ships, by kind, with the parameters of its `Config`.",
        "In a recipe a component is one table, `[section]` with `name = \"...\"` and any of the",
        "parameters below; a parameter left out takes its default. *unset* means the parameter is",
        "absent unless given (the component then uses the behaviour its description names).",
        "*allowed* is what the field's validator accepts, in its own words (`[a, b]` includes the",
        "bounds, `(a, b)` excludes them); checks that involve several fields or the dataset (a",
        "target class that must exist, a file that must exist, ...) are not listed and are reported",
        "by `bdframe validate`.",
        "",
        "`bdframe validate RECIPE --print` shows a recipe with every default filled in, and",
        "`bdframe plugins` lists what is installed in your environment, third-party plugins included.",
        "See [the user guide](user-guide.md) for how recipes are read and validated.",
        "",
        "## Top level",
        "",
    ]
    # defaults of the top-level keys, as the recipe loader fills them in
    first = {kind: next(n for n in registry.names(kind) if not config_problems(registry.get(kind, n), {}, ""))
             for kind in ("dataset", "model")}  # components that validate with their defaults
    minimal = loads_dict({"dataset": {"name": first["dataset"]}, "model": {"name": first["model"]}},
                         registry=registry, check_dataset=False, default_name="RECIPE")
    lines += [
        "| key | type | default | description |",
        "|---|---|---|---|",
        "| `name` | `str` | the recipe file's name without `.toml` | run name; the run directory is `<output_dir>/<name>` |",
        f"| `seed` | `int` | `{minimal.seed}` | run seed (>= 0); every other seed is derived from it |",
        f"| `device` | `str` | {code(toml_value(minimal.device))} | `\"auto\"`, `\"cpu\"`, `\"cuda\"`, `\"cuda:N\"` or `\"mps\"` |",
        f"| `output_dir` | `str` | {code(toml_value(minimal.output_dir))} | parent folder of run directories |",
        "",
        "## Sections",
        "",
        "| section | component kind | if the section is left out |",
        "|---|---|---|",
    ]
    for section, k in SECTIONS.items():
        kind = k.name
        default = registry.default(kind) if k.when_missing == "default" else None
        if default is not None:
            missing = f"`name = {toml_value(default)}` with its defaults"
        elif k.when_missing == "nothing":
            missing = "none (no attack: the data stay clean and no ASR is measured)"
        else:
            missing = "error: the section is required"
        lines.append(f"| `[{section}]` | [{kind}](#{KIND_TITLES[kind].lower().replace(' ', '-')}) | {missing} |")
    lines += ["| `[clean]` | settings | no trusted clean data (`fraction = 0`) |",
              "| `[eval]` | settings | the defaults below |",
              "| `[plugins]` | settings | the defaults below |", ""]
    lines += ["### `[clean]`", "",
              "The defender's trusted clean data ([clean-data.md](clean-data.md)). Defenses marked "
              "*needs `[clean]`* below are refused without it.", ""]
    lines += fields_table(CleanSettings) + [""]
    lines += ["### `[eval]`", ""]
    lines += fields_table(EvalSettings, {"batch_size": "batch size of the clean-accuracy and ASR evaluation "
                                                       "passes; a positive integer"}) + [""]
    lines += ["### `[plugins]`", ""]
    lines += fields_table(PluginSettings, {
        "block": "plugin names (entry-point names, i.e. distribution names) not to load for this recipe",
        "modules": "importable modules registered as plugins for this recipe only"}) + [""]

    for kind in KINDS:
        entries = sorted(registry.entries(kind), key=lambda e: e.name)
        if not entries:
            continue
        lines += [f"## {KIND_TITLES[kind]}", ""]
        if kind == "scorer":
            lines += ["Scorers are not a recipe section: `bdframe scan RUN --scorer NAME --param NAME.KEY=VALUE`",
                      "runs them on a saved run, and defenses create them with `ctx.component(\"scorer\", NAME, ...)`.",
                      ""]
        else:
            lines += [f"Recipe section: `[{KIND_SECTION[kind]}]`.", ""]
        for e in entries:
            lines += [f"### `{e.name}`", ""]
            if e.cls.summary:
                lines += [sentence(e.cls.summary), ""]
            facts = [f"distribution `{e.provider.distribution or e.provider.plugin}`",
                     f"class `{e.cls.__module__}.{e.cls.__qualname__}`"]
            if kind == "scorer":
                facts.append("set-level (a score depends on other samples)" if getattr(e.cls, "set_level", False)
                             else "per-sample")
            if kind == "defense" and getattr(e.cls, "clean_data", "none") != "none":
                facts.append("*needs `[clean]`*" if e.cls.clean_data == "required" else "uses `[clean]` when given")
            lines += [sentence("; ".join(facts)), ""]
            lines += fields_table(e.cls.Config) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REFERENCE), help="output file, or - for stdout (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if --out differs from the output")
    p.add_argument("--all", action="store_true",
                   help="document every installed plugin, third-party ones included (respects "
                        "BDFRAME_LOAD_PLUGINS / BDFRAME_BLOCK_PLUGINS)")
    args = p.parse_args(argv)
    if args.all and args.out == str(REFERENCE) and not args.check:
        p.error("--all describes this environment, not bdframe: give --out for it (the committed "
                "reference covers the built-in plugins only)")
    text = render(load_registry() if args.all else None)
    if args.check:
        current = Path(args.out).read_text(encoding="utf-8") if Path(args.out).exists() else ""
        if current != text:
            print(f"{args.out} is out of date; run: python docs/gen_reference.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

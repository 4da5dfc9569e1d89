"""``bdframe sweep``: a grid of runs from one base recipe and a set of axes.

A sweep file (TOML) names a base recipe and the settings to vary::

    name = "meca-grid"                 # the sweep directory is <output_dir>/<name>
    output_dir = "sweeps"              # default "sweeps", relative to the working directory
    base = "recipe.toml"               # a recipe file, relative to the sweep file; or a [base] table

    [axes]
    attack = ["badnet", {name = "blend", alpha = 0.1}, false]   # false: no [attack] section
    "defense.lam" = [0.05, 0.3]
    seed = [0, 1, 2]

    [axes.defense]                     # the labelled form: label = value, labels name the runs
    none = "none"
    meca = {name = "meca"}

    [[exclude]]                        # drop every run that matches all the given axes
    attack = "none"
    defense = "meca"

    [[include]]                        # add one run; gives a value for every axis
    attack = {name = "sig"}
    defense = "meca"
    "defense.lam" = 0.05
    seed = 0

Axes are combined as a product (in file order), then ``exclude`` removes runs and ``include``
adds runs. ``${PATH}`` in a string of the base recipe or of an axis value becomes the run's
label on the axis ``PATH`` (``model = "sweeps/a/runs/attack=${attack}/model.pt"``). An axis path is a recipe path: a section (``attack``: a component name, a table
``{name = ..., ...}`` replacing the whole section, or ``false`` to leave the section out) or a
setting inside one (``defense.lam``, ``train.epochs``) or a top-level key (``seed``, ``device``).
Paths are applied shortest first, so ``defense.lam`` sets a parameter of whichever defense the
``defense`` axis chose. In ``exclude``/``include``, a string that is one of the axis's labels
stands for that value.

Each run is an ordinary run directory, named from its axis labels in axis order
(``attack=badnet,defense=meca,seed=0``). The sweep directory holds::

    sweep.toml          the sweep file as given; base.toml its base recipe
    sweep.json          the axes and the runs with their labels (read by ``bdframe report``)
    recipes/<run>.toml  each run's recipe (``bdframe run recipes/<run>.toml`` runs it alone)
    runs/<run>/         finished runs; runs/<run>.partial/ interrupted ones
    logs/<run>.log      each run's output, every attempt appended
    failed/<run>.json   the error line of a run whose last attempt failed

``bdframe sweep run`` validates every run before any starts, skips finished runs, resumes
interrupted ones (a ``.partial`` directory whose recipe matches) and retries failed ones. Each run
is its own process (``python -m bdframe.sweep_worker``), holding a lock on ``locks/<run>.lock`` while it
runs, so a killed worker loses only its own unfinished run and two sweeps never run the same run
at once. Executors: ``local`` (a pool of processes on this machine) and ``ray`` (one Ray task
per run; the optional ``bdframe[ray]`` extra).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import attrs

from bdframe.errors import UserError

SWEEP_KEYS = ("name", "output_dir", "base", "axes", "exclude", "include")
#: top-level recipe keys a sweep sets itself
RESERVED = ("name", "output_dir")
_SAFE = re.compile(r"[^A-Za-z0-9._+\-]")


# -- labels and names ---------------------------------------------------------------------------

def _short(text: str, limit: int, key: str) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 9] + "~" + hashlib.sha1(key.encode()).hexdigest()[:8]


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "+".join(_scalar(x) for x in v) if v else "empty"
    if isinstance(v, dict):
        return "_".join(f"{k}-{_scalar(x)}" for k, x in v.items()) or "empty"
    return str(v)


def value_label(value, *, section: bool) -> str:
    """The label a value gets when the axis does not name it: a scalar as written, a component
    table as its name followed by its other parameters (``blend_alpha-0.1``), ``false`` for a
    section as ``none``. Only letters, digits and ``. _ + -`` are kept; long labels end in a hash."""
    if section and value is False:
        text = "none"
    elif isinstance(value, dict) and isinstance(value.get("name"), str):
        rest = {k: v for k, v in value.items() if k != "name"}
        text = value["name"] + ("_" + _scalar(rest) if rest else "")
    else:
        text = _scalar(value)
    text = _SAFE.sub("_", text) or "_"
    return _short(text, 60, json.dumps(value, sort_keys=True, default=str))


def run_name(labels: dict) -> str:
    """``path=label`` for every axis, in axis order, joined by commas (a stable directory name)."""
    text = ",".join(f"{path}={label}" for path, label in labels.items())
    return _short(text, 180, text)


# -- the sweep file -----------------------------------------------------------------------------

@attrs.frozen
class Axis:
    path: str
    labels: tuple
    values: tuple


@attrs.frozen
class Run:
    name: str
    labels: dict           # axis path -> label
    values: dict           # axis path -> value as written in the sweep file
    data: dict             # the run's recipe (unvalidated), name and output_dir set


@attrs.frozen
class Sweep:
    source: str
    name: str
    directory: Path
    base: dict
    axes: tuple
    runs: tuple
    excluded: int
    included: int

    def describe(self) -> str:
        sizes = " x ".join(f"{a.path} {len(a.values)}" for a in self.axes)
        extra = []
        if self.excluded:
            extra.append(f"{self.excluded} excluded")
        if self.included:
            extra.append(f"{self.included} included")
        return f"{len(self.runs)} runs ({sizes}{'; ' + ', '.join(extra) if extra else ''})"


def _is_section(path: str) -> bool:
    from bdframe.interfaces import SECTIONS

    return path in SECTIONS


def _apply(data: dict, path: str, value, problems: list, where: str, left_out: set) -> None:
    """Set ``path`` (dot-separated) in the recipe dict ``data`` to ``value``. A setting inside a
    section that another axis left out (``attack = false``) is not set: there is nothing to set
    it on."""
    parts = path.split(".")
    if len(parts) > 1 and _is_section(parts[0]) and parts[0] in left_out:
        return
    if _is_section(path):
        if value is False:
            data.pop(path, None)
            left_out.add(path)
        elif isinstance(value, str):
            data[path] = {"name": value}
        elif isinstance(value, dict):
            data[path] = dict(value)
        else:
            problems.append(f"{where}: a value of the section axis {path!r} must be a component name, a table "
                            f"{{name = \"...\", ...}} or false (leave the section out), got {value!r}")
        return
    node = data
    for i, key in enumerate(parts[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            problems.append(f"{where}: cannot set {path!r}: {'.'.join(parts[:i + 1])!r} is {child!r}, not a table")
            return
        else:
            child = node[key] = dict(child)
        node = child
    node[parts[-1]] = value


_TEMPLATE = re.compile(r"\$\{([^}]*)\}")


def _substitute(obj, labels: dict, problems: list, where: str):
    """``${PATH}`` in any string of a run's recipe becomes the run's label on the axis PATH (a
    setting that follows another axis, e.g. the model file of an earlier sweep's run)."""
    if isinstance(obj, dict):
        return {k: _substitute(v, labels, problems, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, labels, problems, where) for v in obj]
    if isinstance(obj, str) and "${" in obj:
        def repl(m):
            if m.group(1) not in labels:
                problems.append(f"{where}: ${{{m.group(1)}}} in {obj!r} names no axis; axes: {', '.join(labels)}")
                return m.group(0)
            return labels[m.group(1)]

        return _TEMPLATE.sub(repl, obj)
    return obj


def _check_path(path, where: str) -> Optional[str]:
    if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
        return f"{where}: an axis path is a dotted recipe path such as 'attack', 'defense.lam' or 'seed', got {path!r}"
    if path.split(".")[0] in RESERVED:
        return f"{where}: {path!r} is set by the sweep (the run name and the sweep directory); it cannot be an axis"
    return None


def _read_axes(raw, problems: list) -> list[Axis]:
    if not isinstance(raw, dict) or not raw:
        problems.append("$.axes: must be a table of at least one axis: path = [values] or [axes.PATH] label = value")
        return []
    axes = []
    for path, spec in raw.items():
        where = f"$.axes.{path!r}" if "." in path else f"$.axes.{path}"
        p = _check_path(path, where)
        if p:
            problems.append(p)
            continue
        section = _is_section(path)
        if isinstance(spec, list):
            values = tuple(spec)
            labels = tuple(value_label(v, section=section) for v in values)
        elif isinstance(spec, dict):
            values = tuple(spec.values())
            labels = tuple(spec.keys())
            bad = [lab for lab in labels if _SAFE.sub("_", lab) != lab or not lab]
            if bad:
                problems.append(f"{where}: label {bad[0]!r}: labels name run directories; use only letters, digits "
                                f"and . _ + -")
                continue
        else:
            problems.append(f"{where}: must be a list of values or a table of label = value, got {spec!r}")
            continue
        if not values:
            problems.append(f"{where}: has no values")
            continue
        seen: dict = {}
        for i, lab in enumerate(labels):
            if lab in seen:
                problems.append(f"{where}: values {seen[lab] + 1} and {i + 1} both get the label {lab!r}; name them "
                                f"with the table form [axes.{path}] label = value")
                break
            seen[lab] = i
        axes.append(Axis(path, labels, values))
    return axes


def _norm(axis: Axis, value):
    """A section value in one form: a component name means ``{name = ...}``."""
    if _is_section(axis.path) and isinstance(value, str):
        return {"name": value}
    return value


def _resolve(axis: Axis, value) -> tuple[str, Any]:
    """An exclude/include value: one of the axis's labels, or a value of its own."""
    if isinstance(value, str) and value in axis.labels:
        i = axis.labels.index(value)
        return axis.labels[i], axis.values[i]
    for lab, v in zip(axis.labels, axis.values):
        if _norm(axis, v) == _norm(axis, value):
            return lab, v
    return value_label(value, section=_is_section(axis.path)), value


def _matches(axis: Axis, label: str, value, want) -> bool:
    """Whether an exclude entry's ``want`` picks the axis value ``value`` (labelled ``label``): by
    label, by value, or for a section by component name."""
    if isinstance(want, str) and want in axis.labels:
        return want == label
    if _is_section(axis.path) and isinstance(want, str) and isinstance(value, (str, dict)):
        name = value if isinstance(value, str) else value.get("name")
        return want == name
    return _norm(axis, want) == _norm(axis, value)


def load(path: str | Path) -> Sweep:
    """Read and expand a sweep file (every problem collected into one :class:`UserError`); the
    runs' recipes are not validated here (see :func:`validate`)."""
    from bdframe.recipe import parse_toml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {str(path)!r} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        raw = parse_toml(path)
    except UserError as e:
        raise UserError([m.replace("recipe", "sweep file", 1) for m in e.messages]) from None
    problems: list[str] = []
    for key in raw:
        if key not in SWEEP_KEYS:
            problems.append(f"$.{key}: unknown key; a sweep file has {', '.join(SWEEP_KEYS)} (recipe settings go "
                            f"in the base recipe)")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or _SAFE.sub("_", name) != name or not name:
        problems.append(f"$.name: must be a name of letters, digits and . _ + -, got {name!r}")
    output_dir = raw.get("output_dir", "sweeps")
    if not isinstance(output_dir, str) or not output_dir.strip():
        problems.append(f"$.output_dir: must name a directory, got {output_dir!r}")
        output_dir = "sweeps"

    base = raw.get("base")
    if isinstance(base, str):
        base_path = (path.parent / base)
        if not base_path.is_file():
            problems.append(f"$.base: recipe file {str(base_path)!r} does not exist")
            base = {}
        else:
            try:
                base = parse_toml(base_path)
            except UserError as e:
                problems += [f"$.base: {m}" for m in e.messages]
                base = {}
    elif isinstance(base, dict):
        base = dict(base)
    else:
        problems.append("$.base: missing; give base = \"recipe.toml\" (relative to the sweep file) or a [base] table")
        base = {}

    axes = _read_axes(raw.get("axes"), problems)
    if problems:
        raise UserError([f"invalid sweep {path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}"]
                        + [f"  {p}" for p in problems])

    by_path = {a.path: a for a in axes}
    product = [dict(zip(by_path, combo)) for combo in itertools.product(*[range(len(a.values)) for a in axes])]
    combos = list(product)

    def entries(key):
        val = raw.get(key, [])
        if not isinstance(val, list) or not all(isinstance(e, dict) for e in val):
            problems.append(f"$.{key}: must be an array of tables ([[{key}]] with axis = value lines)")
            return []
        return val

    excluded = 0
    for n, entry in enumerate(entries("exclude"), 1):
        unknown = [k for k in entry if k not in by_path]
        if unknown or not entry:
            problems.append(f"$.exclude[{n}]: " + (f"{unknown[0]!r} is not an axis; axes: {', '.join(by_path)}"
                                                   if unknown else "is empty"))
            continue
        def hit(c):
            return all(_matches(by_path[k], by_path[k].labels[c[k]], by_path[k].values[c[k]], want)
                       for k, want in entry.items())

        keep = [c for c in combos if not hit(c)]
        if not any(hit(c) for c in product):
            problems.append(f"$.exclude[{n}]: matches no run ({entry!r}); check its values against the axis labels")
        excluded += len(combos) - len(keep)
        combos = keep

    chosen: list[tuple[dict, dict]] = []
    for c in combos:
        chosen.append(({p: by_path[p].labels[i] for p, i in c.items()}, {p: by_path[p].values[i] for p, i in c.items()}))
    included = 0
    for n, entry in enumerate(entries("include"), 1):
        unknown = [k for k in entry if k not in by_path]
        missing = [p for p in by_path if p not in entry]
        if unknown:
            problems.append(f"$.include[{n}]: {unknown[0]!r} is not an axis; axes: {', '.join(by_path)} (to vary "
                            f"another setting, add it as an axis)")
            continue
        if missing:
            problems.append(f"$.include[{n}]: gives no value for the axis {missing[0]!r}; an included run names a "
                            f"value (or a label) for every axis")
            continue
        labels, values = {}, {}
        for p in by_path:
            labels[p], values[p] = _resolve(by_path[p], entry[p])
        chosen.append((labels, values))
        included += 1

    directory = Path(output_dir) / name if isinstance(name, str) else Path(output_dir)
    runs: dict[str, Run] = {}
    for labels, values in chosen:
        rname = run_name(labels)
        data = json.loads(json.dumps(base, default=str))
        where = f"run {rname}"
        left_out: set = set()
        for p in sorted(values, key=lambda q: q.count(".")):
            _apply(data, p, values[p], problems, where, left_out)
        data = _substitute(data, labels, problems, where)
        data["name"] = rname
        data["output_dir"] = str(directory / "runs")  # as given: relative to the working directory
        if rname in runs:
            if runs[rname].data != data:
                problems.append(f"{where}: two runs get this name with different recipes (an included run repeats "
                                f"labels of another); give its values labels of their own")
            continue
        runs[rname] = Run(rname, labels, values, data)
    if not runs and not problems:
        problems.append("$.exclude: the sweep expands to no runs")
    if problems:
        raise UserError([f"invalid sweep {path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}"]
                        + [f"  {p}" for p in problems])
    return Sweep(str(path), name, directory, base, tuple(axes), tuple(runs.values()), excluded, included)


# -- validation ---------------------------------------------------------------------------------

def validate(sweep: Sweep, *, check_dataset: bool = True) -> dict:
    """Validate every run's recipe; returns ``{run name: resolved recipe TOML}`` or raises one
    :class:`UserError` listing each problem with the run it belongs to and its path.
    ``check_dataset=False`` skips reading the datasets (their roots and the attacks' fit)."""
    from bdframe import recipe as rmod
    from bdframe.errors import RecipeError
    from bdframe.nn import device_problem
    from bdframe.runs import output_problem

    checked_data: set = set()
    out, problems = {}, []
    for run in sweep.runs:
        where = f"run {run.name}"
        settings, p = rmod.plugin_settings(run.data)
        if p:
            problems += [f"{where}: {m}" for m in p]
            continue
        try:
            registry = _registry(settings)
            # a dataset (and the attack's fit to it) is checked once per distinct pair, not per run
            dkey = json.dumps([run.data.get("dataset"), run.data.get("attack")], sort_keys=True, default=str)
            recipe = rmod.loads_dict(run.data, registry, default_name=run.name,
                                     check_dataset=check_dataset and dkey not in checked_data)
            checked_data.add(dkey)
        except RecipeError as e:
            problems += [f"{where}: {m}" for m in e.problems]
            continue
        except UserError as e:
            problems += [f"{where}: {m}" for m in e.messages]
            continue
        problem = device_problem(recipe.device)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        out[run.name] = (recipe, registry)
    problem = output_problem(sweep.directory, "$.output_dir")
    if problem:
        problems.insert(0, problem)
    if problems:
        raise UserError([f"invalid sweep {sweep.source}: {len(problems)} problem{'s' if len(problems) > 1 else ''}"]
                        + [f"  {p}" for p in problems])
    return {name: recipe.to_toml() for name, (recipe, _) in out.items()}


# -- run states ---------------------------------------------------------------------------------

def _digest(text: str) -> str:
    from bdframe.runs import recipe_digest

    return recipe_digest(text)


def same_recipe(a: str, b: str) -> bool:
    """Whether two resolved recipes (TOML) ask for the same run: equal apart from
    ``output_dir``, which says where a run is written, not what it computes."""
    import tomllib

    try:
        da, db = tomllib.loads(a), tomllib.loads(b)
    except tomllib.TOMLDecodeError:
        return False
    da.pop("output_dir", None)
    db.pop("output_dir", None)
    return da == db


def _reresolved(text: str) -> Optional[str]:
    """A finished run's resolved recipe resolved again by the installed plugins: a parameter
    added since (with its default) is filled in, so the run still counts as this recipe's.
    None if it no longer validates."""
    import tomllib

    from bdframe import recipe as rmod

    try:
        data = tomllib.loads(text)
        settings, problems = rmod.plugin_settings(data)
        if problems:
            return None
        return rmod.loads_dict(data, _registry(settings), check_dataset=False).to_toml()
    except (tomllib.TOMLDecodeError, UserError):
        return None


_REGISTRIES: dict = {}


def _registry(settings):
    """The registry for a recipe's ``[plugins]`` settings, built once per process."""
    from bdframe.plugins import load_registry

    key = (settings.block, settings.modules)
    if key not in _REGISTRIES:
        _REGISTRIES[key] = load_registry(block=settings.block, modules=settings.modules)
    return _REGISTRIES[key]


def run_state(directory: Path, name: str, toml_text: str) -> str:
    """``finished``, ``stale`` (finished with another recipe), ``resume`` (a matching
    ``.partial``), ``restart`` (a ``.partial`` of another recipe) or ``new``. A finished run's
    recipe matches when it is the same apart from ``output_dir``, also after resolving it again
    (options added to a component since it ran take their defaults)."""
    final = directory / "runs" / name
    if (final / "metrics.json").is_file():
        try:
            saved = (final / "recipe.toml").read_text(encoding="utf-8")
        except OSError:
            return "stale"
        if same_recipe(saved, toml_text):
            return "finished"
        again = _reresolved(saved)
        return "finished" if again is not None and same_recipe(again, toml_text) else "stale"
    partial = directory / "runs" / f"{name}.partial"
    if partial.is_dir():
        try:
            saved = json.loads((partial / "resume.json").read_text(encoding="utf-8")).get("recipe_sha256")
        except (OSError, ValueError, AttributeError):
            saved = None
        return "resume" if saved == _digest(toml_text) else "restart"
    return "new"


def _locked(lock: Path) -> bool:
    """Whether another process holds ``lock`` (POSIX); False where locks are not available."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def write_layout(sweep: Sweep) -> None:
    """``sweep.toml``, ``sweep.json``, ``recipes/`` and the marker file, before any run starts."""
    import toml

    from bdframe.runs import write_json_atomic, write_text_atomic

    d = sweep.directory
    d.mkdir(parents=True, exist_ok=True)
    marker = d / ".sweep-id"
    if not marker.exists():
        write_text_atomic(marker, uuid.uuid4().hex + "\n")
    write_text_atomic(d / "sweep.toml", Path(sweep.source).read_text(encoding="utf-8"))
    write_text_atomic(d / "base.toml", toml.dumps(sweep.base))
    write_json_atomic(d / "sweep.json", {
        "format": 1, "name": sweep.name, "source": sweep.source,
        "axes": [{"path": a.path, "labels": list(a.labels)} for a in sweep.axes],
        "runs": [{"name": r.name, "axes": r.labels, "dir": f"runs/{r.name}"} for r in sweep.runs]})
    for r in sweep.runs:
        write_text_atomic(d / "recipes" / f"{r.name}.toml", toml.dumps(r.data))


# -- executing ----------------------------------------------------------------------------------

def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plan_parallelism(jobs: Optional[int], threads: Optional[int], cores: Optional[int] = None) -> tuple[int, int]:
    """``(jobs, threads per run)`` so that jobs x threads <= cores where either is left open:
    threads default to 2 (fewer on a 1-core machine), jobs to what then fits."""
    cores = cores or cpu_count()
    if threads is None:
        threads = max(1, cores // jobs) if jobs else min(2, cores)
    if jobs is None:
        jobs = max(1, cores // threads)
    return jobs, threads


def _fmt(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    return f"{h:d}:{rem // 60:02d}:{rem % 60:02d}"


class Tracker:
    """Counts, the one progress line (redrawn on a terminal, printed on change otherwise) and the
    failure records."""

    def __init__(self, sweep: Sweep, total: int, done_before: int, jobs: int, *, quiet: bool = False, stream=None):
        self.sweep = sweep
        self.total = total
        self.done = done_before
        self.failed: list[str] = []
        self.running = 0
        self.jobs = jobs
        self.durations: list[float] = []
        self.start = time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.quiet = quiet
        self._last = ""

    def line(self) -> str:
        pending = self.total - self.done - len(self.failed) - self.running
        text = (f"sweep {self.sweep.name}: {self.done}/{self.total} finished, {len(self.failed)} failed, "
                f"{self.running} running, {pending} pending, elapsed {_fmt(time.monotonic() - self.start)}")
        if self.durations and (pending or self.running):
            mean = sum(self.durations) / len(self.durations)
            text += f", eta {_fmt(math.ceil((pending + self.running) / self.jobs) * mean)}"
        return text

    def show(self, force: bool = False) -> None:
        if self.quiet:
            return
        text = self.line()
        if self.tty:
            self.stream.write("\r" + text.ljust(len(self._last)))
        elif force or text.split(", elapsed")[0] != self._last.split(", elapsed")[0]:
            self.stream.write(text + "\n")
        self._last = text
        self.stream.flush()

    def finish_line(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")

    def record(self, name: str, ok: bool, seconds: float, error: Optional[dict] = None) -> None:
        from bdframe.runs import write_json_atomic

        self.durations.append(seconds)
        if ok:
            self.done += 1
        else:
            self.failed.append(name)
            write_json_atomic(self.sweep.directory / "failed" / f"{name}.json", dict(error or {}, seconds=seconds))


def _error_line(log: Path, offset: int, rc: int) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("bdframe: error:")]
    if rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = str(-rc)
        return f"killed by signal {-rc} ({sig})"
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"exit status {rc}"


def worker_command(name: str, directory: Path, state: str) -> list[str]:
    """The command that runs one run of the sweep in its own process."""
    cmd = [sys.executable, "-m", "bdframe.sweep_worker", str(directory / "locks" / f"{name}.lock"), "run",
           str(directory / "recipes" / f"{name}.toml"), "--out", str(directory / "runs" / name)]
    if state == "resume":
        cmd.append("--resume")
    elif state == "restart":
        cmd.append("--overwrite")
    return cmd


def _env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env  # progress bars print a line every 10 s into the run's log (not a terminal)


def _prepare(sweep: Sweep, resolved: dict, chosen: set) -> tuple[list[tuple[str, str]], int, list[str]]:
    """``(runs to start with their state, finished count, runs locked by another process)`` among
    the ``chosen`` runs; finished runs of another recipe are refused whether chosen or not."""
    todo, finished, busy, stale = [], 0, [], []
    for run in sweep.runs:
        state = run_state(sweep.directory, run.name, resolved[run.name])
        if run.name not in chosen:
            if state == "stale":
                stale.append(run.name)
            continue
        if state == "finished":
            finished += 1
        elif state == "stale":
            stale.append(run.name)
        elif _locked(sweep.directory / "locks" / f"{run.name}.lock"):
            busy.append(run.name)
        else:
            todo.append((run.name, state))
    _refuse_stale(sweep, stale)
    return todo, finished, busy


def _refuse_stale(sweep: Sweep, stale: list) -> None:
    if stale:
        raise UserError([f"{len(stale)} finished run(s) of {sweep.directory} were made from a different recipe "
                         f"(the sweep or its base recipe changed since); remove them to run them again, or give "
                         f"the sweep another name:"] + [f"  {sweep.directory / 'runs' / n}" for n in stale])


def _local(sweep: Sweep, todo, tracker: Tracker, jobs: int, threads: int) -> None:
    d = sweep.directory
    (d / "logs").mkdir(exist_ok=True)
    queue = list(todo)
    running: dict[str, tuple] = {}
    try:
        while queue or running:
            changed = False
            for name in list(running):
                proc, t0, log, offset = running[name]
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                err = None if rc == 0 else {"error": _error_line(log, offset, rc), "returncode": rc,
                                            "log": f"logs/{name}.log"}
                tracker.record(name, rc == 0, time.monotonic() - t0, err)
                changed = True
            while queue and len(running) < jobs:
                name, state = queue.pop(0)
                (d / "failed" / f"{name}.json").unlink(missing_ok=True)
                log = d / "logs" / f"{name}.log"
                with open(log, "ab") as f:
                    offset = f.tell()
                    f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {state} run {name}\n".encode())
                    f.flush()
                    proc = subprocess.Popen(worker_command(name, d, state), stdout=f, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=_env(threads))
                running[name] = (proc, time.monotonic(), log, offset)
                changed = True
            tracker.running = len(running)
            if changed or tracker.tty:
                tracker.show()
            if running:
                time.sleep(0.2)
    except BaseException:
        for proc, *_ in running.values():
            proc.terminate()
        for proc, *_ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise


def _ray_task(payload: dict) -> dict:
    """One run on a Ray worker. With the sweep directory reachable (its marker file matches), the
    run is written there directly; otherwise it runs in a temporary directory and comes back as a
    tar.gz of its run directory."""
    import io
    import tarfile
    import tempfile

    d = Path(payload["directory"])
    if payload.get("cwd") and Path(payload["cwd"]).is_dir():
        os.chdir(payload["cwd"])
    try:
        shared = (d / ".sweep-id").read_text().strip() == payload["marker"]
    except OSError:
        shared = False
    name = payload["name"]
    t0 = time.monotonic()
    if shared:
        cmd = worker_command(name, d, payload["state"])
        log = d / "logs" / f"{name}.log"
        with open(log, "ab") as f:
            offset = f.tell()
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {payload['state']} run {name} (ray)\n".encode())
            f.flush()
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=_env(payload["threads"]))
        return {"rc": rc, "error": None if rc == 0 else _error_line(log, offset, rc), "shared": True,
                "seconds": time.monotonic() - t0}
    with tempfile.TemporaryDirectory(prefix="bdframe-sweep-") as tmp:
        t = Path(tmp)
        (t / "recipes").mkdir()
        (t / "runs").mkdir()
        (t / "recipes" / f"{name}.toml").write_text(payload["recipe"], encoding="utf-8")
        log = t / "run.log"
        with open(log, "wb") as f:
            rc = subprocess.call(worker_command(name, t, "new"), stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=_env(payload["threads"]))
        out = {"rc": rc, "error": None if rc == 0 else _error_line(log, 0, rc), "shared": False,
               "log": log.read_bytes(), "seconds": time.monotonic() - t0}
        if rc == 0:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                tar.add(t / "runs" / name, arcname=name)
            out["archive"] = buf.getvalue()
        return out


def unpack(directory: Path, name: str, result: dict) -> None:
    """Put a run that a Ray worker shipped back (no shared sweep directory) in its place: its log
    appended to ``logs/<run>.log`` and, when it finished, its run directory under ``runs/``."""
    import io
    import shutil
    import tarfile

    with open(directory / "logs" / f"{name}.log", "ab") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} run {name} (ray, shipped back)\n".encode())
        f.write(result.get("log", b""))
    if result["rc"] != 0:
        return
    tmp = directory / "runs" / f"{name}.shipping"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(result["archive"]), mode="r:gz") as tar:
        tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    shutil.rmtree(directory / "runs" / f"{name}.partial", ignore_errors=True)
    os.replace(tmp / name, directory / "runs" / name)
    tmp.rmdir()


def _ray(sweep: Sweep, todo, tracker: Tracker, threads: int, gpus: float, address: Optional[str]) -> None:
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray, which is not installed; install it with "
                        "pip install 'bdframe[ray]'") from None
    d = sweep.directory.absolute()
    (d / "logs").mkdir(exist_ok=True)
    started_here = False
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=False)
        if address:
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except ConnectionError as e:
            raise UserError(f"--address {address}: cannot connect to a Ray cluster: {e}") from None
        started_here = True
    marker = (d / ".sweep-id").read_text().strip()
    task = ray.remote(_ray_task).options(num_cpus=threads, num_gpus=gpus, max_retries=0)
    pending = {}
    for name, state in todo:
        (d / "failed" / f"{name}.json").unlink(missing_ok=True)
        payload = {"name": name, "state": state, "directory": str(d), "marker": marker, "threads": threads,
                   "cwd": os.getcwd(), "recipe": (d / "recipes" / f"{name}.toml").read_text(encoding="utf-8")}
        pending[task.remote(payload)] = (name, time.monotonic())
    tracker.running = min(len(pending), tracker.jobs)
    tracker.show()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                name, t0 = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # the worker died or the task could not run
                    res = {"rc": 1, "error": f"ray task failed: {type(e).__name__}: {str(e).splitlines()[0]}",
                           "shared": True, "seconds": time.monotonic() - t0}
                if not res["shared"]:
                    unpack(d, name, res)
                err = None if res["rc"] == 0 else {"error": res["error"], "returncode": res["rc"],
                                                   "log": f"logs/{name}.log"}
                tracker.record(name, res["rc"] == 0, res["seconds"], err)
                tracker.running = min(len(pending), tracker.jobs)
                tracker.show()
            if tracker.tty:
                tracker.show()
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()


def parse_only(only, axes: dict, labelled: list) -> dict:
    """``PATH=LABEL`` items of ``only`` as {axis path: [labels]} (in the order given). ``axes``
    maps each axis path to its labels; ``labelled`` are the runs' label dicts; a label no run
    carries is refused."""
    want: dict[str, list] = {}
    for item in only:
        path, sep, lab = str(item).partition("=")
        if not sep or path not in axes:
            raise UserError(f"--only {item!r}: expected AXIS=LABEL with AXIS one of: {', '.join(axes)}")
        labels = {r[path] for r in labelled}
        if lab not in labels:
            raise UserError(f"--only {item!r}: no run has the label {lab!r} on {path!r}; its labels: "
                            f"{', '.join(sorted(labels))}")
        if lab not in want.setdefault(path, []):
            want[path].append(lab)
    return want


def match_only(only, axes: dict, labelled: list) -> list:
    """For each label dict of ``labelled`` (axis path -> label), whether it matches every
    ``PATH=LABEL`` of ``only`` (see :func:`parse_only`): several labels of one axis are
    alternatives, different axes must all match."""
    want = parse_only(only, axes, labelled)
    return [matches(r, want) for r in labelled]


def matches(labels: dict, want: dict) -> bool:
    """Whether one run's labels (axis path -> label) carry one of the wanted labels on every axis
    of ``want`` (the result of :func:`parse_only`)."""
    return all(labels[p] in labs for p, labs in want.items())


def select(sweep: Sweep, only: list[str]) -> list[str]:
    """The names of the runs that match every ``PATH=LABEL`` of ``only`` (all runs when empty)."""
    keep = match_only(only, {a.path: a for a in sweep.axes}, [r.labels for r in sweep.runs])
    return [r.name for r, k in zip(sweep.runs, keep) if k]


def run_sweep(path, *, jobs: Optional[int] = None, threads: Optional[int] = None, executor: str = "local",
              address: Optional[str] = None, gpus: float = 0.0, only: tuple = (), quiet: bool = False,
              log=None) -> dict:
    """Validate, then run every unfinished run of the sweep (those matching ``only``, a list of
    ``AXIS=LABEL``: several labels of one axis are alternatives, different axes must all
    match); returns the counts (``{"runs", "finished", "failed", "skipped", "busy", "directory"}``)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    if executor not in ("local", "ray"):
        raise UserError(f"--executor: must be local or ray, got {executor!r}")
    sweep = load(path)
    chosen = set(select(sweep, list(only)))
    resolved = validate(sweep)
    jobs, threads = plan_parallelism(jobs, threads)
    todo, finished, busy = _prepare(sweep, resolved, chosen)
    write_layout(sweep)
    log(f"sweep {sweep.name}: {sweep.describe()} in {sweep.directory}"
        + (f"; {len(chosen)} selected by --only" if only else ""))
    resumes = sum(1 for _, s in todo if s == "resume")
    log(f"sweep {sweep.name}: {finished} finished earlier (skipped), {resumes} to resume, "
        f"{len(todo) - resumes} to start" + (f", {len(busy)} running in another process (left alone)" if busy else "")
        + (f"; {jobs} at a time, {threads} thread{'s' if threads != 1 else ''} each" if executor == "local" else
           f"; on Ray, {threads} CPUs{f' and {gpus:g} GPUs' if gpus else ''} per run"))
    tracker = Tracker(sweep, len(chosen), finished, jobs, quiet=quiet)
    if todo:
        if executor == "local":
            _local(sweep, todo, tracker, jobs, threads)
        else:
            _ray(sweep, todo, tracker, threads, gpus, address)
    tracker.show(force=not todo)
    tracker.finish_line()
    for name in tracker.failed:
        rec = json.loads((sweep.directory / "failed" / f"{name}.json").read_text(encoding="utf-8"))
        log(f"  failed: {name}: {rec['error']} (log: {sweep.directory / rec['log']})")
    return {"runs": len(chosen), "finished": tracker.done, "failed": len(tracker.failed), "skipped": finished,
            "busy": len(busy), "directory": str(sweep.directory)}


# -- the command line ---------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("sweep", help="run a grid of recipes (attacks x defenses x seeds ...) from a sweep file",
                              description="Expand a sweep file (a base recipe and axes) into runs; validate them "
                                          "or run them, locally or on a Ray cluster. See the user guide, "
                                          "'Benchmarking'.")
    sub = s.add_subparsers(dest="sweep_command", metavar="ACTION", required=True)
    v = sub.add_parser("validate", help="expand the sweep and validate every run's recipe; nothing runs")
    v.add_argument("sweep_file")
    v.add_argument("--list", action="store_true", help="print each run's name and state")
    r = sub.add_parser("run", help="run every unfinished run (finished runs are skipped, interrupted ones resumed)")
    r.add_argument("sweep_file")
    r.add_argument("--jobs", type=int, help="runs at a time (local executor; default: what fits the cores)")
    r.add_argument("--threads", type=int, help="CPU threads per run (default 2, or cores / --jobs)")
    r.add_argument("--executor", default="local", choices=("local", "ray"), help="local (default) or ray")
    r.add_argument("--address", help="Ray cluster address (e.g. auto, or ray://host:10001); default: a local Ray "
                                     "instance")
    r.add_argument("--gpus", type=float, default=0.0, help="GPUs per run (ray executor; default 0)")
    r.add_argument("--only", action="append", default=[], metavar="AXIS=LABEL",
                   help="run only the runs with this label (repeatable: labels of one axis are alternatives, "
                        "different axes must all match), e.g. --only attack=badnet --only seed=0")
    r.add_argument("--quiet", action="store_true", help="no progress line")
    return s


def main(args) -> int:
    for opt in ("jobs", "threads"):
        v = getattr(args, opt, None)
        if v is not None and v < 1:
            raise UserError(f"--{opt}: must be a positive integer, got {v}")
    if args.sweep_command == "validate":
        sweep = load(args.sweep_file)
        resolved = validate(sweep)
        states = {r.name: run_state(sweep.directory, r.name, resolved[r.name]) for r in sweep.runs}
        for name, state in states.items():
            if state in ("resume", "restart", "new") and _locked(sweep.directory / "locks" / f"{name}.lock"):
                states[name] = "running"
        _refuse_stale(sweep, [n for n, s in states.items() if s == "stale"])
        if args.list:
            for name, state in states.items():
                print(f"{state:9s} {name}")
        counts = {s: sum(1 for x in states.values() if x == s)
                  for s in ("finished", "running", "resume", "restart", "new")}
        print(f"{args.sweep_file}: ok, {sweep.describe()}; {counts['finished']} finished, "
              + (f"{counts['running']} running, " if counts["running"] else "")
              + f"{counts['resume'] + counts['restart']} interrupted, {counts['new']} not started")
        return 0
    if args.executor == "local" and args.address:
        raise UserError("--address: only with --executor ray")
    if args.gpus < 0:
        raise UserError(f"--gpus: must be >= 0, got {args.gpus:g}")
    try:
        res = run_sweep(args.sweep_file, jobs=args.jobs, threads=args.threads, executor=args.executor,
                        address=args.address, gpus=args.gpus, only=args.only, quiet=args.quiet)
    except KeyboardInterrupt:
        print("\nbdframe: sweep interrupted; run the same command again to resume it", file=sys.stderr)
        return 130
    busy = f", {res['busy']} running elsewhere" if res["busy"] else ""
    print(f"sweep {res['directory']}: {res['finished']} of {res['runs']} runs finished, {res['failed']} failed{busy}; "
          f"table: bdframe report {res['directory']}")
    return min(res["failed"], 100)

"""``bdframe report``: the tables of a sweep directory, laid out like the MeCa paper's Table II.

A sweep directory (written by ``bdframe sweep run``) holds ``sweep.json`` (the axes, each with
its ordered labels, and the planned runs with a label per axis), ``runs/<name>/metrics.json``
for each finished run, ``runs/<name>.partial/`` for an interrupted run and
``failed/<name>.json`` (``{"error": "one line", "log": ..., "returncode": ...}``) for a failed
one. The report is always recomputed from the ``metrics.json`` files; nothing is cached and
nothing in the sweep directory is changed (only ``--format html`` writes a file, by default
``SWEEP_DIR/report.html``).

Layout: the labels of the ``--rows`` axes (default ``attack``) make the rows and the labels of
the ``--cols`` axes (default ``defense``) the column groups; several axes combine, their labels
joined with " / ", in the order of ``sweep.json``. Every other axis is aggregated over: a cell
holds the finished runs with its row and column labels, and shows the mean and the sample
standard deviation (ddof 1) over them, or the value alone for a single run. A cell without a
finished run, or without the value (no ASR when there is no attack), shows "–".

Per cell:

- clean accuracy (ACC) and attack success rate (ASR), in percent;
- for runs whose defense flagged training samples: the flagged share of the training set
  (``metrics.json``'s ``suspected.share``, present with or without an attack) and, with an
  attack, detection recall and precision, in percent;
- the wall-time multiple: a run's ``seconds.total`` divided by that of its no-defense
  reference, the finished run whose ``metrics.json`` names the defense ``none`` and whose labels
  equal the run's on every axis except the ``--cols`` axes (the same attack, the same seed, ...).
  A run that is itself a no-defense run is its own reference (multiple 1.00). Should several
  runs qualify (a defense parameter axis that the no-defense runs repeat), their mean is used.
  Seconds measured on two machines make no multiple: where the hardware that the run and a
  reference record in ``run.json`` (CPU model, device, GPU, threads) differs, or only one of
  them records it, the cell has no multiple and a note names the run. Two runs that both
  predate the CPU record are compared as before. A resumed run (``"resumed": true`` in
  ``run.json``) records only the seconds of its last attempt, so neither it nor a run whose
  reference was resumed has a multiple; a note names them.
  The ACC loss in the HTML scatter plot uses the same reference.

When the default ``attack`` (or ``defense``) is not an axis of the sweep, or is taken by the
other option, there is one row (or one column group). It is labelled with the ``attack`` (or
``defense``) value that the finished runs' ``metrics.json`` share ("none" for no attack), or
"all" when they differ or no run is finished; a note says so. A path given with ``--rows`` or
``--cols`` must be an axis of the sweep and may not be in both.

Formats: ``md`` (default; to stdout or ``--out``), ``csv`` (one line per cell, long format;
percentages at full precision, empty fields for missing values) and ``html`` (a self-contained
page with the tables and two figures embedded as PNG: ACC and ASR bars, and ACC loss against
ASR; the figures need matplotlib, ``pip install 'bdframe[plots]'``, and without it the page
holds the tables only).
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Optional

import attrs

from bdframe.errors import UserError

CLEAN_MARK = "†"  # marks the column groups whose defense used trusted clean data
NO_DEFENSE = "none"  # the defense whose runs are the reference for the time multiple and the ACC loss
DASH = "–"
ROWS_AXIS = "attack"
COLS_AXIS = "defense"
FINISHED, FAILED, INTERRUPTED, NOT_STARTED = "finished", "failed", "interrupted", "not started"


@attrs.frozen
class Stat:
    """Mean and sample standard deviation (None for a single value) of ``n`` values."""

    mean: float
    std: Optional[float]
    n: int

    @classmethod
    def of(cls, values) -> Optional["Stat"]:
        values = [float(v) for v in values]
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@attrs.frozen
class Run:
    """One planned run of the sweep: its labels (axis path -> label), where it lives and how far
    it got. ``metrics`` is set for finished runs, ``error`` (and ``log``) for failed ones."""

    name: str
    labels: dict
    dir: Path
    status: str
    metrics: Optional[dict] = None
    error: Optional[str] = None
    log: Optional[str] = None
    environment: Optional[dict] = None  # run.json's, where it could be read
    resumed: bool = False  # run.json says so: its seconds cover only the last attempt


def hardware(r: Run) -> Optional[tuple]:
    """What a run's seconds depend on besides the recipe: (CPU model, device type, GPU, threads)
    from its run.json, or None for a run that did not record its CPU (runs made before bdframe
    recorded it)."""
    env = r.environment
    if not isinstance(env, dict) or not env.get("cpu"):
        return None
    return (env.get("cpu"), str(env.get("device", "")).split(":")[0], env.get("gpu"), env.get("threads"))


@attrs.frozen
class Cell:
    """The finished runs with one row's and one column group's labels and their statistics:
    ``acc``, ``asr``, ``recall``, ``precision`` and ``acc_loss`` in percent (points),
    ``multiple`` as a ratio, ``rss`` and ``gpu`` (peak resident and peak GPU memory of the run's
    process) in MiB; None where no run has the value."""

    row: tuple
    col: tuple
    runs: tuple
    acc: Optional[Stat] = None
    asr: Optional[Stat] = None
    recall: Optional[Stat] = None
    precision: Optional[Stat] = None
    flagged: Optional[Stat] = None
    auroc: Optional[Stat] = None
    multiple: Optional[Stat] = None
    acc_loss: Optional[Stat] = None
    rss: Optional[Stat] = None
    gpu: Optional[Stat] = None
    planned: tuple = ()  # every run of the sweep with these labels, finished or not

    @property
    def n(self) -> int:
        return len(self.runs)


@attrs.frozen
class Table:
    """A sweep's report. ``row_axes``/``col_axes`` are the sweep axes used (empty for a single
    fallback row or column group); ``row_names``/``col_names`` name the label positions of the
    keys in ``rows``/``cols`` (for headers and csv columns). ``cells`` maps (row, col) keys to
    :class:`Cell`; ``aggregated`` lists (axis path, number of labels) of the other axes."""

    sweep_dir: Path
    name: str
    axes: dict
    row_axes: tuple
    col_axes: tuple
    row_names: tuple
    col_names: tuple
    rows: list
    cols: list
    cells: dict
    aggregated: list
    runs: list
    fallbacks: list
    other_hardware: list = attrs.field(factory=list)  # runs without a multiple: their reference ran elsewhere
    resumed: list = attrs.field(factory=list)  # runs without a multiple: they or their reference were resumed

    def cell(self, row, col) -> Cell:
        """The cell of a row and a column group, given as keys or as " / "-joined labels."""
        def key(k, keys):
            if isinstance(k, tuple):
                return k
            for x in keys:
                if label(x) == k:
                    return x
            raise KeyError(k)
        return self.cells[(key(row, self.rows), key(col, self.cols))]

    def with_status(self, status: str) -> list:
        return [r for r in self.runs if r.status == status]

    def clean_data(self) -> dict:
        """``{column group: sorted clean-data sizes}`` for the column groups whose finished runs
        used trusted clean data (``metrics.json`` ``clean_data.used``)."""
        out: dict = {}
        for r in self.with_status(FINISHED):
            cd = r.metrics.get("clean_data")
            if isinstance(cd, dict) and cd.get("used"):
                col = next((c for c in self.cols if r.name in self.cells_in_col(c)), None)
                if col is not None:
                    out.setdefault(col, set()).add(int(cd.get("size", 0)))
        return {c: sorted(v) for c, v in out.items()}

    def cells_in_col(self, col) -> set:
        return {name for (_, c), cell in self.cells.items() if c == col for name in cell.runs}

    def has_multiples(self) -> bool:
        """Whether any cell has a wall-time multiple (some shown run has a no-defense reference)."""
        return any(c.multiple is not None for c in self.cells.values())

    def detection_cols(self) -> list:
        """The column groups where some cell has detection results."""
        return [c for c in self.cols if any(self.cells[(r, c)].recall is not None or self.cells[(r, c)].flagged
                                            is not None for r in self.rows)]


def label(key: tuple) -> str:
    return " / ".join(key)


# -- reading the sweep directory ------------------------------------------------------------------

@attrs.frozen
class _Planned:
    name: str
    labels: dict
    dir: str


def read_sweep(sweep_dir: Path):
    """``(name, axes, planned runs)`` from ``sweep_dir/sweep.json``; ``axes`` maps each axis
    path to its ordered labels. Raises UserError naming the file for anything unexpected."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.exists():
        raise UserError(f"sweep directory {str(sweep_dir)!r} does not exist")
    if not sweep_dir.is_dir():
        raise UserError(f"{str(sweep_dir)!r} is not a directory (expected a sweep directory)")
    f = sweep_dir / "sweep.json"
    if not f.is_file():
        raise UserError(f"{str(sweep_dir)!r} is not a sweep directory (no sweep.json); "
                        f"`bdframe sweep run FILE` makes one")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {str(f)!r}: {type(e).__name__}: {e}") from None
    problems = []
    if not isinstance(data, dict):
        raise UserError(f"{str(f)!r} is not a sweep file: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != 1:
        problems.append(f"$.format: expected 1, got {data.get('format')!r}")
    axes: dict = {}
    raw_axes = data.get("axes")
    if not isinstance(raw_axes, list):
        problems.append("$.axes: expected a list of {\"path\", \"labels\"} objects")
        raw_axes = []
    for i, a in enumerate(raw_axes):
        where = f"$.axes[{i}]"
        path = a.get("path") if isinstance(a, dict) else None
        labels = a.get("labels") if isinstance(a, dict) else None
        if not isinstance(path, str) or not path:
            problems.append(f"{where}.path: expected a recipe path such as \"attack\"")
        elif path in axes:
            problems.append(f"{where}.path: axis {path!r} appears twice")
        elif not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            problems.append(f"{where}.labels: expected a non-empty list of strings")
        elif len(set(labels)) != len(labels):
            problems.append(f"{where}.labels: a label appears twice")
        else:
            axes[path] = list(labels)
    planned = []
    raw_runs = data.get("runs")
    if not isinstance(raw_runs, list):
        problems.append("$.runs: expected a list of {\"name\", \"axes\", \"dir\"} objects")
        raw_runs = []
    names = set()
    for i, r in enumerate(raw_runs):
        where = f"$.runs[{i}]"
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not r["name"]:
            problems.append(f"{where}.name: expected the run's name")
            continue
        name = r["name"]
        if name in names:
            problems.append(f"{where}.name: run {name!r} appears twice")
        names.add(name)
        labels = r.get("axes")
        if not isinstance(labels, dict):
            problems.append(f"{where}.axes: expected an object with a label per axis")
            continue
        bad = [p for p in axes if labels.get(p) not in axes[p]]
        if bad:
            p = bad[0]
            problems.append(f"{where}.axes.{p}: expected one of the axis' labels ({', '.join(axes[p])}), "
                            f"got {labels.get(p)!r}")
            continue
        d = r.get("dir", f"runs/{name}")
        if not isinstance(d, str) or not d:
            problems.append(f"{where}.dir: expected a directory relative to the sweep directory")
            continue
        planned.append(_Planned(name, {p: labels[p] for p in axes}, d))
    if problems:
        head = f"{str(f)!r} is not a sweep file in the expected format:"
        if len(problems) == 1:
            raise UserError(f"{head} {problems[0]}")
        raise UserError([f"{head} {len(problems)} problems"] + [f"  {p}" for p in problems])
    return str(data.get("name") or sweep_dir.name), axes, planned


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _total_seconds(r: Run) -> Optional[float]:
    secs = r.metrics.get("seconds")
    total = secs.get("total") if isinstance(secs, dict) else None
    return float(total) if _number(total) else None


def _load_run(sweep_dir: Path, p: _Planned) -> Run:
    d = sweep_dir / p.dir
    mf = d / "metrics.json"
    if mf.is_file():
        try:
            m = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{str(mf)!r} is not valid JSON ({type(e).__name__}: {e}); the run {p.name!r} "
                            f"must be rerun or its directory removed") from None
        if not isinstance(m, dict) or not _number(m.get("clean_acc")):
            raise UserError(f"{str(mf)!r} has no clean_acc number; is it a bdframe metrics.json?")
        info = _run_info(d)
        env = info.get("environment")
        return Run(p.name, p.labels, d, FINISHED, metrics=m, environment=env if isinstance(env, dict) else None,
                   resumed=info.get("resumed") is True)
    ff = sweep_dir / "failed" / f"{p.name}.json"
    if ff.is_file():
        try:
            info = json.loads(ff.read_text(encoding="utf-8"))
            info = info if isinstance(info, dict) else {}
        except (OSError, UnicodeDecodeError, ValueError):
            info = {}
        error = str(info.get("error") or f"(no error line in {ff.relative_to(sweep_dir)})").splitlines()
        log = info.get("log")
        return Run(p.name, p.labels, d, FAILED, error=error[0] if error else "", log=str(log) if log else None)
    if d.with_name(d.name + ".partial").exists():
        return Run(p.name, p.labels, d, INTERRUPTED)
    if d.exists():
        return Run(p.name, p.labels, d, INTERRUPTED, error=f"{p.dir} has no metrics.json")
    return Run(p.name, p.labels, d, NOT_STARTED)


def _run_info(d: Path) -> dict:
    """The run's ``run.json`` ({} where it is missing or unreadable)."""
    try:
        info = json.loads((d / "run.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def load_runs(sweep_dir) -> tuple:
    """``(name, axes, runs)``: the sweep's planned runs in plan order, each a :class:`Run` with
    its status (finished runs carry their ``metrics.json``). Raises UserError naming the file
    for a sweep directory or a ``metrics.json`` that cannot be read."""
    sweep_dir = Path(sweep_dir)
    name, axes, planned = read_sweep(sweep_dir)
    return name, axes, [_load_run(sweep_dir, p) for p in planned]


def no_defense_references(runs, axes: dict, col_axes=(COLS_AXIS,)):
    """A function from a run to its no-defense references: the finished runs whose
    ``metrics.json`` names the defense ``none`` and whose labels equal the run's on every axis
    except ``col_axes`` (the same attack, the same seed, ...). A no-defense run is its own only
    reference; a run without one gets ``[]``."""
    ref_axes = [p for p in axes if p not in col_axes]
    refs: dict = {}
    for r in runs:
        if r.status == FINISHED and r.metrics.get("defense") == NO_DEFENSE:
            refs.setdefault(tuple(r.labels[p] for p in ref_axes), []).append(r)

    def of(run: Run) -> list:
        if run.status == FINISHED and run.metrics.get("defense") == NO_DEFENSE:
            return [run]
        return list(refs.get(tuple(run.labels[p] for p in ref_axes), []))

    return of


# -- building the table ---------------------------------------------------------------------------

def _choose(given, option: str, default: str, axes: dict, taken) -> tuple:
    """The axes for ``option``: ``given`` (validated) or ``(default,)`` when it is a free axis,
    else ``()`` (one fallback row or column group)."""
    if given is None:
        return (default,) if default in axes and default not in taken else ()
    given = list(given)
    for path in given:
        if path not in axes:
            raise UserError(f"{option} {path!r} is not an axis of this sweep; its axes are: "
                            f"{', '.join(axes) or '(none)'}")
    dup = sorted({p for p in given if given.count(p) > 1})
    if dup:
        raise UserError(f"{option}: {', '.join(dup)} given more than once")
    return tuple(given)


def _fallback_label(runs: list, key: str) -> str:
    values = {r.metrics.get(key) or NO_DEFENSE for r in runs if r.status == FINISHED}
    values = {str(v) for v in values}
    return values.pop() if len(values) == 1 else "all"


def collect(sweep_dir, rows=None, cols=None, only=()) -> Table:
    """Read ``sweep_dir`` and build its :class:`Table`. ``rows``/``cols`` are lists of axis
    paths, or None for the defaults (``attack`` / ``defense``, see the module text). ``only``
    (``AXIS=LABEL`` items, as ``bdframe sweep run --only``) keeps the matching runs in the
    table; the no-defense references of the time multiple and the ACC loss are taken from all
    runs, shown or not."""
    sweep_dir = Path(sweep_dir)
    name, axes, every = load_runs(sweep_dir)
    if rows is not None and cols is not None:
        both = [p for p in rows if p in cols]
        if both:
            raise UserError(f"--rows and --cols both name {', '.join(repr(p) for p in both)}; an axis is "
                            f"either rows or columns (the others are aggregated over)")
    row_axes = _choose(rows, "--rows", ROWS_AXIS, axes, cols or ())
    col_axes = _choose(cols, "--cols", COLS_AXIS, axes, row_axes)
    runs, chosen = every, {}
    if only:
        from bdframe.sweep import matches, parse_only

        chosen = parse_only(only, axes, [r.labels for r in every])
        runs = [r for r in every if matches(r.labels, chosen)]
    done = [r for r in runs if r.status == FINISHED]

    fallbacks = []

    def keys(chosen, what, metric_key):
        if not chosen:
            fb = _fallback_label(runs, metric_key)
            why = "is not an axis of this sweep" if what not in axes else \
                f"is in {'--cols' if what == ROWS_AXIS else '--rows'}"
            fallbacks.append(f"{what} {why}: one {'row' if what == ROWS_AXIS else 'column group'}, "
                             f"labelled {fb!r} (the runs' {metric_key}, or 'all' when they differ)")
            return (what,), [(fb,)], lambda run: (fb,)
        present = {tuple(r.labels[p] for p in chosen) for r in runs}
        ordered = [k for k in itertools.product(*(axes[p] for p in chosen)) if k in present]
        return tuple(chosen), ordered, lambda run: tuple(run.labels[p] for p in chosen)

    row_names, row_keys, row_of = keys(row_axes, ROWS_AXIS, "attack")
    col_names, col_keys, col_of = keys(col_axes, COLS_AXIS, "defense")

    # the no-defense references (taken from every run, shown or not): same labels on every axis but the column axes
    references = no_defense_references(every, axes, col_axes)

    def per_run(r: Run) -> dict:
        m = r.metrics
        v = {"acc": 100 * m["clean_acc"]}
        if _number(m.get("asr")):
            v["asr"] = 100 * m["asr"]
        det = m.get("detection")
        if isinstance(det, dict):
            for k in ("recall", "precision"):
                if _number(det.get(k)):
                    v[k] = 100 * det[k]
        if isinstance(det, dict) and _number(det.get("auroc")):
            v["auroc"] = det["auroc"]
        sus = m.get("suspected")
        if isinstance(sus, dict) and _number(sus.get("share")):
            v["flagged"] = 100 * sus["share"]
        mem = m.get("peak_memory_mb")
        if isinstance(mem, dict):
            for k in ("rss", "gpu"):
                if _number(mem.get(k)):
                    v[k] = mem[k]
        own = r.metrics.get("defense") == NO_DEFENSE
        ref = references(r)
        total = _total_seconds(r)
        ref_totals = [s for s in map(_total_seconds, ref) if s is not None]
        mine, theirs = hardware(r), [hardware(x) for x in ref]
        if own and total is not None:
            v["multiple"] = 1.0
        elif ref and (r.resumed or any(x.resumed for x in ref)):
            resumed.append(r.name)  # a resumed run's seconds are those of its last attempt only
        elif any(h != mine for h in theirs if (h, mine) != (None, None)):
            other_hardware.append(r.name)  # seconds of two machines (or of one that is not known) are no multiple
        elif total is not None and ref_totals and statistics.fmean(ref_totals) > 0:
            v["multiple"] = total / statistics.fmean(ref_totals)
        if ref:
            v["acc_loss"] = 100 * statistics.fmean(x.metrics["clean_acc"] for x in ref) - v["acc"]
        return v

    other_hardware: list = []
    resumed: list = []
    values = {r.name: per_run(r) for r in done}
    cells = {}
    for rk in row_keys:
        for ck in col_keys:
            inside = [r for r in done if row_of(r) == rk and col_of(r) == ck]
            stats = {k: Stat.of([values[r.name][k] for r in inside if k in values[r.name]])
                     for k in ("acc", "asr", "recall", "precision", "flagged", "auroc", "multiple", "acc_loss",
                                  "rss", "gpu")}
            planned_here = tuple(r.name for r in runs if row_of(r) == rk and col_of(r) == ck)
            cells[(rk, ck)] = Cell(rk, ck, tuple(r.name for r in inside), **stats, planned=planned_here)
    aggregated = [(p, len(axes[p])) for p in axes if p not in row_axes and p not in col_axes]
    if chosen:
        which = ", ".join(f"{p} {' or '.join(chosen[p])}" for p in axes if p in chosen)
        fallbacks.append(f"--only: the runs with {which} ({len(runs)} of {len(every)}); the time multiple and "
                         f"ACC loss still refer to each row's no-defense run")
    return Table(sweep_dir, name, axes, row_axes, col_axes, row_names, col_names, row_keys, col_keys, cells,
                 aggregated, runs, fallbacks, other_hardware, resumed)


# -- text ---------------------------------------------------------------------------------------

def fmt(stat: Optional[Stat], digits: int = 2) -> str:
    """``mean ± std`` with ``digits`` decimals, the mean alone for one value, "–" for none."""
    if stat is None:
        return DASH
    if stat.std is None:
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def sections(t: Table) -> list:
    """The report's tables as ``(title, header, body rows)`` with formatted cells."""
    head = label(t.row_names)
    out = []
    clean = t.clean_data()
    main_head = [head] + [f"{label(c)}{CLEAN_MARK if c in clean else ''} {k}" for c in t.cols for k in ("ACC", "ASR")]
    main_body = [[label(r)] + [fmt(getattr(t.cells[(r, c)], k)) for c in t.cols for k in ("acc", "asr")]
                 for r in t.rows]
    out.append(("Clean accuracy (ACC) and attack success rate (ASR), %", main_head, main_body))
    dcols = t.detection_cols()
    if dcols:
        keys = ["flagged", "recall", "precision"]
        if any(t.cells[(r, c)].auroc is not None for r in t.rows for c in dcols):
            keys.append("AUROC")
        out.append(("Detection: share of the training set flagged, and recall and precision of the flagged "
                    "samples, %; AUROC of the defense's scores",
                    [head] + [f"{label(c)} {k}" for c in dcols for k in keys],
                    [[label(r)] + [fmt(t.cells[(r, c)].auroc, 3) if k == "AUROC" else fmt(getattr(t.cells[(r, c)], k))
                                   for c in dcols for k in keys]
                     for r in t.rows]))
    if t.has_multiples():
        out.append(("Wall time: total seconds as a multiple of the no-defense run of the same row",
                    [head] + [f"{label(c)} time" for c in t.cols],
                    [[label(r)] + [fmt(t.cells[(r, c)].multiple) for c in t.cols] for r in t.rows]))
    mem = [k for k in ("rss", "gpu") if any(getattr(cell, k) is not None for cell in t.cells.values())]
    if mem:
        name = {"rss": "RSS", "gpu": "GPU"}
        out.append(("Peak memory of the run's process, MiB: resident memory (RSS) and, where a run used a GPU, "
                    "what PyTorch allocated on it (GPU)",
                    [head] + [f"{label(c)} {name[k]}" for c in t.cols for k in mem],
                    [[label(r)] + [fmt(getattr(t.cells[(r, c)], k), 0) for c in t.cols for k in mem]
                     for r in t.rows]))
    return out


def notes(t: Table) -> list:
    """The notes under the tables as ``(line, sub-lines)``."""
    out = []
    if t.aggregated:
        agg = ", ".join(f"{p} ({n} value{'s' if n != 1 else ''})" for p, n in t.aggregated)
        out.append((f"aggregated over {agg}: a cell shows mean ± sample std (ddof 1) over its finished runs, "
                    f"the value alone for one run; {DASH} = no finished run or no value", []))
    else:
        out.append((f"no axis aggregated over: a cell holds at most one run; {DASH} = no finished run or no value",
                    []))
    for line in t.fallbacks:
        out.append((line, []))
    clean = t.clean_data()
    if clean:
        sizes = sorted({n for v in clean.values() for n in v})
        used = ", ".join(label(c) for c in t.cols if c in clean)
        out.append((f"{CLEAN_MARK} the defense uses trusted clean data ({' / '.join(str(n) for n in sizes)} images; "
                    f"each run's clean.json says where they come from): {used}; the other columns use none", []))
    if not t.detection_cols():
        out.append(("detection: no finished run has detection results (no defense flagged samples)",
                    []))
    if t.other_hardware:
        out.append((f"wall time: no multiple for {len(t.other_hardware)} run"
                    f"{'s' if len(t.other_hardware) != 1 else ''} whose no-defense run was made on other "
                    f"hardware, or on hardware one of them does not record (the CPU, device, GPU or thread count "
                    f"in run.json):", list(t.other_hardware)))
    if t.resumed:
        out.append((f"wall time: no multiple for {len(t.resumed)} run{'s' if len(t.resumed) != 1 else ''} that "
                    f"{'were' if len(t.resumed) != 1 else 'was'} resumed, or whose no-defense run was (run.json: "
                    f"\"resumed\": true; the seconds cover only the last attempt):", list(t.resumed)))
    if t.runs and not t.has_multiples() and not t.other_hardware and not t.resumed:
        out.append(("wall time: no shown run has a finished no-defense run in its row to compare with, so there "
                    "is no time table (each run's metrics.json has its seconds)", []))
    n = len(t.runs)
    groups = [(s, t.with_status(s)) for s in (FINISHED, FAILED, INTERRUPTED, NOT_STARTED)]
    out.append((f"{n} run{'s' if n != 1 else ''}: " + ", ".join(f"{len(rs)} {s}" for s, rs in groups), []))
    for status, rs in groups[1:]:
        if not rs:
            continue
        subs = []
        for r in rs:
            line = r.name
            if status == FAILED:
                line += f": {r.error}" + (f" (log: {r.log})" if r.log else "")
            elif r.error:
                line += f" ({r.error})"
            subs.append(line)
        out.append((f"{status} ({len(rs)}):", subs))
    return out


def _title(t: Table) -> str:
    return f"Sweep report: {t.name}"


def to_markdown(t: Table) -> str:
    """The report as Markdown: a title, the tables (columns padded for reading as text), notes."""
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [f"# {_title(t)}", "", f"Sweep directory: {t.sweep_dir}", ""]
    for title, head, body in sections(t):
        rows = [[esc(c) for c in head]] + [[esc(c) for c in r] for r in body]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines += [f"## {title}", ""]
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(rows[0], widths)) + " |")
        lines.append("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
        for r in rows[1:]:
            lines.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                           for i, (c, w) in enumerate(zip(r, widths))) + " |")
        lines.append("")
    lines += ["## Notes", ""]
    for line, subs in notes(t):
        lines.append(f"- {line}")
        lines += [f"  - {s}" for s in subs]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("n", "acc_mean", "acc_std", "asr_mean", "asr_std", "flagged_mean", "flagged_std", "recall_mean",
              "recall_std", "precision_mean", "precision_std", "auroc_mean", "auroc_std", "time_multiple_mean",
              "time_multiple_std", "clean_images", "runs")


def to_csv(t: Table) -> str:
    """One line per (row, column group) that the sweep has runs for: the labels (a column per
    axis), n (finished runs), mean and std of each value (percent at full precision; empty when
    missing), ``clean_images`` (how many trusted clean images the column's defense used; empty
    for none) and the finished runs' names joined by ";"."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(t.row_names) + list(t.col_names) + list(CSV_FIELDS))

    def num(v):
        return "" if v is None else repr(float(v))

    clean = t.clean_data()
    for r in t.rows:
        for c in t.cols:
            cell = t.cells[(r, c)]
            if not cell.planned:  # an excluded combination
                continue
            line = list(r) + list(c) + [str(cell.n)]
            for k in ("acc", "asr", "flagged", "recall", "precision", "auroc", "multiple"):
                s = getattr(cell, k)
                line += [num(s.mean if s else None), num(s.std if s else None)]
            # the trusted clean images the column's defense used (empty: none)
            w.writerow(line + ["/".join(str(n) for n in clean.get(c, [])), ";".join(cell.runs)])
    return buf.getvalue()


# -- html ---------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
figure { margin: 1em 0 2em; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _png(fig) -> str:
    import base64

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _bars(t: Table):
    """ACC (top) and ASR (bottom) per row, a bar per column group, with std error bars."""
    from bdframe import plots

    nr, nc = max(len(t.rows), 1), max(len(t.cols), 1)
    fig = plots._figure(min(16.0, max(7.0, 2.5 + 0.3 * nr * nc + 0.4 * nr)), 6.5)
    axs = fig.subplots(2, 1, sharex=True)
    width = 0.8 / nc
    for ax, key, ylabel in ((axs[0], "acc", "clean accuracy, ACC (%)"), (axs[1], "asr", "attack success rate, ASR (%)")):
        for j, c in enumerate(t.cols):
            pos, means, errs = [], [], []
            for i, r in enumerate(t.rows):
                s = getattr(t.cells[(r, c)], key)
                if s is not None:
                    pos.append(i - 0.4 + width * (j + 0.5))
                    means.append(s.mean)
                    errs.append(s.std or 0.0)
            ax.bar(pos, means, width * 0.92, yerr=errs, capsize=2, color=f"C{j % 10}",
                   label=label(c) if ax is axs[0] else None)
        ax.set_ylim(0, 105)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
    axs[1].set_xticks(range(len(t.rows)))
    long = sum(len(label(r)) for r in t.rows) > 60
    axs[1].set_xticklabels([label(r) for r in t.rows], rotation=30 if long else 0, ha="right" if long else "center")
    axs[1].set_xlabel(label(t.row_names))
    if t.cols and t.rows:
        fig.legend(title=label(t.col_names), loc="outside right upper", frameon=False)
    fig.suptitle(f"{t.name}: ACC and ASR per {label(t.row_names)} and {label(t.col_names)}")
    return fig


def _scatter(t: Table):
    """ACC loss against the no-defense reference (points) over ASR (%), one point per cell."""
    from bdframe import plots

    fig = plots._figure(8.0, 5.5)
    ax = fig.add_subplot()
    texts = []
    for j, c in enumerate(t.cols):
        pts = [(t.cells[(r, c)].asr.mean, t.cells[(r, c)].acc_loss.mean, f"{label(r)} / {label(c)}")
               for r in t.rows if t.cells[(r, c)].asr is not None and t.cells[(r, c)].acc_loss is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=40, color=f"C{j % 10}", label=label(c),
                       zorder=3)
            texts += pts
    # labels alternate above and below the points, in the order of ASR, so that neighbours overlap less
    for i, (x, y, text) in enumerate(sorted(texts)):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4 if i % 2 == 0 else -11), fontsize=8)
    shown = len(texts)
    ax.axhline(0, color="#999", linewidth=0.8)
    ax.set_xlim(-3, 105)
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_xlabel("attack success rate, ASR (%)")
    ax.set_ylabel("ACC loss vs. no defense (points)")
    ax.set_title(f"{t.name}: ACC cost against ASR, one point per cell")
    if shown:
        ax.legend(title=label(t.col_names), loc="best", frameon=False)
    else:
        ax.text(0.5, 0.5, "no cell has both an ASR and a no-defense reference", transform=ax.transAxes,
                ha="center", va="center", color="grey")
    return fig


def to_html(t: Table) -> str:
    """A self-contained HTML page: the tables, the figures as embedded PNG (when matplotlib is
    installed) and the notes."""
    from bdframe import plots

    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(_title(t))}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>{e(_title(t))}</h1>", f"<p>Sweep directory: <code>{e(str(t.sweep_dir))}</code></p>"]
    for title, head, body in sections(t):
        parts.append(f"<h2>{e(title)}</h2>")
        parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>")
        for row in body:
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        parts.append("</tbody></table>")
    parts.append("<h2>Figures</h2>")
    if plots.available():
        import matplotlib as mpl

        figures = ((_bars, "ACC and ASR per row (bars: mean; whiskers: sample std over the aggregated runs)."),
                   (_scatter, "ACC loss (the no-defense reference's ACC minus the cell's, in points) against "
                              "ASR; cells without an ASR or without a no-defense reference are left out."))
        for draw, caption in figures:
            with mpl.rc_context(plots._STYLE):
                data = _png(draw(t))
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}">'
                         f"<figcaption>{e(caption)}</figcaption></figure>")
    else:
        parts.append(f"<p>Figures need matplotlib: <code>{e(plots.INSTALL_HINT)}</code></p>")
    parts.append("<h2>Notes</h2><ul>")
    for line, subs in notes(t):
        inner = "<ul>" + "".join(f"<li>{e(s)}</li>" for s in subs) + "</ul>" if subs else ""
        parts.append(f"<li>{e(line)}{inner}</li>")
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"


# -- command --------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "report", help="tables of a sweep directory: ACC, ASR, detection and time per attack and defense",
        description="Tabulate the finished runs of a sweep directory (written by `bdframe sweep run`): clean "
                    "accuracy, attack success rate, detection recall/precision and the wall-time multiple of "
                    "the no-defense run, as mean ± std over the axes that are neither rows nor columns.")
    s.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep directory written by `bdframe sweep run`")
    s.add_argument("--format", choices=("md", "csv", "html"), default="md",
                   help="md (default) and csv go to stdout or --out; html goes to SWEEP_DIR/report.html or --out")
    s.add_argument("--rows", nargs="+", action="extend", metavar="AXIS",
                   help="axis path(s) whose labels make the rows (default: attack)")
    s.add_argument("--cols", nargs="+", action="extend", metavar="AXIS",
                   help="axis path(s) whose labels make the column groups (default: defense)")
    s.add_argument("--only", action="append", default=[], metavar="AXIS=LABEL",
                   help="report only the runs with this label (repeatable: labels of one axis are alternatives, "
                        "different axes must all match), e.g. --only defense=none --only defense=clp")
    s.add_argument("--out", metavar="PATH", help="write the report to this file instead")
    return s


def main(args) -> int:
    table = collect(args.sweep_dir, args.rows, args.cols, getattr(args, "only", ()))
    if args.format == "csv":
        text = to_csv(table)
    elif args.format == "html":
        text = to_html(table)
    else:
        text = to_markdown(table)
    out = Path(args.out) if args.out else (table.sweep_dir / "report.html" if args.format == "html" else None)
    if out is None:
        sys.stdout.write(text)
        return 0
    what = f"--out {str(out)!r}" if args.out else f"{str(out)!r} (choose another file with --out)"
    if out.is_dir():
        raise UserError(f"{what} is a directory; give a file path")
    from bdframe.runs import write_text_atomic

    try:
        write_text_atomic(out, text)
    except OSError as e:
        raise UserError(f"cannot write {what}: {e.strerror or e}") from None
    print(f"report written: {out}")
    return 0

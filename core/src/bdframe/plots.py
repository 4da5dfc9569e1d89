"""Pictures for people, drawn with matplotlib (the optional ``plots`` extra:
``pip install 'bdframe[plots]'``).

- :func:`trend`: MeCa's clean accuracy and attack success rate per iteration (``meca_trend.png``);
- :func:`histogram`: a score histogram per group of samples (``bdframe scan``'s ``hist-<scorer>.png``);
- :func:`image_grid`: labelled rows of images (MCLDef's inverted triggers, ``mcldef_inversion.png``);

Figures are drawn on matplotlib's Agg canvas (no display, no pyplot state) and written
atomically (a temporary file in the same directory, then ``os.replace``). Each function returns
a small JSON-ready description of what it drew (file name, title, axis labels, legend entries,
...), or ``None`` when matplotlib is not installed: then nothing is written and one line saying
so, and how to install it, goes to stderr once per process. Runs and scans complete either way.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

INSTALL_HINT = "pip install 'bdframe[plots]'"

# matplotlib's default (tab10) colours, as 0-255 RGB
COLORS = {"clean": (31, 119, 180), "poison": (214, 39, 40), "cover": (44, 160, 44), "all": (90, 90, 90),
          "acc": (31, 119, 180), "asr": (214, 39, 40)}

_STYLE = {
    "font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11, "xtick.labelsize": 10,
    "ytick.labelsize": 10, "legend.fontsize": 10, "figure.titlesize": 14,
    "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": 100,
}

_notice_shown = False


def available() -> bool:
    """Whether matplotlib can be imported; if not, say once per process (stderr) that plots are
    skipped and how to get them."""
    global _notice_shown
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        if not _notice_shown:
            _notice_shown = True
            print(f"bdframe: plots skipped (matplotlib is not installed); to get them: {INSTALL_HINT}",
                  file=sys.stderr)
        return False
    return True


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    """Write ``fig`` as PNG to ``path`` through a temporary sibling and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def trend(acc: Sequence[Optional[float]], asr: Sequence[Optional[float]], path: Path, *,
          title: str = "MeCa: clean accuracy and attack success rate per iteration",
          xlabel: str = "iteration (0 = warm-up model)") -> Optional[dict]:
    """A line chart of clean accuracy and attack success rate per iteration.

    ``acc[i]`` and ``asr[i]`` are fractions in [0, 1] (as in ``metrics.json``) at iteration ``i``,
    drawn as percent; ``None`` or NaN values are skipped (a run without an attack has no ASR).
    Returns ``{"file", "title", "xlabel", "ylabel", "legend", "points"}`` or ``None`` without
    matplotlib.
    """
    if not available():
        return None
    import matplotlib as mpl
    from matplotlib.ticker import MaxNLocator

    ylabel = "percent of test images (%)"
    n = max(len(acc), len(asr))
    legend, points = [], {}
    with mpl.rc_context(_STYLE):
        fig = _figure(7.0, 4.2)
        ax = fig.add_subplot()
        series = (("acc", acc, "clean accuracy (ACC, clean test images)", "s"),
                  ("asr", asr, "attack success rate (ASR, triggered test images)", "o"))
        for key, values, label, marker in series:
            pts = [(i, 100 * float(v)) for i, v in enumerate(values) if _finite(v)]
            points[key] = len(pts)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=marker, markersize=5, linewidth=2, color=_hex(COLORS[key]), label=label)
            ax.annotate(f"{ys[-1]:.1f}%", (xs[-1], ys[-1]), textcoords="offset points", xytext=(6, 0),
                        va="center", fontsize=9, color=_hex(COLORS[key]))
            legend.append(label)
        ax.set_ylim(-2, 102)
        ax.set_yticks(range(0, 101, 25))
        ax.set_xlim(-0.4, max(n - 1, 0) + 0.8)
        if n <= 16:
            ax.set_xticks(range(max(n, 1)))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if legend:
            ax.legend(loc="best", frameon=False)
        else:
            ax.text(0.5, 0.5, "no evaluations", transform=ax.transAxes, ha="center", va="center", color="grey")
        _save(fig, path)
    return {"file": Path(path).name, "title": title, "xlabel": xlabel, "ylabel": ylabel, "legend": legend,
            "points": points}


def histogram(scores, groups: dict, path: Path, *, title: str, xlabel: str, bins: int = 50) -> Optional[dict]:
    """Histograms of ``scores`` (a 1-D tensor or array) per group (name -> bool mask of the same
    length), on shared bins over the scores' range, with a logarithmic count axis so that a small
    group (a few poisoned samples among thousands of clean ones) stays readable; empty groups are
    left out. The legend gives each group's size.

    Returns ``{"file", "title", "xlabel", "ylabel", "range", "bins", "counts", "colors",
    "sizes", "scaling"}`` (``counts``: samples per bin per group; ``colors``: 0-255 RGB) or
    ``None`` without matplotlib.
    """
    if not available():
        return None
    import matplotlib as mpl
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    s = np.asarray(scores.detach().cpu().double() if hasattr(scores, "detach") else scores, dtype=np.float64)
    lo, hi = (float(s.min()), float(s.max())) if len(s) else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    ylabel = "samples per bin (log scale)"
    desc = {"file": Path(path).name, "title": title, "xlabel": xlabel, "ylabel": ylabel, "range": [lo, hi],
            "bins": bins, "counts": {}, "colors": {}, "sizes": {}, "scaling": "counts, logarithmic axis"}
    with mpl.rc_context(_STYLE):
        fig = _figure(7.5, 4.2)
        ax = fig.add_subplot()
        top = 1
        for name, mask in groups.items():
            m = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask, dtype=bool)
            v = s[m]
            if len(v) == 0:
                continue
            counts, _ = np.histogram(v, bins=edges)
            rgb = COLORS.get(name, (0, 0, 0))
            desc["counts"][name] = [int(c) for c in counts]
            desc["colors"][name] = list(rgb)
            desc["sizes"][name] = int(len(v))
            top = max(top, int(counts.max()))
            shown = np.maximum(counts, 0.5)  # empty bins sit below the axis (0.7), not at log(0)
            ax.stairs(shown, edges, fill=True, alpha=0.3, color=_hex(rgb), baseline=0.5)
            ax.stairs(shown, edges, color=_hex(rgb), linewidth=1.6, baseline=0.5,
                      label=f"{name} (n={len(v):,})")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}" if y >= 1 else ""))
        ax.set_ylim(0.7, top * 1.6)
        ax.set_xlim(lo, hi)
        ax.grid(True, axis="y", color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if desc["counts"]:
            ax.legend(loc="best", frameon=False)
        _save(fig, path)
    return desc


def image_grid(rows: Sequence, columns: Sequence[str], path: Path, *, title: str) -> Optional[dict]:
    """Rows of images with a label per row and a title per column. ``rows`` is a list of
    ``(label, images)``, ``images`` a list of float tensors (C,H,W) in [0, 1] (one channel is
    drawn in grey), one per column. Returns ``{"file", "title", "columns", "rows"}`` or ``None``
    without matplotlib."""
    if not available():
        return None
    import matplotlib as mpl

    n_rows, n_cols = len(rows), len(columns)
    with mpl.rc_context(_STYLE):
        fig = _figure(1.35 * n_cols + 2.6, 1.3 * n_rows + 0.8)
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
        for r, (label, images) in enumerate(rows):
            for c, img in enumerate(images):
                ax = axes[r][c]
                arr = img.detach().float().clamp(0, 1).cpu()
                if arr.shape[0] == 1:
                    ax.imshow(arr[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(arr.permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(columns[c], fontsize=10)
                if c == 0:
                    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        fig.suptitle(title)
        _save(fig, path)
    return {"file": Path(path).name, "title": title, "columns": list(columns), "rows": [label for label, _ in rows]}

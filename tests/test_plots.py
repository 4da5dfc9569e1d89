"""bdframe.plots: matplotlib pictures (the optional `plots` extra) with labelled axes, written
atomically; without matplotlib nothing is drawn, None is returned and one line says so."""

import importlib.util
import sys

import pytest
import torch

from bdframe import plots

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib (the `plots` extra) is not installed")


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.fixture
def no_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setattr(plots, "_notice_shown", False)


@needs_matplotlib
def test_trend_draws_both_series_with_labelled_axes(tmp_path):
    path = tmp_path / "trend.png"
    d = plots.trend([0.9, 0.5, 0.2], [0.0, float("nan"), None], path)
    assert d["file"] == "trend.png" and "iteration" in d["xlabel"] and "warm-up" in d["xlabel"]
    assert "%" in d["ylabel"] and d["title"]
    assert len(d["legend"]) == 2 and "ACC" in d["legend"][0] and "ASR" in d["legend"][1]
    assert d["points"] == {"acc": 3, "asr": 1}  # None and NaN are skipped
    w, h = png_size(path)
    assert 500 <= w <= 1500 and 300 <= h <= 1000 and path.stat().st_size > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["trend.png"]  # no temporary file left


@needs_matplotlib
def test_trend_without_asr_or_points(tmp_path):
    d = plots.trend([0.5, 0.6], [None, None], tmp_path / "a.png")
    assert len(d["legend"]) == 1 and "ACC" in d["legend"][0]
    d = plots.trend([], [], tmp_path / "b.png")
    assert d["legend"] == [] and (tmp_path / "b.png").stat().st_size > 1000


@needs_matplotlib
def test_histogram_keeps_a_tiny_group_and_reports_what_it_drew(tmp_path):
    g = torch.Generator().manual_seed(0)
    s = torch.cat([torch.randn(1000, generator=g), torch.randn(5, generator=g) + 4])
    poison = torch.zeros(1005, dtype=torch.bool)
    poison[1000:] = True
    empty = torch.zeros(1005, dtype=torch.bool)
    d = plots.histogram(s, {"clean": ~poison, "poison": poison, "cover": empty}, tmp_path / "h.png",
                        title="loss scores", xlabel="loss score", bins=20)
    assert {"file", "range", "bins", "counts", "colors", "scaling", "sizes", "title", "xlabel", "ylabel"} <= set(d)
    assert d["file"] == "h.png" and d["title"] == "loss scores" and d["xlabel"] == "loss score"
    assert "log" in d["ylabel"] and d["bins"] == 20
    assert set(d["counts"]) == {"clean", "poison"}  # an empty group is left out
    assert d["sizes"] == {"clean": 1000, "poison": 5}
    assert [sum(c) for c in d["counts"].values()] == [1000, 5] and all(len(c) == 20 for c in d["counts"].values())
    assert d["range"] == [pytest.approx(float(s.min())), pytest.approx(float(s.max()))]
    assert d["colors"]["poison"] == [214, 39, 40]
    w, h = png_size(tmp_path / "h.png")
    assert 500 <= w <= 1500 and 300 <= h <= 1000


@needs_matplotlib
def test_histogram_of_constant_scores(tmp_path):
    d = plots.histogram(torch.full((10,), 2.0), {"all": torch.ones(10, dtype=torch.bool)}, tmp_path / "h.png",
                        title="t", xlabel="x")
    assert d["range"] == [1.5, 2.5] and sum(d["counts"]["all"]) == 10


@needs_matplotlib
def attack_grid_script():
    """docs/make_attack_grid.py, which draws docs/attacks.png (its grid is not a product feature)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "make_attack_grid.py"
    spec = importlib.util.spec_from_file_location("make_attack_grid", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_attack_grid_script_labels_rows_and_columns(tmp_path):
    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    d = attack_grid_script().image_grid([[img, img, img], [img, img, img]], tmp_path / "g.png", row_labels=["a", "b"],
                         col_labels=["clean", "poisoned", "difference x4"], group=3, title="grid")
    assert d["rows"] == ["a", "b"] and d["columns"] == ["clean", "poisoned", "difference x4"]
    assert png_size(tmp_path / "g.png") == tuple(d["size_px"])


@needs_matplotlib
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "trend.png"
    path.write_bytes(b"old")

    def fail(self, fname, **kw):
        open(fname, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(OSError):
        plots.trend([0.5], [0.5], path)
    assert [p.name for p in tmp_path.iterdir()] == ["trend.png"] and path.read_bytes() == b"old"


def test_without_matplotlib_nothing_is_drawn_and_one_line_says_how_to_install(tmp_path, capsys, no_matplotlib):
    ones = torch.ones(4, dtype=torch.bool)
    assert plots.trend([0.5], [0.5], tmp_path / "t.png") is None
    assert plots.histogram(torch.arange(4.0), {"all": ones}, tmp_path / "h.png", title="t", xlabel="x") is None
    assert attack_grid_script().image_grid([[torch.zeros(3, 4, 4)]], tmp_path / "g.png", row_labels=["a"],
                                           col_labels=["b"]) is None
    assert plots.available() is False
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "plots skipped" in err[0] and "pip install 'bdframe[plots]'" in err[0]


@needs_matplotlib
def test_image_grid_labels_rows_and_columns(tmp_path):
    path = tmp_path / "grid.png"
    rows = [(f"class {k}", [torch.rand(1, 8, 8), torch.rand(3, 8, 8)]) for k in range(3)]
    d = plots.image_grid(rows, ["mask", "pattern"], path, title="inversion")
    assert d == {"file": "grid.png", "title": "inversion", "columns": ["mask", "pattern"],
                 "rows": ["class 0", "class 1", "class 2"]}
    w, h = png_size(path)
    assert w > 200 and h > 300 and [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_image_grid_without_matplotlib_writes_nothing(tmp_path, no_matplotlib, capsys):
    assert plots.image_grid([("a", [torch.rand(3, 4, 4)])], ["x"], tmp_path / "g.png", title="t") is None
    assert list(tmp_path.iterdir()) == [] and "plots skipped" in capsys.readouterr().err

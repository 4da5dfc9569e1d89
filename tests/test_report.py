"""`bdframe report`: the tables of a hand-made sweep directory, cell by cell."""

import csv
import importlib.util
import io
import itertools
import json
import statistics

import pytest

from bdframe import report
from bdframe.cli import main

AXES = {"attack": ["none", "badnet", "blend"], "defense": ["none", "meca"], "seed": ["0", "1", "2"]}
FAILED = {"attack=blend,defense=meca,seed=0": "RuntimeError: CUDA out of memory"}
INTERRUPTED = ["attack=blend,defense=meca,seed=1"]
NOT_STARTED = ["attack=blend,defense=meca,seed=2", "attack=badnet,defense=none,seed=2"]


def run_name(labels: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def fake_metrics(labels: dict) -> dict:
    """Known, uneven numbers per run (so means and stds differ from cell to cell)."""
    a, d, s = labels["attack"], labels["defense"], int(labels.get("seed", "0"))
    ai = AXES["attack"].index(a)
    acc = 0.90 + 0.011 * s * s - (0.023 if d == "meca" else 0.0) - 0.004 * ai
    m = {"clean_acc": acc, "attack": None if a == "none" else a, "defense": d,
         "seconds": {"total": 10.0 + 1.5 * s + ai + (25.0 + 4.0 * s * s if d == "meca" else 0.0), "defense": 1.0}}
    if a != "none":
        m["asr"] = (0.97 - 0.02 * s - 0.01 * ai) if d == "none" else (0.015 + 0.007 * s * s + 0.003 * ai)
        if d == "meca":
            m["detection"] = {"flagged": 50 + s, "recall": 0.9 + 0.03 * s - 0.01 * ai,
                              "precision": 0.8 - 0.05 * s * s + 0.02 * ai, "auroc": 0.95 - 0.013 * s * s + 0.01 * ai}
    if d == "meca":  # the flagged share comes with or without an attack
        m["suspected"] = {"count": 50 + s + 7 * ai, "share": (50 + s + 7 * ai) / 1000}
    return m


def make_sweep(root, axes=AXES, metrics=fake_metrics, *, failed=FAILED, interrupted=INTERRUPTED,
               not_started=NOT_STARTED, name="grid"):
    """Write sweep.json, a metrics.json per finished run, failed/<name>.json and <name>.partial
    dirs. Returns {run name: labels} of the finished runs."""
    root.mkdir(parents=True, exist_ok=True)
    runs, finished = [], {}
    for combo in itertools.product(*axes.values()):
        labels = dict(zip(axes, combo))
        n = run_name(labels)
        runs.append({"name": n, "axes": labels, "dir": f"runs/{n}"})
        if n in failed:
            (root / "failed").mkdir(exist_ok=True)
            (root / "failed" / f"{n}.json").write_text(json.dumps(
                {"error": failed[n], "log": f"logs/{n}.log", "returncode": 1}))
        elif n in interrupted:
            (root / "runs" / f"{n}.partial").mkdir(parents=True)
            # an unfinished run's files are not read
            (root / "runs" / f"{n}.partial" / "metrics.json").write_text('{"clean_acc": 0.123')
        elif n not in not_started:
            (root / "runs" / n).mkdir(parents=True)
            (root / "runs" / n / "metrics.json").write_text(json.dumps(metrics(labels)))
            finished[n] = labels
    (root / "sweep.json").write_text(json.dumps(
        {"format": 1, "name": name, "axes": [{"path": p, "labels": v} for p, v in axes.items()], "runs": runs}))
    return finished


def expect(values, digits=2):
    """The cell text for a list of values, computed independently of bdframe.report."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def expected_values(finished: dict, attack: str, defense: str) -> dict:
    """Per quantity, the values of the finished runs of one (attack, defense) cell."""
    out = {"acc": [], "asr": [], "flagged": [], "recall": [], "precision": [], "auroc": [], "multiple": []}
    for n, lab in finished.items():
        if lab["attack"] != attack or lab["defense"] != defense:
            continue
        m = fake_metrics(lab)
        out["acc"].append(100 * m["clean_acc"])
        if "asr" in m:
            out["asr"].append(100 * m["asr"])
        if "suspected" in m:
            out["flagged"].append(100 * m["suspected"]["share"])
        if "detection" in m:
            out["recall"].append(100 * m["detection"]["recall"])
            out["precision"].append(100 * m["detection"]["precision"])
            out["auroc"].append(m["detection"]["auroc"])
        ref = run_name({"attack": attack, "defense": "none", "seed": lab["seed"]})
        if ref in finished:
            out["multiple"].append(m["seconds"]["total"] / fake_metrics(finished[ref])["seconds"]["total"])
    return out


def md_tables(text: str) -> dict:
    """Markdown tables by section title: {title: (header, {row label: cells})}."""
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("| ") and title:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if title not in tables:
                tables[title] = (cells, {})
            else:
                tables[title][1][cells[0]] = cells[1:]
        elif line.startswith("|-"):
            continue
    return tables


def section(tables: dict, word: str):
    (key,) = [k for k in tables if k.startswith(word)]
    return tables[key]


def report_md(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["report", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_markdown_cells_match_the_metrics(tmp_path, capsys):
    d = tmp_path / "sweep"
    finished = make_sweep(d)
    text = report_md(capsys, d)
    tables = md_tables(text)
    head, body = section(tables, "Clean accuracy")
    assert head == ["attack", "none ACC", "none ASR", "meca ACC", "meca ASR"]
    assert list(body) == ["none", "badnet", "blend"]
    det_head, det = section(tables, "Detection")
    assert det_head == ["attack", "meca flagged", "meca recall", "meca precision", "meca AUROC"]
    time_head, times = section(tables, "Wall time")
    assert time_head == ["attack", "none time", "meca time"]
    checked = 0
    for a in AXES["attack"]:
        for j, dfn in enumerate(AXES["defense"]):
            ev = expected_values(finished, a, dfn)
            assert body[a][2 * j] == expect(ev["acc"]), (a, dfn)
            assert body[a][2 * j + 1] == expect(ev["asr"]), (a, dfn)
            assert times[a][j] == expect(ev["multiple"]), (a, dfn)
            if dfn == "meca":
                assert det[a] == [expect(ev["flagged"]), expect(ev["recall"]), expect(ev["precision"]),
                                  expect(ev["auroc"], 3)], a
            checked += 1
    assert checked == 6
    # spot checks of what the expectations above cover
    assert body["blend"][2:] == ["–", "–"] and times["blend"][1] == "–" and det["blend"] == ["–", "–", "–", "–"]
    assert body["none"][1] == "–" and det["none"][1:] == ["–", "–", "–"]  # no attack: no ASR, no recall/precision
    assert det["none"][0] == "5.10 ± 0.10"  # but a flagged share: 50 + seed of 1,000
    assert times["badnet"][0] == "1.00 ± 0.00" and times["none"][0] == "1.00 ± 0.00"  # their own reference
    # the notes
    assert "aggregated over seed (3 values)" in text
    assert "18 runs: 14 finished, 1 failed, 1 interrupted, 2 not started" in text
    assert "- failed (1):\n  - attack=blend,defense=meca,seed=0: RuntimeError: CUDA out of memory " \
           "(log: logs/attack=blend,defense=meca,seed=0.log)" in text
    assert "- interrupted (1):\n  - attack=blend,defense=meca,seed=1\n" in text
    assert "- not started (2):\n  - attack=badnet,defense=none,seed=2\n  - attack=blend,defense=meca,seed=2\n" in text
    assert text.startswith("# Sweep report: grid\n")


def test_the_time_multiple_uses_the_no_defense_run_of_the_same_row_and_seed(tmp_path):
    d = tmp_path / "sweep"
    finished = make_sweep(d)
    t = report.collect(d)
    cell = t.cell("badnet", "meca")
    assert cell.n == 3 and cell.runs == tuple(run_name({"attack": "badnet", "defense": "meca", "seed": s})
                                              for s in "012")
    # badnet/none seed 2 never ran: badnet/meca seed 2 has no reference, so two multiples
    ms = [fake_metrics({"attack": "badnet", "defense": "meca", "seed": s})["seconds"]["total"]
          / fake_metrics({"attack": "badnet", "defense": "none", "seed": s})["seconds"]["total"] for s in "01"]
    assert cell.multiple.n == 2
    assert cell.multiple.mean == pytest.approx(statistics.mean(ms))
    assert cell.multiple.std == pytest.approx(statistics.stdev(ms))
    assert t.cell("badnet", "none").multiple == report.Stat(1.0, 0.0, 2)
    # the ACC loss against the same references
    loss = [100 * (fake_metrics({"attack": "badnet", "defense": "none", "seed": s})["clean_acc"]
                   - fake_metrics({"attack": "badnet", "defense": "meca", "seed": s})["clean_acc"]) for s in "01"]
    assert cell.acc_loss.mean == pytest.approx(statistics.mean(loss))
    assert t.cell("blend", "meca").n == 0 and t.cell("blend", "meca").acc is None
    assert t.aggregated == [("seed", 3)] and len(finished) == 14


def test_only_keeps_the_chosen_runs_and_their_no_defense_references(tmp_path, capsys):
    d = tmp_path / "sweep"
    finished = make_sweep(d)
    full = report.collect(d)
    t = report.collect(d, only=["defense=meca", "attack=badnet", "attack=blend"])
    assert t.cols == [("meca",)] and t.rows == [("badnet",), ("blend",)]
    assert {r.name for r in t.runs} == {run_name({"attack": a, "defense": "meca", "seed": s})
                                        for a in ("badnet", "blend") for s in "012"}
    # the multiple and the ACC loss still come from the hidden no-defense runs
    assert t.cell("badnet", "meca") == full.cell("badnet", "meca")
    assert t.cell("badnet", "meca").multiple.n == 2
    text = report_md(capsys, d, "--only", "defense=meca", "--only", "attack=badnet", "--only", "attack=blend")
    head, body = section(md_tables(text), "Clean accuracy")
    assert head == ["attack", "meca ACC", "meca ASR"] and list(body) == ["badnet", "blend"]
    ev = expected_values(finished, "badnet", "meca")
    assert body["badnet"] == [expect(ev["acc"]), expect(ev["asr"])]
    assert "--only: the runs with attack badnet or blend, defense meca (6 of 18)" in text
    assert "6 runs: 3 finished, 1 failed, 1 interrupted, 1 not started" in text


def test_no_reference_gives_a_dash(tmp_path, capsys):
    d = tmp_path / "sweep"
    axes = {"attack": ["badnet"], "defense": ["none", "meca"], "seed": ["0"]}
    make_sweep(d, axes, failed={"attack=badnet,defense=none,seed=0": "boom"}, interrupted=[], not_started=[])
    text = report_md(capsys, d)
    # no time multiple anywhere: no table of dashes, a note instead
    assert not [k for k in md_tables(text) if k.startswith("Wall time")]
    assert "- wall time: no shown run has a finished no-defense run in its row" in text
    # one run per cell: plain values
    _, body = section(md_tables(text), "Clean accuracy")
    m = fake_metrics({"attack": "badnet", "defense": "meca", "seed": "0"})
    assert body["badnet"] == ["–", "–", f"{100 * m['clean_acc']:.2f}", f"{100 * m['asr']:.2f}"]


def test_no_time_multiple_across_machines(tmp_path, capsys):
    """Seconds from two machines make no multiple: where the hardware a run and its no-defense
    reference record in run.json differs, or only one records it, the run has none and a note
    names it; two runs that record no CPU (made before bdframe did) are compared as before."""
    d = tmp_path / "sweep"
    axes = {"attack": ["none", "badnet", "blend"], "defense": ["none", "meca"], "seed": ["0", "1"]}
    make_sweep(d, axes, failed={}, interrupted=[], not_started=[])
    amd = {"cpu": "AMD EPYC 9R14", "device": "cpu", "threads": 2}
    intel = {**amd, "cpu": "Intel(R) Xeon(R) Processor"}
    envs = {"attack=badnet,defense=none,seed=0": amd, "attack=badnet,defense=meca,seed=0": intel,  # two CPUs
            "attack=badnet,defense=none,seed=1": amd, "attack=badnet,defense=meca,seed=1": amd,  # one machine
            "attack=blend,defense=none,seed=0": amd, "attack=blend,defense=meca,seed=0": {**amd, "threads": 4},
            "attack=blend,defense=meca,seed=1": intel}  # its no-defense run records no CPU
    for name, env in envs.items():
        (d / "runs" / name / "run.json").write_text(json.dumps({"environment": env}))

    def ratio(attack, seed):
        return (fake_metrics({"attack": attack, "defense": "meca", "seed": seed})["seconds"]["total"]
                / fake_metrics({"attack": attack, "defense": "none", "seed": seed})["seconds"]["total"])

    t = report.collect(d)
    assert t.cell("badnet", "meca").multiple == report.Stat(ratio("badnet", "1"), None, 1)
    assert t.cell("blend", "meca").multiple is None
    assert t.cell("badnet", "none").multiple == report.Stat(1.0, 0.0, 2)
    assert t.cell("none", "meca").multiple.n == 2  # neither records its CPU: as before
    assert t.cell("none", "meca").multiple.mean == pytest.approx((ratio("none", "0") + ratio("none", "1")) / 2)
    assert t.other_hardware == ["attack=badnet,defense=meca,seed=0", "attack=blend,defense=meca,seed=0",
                                "attack=blend,defense=meca,seed=1"]
    text = report_md(capsys, d)
    assert ("- wall time: no multiple for 3 runs whose no-defense run was made on other hardware, or on "
            "hardware one of them does not record (the CPU, device, GPU or thread count in run.json):\n"
            "  - attack=badnet,defense=meca,seed=0\n") in text
    _, body = section(md_tables(text), "Wall time")
    assert body["blend"] == ["1.00 ± 0.00", "–"] and body["badnet"][1] == f"{ratio('badnet', '1'):.2f}"


def test_a_resumed_run_has_no_time_multiple(tmp_path, capsys):
    """A resumed run's seconds are those of its last attempt only: neither it nor a run whose
    no-defense reference was resumed gets a multiple, and a note names both; a resumed
    no-defense run is still its own reference."""
    d = tmp_path / "sweep"
    axes = {"attack": ["none", "badnet", "blend"], "defense": ["none", "meca"]}
    make_sweep(d, axes, failed={}, interrupted=[], not_started=[])
    env = {"cpu": "AMD EPYC 9R14", "device": "cpu", "threads": 2}
    resumed = {"attack=badnet,defense=meca", "attack=blend,defense=none"}
    for combo in itertools.product(*axes.values()):
        name = f"attack={combo[0]},defense={combo[1]}"
        (d / "runs" / name / "run.json").write_text(json.dumps({"environment": env, "resumed": name in resumed}))
    t = report.collect(d)
    assert t.cell("badnet", "meca").multiple is None
    assert t.cell("blend", "meca").multiple is None  # its reference was resumed
    assert t.cell("blend", "none").multiple == report.Stat(1.0, None, 1)
    assert t.cell("none", "meca").multiple.mean == pytest.approx(
        fake_metrics({"attack": "none", "defense": "meca"})["seconds"]["total"]
        / fake_metrics({"attack": "none", "defense": "none"})["seconds"]["total"])
    assert t.resumed == ["attack=badnet,defense=meca", "attack=blend,defense=meca"] and t.other_hardware == []
    text = report_md(capsys, d)
    assert ("- wall time: no multiple for 2 runs that were resumed, or whose no-defense run was (run.json: "
            "\"resumed\": true; the seconds cover only the last attempt):\n"
            "  - attack=badnet,defense=meca\n") in text


def test_csv_is_one_line_per_cell(tmp_path, capsys):
    d = tmp_path / "sweep"
    finished = make_sweep(d)
    capsys.readouterr()
    assert main(["report", str(d), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0]) == ["attack", "defense", *report.CSV_FIELDS]
    assert [(r["attack"], r["defense"]) for r in rows] == list(itertools.product(AXES["attack"], AXES["defense"]))
    for r in rows:
        ev = expected_values(finished, r["attack"], r["defense"])
        names = [n for n, lab in finished.items() if (lab["attack"], lab["defense"]) == (r["attack"], r["defense"])]
        assert int(r["n"]) == len(ev["acc"]) and r["runs"] == ";".join(names)
        for key, col in (("acc", "acc"), ("asr", "asr"), ("flagged", "flagged"), ("recall", "recall"),
                         ("precision", "precision"), ("auroc", "auroc"), ("multiple", "time_multiple")):
            vals = ev[key]
            if not vals:
                assert r[f"{col}_mean"] == "" and r[f"{col}_std"] == "", (r, key)
                continue
            assert float(r[f"{col}_mean"]) == pytest.approx(statistics.mean(vals), abs=1e-12), (r, key)
            if len(vals) == 1:
                assert r[f"{col}_std"] == ""
            else:
                assert float(r[f"{col}_std"]) == pytest.approx(statistics.stdev(vals), abs=1e-12), (r, key)
    out = tmp_path / "sub" / "report.csv"
    assert main(["report", str(d), "--format", "csv", "--out", str(out)]) == 0
    assert list(csv.DictReader(out.open())) == rows


def test_rows_and_cols_swap_and_combine(tmp_path, capsys):
    d = tmp_path / "sweep"
    make_sweep(d)
    _, body = section(md_tables(report_md(capsys, d)), "Clean accuracy")
    head, swapped = section(md_tables(report_md(capsys, d, "--rows", "defense", "--cols", "attack")), "Clean accuracy")
    assert head == ["defense", "none ACC", "none ASR", "badnet ACC", "badnet ASR", "blend ACC", "blend ASR"]
    for i, a in enumerate(AXES["attack"]):
        for j, dfn in enumerate(AXES["defense"]):
            assert swapped[dfn][2 * i:2 * i + 2] == body[a][2 * j:2 * j + 2]
    text = report_md(capsys, d, "--rows", "attack", "seed")
    head, rows = section(md_tables(text), "Clean accuracy")
    assert head[0] == "attack / seed" and list(rows)[:4] == ["none / 0", "none / 1", "none / 2", "badnet / 0"]
    m = fake_metrics({"attack": "badnet", "defense": "meca", "seed": "1"})
    assert rows["badnet / 1"][2:] == [f"{100 * m['clean_acc']:.2f}", f"{100 * m['asr']:.2f}"]
    assert "no axis aggregated over" in text
    t = report.collect(d, cols=["defense", "seed"])
    assert t.cols[:3] == [("none", "0"), ("none", "1"), ("none", "2")] and t.rows == [("none",), ("badnet",), ("blend",)]
    assert t.cell("badnet", "meca / 1").acc.mean == pytest.approx(100 * m["clean_acc"])


@pytest.mark.parametrize("args, words", [
    (["--rows", "defense.lam"], ["--rows 'defense.lam' is not an axis", "attack, defense, seed"]),
    (["--cols", "train.epochs"], ["--cols 'train.epochs' is not an axis", "attack, defense, seed"]),
    (["--rows", "seed", "--cols", "seed"], ["--rows and --cols both name 'seed'"]),
    (["--rows", "seed", "seed"], ["--rows: seed given more than once"]),
    (["--only", "defense"], ["--only 'defense': expected AXIS=LABEL", "attack, defense, seed"]),
    (["--only", "defense=abl"], ["--only 'defense=abl': no run has the label 'abl'", "meca, none"]),
])
def test_bad_axes_exit_2_with_one_line(tmp_path, capsys, args, words):
    d = tmp_path / "sweep"
    make_sweep(d)
    capsys.readouterr()
    assert main(["report", str(d), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bdframe: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err


def test_not_a_sweep_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for path, words in ((tmp_path / "empty", "is not a sweep directory (no sweep.json); `bdframe sweep run FILE`"),
                        (tmp_path / "missing", "does not exist"), (tmp_path / "file", "is not a directory")):
        capsys.readouterr()
        assert main(["report", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bdframe: error: ") and words in err and str(path) in err, err
    (tmp_path / "empty" / "sweep.json").write_text('{"format": 2, "axes": [], "runs": []}')
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "$.format: expected 1, got 2" in capsys.readouterr().err


def test_a_broken_metrics_file_is_named(tmp_path, capsys):
    d = tmp_path / "sweep"
    make_sweep(d)
    bad = d / "runs" / "attack=none,defense=meca,seed=1" / "metrics.json"
    bad.write_text('{"clean_acc": 0.9')
    capsys.readouterr()
    assert main(["report", str(d)]) == 2
    err = capsys.readouterr().err
    assert "is not valid JSON" in err and str(bad) in err and "Traceback" not in err


def test_zero_finished_runs_print_an_empty_table(tmp_path, capsys):
    d = tmp_path / "sweep"
    axes = {"attack": ["badnet"], "defense": ["none", "meca"]}
    make_sweep(d, axes, failed={}, interrupted=[], not_started=["attack=badnet,defense=none",
                                                               "attack=badnet,defense=meca"])
    text = report_md(capsys, d)
    _, body = section(md_tables(text), "Clean accuracy")
    assert body == {"badnet": ["–"] * 4}
    assert "2 runs: 0 finished, 0 failed, 0 interrupted, 2 not started" in text
    assert "no axis aggregated over" in text


def test_missing_default_axes_fall_back_to_one_row_and_column(tmp_path, capsys):
    d = tmp_path / "sweep"
    axes = {"seed": ["0", "1"]}
    make_sweep(d, axes, lambda lab: fake_metrics({"attack": "badnet", "defense": "meca", **lab}),
               failed={}, interrupted=[], not_started=[])
    text = report_md(capsys, d)
    head, body = section(md_tables(text), "Clean accuracy")
    assert head == ["attack", "meca ACC", "meca ASR"]
    accs = [100 * fake_metrics({"attack": "badnet", "defense": "meca", "seed": s})["clean_acc"] for s in "01"]
    assert body == {"badnet": [expect(accs), body["badnet"][1]]}
    assert "attack is not an axis of this sweep" in text and "aggregated over seed (2 values)" in text
    # runs that differ: labelled "all"
    mixed = {"defense": ["none", "meca"]}
    make_sweep(tmp_path / "mixed", mixed, lambda lab: fake_metrics({"attack": lab["defense"] == "meca" and "blend"
                                                                    or "badnet", **lab}),
               failed={}, interrupted=[], not_started=[])
    t = report.collect(tmp_path / "mixed")
    assert t.rows == [("all",)] and t.cols == [("none",), ("meca",)] and t.row_names == ("attack",)
    # --rows defense takes the default column axis: one column group
    t = report.collect(tmp_path / "mixed", rows=["defense"])
    assert t.row_axes == ("defense",) and t.col_axes == () and t.cols == [("all",)]


def test_html_holds_the_tables_and_figures(tmp_path, capsys, monkeypatch):
    d = tmp_path / "sweep"
    finished = make_sweep(d)
    capsys.readouterr()
    assert main(["report", str(d), "--format", "html"]) == 0
    out = d / "report.html"
    assert capsys.readouterr().out.strip() == f"report written: {out}"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    ev = expected_values(finished, "badnet", "meca")
    for key in ("acc", "asr", "flagged", "recall", "precision", "multiple"):
        assert f"<td>{expect(ev[key])}</td>" in page, key
    assert "<th>meca ACC</th>" in page and "RuntimeError: CUDA out of memory" in page
    if importlib.util.find_spec("matplotlib"):
        assert page.count('<img src="data:image/png;base64,') == 2
    else:
        assert "pip install" in page and "<img" not in page
    # without matplotlib: the tables and a line saying how to get the figures
    from bdframe import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    other = tmp_path / "r.html"
    assert main(["report", str(d), "--format", "html", "--out", str(other)]) == 0
    page = other.read_text(encoding="utf-8")
    assert "<img" not in page and "pip install &#x27;bdframe[plots]&#x27;" in page
    assert f"<td>{expect(ev['acc'])}</td>" in page


def test_labels_are_escaped_in_html(tmp_path, monkeypatch):
    d = tmp_path / "sweep"
    axes = {"attack": ["<b>"], "defense": ["none"]}
    make_sweep(d, axes, lambda lab: fake_metrics({"attack": "badnet", "defense": "none", "seed": "0"}),
               failed={}, interrupted=[], not_started=[])
    from bdframe import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    page = report.to_html(report.collect(d))
    assert "<td>&lt;b&gt;</td>" in page and "<td><b></td>" not in page


def test_columns_whose_defense_used_clean_data_are_marked_and_noted(tmp_path, capsys):
    axes = {"attack": ["badnet"], "defense": ["none", "mcldef"]}

    def metrics(labels):
        m = {"clean_acc": 0.8, "asr": 0.5, "seconds": {"total": 10.0}, "defense": labels["defense"]}
        m["clean_data"] = {"size": 500, "fraction": 0.05, "used": labels["defense"] == "mcldef"}
        return m

    d = tmp_path / "sweep"
    make_sweep(d, axes, metrics, failed={}, interrupted=[], not_started=[])
    text = report_md(capsys, d)
    head, _ = section(md_tables(text), "Clean accuracy")
    assert head == ["attack", "none ACC", "none ASR", "mcldef† ACC", "mcldef† ASR"]
    assert ("† the defense uses trusted clean data (500 images; each run's clean.json says where they come "
            "from): mcldef; the other columns use none") in text
    # without clean data, no mark and no note
    d2 = tmp_path / "sweep2"
    make_sweep(d2, axes, lambda labels: {"clean_acc": 0.8, "seconds": {"total": 1.0}}, failed={}, interrupted=[],
               not_started=[])
    assert "†" not in report_md(capsys, d2)
    # the csv says it in a column
    capsys.readouterr()
    assert main(["report", str(d), "--format", "csv"]) == 0
    rows = {r["defense"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert rows["mcldef"]["clean_images"] == "500" and rows["none"]["clean_images"] == ""


def test_no_defense_references_pair_each_run_with_its_row(tmp_path):
    """The public helper benchmark scripts use: each run's references are the finished
    no-defense runs with the same labels on every other axis; a no-defense run is its own; a
    row whose no-defense run did not finish has none."""
    d = tmp_path / "sweep"
    finished = make_sweep(d)
    name, axes, runs = report.load_runs(d)
    assert name == "grid" and list(axes) == list(AXES)
    assert [r.name for r in runs if r.status == report.FINISHED] == list(finished)
    of = report.no_defense_references(runs, axes)
    by_name = {r.name: r for r in runs}
    meca = by_name["attack=badnet,defense=meca,seed=1"]
    assert [r.name for r in of(meca)] == ["attack=badnet,defense=none,seed=1"]
    own = by_name["attack=badnet,defense=none,seed=0"]
    assert of(own) == [own]
    assert of(by_name["attack=badnet,defense=meca,seed=2"]) == []  # its no-defense run never started
    # with seed among the column axes, a row's references are all its seeds' no-defense runs
    pooled = report.no_defense_references(runs, axes, col_axes=("defense", "seed"))
    assert sorted(r.name for r in pooled(meca)) == ["attack=badnet,defense=none,seed=0",
                                                   "attack=badnet,defense=none,seed=1"]


def test_peak_memory_table_shows_each_cell_and_only_where_runs_record_it(tmp_path, capsys):
    """Runs that record ``peak_memory_mb`` get a peak-memory table (RSS, and GPU only where a
    run used one); sweeps whose runs record none (made before bdframe did) get no such table."""
    d = tmp_path / "sweep"
    axes = {"attack": ["badnet"], "defense": ["none", "meca"], "seed": ["0", "1"]}
    mem = {("none", "0"): 1000.0, ("none", "1"): 1200.0, ("meca", "0"): 2500.0}  # meca seed 1 records none

    def metrics(labels):
        m = fake_metrics(labels)
        if (labels["defense"], labels["seed"]) in mem:
            m["peak_memory_mb"] = {"rss": mem[(labels["defense"], labels["seed"])]}
        return m

    make_sweep(d, axes, metrics, failed={}, interrupted=[], not_started=[])
    t = report.collect(d)
    assert t.cell("badnet", "none").rss == report.Stat(1100.0, statistics.stdev([1000.0, 1200.0]), 2)
    assert t.cell("badnet", "meca").rss == report.Stat(2500.0, None, 1)
    assert t.cell("badnet", "meca").gpu is None
    head, body = section(md_tables(report_md(capsys, d)), "Peak memory")
    assert head == ["attack", "none RSS", "meca RSS"]
    assert body["badnet"] == [f"1100 ± {statistics.stdev([1000.0, 1200.0]):.0f}", "2500"]

    bare = tmp_path / "bare"
    make_sweep(bare, axes, failed={}, interrupted=[], not_started=[])
    assert not [k for k in md_tables(report_md(capsys, bare)) if k.startswith("Peak memory")]

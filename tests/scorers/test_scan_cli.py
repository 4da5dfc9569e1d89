"""`bdframe scan`: outputs of a scan of a saved run, and clean failures on bad input."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from bdframe.cli import main
from helpers import TINY

# the shared tiny recipe, renamed, with no training epochs (scan only needs a saved model)
RECIPE = TINY.replace('name = "tiny"', 'name = "scan-test"')


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (untrained: 0 epochs) badnet run on the synthetic dataset, made by the runner."""
    d = tmp_path_factory.mktemp("scan")
    recipe = d / "r.toml"
    recipe.write_text(RECIPE.format(out=d / "runs", epochs=0))
    assert main(["run", str(recipe), "--out", str(d / "run"), "--quiet"]) == 0
    return d / "run"


def test_scan_writes_scores_histograms_and_metrics(run_dir, tmp_path, capsys):
    out = tmp_path / "scan"
    rc = main(["scan", str(run_dir), "--scorer", "loss", "--scorer", "spectral", "--scorer", "strip",
               "--param", "strip.n_overlays=4", "--param", "spectral.poison_rate_bound=0.1",
               "--out", str(out), "--device", "cpu", "--quiet", "--batch-size", "64"])
    assert rc == 0 and "scan complete" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["hist-loss.png", "hist-spectral.png", "hist-strip.png",
                                                    "metrics.json", "scores.csv"]
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 300 and list(rows[0])[:4] == ["id", "path", "label", "truth"]
    assert all(r["path"] == "" for r in rows)  # the synthetic dataset has no files
    poison = set(json.loads((run_dir / "poison.json").read_text())["poison_ids"])
    assert {int(r["id"]) for r in rows if r["truth"] == "poison"} == poison
    ranks = sorted(int(r["loss_rank"]) for r in rows)
    assert ranks == list(range(1, 301))
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 300 and m["num_poison"] == 30
    for name in ("loss", "spectral", "strip"):
        r = m["scorers"][name]
        assert 0 <= r["auroc"] <= 1 and set(r["tpr_at_fpr"]) == {"0.01", "0.05", "0.1"}
        assert {"precision", "recall", "flagged", "rule"} <= set(r["split"])
        h = r["histogram"]
        assert h["file"] == f"hist-{name}.png" and (out / h["file"]).stat().st_size > 5000
        assert name in h["title"] and f"AUROC {r['auroc']:.3f}" in h["title"]
        assert name in h["xlabel"] and "samples" in h["ylabel"] and h["bins"] == 50
        assert h["sizes"] == {"clean": 270, "poison": 30}  # badnet has no cover samples: no empty group drawn
        assert {k: sum(c) for k, c in h["counts"].items()} == h["sizes"]
        assert h["range"] == [pytest.approx(r["score_stats"]["min"]), pytest.approx(r["score_stats"]["max"])]
    assert m["scorers"]["strip"]["params"]["n_overlays"] == 4
    assert m["scorers"]["spectral"]["split"]["flagged"] > 0
    from torchvision.io import read_image

    img = read_image(str(out / "hist-loss.png"))
    assert img.shape[0] in (3, 4) and 300 <= img.shape[1] <= 1000 and 500 <= img.shape[2] <= 1500


def test_scan_without_matplotlib_completes_without_histograms(run_dir, tmp_path, capsys, monkeypatch):
    from bdframe import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the `plots` extra were not installed
    monkeypatch.setattr(plots, "_notice_shown", False)
    out = tmp_path / "scan"
    assert main(["scan", str(run_dir), "--scorer", "loss", "--scorer", "spectral", "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "scores.csv"]
    m = json.loads((out / "metrics.json").read_text())
    assert all(m["scorers"][name]["histogram"] is None and 0 <= m["scorers"][name]["auroc"] <= 1
               for name in ("loss", "spectral"))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "plots skipped" in err[0] and "pip install 'bdframe[plots]'" in err[0]


def test_limit_and_clean_aux(run_dir, tmp_path):
    out = tmp_path / "scan"
    assert main(["scan", str(run_dir), "--scorer", "scan", "--scorer", "adv-kl", "--limit", "120",
                 "--clean-aux", "40", "--param", "scan.aux_size=40", "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 120 and m["scorers"]["scan"]["clean_aux"] is True
    assert m["scorers"]["adv-kl"]["clean_aux"] is False and "split" not in m["scorers"]["adv-kl"]
    assert m["scorers"]["adv-kl"]["score_stats"]["max"] <= 0


@pytest.mark.parametrize("args, message", [
    (["--scorer", "nope"], "unknown scorer 'nope'"),
    (["--scorer", "adv-kl", "--param", "adv-kl.epsilon=2.0"], "scorer:adv-kl.epsilon: must be in [0, 1]"),
    (["--scorer", "adv-kl", "--param", "adv-kl.mask=grid"], "unknown parameter"),
    (["--scorer", "adv-kl", "--param", "loss.isolation_ratio=0.1"], "is not selected"),
    (["--scorer", "adv-kl", "--param", "epsilon"], "expected SCORER.KEY=VALUE"),
    (["--scorer", "loss", "--scorer", "loss"], "more than once"),
    ([], "no scorer given"),
])
def test_bad_input_is_a_user_error_and_leaves_no_output(run_dir, tmp_path, capsys, args, message):
    out = tmp_path / "scan"
    assert main(["scan", str(run_dir), "--out", str(out), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".scan.tmp-*"))


def test_missing_or_incomplete_run_dir_and_existing_output(run_dir, tmp_path, capsys):
    assert main(["scan", str(tmp_path / "missing"), "--scorer", "loss"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    assert main(["scan", str(tmp_path / "half"), "--scorer", "loss", "--out", str(tmp_path / "o")]) == 2
    assert "recipe.toml is missing" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "exists").mkdir()
    assert main(["scan", str(run_dir), "--scorer", "loss", "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_exit_code_without_traceback(run_dir, tmp_path):
    p = subprocess.run([sys.executable, "-m", "bdframe.cli", "scan", str(run_dir), "--scorer", "adv-kl",
                        "--param", "adv-kl.mask_mode=diamond", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "mask_mode" in p.stderr
    assert not (tmp_path / "o").exists()


def test_run_dir_that_does_not_match_its_recipe(run_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    pj = json.loads((bad / "poison.json").read_text())
    pj["poison_ids"] = pj["poison_ids"][1:]
    (bad / "poison.json").write_text(json.dumps(pj))
    assert main(["scan", str(bad), "--scorer", "loss", "--out", str(tmp_path / "o1"), "--quiet"]) == 2
    assert "does not match" in capsys.readouterr().err
    shutil.copy(run_dir / "poison.json", bad / "poison.json")
    torch.save({"weight": torch.zeros(3)}, bad / "model.pt")
    assert main(["scan", str(bad), "--scorer", "loss", "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "does not load into the recipe's model" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_param_values():
    from bdframe.scan import parse_value

    assert parse_value("8/255") == 8 / 255 and parse_value("0.02") == 0.02 and parse_value("true") is True
    assert parse_value("single") == "single" and parse_value('["rotate", "flip"]') == ["rotate", "flip"]

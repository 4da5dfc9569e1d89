"""The ``abl`` defense: the isolated set's size, what it reports, and resume."""

import json

import pytest

from helpers import TINY
from bdframe import runner
from bdframe.cli import main

ABL = """
[defense]
name = "abl"
isolation_epochs = 2
isolation_lr = 0.05
isolation_ratio = {ratio}
unlearn_epochs = 1
evaluate_each_epoch = false
"""


def recipe(tmp_path, ratio=0.02):
    f = tmp_path / "abl.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1) + ABL.format(ratio=ratio))
    return f


pytestmark = pytest.mark.usefixtures("two_threads")


def test_isolates_floor_ratio_n_lowest_loss_samples_and_reports_them(tmp_path):
    f = recipe(tmp_path)
    assert main(["run", str(f), "--quiet"]) == 0
    d = tmp_path / "runs" / "tiny"
    m = json.loads((d / "metrics.json").read_text())
    n = m["train_size"]
    sus = json.loads((d / "suspected.json").read_text())
    assert sus["count"] == int(0.02 * n) == m["detection"]["flagged"] == m["defense_metrics"]["split"]["isolated"]
    assert m["defense_metrics"]["split"]["kept"] == n - sus["count"]
    assert 0.0 <= m["detection"]["auroc"] <= 1.0 and "tpr_at_fpr" in m["detection"]
    scores = [s["score"] for s in sus["samples"]]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)  # log p_y, lowest loss first
    assert [t["step"] for t in m["defense_metrics"]["trend"]] == ["isolation", "finetune", "unlearn"]
    stages = [json.loads(line)["stage"] for line in (d / "history.jsonl").read_text().splitlines()]
    assert stages.count("abl-isolation") == 3 and stages.index("abl-isolate") < stages.index("abl-finetune")


def test_nothing_isolated_means_no_unlearning(tmp_path):
    f = recipe(tmp_path, ratio=0.001)  # floor(0.001 * 300) = 0
    assert main(["run", str(f), "--quiet"]) == 0
    m = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert m["defense_metrics"]["split"]["isolated"] == 0
    assert [t["step"] for t in m["defense_metrics"]["trend"]] == ["isolation", "finetune"]


def test_a_resumed_run_does_not_redo_the_isolation(tmp_path, monkeypatch):
    from bdframe_scorer_loss.plugin import Loss

    f = recipe(tmp_path)
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "ref")]) == 0
    real_log, real_score = runner.RunContext.log, Loss.score
    scored = {"n": 0}

    def score(self, *a, **k):
        scored["n"] += 1
        return real_score(self, *a, **k)

    def log(self, record):
        real_log(self, record)
        if record.get("stage") == "abl-finetune" and not record.get("replayed"):
            raise KeyboardInterrupt

    monkeypatch.setattr(Loss, "score", score)
    monkeypatch.setattr(runner.RunContext, "log", log)
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "cut")]) == 130
    assert scored["n"] == 1
    monkeypatch.setattr(runner.RunContext, "log", real_log)
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert scored["n"] == 1  # the isolation was loaded, not scored again
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ref", "cut"))
    assert (a["clean_acc"], a["asr"], a["detection"]) == (b["clean_acc"], b["asr"], b["detection"])


@pytest.mark.slow
@pytest.mark.heavy
def test_the_abl_example_isolates_poison_and_unlearns_the_backdoor(tmp_path):
    """examples/abl-quickstart.toml: the fine-tuned model has the backdoor, the isolated samples
    are mostly poisoned, and unlearning them removes it."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "abl-quickstart.toml"
    assert main(["run", str(example), "--quiet", "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    finetuned = [t for t in m["defense_metrics"]["trend"] if t["step"] == "finetune"]
    assert finetuned and finetuned[0]["asr"] > 0.9
    assert m["detection"]["precision"] > 0.5
    assert m["asr"] < 0.2 and m["clean_acc"] > 0.5

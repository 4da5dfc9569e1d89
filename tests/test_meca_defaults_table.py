"""benchmarks/meca_defaults_table.py: one table of MeCa's defaults from runs and replays, against the targets."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import meca_defaults_table  # noqa: E402


def _run(runs: Path, attack: str, defense: str, *, acc, asr, warm_asr=None, recall=None, precision=None,
         flagged=0, picked=(), target=1, meca=True) -> Path:
    d = runs / f"attack={attack},defense={defense}"
    d.mkdir(parents=True)
    (d / "recipe.toml").write_text(f'name = "{d.name}"\n[attack]\nname = "badnet"\ntarget = {target}\n')
    m = {"defense": "meca" if meca else "none", "train_size": 1000, "clean_acc": acc, "asr": asr,
         "suspected": {"count": flagged}, "seconds": {"total": 10.0}}
    if meca:
        m["detection"] = {"flagged": flagged, "recall": recall, "precision": precision}
        m["defense_metrics"] = {"trend": [{"iteration": 0, "clean_acc": acc, "asr": warm_asr}]}
    (d / "metrics.json").write_text(json.dumps(m))
    (d / "history.jsonl").write_text(json.dumps({"stage": "meca-detect", "suspicious_classes": list(picked)}) + "\n")
    return d


def test_the_targets_are_judged_against_the_rows_own_no_defense_run_and_apply_only_where_the_backdoor_was_learned(tmp_path, capsys):
    runs = tmp_path / "sweep" / "runs"
    _run(runs, "badnet", "none", acc=0.86, asr=0.95, meca=False)
    _run(runs, "quiet", "none", acc=0.86, asr=0.01, meca=False)
    good = _run(runs, "badnet", "meca-defaults", acc=0.845, asr=0.019, warm_asr=0.9, recall=0.96, precision=0.61,
                flagged=60, picked=[1])
    unlearned = _run(runs, "quiet", "meca-defaults", acc=0.82, asr=0.30, warm_asr=0.2, recall=0.1, precision=0.1,
                     flagged=5)
    out = tmp_path / "t.json"
    assert meca_defaults_table.main(["--runs", str(good), str(unlearned), "--out", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["badnet"]["acc_met"] and rows["badnet"]["asr_met"] and rows["badnet"]["detection_met"]
    assert rows["badnet"]["acc_change"] == pytest.approx(-1.5) and rows["badnet"]["picked"] == [1]
    assert rows["badnet"]["flagged"] == 60
    # 4 points lost; a backdoor the warm-up never learned is not held to the ASR or detection targets
    assert rows["quiet"]["acc_met"] is False and rows["quiet"]["asr_met"] is None and rows["quiet"]["detection_met"] is None
    assert "ASR <= 2%: met on 1 of 1 rows" in capsys.readouterr().out


def test_a_replay_fills_a_row_only_where_no_run_of_the_defaults_exists_and_the_first_run_given_wins(tmp_path):
    runs = tmp_path / "sweep" / "runs"
    for a in ("badnet", "blend"):
        _run(runs, a, "none", acc=0.86, asr=0.95, meca=False)
    ran = _run(runs, "badnet", "meca-defaults", acc=0.85, asr=0.01, warm_asr=0.9, recall=0.9, precision=0.9, flagged=50)
    also = _run(runs, "badnet", "meca-also", acc=0.70, asr=0.01, warm_asr=0.9, recall=0.9, precision=0.9, flagged=50)
    older = {a: _run(runs, a, "meca-older", acc=0.80, asr=0.5, warm_asr=0.9, recall=0.5, precision=0.5) for a in ("badnet", "blend")}
    replay_rows = [{"run": str(older[a]), "variant": v, "acc_pct": acc, "asr_pct": 3.0, "flagged": 40,
                    "recall_pct": 97.0, "precision_pct": 50.0}
                   for a in ("badnet", "blend") for v, acc in (("clean model (no second look)", 80.0), ("x,balance=True", 84.0))]
    replays = tmp_path / "replays.json"
    replays.write_text(json.dumps({"rows": replay_rows}))
    out = tmp_path / "t.json"
    assert meca_defaults_table.main(["--runs", str(ran), str(also), "--replays", str(replays), "--variant", "balance=True",
                                     "--out", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["badnet"]["source"] == "run: meca-defaults" and rows["badnet"]["acc_pct"] == pytest.approx(85.0)
    assert rows["blend"]["source"] == "replay: meca-older" and rows["blend"]["acc_pct"] == 84.0
    assert rows["blend"]["asr_met"] is False and rows["blend"]["detection_met"] is False


def test_a_run_without_its_no_defense_sibling_is_refused_with_exit_2(tmp_path, capsys):
    d = _run(tmp_path / "sweep" / "runs", "badnet", "meca-defaults", acc=0.85, asr=0.01, warm_asr=0.9,
             recall=0.9, precision=0.9)
    with pytest.raises(SystemExit) as e:
        meca_defaults_table.main(["--runs", str(d)])
    assert e.value.code == 2
    assert "attack=badnet,defense=none is missing" in capsys.readouterr().err


def test_a_learned_backdoor_whose_class_is_not_picked_misses_the_asr_and_detection_targets(tmp_path):
    runs = tmp_path / "sweep" / "runs"
    _run(runs, "blend", "none", acc=0.86, asr=0.99, meca=False)
    # no class picked: none of the poison flagged, so recall 0 and precision undefined (None)
    missed = _run(runs, "blend", "meca-defaults", acc=0.858, asr=0.99, warm_asr=0.99, recall=0.0, precision=None,
                  flagged=3)
    out = tmp_path / "t.json"
    assert meca_defaults_table.main(["--runs", str(missed), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["picked"] == [] and row["acc_met"] is True
    assert row["asr_met"] is False and row["detection_met"] is False

"""The ``dbd`` defense: validation of its stage tables, what it reports, and that it lowers the
ASR of a learned BadNet backdoor."""

import json

import pytest

from helpers import TINY
from bdframe.cli import main

DBD = """
[defense]
name = "dbd"
simclr = {{epochs = 2, batch_size = 64}}
linear = {{epochs = 2, lr = 0.02}}
semi = {{epochs = 2, batch_size = 32}}
evaluate_each_epoch = {each}
{extra}
"""

pytestmark = pytest.mark.usefixtures("two_threads")


def recipe(tmp_path, extra="", each="false"):
    f = tmp_path / "dbd.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1) + DBD.format(extra=extra, each=each))
    return f


@pytest.mark.parametrize("table, value, expected", [
    ("simclr", "{epoch = 3}", "$.defense.simclr.epoch: unknown parameter for trainer 'simclr'"),
    ("linear", '{loss = "mse"}', "$.defense.linear.loss: must be one of"),
    ("semi", "{credible_share = 0.3}", "$.defense.semi: 'credible_share' is set by the defense itself"),
    ("semi", '{split_by = "class"}', "$.defense.semi: 'split_by' is set by the defense itself"),
    ("split_by", '"label"', "$.defense.split_by: must be one of"),
])
def test_a_bad_stage_table_is_one_clear_line_naming_its_path(tmp_path, capsys, table, value, expected):
    f = tmp_path / "bad.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1) + f'\n[defense]\nname = "dbd"\n{table} = {value}\n')
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not (tmp_path / "runs").exists()


def test_dbd_reports_its_low_credible_half_and_each_stage(tmp_path):
    f = recipe(tmp_path, each="true")
    assert main(["run", str(f), "--quiet"]) == 0
    d = tmp_path / "runs" / "tiny"
    m = json.loads((d / "metrics.json").read_text())
    n = m["train_size"]
    dm = m["defense_metrics"]
    assert dm["split"] == {"credible": n // 2, "low_credible": n - n // 2}
    assert m["detection"]["flagged"] == n - n // 2 and 0.0 <= m["detection"]["auroc"] <= 1.0
    assert set(dm["stages"]) == {"simclr", "linear", "semi"}
    assert dm["linear_probe_clean_acc"] == dm["stages"]["linear"]["clean_acc"]
    sus = json.loads((d / "suspected.json").read_text())
    scores = [s["score"] for s in sus["samples"]]
    assert scores == sorted(scores, reverse=True) and all(s >= 0 for s in scores)  # SCE, highest first
    records = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
    semi = [r for r in records if r["stage"] == "dbd-semi" and "epoch" in r]
    assert [r["labelled"] for r in semi] == [n // 2, n // 2] and all("clean_acc" in r for r in semi)
    if dm["plot"] is not None:
        assert (d / dm["plot"]).is_file() or (d / "dbd_trend.png").is_file()


def test_dbd_split_by_class_keeps_half_of_every_label(tmp_path):
    """With ``split_by = "class"`` every semi-supervised epoch and the final split keep the labels
    of the lowest-loss half of each given label, so the low-credible set holds half of every class
    (rounded up)."""
    import collections

    f = recipe(tmp_path, extra='split_by = "class"')
    assert main(["run", str(f), "--quiet"]) == 0
    d = tmp_path / "runs" / "tiny"
    m = json.loads((d / "metrics.json").read_text())
    sus = json.loads((d / "suspected.json").read_text())["samples"]
    flagged = collections.Counter(s["label"] for s in sus)
    # the class sizes under the given (poisoned) labels, from the run's own data
    from bdframe.build import materialise
    from bdframe.plugins import load_recipe

    parsed, registry = load_recipe(f)
    sizes = collections.Counter(materialise(parsed, registry).poisoned.labels.tolist())
    assert flagged == {c: n - n // 2 for c, n in sizes.items()}, (flagged, sizes)
    assert m["defense_metrics"]["split"]["credible"] == sum(n // 2 for n in sizes.values())
    semi = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
    assert [r["labelled"] for r in semi if r["stage"] == "dbd-semi" and "epoch" in r] == \
        [sum(n // 2 for n in sizes.values())] * 2


@pytest.mark.slow
@pytest.mark.heavy
def test_the_dbd_example_removes_a_learned_badnet_backdoor(tmp_path):
    """examples/dbd-quickstart.toml as shipped, beside the same data trained without a defense:
    the undefended model learns the backdoor; DBD's model does not, and its low-credible half
    holds most of the poisoned samples."""
    from pathlib import Path

    import toml

    example = Path(__file__).resolve().parents[2] / "examples" / "dbd-quickstart.toml"
    assert main(["run", str(example), "--quiet", "--out", str(tmp_path / "dbd")]) == 0
    plain = toml.loads(example.read_text())
    plain["defense"] = {"name": "none", "evaluate_each_epoch": False}
    plain["train"] = {"name": "standard", "epochs": 10, "lr": 0.05}
    (tmp_path / "none.toml").write_text(toml.dumps(plain))
    assert main(["run", str(tmp_path / "none.toml"), "--quiet", "--out", str(tmp_path / "none")]) == 0
    dbd = json.loads((tmp_path / "dbd" / "metrics.json").read_text())
    none = json.loads((tmp_path / "none" / "metrics.json").read_text())
    assert none["asr"] > 0.8
    assert dbd["asr"] < 0.1 and dbd["detection"]["recall"] > 0.8
    assert dbd["clean_acc"] > 0.5

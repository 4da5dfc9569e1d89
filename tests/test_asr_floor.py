"""benchmarks/asr_floor.py: the ASR a model trained without the poison gives an attack's test set."""

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, write_recipe

from bdframe.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import asr_floor  # noqa: E402


def _runs(tmp_path):
    out = tmp_path / "runs"
    attacked = write_recipe(tmp_path / "attacked.toml", TINY.format(out=out, epochs=1))
    clean_text = TINY.format(out=out, epochs=1).replace('name = "tiny"', 'name = "clean"', 1)
    clean_text = clean_text.replace('[attack]\nname = "badnet"\npoison_rate = 0.1\ntarget = 1\n', "")
    clean = write_recipe(tmp_path / "clean.toml", clean_text)
    assert main(["run", str(attacked), "--quiet"]) == 0 and main(["run", str(clean), "--quiet"]) == 0
    return out / "clean", out / "tiny"


class Constant(torch.nn.Module):
    """Calls every image by class ``k``."""

    def __init__(self, k: int, classes: int = 10):
        super().__init__()
        self.k, self.classes = k, classes

    def forward(self, x):
        out = torch.zeros(len(x), self.classes)
        out[:, self.k] = 1.0
        return out


def test_the_floor_counts_the_triggered_and_the_plain_images_called_by_the_target(tmp_path):
    from bdframe.scan import rebuild_parts

    _, attacked = _runs(tmp_path)
    parts = rebuild_parts(attacked)
    target = int(parts.asr_set.labels[0])
    row = asr_floor.floor_row(Constant(target), parts.test, parts.asr_set, "cpu")
    assert row == {"target": target, "n": len(parts.asr_set), "floor": 1.0, "untriggered": 1.0}
    row = asr_floor.floor_row(Constant((target + 1) % 10), parts.test, parts.asr_set, "cpu")
    assert row["floor"] == 0.0 and row["untriggered"] == 0.0


def test_the_script_reads_a_clean_model_and_refuses_a_poisoned_one(tmp_path, capsys):
    clean, attacked = _runs(tmp_path)
    out = tmp_path / "floor.json"
    assert asr_floor.main(["--model", str(clean), "--attack", str(attacked), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["target"] == 1 and rows[0]["n"] == 90
    assert 0 <= rows[0]["floor"] <= 1 and 0 <= rows[0]["untriggered"] <= 1
    assert rows[0]["run_asr"] == json.loads((attacked / "metrics.json").read_text())["asr"]
    with pytest.raises(SystemExit) as e:
        asr_floor.main(["--model", str(attacked), "--attack", str(attacked)])
    assert e.value.code == 2
    assert "poisoned by 'badnet'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        asr_floor.main(["--model", f"{clean}:missing.pt", "--attack", str(attacked)])
    assert e.value.code == 2

"""CLI: exit codes, messages, no traceback, no half-written run directory."""

import json
import subprocess
import sys

from helpers import TINY
from bdframe.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bdframe.cli", *args], capture_output=True, text=True)


def test_version_and_plugins_json():
    import bdframe

    p = run_cli("--version")
    assert p.returncode == 0 and bdframe.__version__ in p.stdout
    p = run_cli("plugins", "--json")
    data = json.loads(p.stdout)
    names = {(c["kind"], c["name"]) for c in data["components"]}
    assert ("attack", "badnet") in names and ("defense", "none") in names
    badnet = next(c for c in data["components"] if c["name"] == "badnet")
    assert badnet["distribution"] == "bdframe-attack-badnet" and badnet["params"]["poison_rate"]["default"] == 0.05
    assert any(pl["distribution"] == "bdframe-models-cifar" for pl in data["plugins"])


def test_plugins_table():
    p = run_cli("plugins")
    assert p.returncode == 0 and "bdframe-attack-badnet" in p.stdout and "KIND" in p.stdout


def test_bad_recipe_exits_2_without_traceback_or_run_dir(tmp_path):
    out = tmp_path / "runs"
    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=out, epochs=1).replace("poison_rate = 0.1", "poison_rate = 2.0"))
    p = run_cli("run", str(f))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "$.attack.poison_rate: must be in (0, 1), got 2.0" in p.stderr
    assert not out.exists()


def test_missing_recipe_file(tmp_path):
    p = run_cli("validate", str(tmp_path / "missing.toml"))
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_missing_trigger_file_is_named(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1).replace(
        "target = 1", f'target = 1\ntrigger_image = "{tmp_path}/kitty.png"'))
    assert main(["validate", str(f)]) == 2


def test_validate_ok_and_print(tmp_path, capsys):
    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1))
    assert main(["validate", str(f), "--print"]) == 0
    out = capsys.readouterr().out
    assert 'name = "badnet"' in out and "weight_decay" in out


def test_existing_run_dir_refused(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1))
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    assert main(["run", str(f), "--quiet"]) == 2
    assert not (tmp_path / "runs" / "tiny.partial").exists()


def test_unavailable_device_leaves_nothing(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1).replace('device = "cpu"', 'device = "cuda"'))
    p = run_cli("run", str(f))
    assert p.returncode == 2 and "CUDA is not available" in p.stderr
    assert not (tmp_path / "runs").exists()


def test_dataset_error_during_run_leaves_no_partial_dir(tmp_path, monkeypatch):
    from bdframe.errors import UserError
    from bdframe_dataset_synthetic.plugin import Synthetic

    def broken(self):
        raise UserError("root: simulated unreadable dataset")

    monkeypatch.setattr(Synthetic, "load", broken)
    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1))
    assert main(["run", str(f), "--quiet"]) == 2
    assert not (tmp_path / "runs").exists()  # not even the output_dir the run would have created

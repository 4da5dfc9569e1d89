"""Trustworthy runs: strict recipe values, paths checked before anything is written, triggers
checked at validation, divergence stopped with one line, a defense that cannot reach the ground
truth, and results that name files."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from helpers import TINY
from bdframe import recipe as rmod
from bdframe.cli import main
from bdframe.errors import DivergedError, RecipeError


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bdframe.cli", *args], capture_output=True, text=True, cwd=cwd)


def tiny(tmp_path, epochs=1, **replace) -> str:
    text = TINY.format(out=tmp_path / "runs", epochs=epochs)
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def one_clear_line(p: subprocess.CompletedProcess):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("bdframe: error:")]
    assert len(lines) == 1 and p.stderr.rstrip().endswith(lines[0]), p.stderr  # the last line, no more
    return lines[0]


# -- strict values -------------------------------------------------------------------------------

def problems_of(data: dict, registry) -> list[str]:
    with pytest.raises(RecipeError) as e:
        rmod.loads_dict(data, registry=registry, check_dataset=False)
    return e.value.problems


BASE = {"name": "t", "dataset": {"name": "synthetic"}, "model": {"name": "simple-cnn"},
        "train": {"name": "standard"}}


@pytest.mark.parametrize("section, values, field, expected", [
    ("train", {"flip": "false"}, "$.train.flip", "must be true or false, got a string ('false')"),
    ("defense", {"name": "meca", "relearn": "yes please"}, "$.defense.relearn", "must be true or false"),
    ("dataset", {"name": "imagefolder", "root": "x", "cache": "no"}, "$.dataset.cache", "must be true or false"),
    ("train", {"epochs": "10"}, "$.train.epochs", "must be an integer, got a string ('10')"),
    ("train", {"epochs": 2.5}, "$.train.epochs", "must be an integer, got a float (2.5)"),
    ("train", {"epochs": True}, "$.train.epochs", "must be an integer, got a boolean (true)"),
    ("train", {"lr": "0.1"}, "$.train.lr", "must be a number, got a string ('0.1')"),
    ("train", {"lr": float("nan")}, "$.train.lr", "must be a finite number, got nan"),
    ("train", {"lr": float("inf")}, "$.train.lr", "must be a finite number, got inf"),
    ("train", {"milestones": "1,2"}, "$.train.milestones", "must be an array, got a string ('1,2')"),
    ("train", {"milestones": [1, "2"]}, "$.train.milestones", "element 1: must be an integer"),
    ("dataset", {"name": "imagefolder", "root": 5}, "$.dataset.root", "must be a string, got an integer (5)"),
])
def test_a_value_of_the_wrong_type_is_an_error_naming_field_type_and_value(
        bdframe_registry, section, values, field, expected):
    data = json.loads(json.dumps(BASE))
    data.setdefault(section, {}).update(values)
    if section == "defense" or section == "dataset":
        data[section] = {**values}
    problems = problems_of(data, bdframe_registry)
    assert any(p.startswith(f"{field}: ") and expected in p for p in problems), problems


def test_values_of_the_right_type_still_structure(bdframe_registry):
    data = json.loads(json.dumps(BASE))
    data["train"].update(flip=False, epochs=3, lr=1, milestones=[1, 2])  # an integer is a fine float
    r = rmod.loads_dict(data, registry=bdframe_registry, check_dataset=False)
    assert r.train.config.flip is False and r.train.config.lr == 1.0 and isinstance(r.train.config.lr, float)
    assert r.train.config.milestones == (1, 2)


@pytest.mark.parametrize("name", ["", "  ", "a/b", "..", ".", "a\\b"])
def test_run_name_must_be_a_plain_directory_name(bdframe_registry, name):
    problems = problems_of({**BASE, "name": name}, bdframe_registry)
    assert any(p.startswith("$.name: ") for p in problems), problems


# -- paths ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["validate", "run"])
def test_output_dir_that_is_a_file_is_refused_up_front(tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    f = tmp_path / "r.toml"
    f.write_text(tiny(tmp_path).replace(f'output_dir = "{tmp_path / "runs"}"', f'output_dir = "{blocker}"'))
    line = one_clear_line(run_cli(command, str(f)))
    assert "$.output_dir" in line and str(blocker) in line and "is a file" in line
    assert blocker.read_text() == "not a directory"


def test_out_below_a_file_is_refused_and_names_the_option(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    f = tmp_path / "r.toml"
    f.write_text(tiny(tmp_path))
    line = one_clear_line(run_cli("run", str(f), "--out", str(blocker / "sub" / "run")))
    assert line.startswith("bdframe: error: --out:") and "is a file" in line
    assert not (tmp_path / "runs").exists()


def test_a_refused_run_leaves_no_output_dir(tmp_path):
    f = tmp_path / "r.toml"
    deep = tmp_path / "new" / "deeper"
    f.write_text(tiny(tmp_path).replace(f'output_dir = "{tmp_path / "runs"}"', f'output_dir = "{deep}"')
                 .replace('device = "cpu"', 'device = "cuda:7"' if not torch.cuda.is_available() else 'device = "cpu"'))
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to refuse the device")
    one_clear_line(run_cli("run", str(f)))
    assert not (tmp_path / "new").exists()


# -- trigger files -------------------------------------------------------------------------------

def test_a_trigger_file_that_is_not_an_image_is_refused_by_validate(tmp_path):
    fake = tmp_path / "kitty.png"
    fake.write_text("this is text, not a PNG")
    f = tmp_path / "r.toml"
    f.write_text(tiny(tmp_path, **{"name = \"badnet\"": f'name = "blend"\ntrigger_image = "{fake}"'}))
    line = one_clear_line(run_cli("validate", str(f)))
    assert "$.attack.trigger_image" in line and str(fake) in line and "not a readable image" in line
    assert ".cpp" not in line and "torchvision" not in line


# -- divergence ----------------------------------------------------------------------------------

def test_a_weight_that_becomes_non_finite_stops_the_stage(tmp_path):
    """The loss is finite when the step is taken; the update itself overflows the weight."""
    from bdframe.interfaces import StageContext
    from bdframe.testing import tiny_imageset
    from bdframe.training import OptimSettings, run_epochs

    data = tiny_imageset(8, num_classes=2, size=4, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    s = OptimSettings(epochs=1, batch_size=8, lr=1e30, momentum=0.0, weight_decay=0.0, crop_padding=0, flip=False)

    def loss_fn(model, b):
        out = model(b.x)
        return 1e10 * out.sum(), out

    ctx = StageContext(name="probe", progress=False, lr_setting="[train] lr")
    with pytest.raises(DivergedError) as e:
        run_epochs(model, data, ctx, s, loss_fn)
    msg = str(e.value)
    assert "'probe'" in msg and "became non-finite" in msg and "[train] lr" in msg and "\n" not in msg


MECA = """
[defense]
name = "meca"
warmup_epochs = 1
iterations = 1
batch_size = 64
"""


@pytest.mark.slow
def test_a_diverging_meca_stage_is_named_with_its_setting(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text(tiny(tmp_path, **{"lr = 0.05": "lr = 1e12"}) + MECA)
    line = one_clear_line(run_cli("run", str(f), "--quiet"))
    assert "'meca-clean' diverged" in line and "lower [train] lr" in line
    assert not (tmp_path / "runs").exists()


# -- the defense cannot see the answer -----------------------------------------------------------

SNOOP = '''
"""A defense that looks for the answer everywhere it can: its context, its data, the run dir."""
import json
import os
import types

import torch

from bdframe import hookimpl
from bdframe.interfaces import Defense, DefenseResult

FOUND = {}


def walk(obj, seen, out, depth=0):
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, (types.FunctionType, types.MethodType, types.ModuleType, type)):
        out["callables"].append(getattr(obj, "__qualname__", repr(obj)))
        if isinstance(obj, types.MethodType):
            walk(obj.__self__, seen, out, depth + 1)
        return
    if isinstance(obj, torch.Tensor):
        out["tensors"].append(obj)
        return
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        out["scalars"].append(obj)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            walk(k, seen, out, depth + 1)
            walk(v, seen, out, depth + 1)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            walk(v, seen, out, depth + 1)
        return
    out["types"].append(type(obj).__name__)
    names = set(getattr(obj, "__dict__", {})) | set(getattr(type(obj), "__slots__", ()))
    # the registry lists every installed plugin (physicalba among them): not what the recipe chose
    for name in names - {"_registry"}:
        try:
            walk(getattr(obj, name), seen, out, depth + 1)
        except Exception:
            pass


class Snoop(Defense):
    name = "snoop"

    def run(self, data, ctx):
        out = {"callables": [], "tensors": [], "scalars": [], "types": []}
        walk(ctx, set(), out)
        walk(data, set(), out)
        files = {}
        for root, _, names in os.walk(ctx.artifacts):
            for n in names:
                p = os.path.join(root, n)
                with open(p, "rb") as fh:
                    files[os.path.relpath(p, ctx.artifacts)] = fh.read().decode("utf-8", "replace")
        FOUND.update(out, files=files, attrs=sorted(vars(ctx)), has_recipe=hasattr(ctx, "recipe"))
        model = ctx.new_model()
        return DefenseResult(model=model)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(Snoop)
'''


def test_a_defense_that_snoops_finds_no_ground_truth(tmp_path, monkeypatch):
    (tmp_path / "snoop_defense.py").write_text(SNOOP)
    monkeypatch.syspath_prepend(str(tmp_path))
    f = tmp_path / "r.toml"
    # unusual attack settings, so any trace of them is recognisable
    f.write_text(tiny(tmp_path, **{"poison_rate = 0.1": "poison_rate = 0.0731", "target = 1": "target = 7",
                                   'name = "badnet"': 'name = "physicalba"\ntransform_on = "poison"'})
                 + '\n[defense]\nname = "snoop"\n\n[plugins]\nmodules = ["snoop_defense"]\n')
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "out")]) == 0
    import snoop_defense

    found = snoop_defense.FOUND
    poison_ids = set(json.loads((tmp_path / "out" / "poison.json").read_text())["poison_ids"])
    assert poison_ids  # the attack did poison
    assert any(t.dim() == 4 and len(t) == 300 for t in found["tensors"])  # the walk reached the data
    assert not found["has_recipe"] and "recipe" not in found["attrs"]
    assert 0.0731 not in found["scalars"] and "physicalba" not in found["scalars"]
    assert not any("Config" in t and "PhysicalBA" in t for t in found["types"]), found["types"]
    for t in found["tensors"]:
        if t.dtype == torch.int64 and t.dim() == 1:
            assert set(t.tolist()) != poison_ids, "a tensor of the poison ids is reachable"
            assert not (len(t) > 1 and bool((t == 7).all())), "the ASR set's labels (the target) are reachable"
        assert len(t) != 90, "a tensor the size of the ASR set is reachable"
    # the run directory held nothing that names the attack while the defense ran
    assert "poison.json" not in found["files"] and "recipe.toml" not in found["files"], sorted(found["files"])
    for name, text in found["files"].items():
        assert "0.0731" not in text and "physicalba" not in text and "poison_ids" not in text, name
    # ... and everything is there once the run is complete
    done = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"poison.json", "recipe.toml", "run.json", "metrics.json"} <= done and "resume.json" not in done
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert "attack" in run["seeds"] and run["plugins"]["attack"]["name"] == "physicalba"


# -- results that name files ---------------------------------------------------------------------

def make_image_folder(root, per_class=40, classes=("cat", "dog", "emu"), size=16, test=10):
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("test", test)):
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = (torch.rand(3, size, size, generator=g) * 120 + 40 * k).to(torch.uint8)
                write_png(img, str(d / f"img{i:03d}.png"))


@pytest.mark.slow
def test_suspected_and_scan_outputs_name_the_files(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root)
    f = tmp_path / "r.toml"
    f.write_text(tiny(tmp_path, **{"target = 1": "target = 0", 'name = "synthetic"\ntrain_size = 300\ntest_size = 100\n'
                                   'image_size = 16': f'name = "imagefolder"\nroot = "{root}"'}) + MECA)
    assert main(["run", str(f), "--quiet"]) == 0
    d = tmp_path / "runs" / "tiny"
    rows = list(csv.DictReader(open(d / "suspected.csv")))
    sus = json.loads((d / "suspected.json").read_text())
    assert rows and len(rows) == sus["count"] == len(sus["suspected_ids"])
    assert list(rows[0]) == ["rank", "id", "path", "label", "class", "score"]
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and sus["order"] == "most suspicious first"
    for r in rows:
        assert r["path"].startswith("train/") and (root / r["path"]).is_file()
        assert r["class"] == r["path"].split("/")[1] or int(r["label"]) == 0  # poisoned rows carry the target
    assert {int(r["id"]) for r in rows} == set(sus["suspected_ids"])
    assert [s["path"] for s in sus["samples"]] == [r["path"] for r in rows]
    # bdframe scan: a path column beside the id
    out = tmp_path / "scan"
    assert main(["scan", str(d), "--scorer", "loss", "--out", str(out), "--quiet"]) == 0
    srows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(srows) == 120 and all((root / r["path"]).is_file() for r in srows)
    ids_to_path = {int(r["id"]): r["path"] for r in srows}
    assert all(ids_to_path[int(r["id"])] == r["path"] for r in rows)


def test_suspected_without_scores_or_files_is_in_id_order(tmp_path):
    from bdframe.runner import write_suspected
    from bdframe.testing import tiny_imageset

    data = tiny_imageset(10, num_classes=2, size=4, seed=0, id_offset=50)
    write_suspected(tmp_path, data, torch.tensor([57, 51, 55]), None, None)
    rows = list(csv.DictReader(open(tmp_path / "suspected.csv")))
    assert [int(r["id"]) for r in rows] == [51, 55, 57] and all(r["path"] == "" and r["score"] == "" for r in rows)
    scores = torch.zeros(10, dtype=torch.float64)
    scores[data.positions(torch.tensor([55, 57]))] = torch.tensor([0.2, 0.9], dtype=torch.float64)
    write_suspected(tmp_path, data, torch.tensor([57, 51, 55]), scores, {i: f"f{i}.png" for i in range(50, 60)})
    rows = list(csv.DictReader(open(tmp_path / "suspected.csv")))
    assert [int(r["id"]) for r in rows] == [57, 55, 51] and rows[0]["path"] == "f57.png"
    with pytest.raises(ValueError):
        write_suspected(tmp_path, data, torch.tensor([57]), torch.zeros(3), None)


@pytest.mark.parametrize("device", ["cuda", "cuda:9"])
def test_validate_refuses_a_device_this_machine_lacks_as_run_does(tmp_path, device):
    if torch.cuda.is_available() and device == "cuda":
        pytest.skip("CUDA is available here")
    f = tmp_path / "r.toml"
    f.write_text(tiny(tmp_path, **{'device = "cpu"': f'device = "{device}"'}))
    for command in ("validate", "run"):
        line = one_clear_line(run_cli(command, str(f)))
        assert line.startswith(f"bdframe: error: $.device: '{device}' requested"), line
    assert not (tmp_path / "runs").exists()


def test_score_quality_of_a_defense_s_scores():
    """AUROC and TPR@FPR of a defense's scores against the poison ids (cover rows count as clean)."""
    from bdframe.runner import score_quality

    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    poison = torch.tensor([12, 15])
    perfect = score_quality(torch.tensor([0.1, 0.2, 0.9, 0.3, 0.0, 0.8]), ids, poison)
    assert perfect["auroc"] == 1.0 and perfect["tpr_at_fpr"]["0.05"] == 1.0
    # one poisoned row ranked below one clean row: 7 of 8 pairs in order
    assert score_quality(torch.tensor([0.1, 0.5, 0.9, 0.3, 0.0, 0.4]), ids, poison)["auroc"] == pytest.approx(7 / 8)
    assert score_quality(torch.zeros(6), ids, torch.tensor([], dtype=torch.long)) == {}

"""Generated recipe mutations: every mutant either validates and runs, or is refused by
`bdframe validate` and `bdframe run` alike with exit status 2, a few lines, no traceback and
nothing written."""

import copy
import shutil
import tempfile
from pathlib import Path

import pytest
import toml
from hypothesis import HealthCheck, event, given, settings, strategies as st

from bdframe.cli import main

BASE = {
    "name": "fuzz",
    "seed": 1,
    "device": "cpu",
    "dataset": {"name": "synthetic", "train_size": 60, "test_size": 20, "image_size": 8},
    "model": {"name": "simple-cnn", "width": 4},
    "attack": {"name": "badnet", "poison_rate": 0.1, "target": 1, "patch_size": 2},
    "train": {"name": "standard", "epochs": 1, "batch_size": 32, "lr": 0.05, "flip": True},
    "defense": {"name": "none", "evaluate_each_epoch": False},
    "eval": {"batch_size": 64},
}

# (section or None for the top level, key) pairs that exist in BASE
PATHS = [(None, k) for k in ("name", "seed", "device")] + [
    (sec, k) for sec, body in BASE.items() if isinstance(body, dict) for k in body]

ODD_VALUES = st.sampled_from([
    "", "x", "false", "true", "10", "0.1", "no", "yes please", "../..", "/etc/passwd", "nonexistent.png",
    "cuda", "cuda:3", "mps", "cpu", "auto",
    0, -1, 1, 2, 10 ** 12, -(10 ** 12), 0.0, -0.5, 0.5, 1.5, 2.5, 1e12, 1e-12, float("nan"), float("inf"),
    -float("inf"), True, False, [], [1, 2], ["a"], {"name": "x"}, {},
])


@st.composite
def mutants(draw):
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "unknown-key", "drop-section",
                                     "section-not-table", "component-name"]))
        sec, key = draw(st.sampled_from(PATHS))
        table = data if sec is None else data.get(sec)
        if kind == "set" and isinstance(table, dict):
            table[key] = draw(ODD_VALUES)
        elif kind == "delete" and isinstance(table, dict):
            table.pop(key, None)
        elif kind == "unknown-key":
            target = data if sec is None else table
            if isinstance(target, dict):
                target[draw(st.sampled_from(["epochz", "poison", "lr_", "nme", "extra"]))] = 1
        elif kind == "drop-section" and sec is not None:
            data.pop(sec, None)
        elif kind == "section-not-table" and sec is not None:
            data[sec] = draw(st.sampled_from(["badnet", 3, [1]]))
        elif kind == "component-name" and sec is not None and isinstance(table, dict):
            table["name"] = draw(st.sampled_from(["", "badnett", "meca", "blend", "standard", 7]))
    return data


def _dump(data) -> str:
    return toml.dumps(data)


@pytest.mark.slow
@settings(max_examples=int(__import__("os").environ.get("BDFRAME_FUZZ_EXAMPLES", "150")), deadline=None, derandomize="BDFRAME_FUZZ_EXAMPLES" not in __import__("os").environ,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutants())
def test_every_mutant_validates_and_runs_or_is_refused_cleanly(capsys, data):
    work = Path(tempfile.mkdtemp(prefix="bdframe-fuzz-"))
    try:
        data = dict(data, output_dir=str(work / "runs"))
        f = work / "r.toml"
        try:
            f.write_text(_dump(data))
        except Exception:  # a mutant the TOML writer cannot express is not a recipe
            return
        capsys.readouterr()
        v = main(["validate", str(f)])
        verr = capsys.readouterr().err
        r = main(["run", str(f), "--quiet"])
        rerr = capsys.readouterr().err
        event(f"validate {v}, run {r}")
        assert v in (0, 2) and r in (0, 2), (v, r)
        for err in (verr, rerr):
            assert "Traceback" not in err
        errors = [line for line in rerr.splitlines() if line.startswith("bdframe: error:")]
        if v == 2:
            assert r == 2, "validate refused what run accepted"
            assert len(errors) == 1 and len(rerr.strip().splitlines()) <= 12, rerr
        if r == 2:
            assert not (work / "runs").exists(), "a refused run left files behind"
            assert len(errors) == 1, rerr
            if v == 0:  # only a training-time failure may pass validation
                assert "diverged" in errors[0], errors[0]
        else:
            assert (work / "runs" / data.get("name", "r") / "metrics.json").is_file()  # default name: the file stem
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_base_recipe_runs(tmp_path, capsys):
    f = tmp_path / "r.toml"
    f.write_text(_dump(dict(BASE, output_dir=str(tmp_path / "runs"))))
    assert main(["validate", str(f)]) == 0 and main(["run", str(f), "--quiet"]) == 0
    assert (tmp_path / "runs" / "fuzz" / "metrics.json").is_file()

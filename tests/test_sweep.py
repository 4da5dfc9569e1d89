"""`bdframe sweep`: expansion (product, exclude, include, stable names), validation of every run
before any starts, resume after kill -9, failures recorded, the Ray executor, and the report of a
real sweep checked against its runs' metrics.json."""

import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import TINY
from bdframe import report, sweep
from bdframe.cli import main
from bdframe.errors import UserError

# the tiny recipe without the two settings a sweep sets itself (name and output_dir)
BASE = "\n".join(line for line in TINY.replace("train_size = 300", "train_size = 200").splitlines()
                 if not line.startswith(("name = \"tiny\"", "output_dir"))) + "\n"


def write_sweep(tmp_path: Path, body: str, *, epochs: int = 1, name: str = "grid", out: str = "out") -> Path:
    (tmp_path / "base.toml").write_text(BASE.format(epochs=epochs))
    f = tmp_path / f"{name}.toml"
    f.write_text(f'name = "{name}"\noutput_dir = "{tmp_path / out}"\nbase = "base.toml"\n' + body)
    return f


def metrics(directory: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((directory / "runs").glob("*/metrics.json"))}


# -- expansion ----------------------------------------------------------------------------------

PATHS = ["seed", "train.epochs", "train.lr", "train.batch_size", "defense.name"]
VALUES = {"seed": st.integers(0, 50), "train.epochs": st.integers(1, 9), "train.lr": st.sampled_from([0.1, 0.05, 1e-3]),
          "train.batch_size": st.sampled_from([16, 32, 64]), "defense.name": st.sampled_from(["none", "meca"])}


@st.composite
def sweeps(draw):
    paths = draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=3, unique=True))
    axes = {p: draw(st.lists(VALUES[p], min_size=1, max_size=3, unique=True)) for p in paths}
    return axes


def load_axes(tmp, axes, extra: dict | None = None):
    (tmp / "base.toml").write_text(BASE.format(epochs=1))
    doc = {"name": "h", "output_dir": str(tmp / "out"), "base": "base.toml", "axes": axes, **(extra or {})}
    f = tmp / "h.toml"
    f.write_text(toml.dumps(doc))
    return sweep.load(f)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(axes=sweeps(), data=st.data())
def test_expansion_is_the_product_with_stable_unique_names(tmp_path, axes, data):
    s = load_axes(tmp_path, axes)
    combos = list(itertools.product(*axes.values()))
    assert len(s.runs) == len(combos)
    names = [r.name for r in s.runs]
    assert len(set(names)) == len(names)
    for run, combo in zip(s.runs, combos):  # file order, the last axis varying fastest
        assert run.values == dict(zip(axes, combo))
        assert run.name == ",".join(f"{p}={sweep.value_label(v, section=False)}" for p, v in zip(axes, combo))
        for path, v in zip(axes, combo):
            node = run.data
            for key in path.split("."):
                node = node[key]
            assert node == v
        assert run.data["name"] == run.name
    # the same file gives the same names; the names do not depend on the other runs
    assert [r.name for r in load_axes(tmp_path, axes).runs] == names
    # exclude: drop every run matching the entry, keep the rest in order
    path = data.draw(st.sampled_from(list(axes)))
    value = data.draw(st.sampled_from(axes[path]))
    if len(axes[path]) > 1:
        ex = load_axes(tmp_path, axes, {"exclude": [{path: value}]})
        assert [r.name for r in ex.runs] == [r.name for r in s.runs if r.values[path] != value]
        assert ex.excluded == len(s.runs) - len(ex.runs)
        # include the excluded ones again, one entry each: the full set comes back
        back = [dict(r.values) for r in s.runs if r.values[path] == value]
        inc = load_axes(tmp_path, axes, {"exclude": [{path: value}], "include": back})
        assert sorted(r.name for r in inc.runs) == sorted(names)


def test_labels_sections_and_include_by_label(tmp_path):
    f = write_sweep(tmp_path, """
[axes]
attack = ["badnet", {name = "blend", alpha = 0.2}, false]
[axes.defense]
plain = "none"
meca-fast = {name = "meca", iterations = 2}
[[exclude]]
attack = "none"
defense = "meca-fast"
[[include]]
attack = {name = "sig"}
defense = "plain"
""")
    s = sweep.load(f)
    names = [r.name for r in s.runs]
    assert names == ["attack=badnet,defense=plain", "attack=badnet,defense=meca-fast",
                     "attack=blend_alpha-0.2,defense=plain", "attack=blend_alpha-0.2,defense=meca-fast",
                     "attack=none,defense=plain", "attack=sig,defense=plain"]
    by = {r.name: r.data for r in s.runs}
    assert "attack" not in by["attack=none,defense=plain"]
    assert by["attack=blend_alpha-0.2,defense=meca-fast"]["attack"] == {"name": "blend", "alpha": 0.2}
    assert by["attack=blend_alpha-0.2,defense=meca-fast"]["defense"] == {"name": "meca", "iterations": 2}
    assert by["attack=badnet,defense=plain"]["defense"] == {"name": "none"}
    assert by["attack=badnet,defense=plain"]["train"]["epochs"] == 1  # the base recipe underneath
    assert (s.excluded, s.included) == (1, 1)


def test_exclude_by_name_or_table_and_settings_of_a_left_out_section(tmp_path):
    s = sweep.load(write_sweep(tmp_path, """
[axes]
attack = ["badnet", "blend", false]
"attack.poison_rate" = [0.05, 0.1]
[[exclude]]
attack = {name = "blend"}
"attack.poison_rate" = 0.1
[[exclude]]
attack = "blend"
"attack.poison_rate" = 0.1
"""))
    names = [r.name for r in s.runs]
    assert "attack=blend,attack.poison_rate=0.1" not in names and len(names) == 5  # both entries match the same run
    by = {r.name: r.data for r in s.runs}
    assert by["attack=badnet,attack.poison_rate=0.1"]["attack"] == {"name": "badnet", "poison_rate": 0.1}
    assert "attack" not in by["attack=none,attack.poison_rate=0.1"]  # no attack to set a rate on


def test_templates_take_the_run_s_labels(tmp_path):
    s = sweep.load(write_sweep(tmp_path, """
[axes]
attack = ["badnet", "blend"]
[axes.defense]
loss = {name = "detect", scorer = "loss", model = "runs/attack=${attack}/model.pt"}
"""))
    assert [r.data["defense"]["model"] for r in s.runs] == ["runs/attack=badnet/model.pt", "runs/attack=blend/model.pt"]
    with pytest.raises(UserError, match=r"\$\{seed\} in 'x\$\{seed\}' names no axis"):
        sweep.load(write_sweep(tmp_path, '[axes]\nattack = ["badnet"]\n"defense.model" = ["x${seed}"]\n'))


def test_a_parameter_axis_applies_after_its_section_axis(tmp_path):
    s = sweep.load(write_sweep(tmp_path, """
[axes]
"defense.iterations" = [1, 2]
defense = ["meca"]
"""))
    assert [r.data["defense"] for r in s.runs] == [{"name": "meca", "iterations": 1}, {"name": "meca", "iterations": 2}]


@pytest.mark.parametrize("body, expected", [
    ('[axes]\nname = ["a"]', "'name' is set by the sweep"),
    ('[axes]\nseed = []', "$.axes.seed: has no values"),
    ('[axes]\nseed = 3', "must be a list of values or a table"),
    ('[axes]\nseed = [1, "1"]', "values 1 and 2 both get the label '1'"),
    ('[axes]\nseed = [1]\n[[exclude]]\nattack = "x"', "$.exclude[1]: 'attack' is not an axis"),
    ('[axes]\nseed = [1, 2]\n[[exclude]]\nseed = 5', "$.exclude[1]: matches no run"),
    ('[axes]\nattack = ["badnet"]\nseed = [1, 2]\n[[exclude]]\nattack = {name = "blend"}', "$.exclude[1]: matches no run"),
    ('[axes]\nseed = [1]\n"train.lr" = [0.1]\n[[include]]\nseed = 4', "$.include[1]: gives no value for the axis 'train.lr'"),
    ('bogus = 1\n[axes]\nseed = [1]', "$.bogus: unknown key"),
    ('[axes]\nseed = [1]\nbogus = 1', "$.axes.bogus: must be a list of values"),
    ('[axes]\nattack = [3]', "a value of the section axis 'attack' must be a component name"),
    ('[axes]\n"seed.x" = [3]', "cannot set 'seed.x': 'seed' is 3, not a table"),
])
def test_bad_sweep_files_say_where(tmp_path, body, expected):
    with pytest.raises(UserError) as e:
        sweep.load(write_sweep(tmp_path, body))
    assert expected in str(e.value), str(e.value)


def test_validation_names_the_bad_run_and_its_path_and_starts_nothing(tmp_path, capsys):
    f = write_sweep(tmp_path, """
[axes]
attack = ["badnet", {name = "blend", alpha = 5.0}]
seed = [0, 1]
""")
    for cmd in (["sweep", "validate", str(f)], ["sweep", "run", str(f)]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "$.attack.alpha" in ln]
        assert [ln.split(":")[0].strip() for ln in lines] == ["run attack=blend_alpha-5.0,seed=0",
                                                               "run attack=blend_alpha-5.0,seed=1"], err
        assert "badnet" not in err
        assert not (tmp_path / "out").exists()


def test_validate_lists_the_runs(tmp_path, capsys):
    f = write_sweep(tmp_path, '[axes]\nseed = [0, 1]\n')
    assert main(["sweep", "validate", str(f), "--list"]) == 0
    out = capsys.readouterr().out
    assert "new       seed=0" in out and "2 runs (seed 2); 0 finished, 0 interrupted, 2 not started" in out


def test_parallelism_fits_the_cores():
    assert sweep.plan_parallelism(None, None, cores=2) == (1, 2)
    assert sweep.plan_parallelism(None, None, cores=16) == (8, 2)
    assert sweep.plan_parallelism(4, None, cores=16) == (4, 4)
    assert sweep.plan_parallelism(None, 3, cores=16) == (5, 3)
    assert sweep.plan_parallelism(None, None, cores=1) == (1, 1)


# -- running ------------------------------------------------------------------------------------

def sweep_cli(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "bdframe.cli", "sweep", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    body = '[axes]\nattack = ["badnet", "blend", "sig"]\n'
    ref = write_sweep(tmp_path, body, epochs=5, name="ref", out="ref")
    assert main(["sweep", "run", str(ref), "--jobs", "1", "--threads", "1", "--quiet"]) == 0

    f = write_sweep(tmp_path, body, epochs=5)
    d = tmp_path / "out" / "grid"
    p = sweep_cli("run", str(f), "--jobs", "1", "--threads", "1", "--quiet")
    deadline = time.monotonic() + 240
    # kill -9 once a run has finished and the next one has saved an epoch
    while time.monotonic() < deadline:
        # a run writes metrics.json inside its .partial directory just before the rename: only a
        # renamed directory counts as finished, and the partial run must be another one
        runs = list((d / "runs").iterdir()) if (d / "runs").exists() else []
        done = [q for q in runs if not q.name.endswith(".partial") and (q / "metrics.json").is_file()]
        partial = [q / "state" / "train.pt" for q in runs if q.name.endswith(".partial")
                   and (q / "state" / "train.pt").is_file() and not (q / "metrics.json").exists()]
        if done and partial:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert done and partial, "the sweep did not reach the point to interrupt"
    # the run's process dies with the sweep (it is told so at start); until it has, it holds its lock
    lock = d / "locks" / f"{partial[0].parent.parent.name.removesuffix('.partial')}.lock"
    while sweep._locked(lock) and time.monotonic() < deadline + 30:
        time.sleep(0.05)
    assert not sweep._locked(lock)
    finished_before = {q.parent.name: q.stat().st_mtime_ns for q in (d / "runs").glob("*/metrics.json")}
    interrupted = [q.name.removesuffix(".partial") for q in (d / "runs").glob("*.partial")]
    assert interrupted and len(finished_before) < 3

    assert main(["sweep", "run", str(f), "--jobs", "1", "--threads", "1", "--quiet"]) == 0
    for name, mtime in finished_before.items():  # not redone
        assert (d / "runs" / name / "metrics.json").stat().st_mtime_ns == mtime
        assert (d / "logs" / f"{name}.log").read_text().count("=== ") == 1
    for name in interrupted:
        assert "resume run" in (d / "logs" / f"{name}.log").read_text()
    got, want = metrics(d), metrics(tmp_path / "ref" / "ref")
    assert sorted(got) == sorted(want) and len(got) == 3
    for name in want:
        for key in ("clean_acc", "asr", "num_poison"):
            assert got[name][key] == want[name][key], (name, key)
    assert not list((d / "runs").glob("*.partial"))


def test_a_failing_run_is_recorded_and_does_not_stop_the_others(tmp_path, capsys):
    f = write_sweep(tmp_path, '[axes]\n"train.lr" = [0.05, 1e30]\nseed = [0, 1]\n')
    assert main(["sweep", "run", str(f), "--jobs", "2", "--threads", "1", "--quiet"]) == 2  # two failed
    out = capsys.readouterr()
    d = tmp_path / "out" / "grid"
    assert sorted(metrics(d)) == ["train.lr=0.05,seed=0", "train.lr=0.05,seed=1"]
    for seed in (0, 1):
        rec = json.loads((d / "failed" / f"train.lr=1e+30,seed={seed}.json").read_text())
        assert rec["error"].startswith("bdframe: error: training stage 'train' diverged"), rec
        assert rec["returncode"] == 2 and (d / rec["log"]).is_file()
        assert f"failed: train.lr=1e+30,seed={seed}: bdframe: error: training stage" in out.err
    assert "2 of 4 runs finished, 2 failed" in out.out
    # the report lists them with their error line
    table = report.collect(d, rows=["train.lr"], cols=["seed"])
    notes = "\n".join(sub for _, subs in report.notes(table) for sub in subs)
    assert "train.lr=1e+30,seed=0: bdframe: error: training stage 'train' diverged" in notes


def test_a_run_locked_by_another_process_is_left_alone(tmp_path):
    f = write_sweep(tmp_path, '[axes]\nseed = [0, 1]\n')
    locks = tmp_path / "out" / "grid" / "locks"
    locks.mkdir(parents=True)
    fd = os.open(locks / "seed=1.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        res = sweep.run_sweep(f, jobs=1, threads=1, quiet=True, log=lambda m: None)
    finally:
        os.close(fd)
    assert (res["finished"], res["failed"], res["busy"]) == (1, 0, 1)
    assert sorted(metrics(tmp_path / "out" / "grid")) == ["seed=0"]


def test_changed_recipes_of_finished_runs_are_refused(tmp_path, capsys):
    f = write_sweep(tmp_path, '[axes]\nseed = [0]\n')
    assert main(["sweep", "run", str(f), "--quiet"]) == 0
    (tmp_path / "base.toml").write_text(BASE.format(epochs=2))
    assert main(["sweep", "run", str(f), "--quiet"]) == 2
    assert "made from a different recipe" in capsys.readouterr().err


def test_a_run_made_before_an_option_was_added_still_counts_as_finished(tmp_path):
    """A finished run's recipe.toml lacks an option added to a component since it ran: resolved
    again, the option takes its default and the run is this recipe's."""
    f = write_sweep(tmp_path, '[axes]\nseed = [0]\n')
    assert main(["sweep", "run", str(f), "--quiet"]) == 0
    d = tmp_path / "out" / "grid"
    saved = d / "runs" / "seed=0" / "recipe.toml"
    text = saved.read_text()
    assert "cutmix_prob = 0.0\n" in text
    saved.write_text(text.replace("cutmix_prob = 0.0\n", ""))
    s = sweep.load(f)
    assert sweep.run_state(d, "seed=0", sweep.validate(s)["seed=0"]) == "finished"
    saved.write_text(text.replace("cutmix_prob = 0.0\n", "cutmix_prob = 0.5\n"))  # a real difference
    assert sweep.run_state(d, "seed=0", sweep.validate(s)["seed=0"]) == "stale"


def test_ray_executor_without_ray_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    f = write_sweep(tmp_path, '[axes]\nseed = [0]\n')
    assert main(["sweep", "run", str(f), "--executor", "ray", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "bdframe: error: --executor ray needs Ray, which is not installed; install it with pip install 'bdframe[ray]'"


def test_a_run_shipped_back_by_a_worker_without_the_shared_directory_lands_in_place(tmp_path):
    f = write_sweep(tmp_path, '[axes]\nseed = [0]\n')
    s = sweep.load(f)
    sweep.write_layout(s)
    d = s.directory.absolute()
    payload = {"name": "seed=0", "state": "new", "directory": str(d), "marker": "not this sweep", "threads": 1,
               "cwd": os.getcwd(), "recipe": (d / "recipes" / "seed=0.toml").read_text()}
    res = sweep._ray_task(payload)
    assert res["rc"] == 0 and res["shared"] is False and not (d / "runs" / "seed=0").exists()
    (d / "logs").mkdir(exist_ok=True)
    sweep.unpack(d, "seed=0", res)
    assert (d / "runs" / "seed=0" / "metrics.json").is_file()
    assert "run complete" in (d / "logs" / "seed=0.log").read_text()
    assert sweep.run_state(d, "seed=0", sweep.validate(s)["seed=0"]) == "finished"


def test_ray_executor_gives_the_local_results(tmp_path):
    ray = pytest.importorskip("ray")
    body = '[axes]\nattack = ["badnet", "blend"]\nseed = [0, 1]\n'
    local = write_sweep(tmp_path, body, name="local", out="local")
    assert sweep.run_sweep(local, jobs=2, threads=1, quiet=True, log=lambda m: None)["finished"] == 4
    remote = write_sweep(tmp_path, body, name="remote", out="remote")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = sweep.run_sweep(remote, threads=1, executor="ray", quiet=True, log=lambda m: None)
    finally:
        ray.shutdown()
    assert (res["finished"], res["failed"]) == (4, 0)
    a, b = metrics(tmp_path / "local" / "local"), metrics(tmp_path / "remote" / "remote")
    assert sorted(a) == sorted(b) and len(a) == 4
    for name in a:
        assert (a[name]["clean_acc"], a[name]["asr"]) == (b[name]["clean_acc"], b[name]["asr"]), name


def test_report_of_a_real_sweep_matches_its_runs(tmp_path, capsys):
    f = write_sweep(tmp_path, """
[axes]
attack = ["badnet", false]
defense = ["none", {name = "meca", iterations = 1, warmup_epochs = 1, relearn = false}]
seed = [0, 1]
[[exclude]]
attack = "none"
defense = "meca"
""")
    assert main(["sweep", "run", str(f), "--jobs", "2", "--threads", "1", "--quiet"]) == 0
    capsys.readouterr()
    d = tmp_path / "out" / "grid"
    assert main(["report", str(d), "--format", "csv"]) == 0
    import csv
    import io
    import statistics

    rows = {(r["attack"], r["defense"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    m = metrics(d)
    meca = next(lab for lab in rows if lab[1].startswith("meca"))[1]
    assert set(rows) == {("badnet", "none"), ("badnet", meca), ("none", "none")}
    for (att, dfn), row in rows.items():
        runs = [m[f"attack={att},defense={dfn},seed={s}"] for s in (0, 1)]
        accs = [100 * r["clean_acc"] for r in runs]
        assert float(row["acc_mean"]) == pytest.approx(statistics.mean(accs))
        assert float(row["acc_std"]) == pytest.approx(statistics.stdev(accs))
        if att == "badnet":
            assert float(row["asr_mean"]) == pytest.approx(statistics.mean(100 * r["asr"] for r in runs))
        else:
            assert row["asr_mean"] == ""
        if dfn == meca:
            shares = [100 * r["suspected"]["share"] for r in runs]
            assert float(row["flagged_mean"]) == pytest.approx(statistics.mean(shares))
            assert float(row["recall_mean"]) == pytest.approx(statistics.mean(100 * r["detection"]["recall"] for r in runs))
            none = [m[f"attack={att},defense=none,seed={s}"] for s in (0, 1)]
            mult = [r["seconds"]["total"] / n["seconds"]["total"] for r, n in zip(runs, none)]
            assert float(row["time_multiple_mean"]) == pytest.approx(statistics.mean(mult))


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("examples/*.toml"))
                         + sorted(Path(__file__).resolve().parents[1].glob("benchmarks/sweeps/*.toml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_sweep_files_validate(path):
    """Every sweep file in examples/ and benchmarks/sweeps/ expands and every run's recipe is
    valid (dataset folders are the reader's, so they are not read)."""
    if "axes" not in toml.loads(path.read_text()):
        pytest.skip("a recipe, not a sweep file")
    s = sweep.load(path)
    assert len(sweep.validate(s, check_dataset=False)) == len(s.runs) > 1

"""End-to-end `bdframe run` on a tiny synthetic dataset: outputs, determinism, resume."""

import json

import pytest
import torch

from bdframe import runner
from bdframe.cli import main
from helpers import README_CPU, TINY, cpu_signature


def recipe_file(tmp_path, epochs=2, name="r.toml"):
    f = tmp_path / name
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=epochs))
    return f


def run_device(d) -> str:
    """The device type a finished run recorded in run.json."""
    return json.loads((d / "run.json").read_text())["environment"]["device"].split(":")[0]


def test_run_writes_complete_run_directory(tmp_path, capsys):
    f = recipe_file(tmp_path)
    assert main(["run", str(f), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "clean ACC" in out and "ASR" in out
    d = tmp_path / "runs" / "tiny"
    assert not (tmp_path / "runs" / "tiny.partial").exists()
    names = {p.name for p in d.iterdir()}
    assert {"recipe.toml", "run.json", "metrics.json", "history.jsonl", "poison.json", "model.pt",
            "attack_example.png"} <= names
    assert not any(n.endswith(".tmp") for n in names) and "state" not in names
    metrics = json.loads((d / "metrics.json").read_text())
    assert 0 <= metrics["clean_acc"] <= 1 and 0 <= metrics["asr"] <= 1
    assert metrics["num_poison"] == 30 and metrics["asr_set_size"] == 90
    assert metrics["train_images_per_s"] > 0 and 0 <= metrics["train_non_compute_share"] <= 1
    # this process's peak resident memory so far: at least torch and the run's data (tens of MiB)
    import resource
    import sys
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    assert 50 < metrics["peak_memory_mb"]["rss"] <= now + 1e-6
    assert ("gpu" in metrics["peak_memory_mb"]) == (run_device(d) == "cuda")
    run = json.loads((d / "run.json").read_text())
    assert run["status"] == "complete" and run["environment"]["torch"] == torch.__version__
    assert run["plugins"]["attack"]["distribution"] == "bdframe-attack-badnet"
    assert run["seeds"]["run"] == 3
    poison = json.loads((d / "poison.json").read_text())
    assert len(poison["poison_ids"]) == 30 and poison["cover_ids"] == []
    hist = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2] and "asr" in hist[0]
    # the resolved recipe re-validates
    assert main(["validate", str(d / "recipe.toml")]) == 0


def test_same_recipe_same_seed_same_results(tmp_path):
    f = recipe_file(tmp_path)
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "a")]) == 0
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "b")]) == 0
    ma, mb = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    assert ma["clean_acc"] == mb["clean_acc"] and ma["asr"] == mb["asr"]
    assert (tmp_path / "a/poison.json").read_text() == (tmp_path / "b/poison.json").read_text()
    sa = torch.load(tmp_path / "a/model.pt")
    sb = torch.load(tmp_path / "b/model.pt")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_interrupted_run_resumes_from_last_epoch(tmp_path, monkeypatch):
    f = recipe_file(tmp_path, epochs=3)
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "ref")]) == 0

    real_log = runner.RunContext.log
    calls = {"n": 0}

    def interrupt_after_two(self, record):
        real_log(self, record)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.RunContext, "log", interrupt_after_two)
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "cut")]) == 130
    assert (tmp_path / "cut.partial" / "state" / "train.pt").exists() and not (tmp_path / "cut").exists()
    monkeypatch.setattr(runner.RunContext, "log", real_log)
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "cut")]) == 2  # needs --resume
    trained = []
    orig = runner.RunContext.log

    def spy(self, record):
        trained.append(record.get("replayed", False))
        orig(self, record)

    monkeypatch.setattr(runner.RunContext, "log", spy)
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert trained == [True, True, False]  # epochs 1-2 replayed, only epoch 3 trained
    ref = json.loads((tmp_path / "ref/metrics.json").read_text())
    res = json.loads((tmp_path / "cut/metrics.json").read_text())
    assert ref["clean_acc"] == res["clean_acc"] and ref["asr"] == res["asr"]
    assert (tmp_path / "ref/history.jsonl").read_text().count("\n") == (tmp_path / "cut/history.jsonl").read_text().count("\n")


def test_resume_refuses_a_changed_recipe(tmp_path):
    f = recipe_file(tmp_path, epochs=1)
    (tmp_path / "x.partial").mkdir()
    (tmp_path / "x.partial" / "resume.json").write_text('{"recipe_sha256": "different"}')
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "x"), "--resume"]) == 2


@pytest.mark.slow
def test_quickstart_recipe_runs(tmp_path):
    """The README quickstart recipe, as shipped."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "examples" / "quickstart.toml"
    assert main(["run", str(recipe), "--quiet", "--out", str(tmp_path / "qs")]) == 0
    m = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert m["clean_acc"] > 0.5


def test_every_example_recipe_validates(capsys):
    """The README quickstart (examples/meca-quickstart.toml) and the other shipped recipes resolve
    against the installed plugins."""
    from pathlib import Path

    examples = [p for p in sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.toml"))
                if "[axes" not in p.read_text()]  # sweep files: test_sweep.py validates them
    assert {p.name for p in examples} >= {"quickstart.toml", "meca-quickstart.toml"}
    for recipe in examples:
        assert main(["validate", str(recipe)]) == 0, recipe
    assert capsys.readouterr().out.count(": ok") == len(examples)


def readme_quickstart_output() -> list[str]:
    """The lines README.md says `bdframe run examples/meca-quickstart.toml` ends with."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("<!-- quickstart-output:", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.strip()]


def locked_environment() -> str | None:
    """Why this is not the environment the README's figures come from (None if it is)."""
    import platform
    import re
    from pathlib import Path

    import torch

    lock = (Path(__file__).resolve().parent.parent / "requirements-lock.txt").read_text()
    pinned = re.search(r"^torch==(\S+)", lock, re.M).group(1)
    if torch.__version__.split("+")[0] != pinned:
        return f"torch {torch.__version__} is not the locked {pinned}"
    if platform.machine() != "x86_64" or platform.system() != "Linux":
        return f"{platform.system()} {platform.machine()} is not x86-64 Linux"
    if torch.cuda.is_available():
        return "a GPU is present (the quickstart's device is auto)"
    sig = cpu_signature()
    if sig != README_CPU:
        return (f"the CPU is {sig[0] or 'of unknown make'} with {sig[1]} kernels, the README's figures come "
                f"from an {README_CPU[0]} CPU with {README_CPU[1]} kernels (on this tiny dataset the "
                f"CPU's floating-point order changes them)")
    return None


@pytest.mark.slow
def test_meca_quickstart_removes_the_backdoor_and_prints_what_the_readme_says(tmp_path):
    """The README quickstart exactly as a user runs it: ASR falls from the warm-up model to the
    defended one, and, with the locked install on x86-64 Linux, the output is the README's."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "bdframe.cli", "run", "examples/meca-quickstart.toml", "--quiet",
                        "--out", str(tmp_path / "qs")], cwd=repo, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert m["defense_metrics"]["trend"][0]["asr"] > 0.5 and m["asr"] < 0.1
    assert m["detection"]["recall"] == 1.0  # the README: every poisoned sample is found, on any CPU
    printed = p.stdout.splitlines()
    assert printed[0] == f"run complete: {tmp_path / 'qs'}"
    why = locked_environment()
    if why:
        pytest.skip(f"README figures are for the locked install on x86-64 Linux CPU: {why}")
    assert printed[1:] == readme_quickstart_output()


@pytest.mark.slow
def test_the_papers_meca_quickstart_removes_the_backdoor_and_flags_every_poisoned_sample(tmp_path):
    """examples/meca-paper-quickstart.toml, MeCa as its paper describes it: the warm-up model has
    the backdoor, the defended model has not, and every poisoned sample is flagged (with many
    clean ones: the enhanced model's errors are what the paper's rule keeps)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    assert main(["run", str(repo / "examples" / "meca-paper-quickstart.toml"), "--quiet",
                 "--out", str(tmp_path / "qs")]) == 0
    m = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert len(m["defense_metrics"]["trend"]) == 6  # the warm-up and five enhancement iterations
    assert m["defense_metrics"]["trend"][0]["asr"] > 0.5 and m["asr"] < 0.1
    assert m["detection"]["recall"] == 1.0


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_on_a_cpu_that_emulates_it_is_announced_before_the_run(tmp_path, capsys, monkeypatch, native):
    """``amp = "on"`` on a CPU without native bfloat16: one warning line naming the setting
    before any work; on a CPU with it (or with amp left at auto), no warning."""
    import bdframe.training

    monkeypatch.setattr(bdframe.training, "cpu_bf16_supported", lambda: native)
    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1) + 'amp = "on"\n')
    assert main(["run", str(f), "--quiet"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "bfloat16" in line]
    if native:
        assert warned == []
    else:
        assert len(warned) == 1 and warned[0].startswith('warning: [train] amp = "on" asks for bfloat16 autocast')
        lines = err.splitlines()
        assert lines[lines.index("device cpu") + 1] == warned[0]  # announced before the data is made
    f.write_text(TINY.format(out=tmp_path / "runs2", epochs=1))
    assert main(["run", str(f), "--quiet"]) == 0
    assert "bfloat16" not in capsys.readouterr().err

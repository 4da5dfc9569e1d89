"""CutMix: the kept share is the area left of each image, probability 0 is plain training, the
boxes follow the batch (so a resumed run is the uninterrupted one), and the cutmix defense."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import TINY
from bdframe import runner
from bdframe.cli import main
from bdframe_trainer_standard.plugin import cutmix


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), b=st.integers(2, 8), h=st.integers(4, 20), w=st.integers(4, 20),
       beta=st.floats(0.2, 4.0), clip=st.sampled_from([(), (0.3, 0.7), (0.5, 0.5)]))
def test_lambda_is_the_share_each_image_keeps(seed, b, h, w, beta, clip):
    x = torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 3, h, w).clone()  # image i is all i
    mixed, perm, lam = cutmix(x, torch.Generator().manual_seed(seed), beta=beta, clip=clip)
    assert 0.0 <= lam <= 1.0
    for i in range(b):
        if perm[i] == i:
            continue
        kept = float((mixed[i] == i).float().mean())
        assert kept == pytest.approx(lam), (i, kept, lam)
        assert bool(((mixed[i] == i) | (mixed[i] == perm[i])).all())
    if clip == (0.5, 0.5):  # a box of sides int(sqrt(.5) * size), clipped at the border: at least half kept
        assert lam >= 0.5 - 1e-9


def recipe(tmp_path, train_extra="", defense=""):
    text = TINY.format(out=tmp_path / "runs", epochs=2) + train_extra + defense
    f = tmp_path / "r.toml"
    f.write_text(text)
    return f


def weights(d):
    return torch.load(d / "model.pt")


def test_probability_zero_is_plain_training(tmp_path):
    a = recipe(tmp_path)
    assert main(["run", str(a), "--quiet", "--out", str(tmp_path / "a")]) == 0
    b = recipe(tmp_path, "cutmix_prob = 0.0\ncutmix_beta = 2.0\n")
    assert main(["run", str(b), "--quiet", "--out", str(tmp_path / "b")]) == 0
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cutmix_training_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    f = recipe(tmp_path, "cutmix_prob = 1.0\n")
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "ref")]) == 0
    real = runner.RunContext.log

    def stop_after_first_epoch(self, record):
        real(self, record)
        if record.get("epoch") == 1 and not record.get("replayed"):
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.RunContext, "log", stop_after_first_epoch)
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(runner.RunContext, "log", real)
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    wa, wb = weights(tmp_path / "ref"), weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    plain = recipe(tmp_path)
    assert main(["run", str(plain), "--quiet", "--out", str(tmp_path / "plain")]) == 0
    wp = weights(tmp_path / "plain")
    assert not all(torch.equal(wa[k], wp[k]) for k in wa)  # CutMix changed the training


def test_clip_is_validated(tmp_path, capsys):
    f = recipe(tmp_path, "cutmix_prob = 1.0\ncutmix_clip = [0.7, 0.3]\n")
    assert main(["validate", str(f)]) == 2
    assert "$.train.cutmix_clip: must be empty or [lo, hi]" in capsys.readouterr().err


@pytest.mark.parametrize("mode, steps", [("scratch", ["train"]), ("repair", ["plain", "repair"])])
def test_cutmix_defense(tmp_path, mode, steps):
    f = recipe(tmp_path, defense=f'\n[defense]\nname = "cutmix"\nmode = "{mode}"\nrepair_epochs = 1\n'
                                 f'evaluate_each_epoch = false\n')
    assert main(["run", str(f), "--quiet"]) == 0
    m = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert [t["step"] for t in m["defense_metrics"]["trend"]] == steps
    assert m["defense_metrics"]["trend"][-1]["clean_acc"] == m["clean_acc"]
    assert "detection" not in m


def test_cutmix_defense_refuses_a_stage_without_cutmix(tmp_path, capsys):
    f = recipe(tmp_path, defense='\n[defense]\nname = "cutmix"\n')
    f.write_text(f.read_text().replace('name = "standard"', 'name = "relearn"'))
    assert main(["run", str(f), "--quiet"]) == 2
    assert "cutmix needs a [train] stage with CutMix options" in capsys.readouterr().err


@pytest.mark.slow
def test_the_cutmix_example_trains_without_the_backdoor(tmp_path):
    """examples/cutmix-quickstart.toml: CutMix from scratch does not learn the BadNet patch."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "cutmix-quickstart.toml"
    assert main(["run", str(example), "--quiet", "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["asr"] < 0.2 and m["clean_acc"] > 0.9

"""Trusted clean data (``[clean]``), trigger inversion, and the defenses that use clean data:
``mcldef``, ``fine-tuning``, ``fine-pruning``."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from helpers import EXAMPLES_CPU, TINY, cpu_signature
from bdframe import inversion
from bdframe.build import materialise
from bdframe.cli import main
from bdframe.errors import RecipeError
from bdframe.plugins import load_recipe

pytestmark = pytest.mark.usefixtures("two_threads")
REPO = Path(__file__).resolve().parents[2]

# a model with a planted patch backdoor: ASR above 90% (the synthetic dataset's BadNet patch is
# the bottom-right 3x3 corner)
PLANTED = """
name = "planted"
seed = 3
device = "cpu"
output_dir = "{out}"

[dataset]
name = "synthetic"
train_size = 600
test_size = 200
image_size = 16

[model]
name = "simple-cnn"
width = 8

[attack]
name = "badnet"
poison_rate = 0.1
target = 1

[clean]
fraction = 0.2

[train]
name = "standard"
epochs = 12
batch_size = 64
lr = 0.05
"""


def write(tmp_path, text, name="r.toml"):
    f = tmp_path / name
    f.write_text(text)
    return f


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """``(recipe path, run dir)`` of a plain run whose model carries the backdoor."""
    d = tmp_path_factory.mktemp("planted")
    f = write(d, PLANTED.format(out=d / "runs"))
    torch.set_num_threads(2)
    assert main(["run", str(f), "--quiet"]) == 0
    run = d / "runs" / "planted"
    assert json.loads((run / "metrics.json").read_text())["asr"] > 0.9
    return f, run


def load_model(recipe_path, run):
    recipe, registry = load_recipe(recipe_path)
    parts = materialise(recipe, registry)
    model = parts.build_model()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    return parts, model.eval()


# -- the reserve ---------------------------------------------------------------------------------

def tiny(tmp_path, extra="", *, attack=True, seed=None):
    text = TINY.format(out=tmp_path / "runs", epochs=1)
    if not attack:
        text = text.replace('[attack]\nname = "badnet"\npoison_rate = 0.1\ntarget = 1\n', "")
    if seed is not None:
        text = text.replace("seed = 3", f"seed = {seed}")
    return write(tmp_path, text + extra, name=f"r{abs(hash((extra, attack, seed)))}.toml")


def test_the_reserve_is_clean_disjoint_from_the_poison_and_the_test_set_and_per_class(tmp_path):
    recipe, registry = load_recipe(tiny(tmp_path, "[clean]\nfraction = 0.1\n"))
    parts = materialise(recipe, registry)
    clean, train = parts.clean, parts.train
    assert len(clean) == 30 and len(train) == 270
    assert not bool(torch.isin(clean.ids, train.ids).any())
    assert not bool(torch.isin(clean.ids, parts.poison_ids).any())
    assert bool(torch.isin(parts.poison_ids, train.ids).all())
    # clean by construction: the same pixels and labels as the dataset's own images
    full, test = registry.get("dataset", "synthetic")(recipe.dataset.config).load()
    ref = full.select_ids(clean.ids)
    assert torch.equal(ref.images, clean.images) and torch.equal(ref.labels, clean.labels)
    # the test split is untouched and shares no images with the reserve
    assert len(parts.test) == len(test) and torch.equal(parts.test.images, test.images)
    # per class: round(0.1 x class size)
    for c in torch.unique(full.labels).tolist():
        assert int((clean.labels == c).sum()) == round(0.1 * int((full.labels == c).sum()))


def test_every_defense_and_attack_of_a_seed_gets_the_same_reserve(tmp_path):
    ids = []
    for extra, attack in [("", True), ('[defense]\nname = "fine-tuning"\n', True), ("", False)]:
        recipe, registry = load_recipe(tiny(tmp_path, "[clean]\nfraction = 0.1\n" + extra, attack=attack))
        ids.append(materialise(recipe, registry).clean.ids.sort().values)
    assert all(torch.equal(ids[0], i) for i in ids[1:])
    recipe, registry = load_recipe(tiny(tmp_path, "[clean]\nfraction = 0.1\n", seed=4))
    assert not torch.equal(materialise(recipe, registry).clean.ids.sort().values, ids[0])


def test_without_clean_the_context_has_none_and_the_data_are_whole(tmp_path):
    from bdframe.runner import RunContext

    recipe, registry = load_recipe(tiny(tmp_path))
    parts = materialise(recipe, registry)
    assert parts.clean is None and len(parts.train) == 300
    assert RunContext.for_parts(parts, torch.device("cpu"), None, progress=False).clean is None
    assert "clean" not in recipe.to_dict()


@pytest.mark.parametrize("defense", ["mcldef", "fine-tuning", "fine-pruning", "scanft"])
def test_a_defense_that_needs_clean_data_is_refused_without_it(tmp_path, capsys, defense):
    f = tiny(tmp_path, f'[defense]\nname = "{defense}"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert any(m.startswith("$.clean: defense") and "needs trusted clean data" in m for m in e.value.problems)
    assert main(["validate", str(f)]) == 2
    assert "$.clean" in capsys.readouterr().err


@pytest.mark.parametrize("body, expect", [
    ("[clean]\nfraction = 1.0\n", "$.clean.fraction: must be a share"),
    ("[clean]\nfraction = -0.1\n", "$.clean.fraction: must be a share"),
    ("[clean]\nfolders = 'x'\n", "$.clean.folders: unknown parameter"),
    ("[clean]\nfolder = 'no/such/dir'\n", "$.clean.folder: 'no/such/dir' is not a folder"),
    ('clean = 0.05\n', "$.clean: must be a table"),
])
def test_bad_clean_sections_are_named(tmp_path, body, expect):
    text = TINY.format(out=tmp_path / "runs", epochs=1)
    text = body + text if not body.startswith("[") else text + body
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    assert any(m.startswith(expect) for m in e.value.problems), e.value.messages


# -- trigger inversion ---------------------------------------------------------------------------

def test_a_zero_mask_leaves_the_image_unchanged():
    x = torch.rand(5, 3, 8, 8)
    assert torch.equal(inversion.stamp(x, torch.zeros(1, 8, 8), torch.rand(3, 8, 8)), x)
    assert torch.equal(inversion.stamp(x, torch.ones(1, 8, 8), torch.full((3, 8, 8), 0.5)), torch.full_like(x, 0.5))


@settings(max_examples=50, deadline=None)
@given(norms=st.lists(st.floats(1, 1000), min_size=3, max_size=20), scale=st.floats(0.1, 10))
@example(norms=[1.0, 2.0, 1.0000000000000002], scale=0.109375)
@example(norms=[4.0, 4.0, 5.0, 1.0000000000000002, 1.0], scale=1.0)
def test_the_anomaly_index_is_scale_free_and_largest_for_the_smallest_norm(norms, scale):
    n = torch.tensor(norms, dtype=torch.float64)
    a = inversion.anomaly_index(n)
    assert torch.allclose(inversion.anomaly_index(n * scale), a, atol=1e-6)
    if bool((a != 0).any()):  # the smallest norm has the largest index (norms a rounding apart tie)
        assert float(a[int(torch.argmin(n))]) == pytest.approx(float(a.max()), rel=1e-9)
    assert float(inversion.anomaly_index(torch.full((5,), 3.0)).abs().max()) == 0.0
    # equal up to float rounding: no spread, not indices of 1e15
    assert not inversion.anomaly_index(torch.tensor([1.0, 2.0, 1.0 + 2 ** -52], dtype=torch.float64)).any()


def test_inversion_finds_the_target_and_a_mask_on_the_patch(planted):
    recipe_path, run = planted
    parts, model = load_model(recipe_path, run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inv = inversion.invert(model, parts.clean, progress=False, seed=0)
    assert inv.target == 1
    assert inv.anomaly[1] == inv.anomaly.max() and inv.index() > 1
    mask = inv.masks[1, 0]
    assert float(mask.sum()) < 3 * 9  # about the patch's 3x3 pixels
    assert float(mask[12:].sum() / mask.sum()) > 0.8  # on the bottom rows, where the patch is
    # the stamp works: the inverted trigger sends clean images of other classes to the target
    others = parts.clean.subset(parts.clean.labels != 1)
    x = others.images.float() / 255
    with torch.no_grad():
        rate = float((model(inversion.apply_trigger(x, inv)).argmax(1) == 1).float().mean())
    assert rate > 0.9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched
    assert all(p.requires_grad for p in model.parameters())


# -- MCLDef's loss -------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 8), d=st.integers(1, 16), t=st.floats(0.05, 2.0), seed=st.integers(0, 10_000))
def test_the_model_contrastive_loss_is_nonnegative_and_log2_when_positive_is_negative(n, d, t, seed):
    from bdframe_defense_mcldef.plugin import mcl_loss

    g = torch.Generator().manual_seed(seed)
    a, p, q = (torch.randn(n, d, generator=g) for _ in range(3))
    assert bool((mcl_loss(a, p, q, t) >= 0).all())
    assert torch.allclose(mcl_loss(a, p, p.clone(), t), torch.full((n,), math.log(2)), atol=1e-6)
    # an anchor on the positive and opposite the negative scores better than the reverse
    assert bool((mcl_loss(p, p, -p, t) < mcl_loss(-p, p, -p, t)).all())


# -- fine-pruning --------------------------------------------------------------------------------

def test_pruning_cuts_exactly_the_reported_channels_and_nothing_else(planted):
    from bdframe_defense_finetuning.plugin import FinePruningConfig, prune

    recipe_path, run = planted
    parts, model = load_model(recipe_path, run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = FinePruningConfig(acc_drop=0.2, step=0.05)
    out = prune(model, parts.clean, SimpleNamespace(device="cpu"), c)
    w = dict(model.named_parameters())[out["weight"]].detach()
    zero_cols = torch.nonzero((w == 0).all(0)).flatten().tolist()
    assert out["pruned"] and zero_cols == out["pruned"]
    cut = torch.tensor(out["pruned"])
    keep = torch.ones(w.shape[1], dtype=torch.bool)
    keep[cut] = False
    assert torch.equal(w[:, keep], before[out["weight"]][:, keep])  # the other channels' weights
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k != out["weight"])
    acc = out["clean_data_acc"]
    assert acc["after"] >= (1 - c.acc_drop) * acc["before"]
    # it pruned the least active channels: every cut channel is at most as active as every kept one
    acts = __import__("bdframe_defense_finetuning.plugin", fromlist=["x"]).mean_activations(
        model_with(before, parts), parts.clean, SimpleNamespace(device="cpu"))
    assert float(acts[cut].max()) <= float(acts[keep].min())


def model_with(state, parts):
    m = parts.build_model()
    m.load_state_dict(state)
    return m.eval()


def test_a_zero_rate_leaves_the_model_unchanged(planted):
    from bdframe_defense_finetuning.plugin import FinePruningConfig, prune

    recipe_path, run = planted
    parts, model = load_model(recipe_path, run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = prune(model, parts.clean, SimpleNamespace(device="cpu"), FinePruningConfig(acc_drop=0.0, step=0.5))
    if not out["pruned"]:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert out["clean_data_acc"]["after"] >= out["clean_data_acc"]["before"]


# -- the defenses end to end, repairing the planted model ----------------------------------------

@pytest.mark.parametrize("defense, params", [
    ("mcldef", "epochs = 3\nmilestones = [1, 2]\ninversion_epochs = 8\n"),
    ("fine-tuning", "epochs = 3\n"),
    ("fine-pruning", "epochs = 3\nstep = 0.05\n"),
    ("scanft", "epochs = 2\nlr = 0.01\n"),
])
def test_each_defense_repairs_a_saved_model_and_reports_its_clean_data(tmp_path, planted, defense, params):
    recipe_path, run = planted
    text = recipe_path.read_text().replace(f'output_dir = "{recipe_path.parent / "runs"}"',
                                           f'output_dir = "{tmp_path / "runs"}"')
    text += f'\n[defense]\nname = "{defense}"\nmodel = "{run / "model.pt"}"\n{params}'
    f = write(tmp_path, text)
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "d")]) == 0
    d = tmp_path / "d"
    m = json.loads((d / "metrics.json").read_text())
    clean = json.loads((d / "clean.json").read_text())
    poison = json.loads((d / "poison.json").read_text())
    assert m["clean_data"] == {"size": clean["size"], "fraction": 0.2, "source": "reserve", "used": True}
    assert clean["source"] == "reserve" and clean["fraction"] == 0.2
    assert clean["size"] == len(clean["ids"]) == 120 and m["train_size"] == 480
    assert not set(clean["ids"]) & set(poison["poison_ids"])
    start = m["defense_metrics"]["trend"][0]
    assert start["asr"] > 0.9  # the loaded model is the backdoored one
    assert m["defense_metrics"]["clean_images"] == 120
    if defense == "mcldef":
        assert m["defense_metrics"]["inversion"]["target"] == 1
        assert (d / "mcldef_inversion.png").is_file()
        assert any("inverted target class 1" in line for line in m["defense_summary"])
    if defense == "fine-pruning":
        assert m["defense_metrics"]["pruning"]["pruned"]
    if defense == "scanft":  # SCAn with the clean reference finds the poison of the planted model
        assert m["detection"]["recall"] > 0.8 and m["detection"]["precision"] > 0.5
        assert m["defense_metrics"]["flagged"] == m["suspected"]["count"]
        assert (d / "suspected.csv").is_file()


def test_scanft_with_nothing_flagged_leaves_the_model_unchanged(tmp_path, planted):
    recipe_path, run = planted
    text = recipe_path.read_text().replace(f'output_dir = "{recipe_path.parent / "runs"}"',
                                           f'output_dir = "{tmp_path / "runs"}"')
    text += f'\n[defense]\nname = "scanft"\nmodel = "{run / "model.pt"}"\nscan = {{threshold = 1e9}}\n'
    assert main(["run", str(write(tmp_path, text)), "--quiet", "--out", str(tmp_path / "d")]) == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert m["defense_metrics"]["flagged"] == 0 and m["detection"]["flagged"] == 0
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "d" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_defense_without_clean_data_records_the_reserve_as_unused(tmp_path):
    f = tiny(tmp_path, "[clean]\nfraction = 0.1\n")
    assert main(["run", str(f), "--quiet", "--out", str(tmp_path / "d")]) == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert m["clean_data"] == {"size": 30, "fraction": 0.1, "source": "reserve", "used": False}
    assert m["train_size"] == 270


# -- the examples --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("example", [pytest.param("mcldef-quickstart.toml", marks=pytest.mark.heavy),
                                     "fine-pruning-quickstart.toml", "fine-tuning-quickstart.toml"])
def test_the_clean_data_examples_run(tmp_path, example):
    assert main(["run", str(REPO / "examples" / example), "--quiet", "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    start = m["defense_metrics"]["trend"][0]
    assert start["asr"] > 0.8  # the model the defense repairs has the backdoor
    if example.startswith("mcldef"):
        assert m["defense_metrics"]["inversion"]["target"] == 1
        assert m["asr"] < 0.2 and m["clean_acc"] > 0.6


@pytest.mark.slow
def test_the_scanft_example_finds_the_poison_and_unlearns_the_backdoor(tmp_path):
    """examples/scanft-quickstart.toml: SCAn flags every poisoned sample (and some clean ones of
    the target class), on any CPU; the stronger flooded unlearning removes the backdoor on the
    CPU docs/clean-data.md's figures come from (AMD, AVX2 kernels). Pure gradient ascent on ~130
    samples is chaotic: on an Intel Xeon and on an AMD CPU with AVX512 kernels the same run kept
    the backdoor (docs/clean-data.md says so), so there the test checks that the unlearning ran
    and changed the model."""
    assert main(["run", str(REPO / "examples" / "scanft-quickstart.toml"), "--quiet", "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    start = m["defense_metrics"]["trend"][0]
    assert start["asr"] > 0.8  # the model SCAnFT repairs has the backdoor
    assert m["detection"]["recall"] > 0.9 and m["detection"]["precision"] > 0.5
    if cpu_signature() == EXAMPLES_CPU:
        assert m["asr"] < 0.2 and m["clean_acc"] > 0.5
    else:
        assert m["clean_acc"] != start["clean_acc"] or m["asr"] != start["asr"]


def test_a_repair_defense_starts_from_exactly_the_model_of_the_plain_run(tmp_path):
    """Trained by the defense or loaded from the none run, the starting model is the same."""
    base = TINY.format(out=tmp_path / "runs", epochs=2) + "[clean]\nfraction = 0.1\n"
    none = write(tmp_path, base, "none.toml")
    assert main(["run", str(none), "--quiet", "--out", str(tmp_path / "none")]) == 0
    ft = write(tmp_path, base + '[defense]\nname = "fine-tuning"\nepochs = 0\n', "ft.toml")
    assert main(["run", str(ft), "--quiet", "--out", str(tmp_path / "ft")]) == 0
    a = torch.load(tmp_path / "none" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "ft" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bdframe_poison_writes_the_reserve_beside_the_poisoned_training_set(tmp_path, capsys):
    import csv

    f = tiny(tmp_path, "[clean]\nfraction = 0.1\n")
    assert main(["poison", str(f), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert "270 train, 30 clean (the [clean] reserve)" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "p" / "manifest.csv").open()))
    clean = [r for r in rows if r["split"] == "clean"]
    assert len(clean) == 30 and all(r["poisoned"] == "0" for r in clean)
    assert all((tmp_path / "p" / r["file"]).is_file() for r in clean)
    train_ids = {r["id"] for r in rows if r["split"] == "train"}
    assert not train_ids & {r["id"] for r in clean}


def write_png(path, img):
    from torchvision.io import write_png as w

    path.parent.mkdir(parents=True, exist_ok=True)
    w(img, str(path))


def test_a_folder_of_trusted_images_is_the_clean_data(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=g)
    folder = tmp_path / "trusted"
    for i, (cls, k) in enumerate([("class2", 0), ("class2", 1), ("class0", 2), ("class7", 3), ("class7", 4)]):
        write_png(folder / cls / f"{i}.png", imgs[k])
    text = TINY.format(out=tmp_path / "runs", epochs=1) + f'[clean]\nfolder = "{folder}"\n'
    recipe, registry = load_recipe(write(tmp_path, text))
    parts = materialise(recipe, registry)
    clean = parts.clean
    assert len(parts.train) == 300  # nothing is taken from the training split
    assert clean.labels.tolist() == [0, 2, 2, 7, 7]  # (class, file) order, labels by class name
    assert torch.equal(clean.images, imgs[[2, 0, 1, 3, 4]])
    assert int(clean.ids.min()) > int(parts.train.ids.max())  # ids apart from the training set's
    # recorded as such in a run
    text += '[defense]\nname = "fine-tuning"\nepochs = 1\n'
    assert main(["run", str(write(tmp_path, text, "ft.toml")), "--quiet", "--out", str(tmp_path / "d")]) == 0
    info = json.loads((tmp_path / "d" / "clean.json").read_text())
    assert info["source"] == "folder" and info["folder"] == str(folder) and info["size"] == 5


@pytest.mark.parametrize("make, words", [
    (lambda d: write_png(d / "cats" / "0.png", torch.zeros(3, 16, 16, dtype=torch.uint8)),
     "sub-folders ['cats'] of"),
    (lambda d: write_png(d / "class1" / "0.png", torch.zeros(3, 8, 8, dtype=torch.uint8)),
     "is 3x8x8; the dataset's images are 3x16x16"),
    (lambda d: (d / "class1").mkdir(parents=True), "no images in"),
])
def test_a_bad_clean_folder_is_named(tmp_path, capsys, make, words):
    folder = tmp_path / "trusted"
    folder.mkdir()
    make(folder)
    text = TINY.format(out=tmp_path / "runs", epochs=1) + f'[clean]\nfolder = "{folder}"\n'
    assert main(["run", str(write(tmp_path, text)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "$.clean.folder" in err and words in err
    assert not (tmp_path / "runs" / "tiny").exists() and not (tmp_path / "runs" / "tiny.partial").exists()


def test_fraction_and_folder_together_are_refused(tmp_path):
    text = TINY.format(out=tmp_path / "runs", epochs=1) + f'[clean]\nfraction = 0.1\nfolder = "{tmp_path}"\n'
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    assert any(m.startswith("$.clean.folder: give either fraction") for m in e.value.problems)


def test_mcldef_returns_the_model_as_trained_when_no_class_stands_out(tmp_path, planted):
    recipe_path, run = planted
    text = recipe_path.read_text().replace(f'output_dir = "{recipe_path.parent / "runs"}"',
                                           f'output_dir = "{tmp_path / "runs"}"')
    text += (f'\n[defense]\nname = "mcldef"\nmodel = "{run / "model.pt"}"\ninversion_epochs = 3\n'
             f'min_anomaly_index = 1000\n')
    assert main(["run", str(write(tmp_path, text)), "--quiet", "--out", str(tmp_path / "d")]) == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert m["defense_metrics"]["purified"] is False
    assert any("returned as trained" in line for line in m["defense_summary"])
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "d" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)

"""`bdframe poison`: image folder + manifest, readable back by the imagefolder dataset."""

import csv

import torch

from bdframe.cli import main
from helpers import TINY


def test_poison_writes_folder_and_manifest(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1))
    out = tmp_path / "poisoned"
    assert main(["poison", str(f), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 300 and sum(int(r["poisoned"]) for r in train) == 30
    assert all(r["given_label"] == "1" for r in train if r["poisoned"] == "1")
    assert all(r["given_label"] == r["original_label"] for r in train if r["poisoned"] == "0")
    assert len([r for r in rows if r["split"] == "test-asr"]) == 90
    assert all((out / r["file"]).is_file() for r in rows)
    # the written tree is an image folder: it reads back bit for bit
    from bdframe_dataset_imagefolder.plugin import ImageFolder, ImageFolderConfig
    from bdframe_attack_badnet.plugin import BadNet, BadNetConfig
    from bdframe_dataset_synthetic.plugin import Synthetic, SyntheticConfig
    from bdframe.seeding import derive_seed

    back, _ = ImageFolder(ImageFolderConfig(root=str(out), cache=False)).load()
    src, _ = Synthetic(SyntheticConfig(train_size=300, test_size=100, image_size=16)).load()
    ps = BadNet(BadNetConfig(poison_rate=0.1, target=1)).poison_train(src, seed=derive_seed(3, "attack"))
    # imagefolder order: sorted class folders, then file names (the zero-padded ids)
    ids = [int(r["id"]) for r in sorted(train, key=lambda r: r["file"])]
    assert torch.equal(back.images, ps.data.images[ids])
    assert main(["poison", str(f), "--out", str(out), "--quiet"]) == 2  # exists
    assert not (tmp_path / "poisoned.partial").exists()


def test_poison_needs_an_attack(tmp_path):
    f = tmp_path / "r.toml"
    text = TINY.format(out=tmp_path / "runs", epochs=1)
    f.write_text(text[: text.index("[attack]")] + text[text.index("[train]"):])
    assert main(["poison", str(f), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert not (tmp_path / "o").exists()

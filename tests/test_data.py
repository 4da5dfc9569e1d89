"""The in-memory data pipeline and dataset plugins."""

import pickle

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe.data import Augment, Batches, ImageSet
from bdframe.errors import UserError
from bdframe.scoring import balanced_draw
from bdframe.testing import tiny_imageset


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 300), bs=st.integers(1, 64), shuffle=st.booleans(), seed=st.integers(0, 1000))
def test_batches_visit_every_sample_once(n, bs, shuffle, seed):
    data = tiny_imageset(n, size=8)
    seen = []
    for x, y, ids in Batches(data, bs, shuffle=shuffle, generator=torch.Generator().manual_seed(seed)):
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert torch.equal(y, data.labels[ids])
        assert torch.allclose(x, data.images[ids].float() / 255)
        seen += ids.tolist()
    assert sorted(seen) == list(range(n))


def test_augment_is_crop_and_flip_of_the_input():
    x = torch.rand(64, 3, 8, 8)
    out = Augment(crop_padding=2, flip=True)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(64):  # every output is some shifted window of the (possibly flipped) padded input
        ok = False
        for src in (padded[i], padded[i].flip(2)):
            for dy in range(5):
                for dx in range(5):
                    ok |= torch.equal(src[:, dy:dy + 8, dx:dx + 8], out[i])
        assert ok
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(Augment()(x, g1), Augment()(x, g2))


def test_identity_augment():
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(Augment(0, False)(x, torch.Generator()), x)


def test_subset_positions_and_balance():
    data = tiny_imageset(100, num_classes=4)
    sub = data.subset(balanced_draw(data, 40, seed=1))
    assert len(sub) == 40 and torch.bincount(sub.labels).tolist() == [10, 10, 10, 10]
    assert torch.equal(data.subset(balanced_draw(data, 40, seed=1)).ids, sub.ids)
    pos = data.positions(torch.tensor([5, 2, 99]))
    assert data.ids[pos].tolist() == [5, 2, 99]
    with pytest.raises(KeyError):
        data.positions(torch.tensor([1000]))


def test_imageset_rejects_bad_arrays():
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), torch.arange(2))


def _write_tree(root, n_per_class=3, size=8):
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for cls in ("cat", "ant", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n_per_class):
                write_png(torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8), str(d / f"{i}.png"))


def test_imagefolder_loads_sorted_classes_and_caches(tmp_path):
    from bdframe_dataset_imagefolder.plugin import ImageFolder, ImageFolderConfig
    from torchvision.io import decode_image

    _write_tree(tmp_path / "ds")
    ds = ImageFolder(ImageFolderConfig(root=str(tmp_path / "ds")))
    train, test = ds.load()
    info = ds.describe()
    assert info.classes == ("ant", "cat", "dog") and info.num_classes == 3 and (info.height, info.width) == (8, 8)
    assert len(train) == 9 and train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(train.images[3], decode_image(str(tmp_path / "ds/train/cat/0.png")))
    assert info.mean != (0.5, 0.5, 0.5)  # computed from the training split
    train2, _ = ImageFolder(ImageFolderConfig(root=str(tmp_path / "ds"))).load()  # from the cache
    assert torch.equal(train.images, train2.images)


def test_imagefolder_resizes_and_reports_missing(tmp_path):
    from bdframe_dataset_imagefolder.plugin import ImageFolder, ImageFolderConfig

    _write_tree(tmp_path / "ds", size=12)
    train, _ = ImageFolder(ImageFolderConfig(root=str(tmp_path / "ds"), image_size=8)).load()
    assert train.images.shape == (9, 3, 8, 8)
    with pytest.raises(UserError, match="does not exist"):
        ImageFolder(ImageFolderConfig(root=str(tmp_path / "nothing"))).describe()


def _fake_cifar_archive(tmp_path):
    """A miniature CIFAR-10 python archive in the official layout, with its md5 sums."""
    import hashlib
    import tarfile

    import numpy as np

    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (src / name).write_bytes(pickle.dumps(batch))
    (src / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in src.iterdir()}
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src, arcname="cifar-10-batches-py")
    return tgz, md5, hashlib.md5(tgz.read_bytes()).hexdigest(), names


def test_cifar10_download_path_with_a_local_archive(tmp_path, monkeypatch):
    """The real download code path (torchvision's downloader), served from a loopback HTTP server."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import torchvision

    from bdframe_dataset_cifar.plugin import Cifar10, CifarConfig

    tgz, md5, tgz_md5, names = _fake_cifar_archive(tmp_path)
    C = torchvision.datasets.CIFAR10
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(C, "url", f"http://127.0.0.1:{server.server_address[1]}/{tgz.name}")
    monkeypatch.setattr(C, "tgz_md5", tgz_md5)
    monkeypatch.setattr(C, "train_list", [[n, md5[n]] for n in names[:5]])
    monkeypatch.setattr(C, "test_list", [[names[5], md5[names[5]]]])
    monkeypatch.setattr(C, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]})
    root = tmp_path / "data"
    with pytest.raises(UserError, match="set download = true"):
        Cifar10(CifarConfig(root=str(root))).load()
    train, test = Cifar10(CifarConfig(root=str(root), download=True)).load()
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 4
    assert train.labels.tolist()[:4] == [0, 1, 2, 3] and train.ids.tolist() == list(range(20))
    server.shutdown()
    server.server_close()
    train2, _ = Cifar10(CifarConfig(root=str(root))).load()  # now present: no download needed
    assert torch.equal(train.images, train2.images)


def test_synthetic_is_deterministic():
    from bdframe_dataset_synthetic.plugin import Synthetic, SyntheticConfig

    a, _ = Synthetic(SyntheticConfig(train_size=50, test_size=10)).load()
    b, _ = Synthetic(SyntheticConfig(train_size=50, test_size=10)).load()
    c, _ = Synthetic(SyntheticConfig(train_size=50, test_size=10, seed=1)).load()
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)

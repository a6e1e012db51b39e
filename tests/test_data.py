import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dkgm_aug import DataError
from dkgm_aug.data import (FASHION_MNIST_DIR, ImageDataset, digits, fashion_mnist, image_folder,
                           load_dataset, long_tailed_indices, npz)


def write_idx(path, array):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(raw / "t10k-images-idx3-ubyte.gz", imgs)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 9, 3]))
    ds = fashion_mnist(root=tmp_path, split="test")
    assert len(ds) == 5 and ds.classes[9] == "Ankle boot"
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 9
    assert torch.allclose(x[0], torch.from_numpy(imgs[3]).float() / 255)


def test_fashion_mnist_missing_names_install_command(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist(root=tmp_path)
    with pytest.raises(DataError, match="split"):
        fashion_mnist(split="val")


def test_truncated_idx(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 4, 4)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(2))
    data = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:-5])
    with pytest.raises(DataError, match="truncated"):
        fashion_mnist(root=tmp_path)


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed (make data installs it)")
def test_real_fashion_mnist():
    train, test = fashion_mnist(split="train"), fashion_mnist(split="test")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.images.shape[1:] == (1, 28, 28)
    assert torch.equal(torch.bincount(test.targets), torch.full((10,), 1000))


def test_digits_splits():
    all_ = digits()
    train, test = digits("train"), digits("test")
    assert len(all_) == 1797 and len(train) + len(test) == 1797
    assert all_.images.shape[1:] == (1, 8, 8) and all_.images.max() == 255
    assert set(torch.bincount(test.targets).tolist()) <= {35, 36, 37}   # 20% of each class
    assert torch.equal(digits("test").images, test.images)             # seeded


def test_npz_and_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.random((6, 5, 7)), labels=np.array(["b", "a"] * 3))
    ds = npz(tmp_path / "d.npz")
    assert ds.images.shape == (6, 1, 5, 7) and ds.classes == ["a", "b"] and ds.targets.tolist() == [1, 0] * 3
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="'images' and 'labels'"):
        npz(tmp_path / "bad.npz")
    from PIL import Image
    for cls in ("cat", "dog"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "folder" / cls / f"{i}.png")
    ds = image_folder(tmp_path / "folder", size=8)
    assert ds.images.shape == (4, 3, 8, 8) and ds.classes == ["cat", "dog"]
    assert load_dataset(tmp_path / "folder", channels=1).images.shape == (4, 1, 9, 9)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


def test_npz_images_take_the_one_uint8_or_float_rule(tmp_path):
    """Floats in [0, 1] are quantized as every other path does; [0, 255] floats, NaN and integer
    arrays other than uint8 (0/1 masks, int64 pixels) are refused with the file named, not guessed."""
    x = np.array([[[0.0, 0.5, 1.0, 0.25]]])
    np.savez(tmp_path / "ok.npz", images=x, labels=[0])
    assert npz(tmp_path / "ok.npz").images.flatten().tolist() == [0, 128, 255, 64]
    for name, images, message in (("wide", x * 255, "looks like a \\[0, 255\\] image"),
                                  ("nan", x * np.nan, "NaN"),
                                  ("ints", (x > 0.3).astype(np.int64), "uint8 or float")):
        np.savez(tmp_path / f"{name}.npz", images=images, labels=[0])
        with pytest.raises(DataError, match=f"{name}.npz: .*{message}"):
            npz(tmp_path / f"{name}.npz")


def test_image_dataset_validation():
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), [0, 1])
    with pytest.raises(DataError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), [0])


def test_long_tailed_profile():
    targets = torch.arange(10).repeat_interleave(500)
    idx = long_tailed_indices(targets, rho=100, seed=0)
    counts = torch.bincount(targets[idx]).tolist()
    assert counts == [round(500 * 100 ** (-c / 9)) for c in range(10)]
    assert counts[0] == 500 and counts[-1] == 5
    assert torch.equal(idx, long_tailed_indices(targets, rho=100, seed=0))
    assert not torch.equal(idx, long_tailed_indices(targets, rho=100, seed=1))
    with pytest.raises(DataError, match="rho"):
        long_tailed_indices(targets, rho=0.5)


def test_long_tailed_class_order_and_step_profile():
    targets = torch.arange(10).repeat_interleave(100)
    natural = torch.bincount(targets[long_tailed_indices(targets, rho=10)], minlength=10)
    rev = torch.bincount(targets[long_tailed_indices(targets, rho=10, order="reversed")], minlength=10)
    assert natural[0] == 100 and natural[9] == 10 and torch.equal(rev, natural.flip(0))
    perm = torch.bincount(targets[long_tailed_indices(targets, rho=10, order="perm:3")], minlength=10)
    assert sorted(perm.tolist()) == sorted(natural.tolist()) and not torch.equal(perm, natural)
    step = torch.bincount(targets[long_tailed_indices(targets, rho=10, profile="step")], minlength=10)
    assert step.tolist() == [100] * 5 + [10] * 5
    # the natural order is the default, and gives the same split as before orders existed
    assert torch.equal(long_tailed_indices(targets, 10, 0), long_tailed_indices(targets, 10, 0, order="natural"))
    for bad in (dict(order="sideways"), dict(order=[0, 1]), dict(profile="linear")):
        with pytest.raises(DataError):
            long_tailed_indices(targets, rho=10, **bad)


def test_wide_pil_modes_hidden_folders_and_empty_classes(tmp_path):
    """16-bit PNGs are scaled to 8 bits (PIL's convert clipped them to 255: all white); a hidden
    folder (.ipynb_checkpoints) is not a class (it became class 0 and shifted every label); an empty
    class folder is refused."""
    from PIL import Image
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    for name in ("cat", "dog"):
        (tmp_path / "root" / name).mkdir(parents=True)
        Image.fromarray(ramp).save(tmp_path / "root" / name / "a.png")
    (tmp_path / "root" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(ramp).save(tmp_path / "root" / ".ipynb_checkpoints" / "a.png")
    ds = image_folder(tmp_path / "root")
    assert ds.classes == ["cat", "dog"] and ds.targets.tolist() == [0, 1]
    assert torch.equal(ds.images[0, 0].long(), torch.from_numpy(np.round(ramp / 65535 * 255)).long())
    (tmp_path / "root" / "empty").mkdir()
    with pytest.raises(DataError, match="hold no images"):
        image_folder(tmp_path / "root")


def test_npz_refuses_channels_first_and_fractional_labels(tmp_path):
    """An N,C,H,W array was read as N,H,W,C (8 channels of 1x8 images); labels 0.9999999 were cut to 0."""
    np.savez(tmp_path / "chw.npz", images=np.zeros((4, 1, 8, 8), np.uint8), labels=np.arange(4))
    with pytest.raises(DataError, match="look like N,C,H,W"):
        npz(tmp_path / "chw.npz")
    np.savez(tmp_path / "lab.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0.0, 0.9999999, 2.0]))
    with pytest.raises(DataError, match="whole numbers"):
        npz(tmp_path / "lab.npz")
    np.savez(tmp_path / "ok.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0.0, 1.0, 2.0]))
    assert npz(tmp_path / "ok.npz").targets.tolist() == [0, 1, 2]


def test_subset_takes_a_boolean_mask_as_a_mask():
    ds = ImageDataset(torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous(),
                      torch.tensor([0, 1, 0, 1, 0, 1]))
    mask = ds.targets == 1
    assert ds.subset(mask).images[:, 0, 0, 0].tolist() == [1, 3, 5]       # it took items 0 and 1, six times
    with pytest.raises(DataError, match="one value per item"):
        ds.subset(mask[:3])


def test_long_tailed_split_refuses_empty_classes_and_warns_when_rho_is_not_met():
    t = torch.arange(10).repeat_interleave(20)
    with pytest.raises(DataError, match="keeps every class"):
        long_tailed_indices(t, 100)                       # 20 / 100 rounds to 0 images
    small_head = torch.tensor([0] * 100 + [1] * 40 + [2] * 100)
    with pytest.warns(UserWarning, match="imbalance ratio is 4"):
        long_tailed_indices(small_head, 10, order=[1, 0, 2])


def test_image_folder_finds_what_torchvision_finds_in_its_order(tmp_path):
    """Images in a class folder's subfolders, and .pgm/.ppm files, were skipped without a word
    (torchvision's ImageFolder reads them): a class lost images silently. Now the same images in
    torchvision's order (hidden subfolders skipped, as hidden class folders are)."""
    from PIL import Image
    from torchvision.datasets import ImageFolder
    files = ["cat/b.png", "cat/a.pgm", "cat/Sub/c.png", "cat/Sub/deeper/d.ppm", "dog/e.PNG", "dog/f.jpg.txt"]
    for v, f in enumerate(files):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        if f.endswith(".txt"):
            (tmp_path / f).write_text("not an image")
        else:
            Image.fromarray(np.full((4, 4), 10 * (v + 1), np.uint8)).save(tmp_path / f)
    (tmp_path / "cat" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "cat" / ".ipynb_checkpoints" / "b-checkpoint.png")
    ours = image_folder(tmp_path, channels=1)
    theirs = [s for s in ImageFolder(tmp_path).samples if ".ipynb_checkpoints" not in s[0]]
    want = [int(np.asarray(Image.open(p).convert("L"))[0, 0]) for p, _ in theirs]
    assert ours.images[:, 0, 0, 0].tolist() == want and len(want) == 5
    assert ours.targets.tolist() == [y for _, y in theirs]


def test_npz_labels_are_read_as_meant_or_refused(tmp_path):
    """Byte-string labels kept their b'...' repr as class names, integer strings were sorted as text
    ('10' before '2', so '2' became class 3), and negative, huge and complex labels were cast silently
    (a uint64 2**63 + 5 wrapped to a negative class); object arrays failed with numpy's error."""
    def load(labels, **kw):
        np.savez(tmp_path / "l.npz", images=np.zeros((len(labels), 4, 4), np.uint8), labels=np.asarray(labels, **kw))
        return npz(tmp_path / "l.npz")
    ds = load([b"cat", b"dog", b"ant"])
    assert ds.classes == ["ant", "cat", "dog"] and ds.targets.tolist() == [1, 2, 0]
    ds = load(["0", "2", "10", "9", " 1"])
    assert ds.targets.tolist() == [0, 2, 10, 9, 1] and ds.classes[2] == "2"
    assert load([True, False]).targets.tolist() == [1, 0]
    for labels, kw, match in (([-1, 0, 1], {}, "negative"), ([0, 2 ** 63 + 5], dict(dtype=np.uint64), "too large"),
                              ([0.0, 1e20], {}, "too large"), ([0j, 1 + 0j], {}, "complex"),
                              (["0", "-3"], {}, "negative")):
        with pytest.raises(DataError, match=f"l.npz: .*{match}"):
            load(labels, **kw)
    with pytest.raises(DataError, match="l.npz: .*not UTF-8"):
        load([b"caf\xe9", b"th\xe9"])
    np.savez(tmp_path / "o.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.array([{}, 1], dtype=object))
    with pytest.raises(DataError, match="o.npz: .*object"):
        npz(tmp_path / "o.npz")



def test_a_local_folder_named_like_a_bundled_dataset_is_not_silently_shadowed(tmp_path, monkeypatch):
    """`--data digits` with the user's own ./digits image folder loaded sklearn's digits with no word
    (checkpoints warn on the same collision); now it warns and says how to take the folder."""
    from dkgm_aug.data import load_dataset
    for cls in ("cat", "dog"):
        (tmp_path / "digits" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "digits" / cls / "a.png")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="pass './digits'"):
        assert len(load_dataset("digits")) > 1000
    assert load_dataset("./digits").classes == ["cat", "dog"]
    assert load_dataset(Path("digits")).classes == ["cat", "dog"]      # Path("./digits") is Path("digits")

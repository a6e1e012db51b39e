"""Datasets that work offline (docs/design.md, section 4), and long-tailed splits.

Every loader returns an :class:`ImageDataset`: uint8 images ``[N, C, H, W]`` kept
in memory (all our bundled sets are small), integer ``targets`` and ``classes``.
Items are ``(float CHW tensor in [0, 1], int label)``; this is the edge where
images enter the library.

>>> ds = load_dataset("digits")          # 1,797 8x8 images from scikit-learn
>>> x, y = ds[0]; x.shape, x.dtype
(torch.Size([1, 8, 8]), torch.float32)
"""
import gzip
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .images import check_not_binary, pil_8bit, tensor_unit, to_uint8

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DATASETS = ("fashion-mnist", "digits")


class ImageDataset(torch.utils.data.Dataset):
    """In-memory map-style dataset of uint8 images; items are ``(float [0,1] CHW, int)``."""

    def __init__(self, images: torch.Tensor, targets, classes=None, transform=None, description: str = ""):
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise DataError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        targets = torch.as_tensor(targets, dtype=torch.long).flatten()
        if len(targets) != len(images):
            raise DataError(f"{len(images)} images but {len(targets)} labels")
        check_not_binary(images)   # once, here: items are then read without it
        self.images, self.targets = images, targets
        n_classes = int(targets.max()) + 1 if len(targets) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
        self.transform, self.description = transform, description

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        x = tensor_unit(self.images[i], check=False)   # uint8, checked at construction
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])

    def subset(self, indices) -> "ImageDataset":
        """The items at ``indices`` (integers), or where a boolean mask of ``len(self)`` is True."""
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise DataError(f"a boolean mask must have one value per item ({len(self)}), got shape "
                                f"{tuple(idx.shape)}")
            idx = torch.nonzero(idx).flatten()
        idx = idx.long()
        return ImageDataset(self.images[idx], self.targets[idx], self.classes, self.transform, self.description)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    # Accept the Debian layout (root/*.gz) and torchvision's (root/FashionMNIST/raw/*).
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def stored_tensors(ds):
    """``(images, targets)``: the tensors a dataset holds (``images`` and ``targets``, an
    :class:`ImageDataset` or the like), when its items are exactly them, that is when it has no
    ``transform``; else None, and the caller reads the items (a transform set on the dataset
    changes what it serves: reading ``images`` directly would score or store other images)."""
    images, targets = getattr(ds, "images", None), getattr(ds, "targets", None)
    if not isinstance(images, torch.Tensor) or targets is None or getattr(ds, "transform", None) is not None:
        return None
    return images, targets


def fashion_mnist(root=None, split: str = "train", transform=None) -> ImageDataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 gray) from Debian's
    ``dataset-fashion-mnist`` package, or a ``root`` in torchvision's layout."""
    if split not in _FASHION_FILES:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else Path(os.environ.get("DKGM_FASHION_MNIST", FASHION_MNIST_DIR))
    paths = [_find(root, stem) for stem in _FASHION_FILES[split]]
    if None in paths:
        raise DataError(f"Fashion-MNIST not found under {root}. Install it with "
                        "`sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist`, or pass "
                        "root= a folder holding train-images-idx3-ubyte(.gz) etc. (torchvision layout works)")
    images, labels = (_read_idx(p) for p in paths)
    return ImageDataset(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)),
                        FASHION_MNIST_CLASSES, transform, f"Fashion-MNIST {split} ({root})")


def digits(split: str = "all", transform=None, test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """scikit-learn's 8x8 digits (1,797 images, 16 gray levels). ``split`` is ``"all"``, or a
    seeded stratified ``"train"``/``"test"`` split with ``test_fraction`` of each class held out."""
    from sklearn.datasets import load_digits
    if split not in ("all", "train", "test"):
        raise DataError(f"split must be 'all', 'train' or 'test', got {split!r}")
    d = load_digits()
    images = to_uint8(torch.from_numpy(d.images / 16.0))[:, None]    # 16 gray levels (0..16) to 0..255
    targets = torch.from_numpy(d.target.astype(np.int64))
    ds = ImageDataset(images, targets, [str(i) for i in range(10)], transform, f"sklearn digits {split}")
    if split == "all":
        return ds
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(targets), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: round(test_fraction * len(idx))]] = True
    return ds.subset(torch.nonzero(test if split == "test" else ~test).flatten())


def npz(path, transform=None) -> ImageDataset:
    """An ``.npz`` with ``images`` (``N,H,W`` or ``N,H,W,C``; uint8, or floats in [0, 1]) and ``labels``:
    class indices (integers >= 0, whole floats, integer strings) or class names (strings, bytes)."""
    with np.load(path, allow_pickle=False) as f:
        if "images" not in f or "labels" not in f:
            raise DataError(f"{path} must hold arrays 'images' and 'labels', found {list(f.keys())}")
        images = f["images"]
        try:
            labels = f["labels"]
        except ValueError as exc:        # an object array: numpy will not unpickle it
            raise DataError(f"{path}: labels are an object array ({exc}); store class indices (integers) or "
                            "strings") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f"{path}: images must be N,H,W or N,H,W,C, got shape {images.shape}")
    if images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
        raise DataError(f"{path}: images of shape {images.shape} look like N,C,H,W; an .npz holds N,H,W,C "
                        "(np.transpose(images, (0, 2, 3, 1)))")
    classes, labels = _npz_labels(path, labels)
    if images.dtype != np.uint8:   # the one uint8-or-float rule and range check, then quantized
        try:
            images = to_uint8(tensor_unit(torch.from_numpy(images))).numpy()
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                        torch.from_numpy(labels.astype(np.int64)),
                        None if classes is None else [str(c) for c in classes], transform, f"npz {path}")


LABEL_MAX = 2 ** 31 - 1


def _npz_labels(path, labels: np.ndarray):
    """``(class names or None, int64 labels)`` of an ``.npz``: integers (or whole floats, bools) as
    class indices; strings (bytes decoded) as class names in sorted order, unless every one is an
    integer, which is then the class index; negative, too large and complex labels refused."""
    if labels.dtype.kind == "S":
        try:
            labels = np.char.decode(labels, "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: byte-string labels that are not UTF-8 ({exc.reason} at byte {exc.start}); "
                            "store them as str (numpy dtype U) or as class indices") from None
    if labels.dtype.kind == "U":
        if not all(re.fullmatch(r"\s*[+-]?\d+\s*", v) for v in labels.reshape(-1).tolist()):
            classes, codes = np.unique(labels, return_inverse=True)
            return [str(c) for c in classes], codes.astype(np.int64)
        labels = np.array([int(v) for v in labels.reshape(-1).tolist()], dtype=object).reshape(labels.shape)
    if labels.dtype.kind == "c":
        raise DataError(f"{path}: labels are complex numbers ({labels.dtype}); store class indices (integers)")
    if labels.dtype.kind not in "biufO":
        raise DataError(f"{path}: labels of dtype {labels.dtype} are not class indices or names")
    if labels.dtype.kind == "f" and not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
        raise DataError(f"{path}: float labels must be whole numbers (class indices), got values such as "
                        f"{labels[~(np.isfinite(labels) & (labels == np.round(labels)))][:3].tolist()}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: negative labels such as {labels[labels < 0][:3].tolist()}: class indices start "
                        "at 0 (drop unlabelled items, or give them a class)")
    if labels.size and labels.max() > LABEL_MAX:
        raise DataError(f"{path}: labels too large for class indices (up to {LABEL_MAX}), such as "
                        f"{labels[labels > LABEL_MAX][:3].tolist()}")
    return None, labels.astype(np.int64)


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}


def _class_files(folder: Path) -> list:
    """A class folder's images in torchvision's ImageFolder order: its subfolders too (walked in
    sorted order, each folder's files sorted; hidden subfolders skipped, as hidden class folders are),
    by torchvision's extensions (and .gif)."""
    found = []
    for here, dirs, names in sorted(os.walk(folder, followlinks=True)):
        if any(part.startswith(".") for part in Path(here).relative_to(folder).parts):
            continue
        found += [Path(here) / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def image_folder(root, size=None, channels: int | None = None, transform=None) -> ImageDataset:
    """Images in ``root/<class>/**/*.png|jpg|...`` (torchvision's ImageFolder layout and order), resized
    to ``size`` (int or (H, W)) when given; ``channels`` 1 or 3 converts the mode."""
    from PIL import Image
    root = Path(root)
    # class folders as torchvision's ImageFolder finds them: hidden ones (.ipynb_checkpoints) are not classes
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if root.is_dir() else []
    files = [(p, c) for c, name in enumerate(classes) for p in _class_files(root / name)]
    if not files:
        raise DataError(f"no images found under {root}/<class>/; expected torchvision ImageFolder layout")
    empty = [name for c, name in enumerate(classes) if not any(fc == c for _, fc in files)]
    if empty:
        raise DataError(f"class folder(s) {empty[:5]} under {root} hold no images: every class needs one "
                        "(remove the folder, or it would shift the labels of the classes after it)")
    arrays = []
    for p, _ in files:
        with Image.open(p) as im:
            im = pil_8bit(im, str(p))
            im = im.convert({1: "L", 3: "RGB", None: "RGB" if im.mode not in ("L", "1") else "L"}[channels])
            if size is not None:
                im = im.resize((size, size) if isinstance(size, int) else tuple(size)[::-1])
            arrays.append(np.asarray(im))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"images under {root} have different sizes {sorted(shapes)[:3]}...; pass size=")
    images = np.stack(arrays)
    images = images[..., None] if images.ndim == 3 else images
    return ImageDataset(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                        [c for _, c in files], classes, transform, f"image folder {root}")


def load_dataset(name_or_path, split: str | None = None, **kwargs) -> ImageDataset:
    """``"fashion-mnist"`` or ``"digits"`` (``split`` defaults to ``"train"``), a ``.npz`` file or an
    image folder (each holds one split: give the file or folder of the split you want); a
    ``pathlib.Path`` is always a path, even one named like a bundled dataset."""
    text = os.fspath(name_or_path)
    bundled = text in DATASETS and not isinstance(name_or_path, os.PathLike)   # a Path is always a path
    if bundled and Path(text).exists():
        warnings.warn(f"{text!r} is both a bundled dataset and a path here; loading the bundled one. For the "
                      f"file or folder pass './{text}' (or a pathlib.Path)", stacklevel=2)
    if bundled and text == "fashion-mnist":
        return fashion_mnist(split=split or "train", **kwargs)
    if bundled and text == "digits":
        return digits(split=split or "train", **kwargs)
    path = Path(text)
    if not ((path.suffix == ".npz" and path.is_file()) or path.is_dir()):
        raise DataError(f"unknown dataset {text!r}: use one of {DATASETS}, a .npz file or an image folder")
    if split is not None:
        raise DataError(f"{text} holds one split, so split={split!r} (--split) cannot select one; splits are for "
                        f"{DATASETS}: give the .npz file or image folder of the split you want")
    return npz(path, **kwargs) if path.is_file() else image_folder(path, **kwargs)


PROFILES = ("exp", "step")


def stratified_holdout(targets, fraction: float, seed: int, at_least_one: bool = False):
    """``(kept indices, held-out indices)``: ``round(fraction * n_c)`` items of each class ``c`` held
    out, chosen by a seeded permutation; with ``at_least_one``, at least one per class and never a
    class's last item."""
    targets = torch.as_tensor(targets).flatten()
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(targets), dtype=torch.bool)
    for c in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == c).flatten()
        n = round(fraction * len(idx))
        if at_least_one:
            n = min(len(idx) - 1, max(1, n))
        held[idx[torch.randperm(len(idx), generator=g)[:n]]] = True
    return torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()


def class_order(classes, order) -> list:
    """Classes from head to tail: ``None``/``"natural"`` (sorted), ``"reversed"``, ``"perm:<seed>"``
    (a seeded permutation), or an explicit list holding every class once."""
    classes = sorted(classes)
    if order is None or order == "natural":
        return classes
    if order == "reversed":
        return classes[::-1]
    if isinstance(order, str) and order.startswith("perm:") and order[5:].isdigit():
        g = torch.Generator().manual_seed(int(order[5:]))
        return [classes[i] for i in torch.randperm(len(classes), generator=g).tolist()]
    if isinstance(order, (list, tuple)) and sorted(order) == classes:
        return list(order)
    raise DataError(f"class order must be 'natural', 'reversed', 'perm:<seed>' or a list of every class "
                    f"{classes} once, got {order!r}")


def long_tailed_indices(targets, rho: float, seed: int = 0, order=None, profile: str = "exp") -> torch.Tensor:
    """Indices of a long-tailed subset. ``profile="exp"`` is CIFAR-10-LT's: the class of rank ``r``
    in ``order`` (see :func:`class_order`; rank 0 is the head) keeps ``round(n_max * rho ** (-r / (C - 1)))``
    images; ``"step"`` keeps ``n_max`` for the first half of the classes and ``round(n_max / rho)`` for
    the rest (``C // 2`` head classes). ``n_max`` is the size of the largest class, and a class smaller
    than its planned count keeps all its images; which images stay is a seeded permutation. Refused: a
    class planned to keep no image. Warned: a class short of its planned count by more than 10%, and
    a class that keeps more images than the one ranked before it where the profile plans fewer."""
    targets = torch.as_tensor(targets).flatten()
    if rho < 1:
        raise DataError(f"imbalance ratio rho must be >= 1, got {rho}")
    if profile not in PROFILES:
        raise DataError(f"profile must be one of {PROFILES}, got {profile!r}")
    classes = class_order(torch.unique(targets).tolist(), order)
    counts = torch.bincount(targets)
    n_max, n_cls = int(counts.max()), len(classes)
    g = torch.Generator().manual_seed(seed)
    keep, planned = {}, {}
    for c in sorted(classes):            # draw in label order, so the order changes counts, not draws
        rank = classes.index(c)
        if profile == "step":
            n = n_max if rank < n_cls // 2 else round(n_max / rho)
        else:
            n = round(n_max * rho ** (-rank / (n_cls - 1))) if n_cls > 1 else n_max
        planned[c] = n
        if n < 1:
            raise DataError(f"rho={rho:g} leaves class {c!r} (rank {rank}) with {n} images out of n_max={n_max}: "
                            f"a long-tailed split keeps every class; use rho <= {n_max:g}")
        idx = torch.nonzero(targets == c).flatten()
        keep[c] = idx[torch.randperm(len(idx), generator=g)[: min(n, len(idx))]]
    kept = [len(keep[c]) for c in classes]             # head to tail
    short = [c for c in classes if len(keep[c]) < 0.9 * planned[c]]
    if short:
        warnings.warn(f"class(es) {short[:5]} hold fewer than 90% of the images their rank plans (e.g. class "
                      f"{short[0]!r}: {len(keep[short[0]])} of {planned[short[0]]}): the split's imbalance ratio is "
                      f"{max(kept) / min(kept):.3g}, not {rho:g}; put larger classes first (order=)", stacklevel=2)
    for r in range(1, n_cls):
        if kept[r] > kept[r - 1] and planned[classes[r]] < planned[classes[r - 1]]:
            warnings.warn(f"class {classes[r - 1]!r} (rank {r - 1}) has only {kept[r - 1]} images, fewer than the "
                          f"{kept[r]} that class {classes[r]!r} keeps at rank {r}: the split is not long-tailed in "
                          "this class order; put larger classes first (order=) or raise rho", stacklevel=2)
            break
    return torch.cat(list(keep.values())).sort().values

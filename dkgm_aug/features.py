"""A small CNN classifier whose penultimate layer is our feature space for Frechet distances.

We call the result "Frechet distance in our classifier's feature space", never FID: FID
means Inception-v3 features, and its numbers are not comparable with ours.

    net = train_feature_net(fashion_mnist(split="train"), epochs=2, seed=0)
    save_feature_net(net, "featurenet.safetensors")
    f_real = features(net, real01)                      # [N, 128]
    frechet_distance(f_real, features(net, fake01))     # dkgm_aug.metrics

Architecture (``width`` w, default 32; any input size via adaptive pooling)::

    [Conv3x3 -> BN -> ReLU](w) -> MaxPool2 -> [..](2w) -> MaxPool2 -> [..](4w)
    -> AdaptiveAvgPool2d(1) -> Linear(4w, feature_dim) -> ReLU   (the features)
    -> Linear(feature_dim, n_classes)                              (the logits)

Images enter in [0, 1] and are mapped to [-1, 1] inside. Weights are stored with
safetensors (the config in its metadata); nothing is unpickled.
"""
import contextlib
import json
import math
import numbers
import time

import torch
from torch import nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import FORMATS, read_tensors, write_tensors
from .data import stored_tensors
from .errors import CheckpointError, DataError
from .images import tensor_unit, to_model, to_unit_float
from .metrics import frechet_distance, sharpness
from .nn import evaluating

METADATA_KEY = FORMATS["feature-net"].key


def _block(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FeatureNet(nn.Module):
    """Small CNN classifier; :meth:`features` is its penultimate layer."""

    def __init__(self, channels: int = 1, n_classes: int = 10, width: int = 32, feature_dim: int = 128,
                 info: dict | None = None):
        super().__init__()
        for name, v in dict(channels=channels, n_classes=n_classes, width=width, feature_dim=feature_dim).items():
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= 4096:
                raise DataError(f"FeatureNet {name} must be an integer in [1, 4096], got {v!r}")
        self.channels, self.n_classes, self.width, self.feature_dim = channels, n_classes, width, feature_dim
        self.info = dict(info or {})
        w = width
        self.body = nn.Sequential(*_block(channels, w), nn.MaxPool2d(2), *_block(w, 2 * w), nn.MaxPool2d(2),
                                  *_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * w, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, n_classes)

    def config(self) -> dict:
        return dict(channels=self.channels, n_classes=self.n_classes, width=self.width,
                    feature_dim=self.feature_dim, info=self.info)

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        return self.body(to_model(x01))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x01))


def _images_and_labels(dataset):
    """``(uint8 or float images [N, C, H, W], long labels [N])`` from an ImageDataset-like
    object (``images`` and ``targets`` tensors, no ``transform``) or any map-style ``(image, label)``
    dataset, read item by item (so through its transform, once: a random transform gives one view of
    each image for every epoch of :func:`train_feature_net`, which adds its own shift and flip)."""
    stored = stored_tensors(dataset)
    if stored is not None:
        return stored[0], torch.as_tensor(stored[1], dtype=torch.long)
    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        raise DataError("the dataset is empty")
    with _for_the_evaluator():
        images = torch.stack([to_unit_float(x) for x, *_ in items])
    return (images,
            torch.as_tensor([int(y) for _, y, *_ in items], dtype=torch.long))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] for the evaluator, range-checked: [-1, 1] images (a generator's sample()) were
    scored without a word."""
    with _for_the_evaluator():
        return tensor_unit(x)


@contextlib.contextmanager
def _for_the_evaluator():
    """A range error re-raised as the evaluator's (the shared hint speaks of DKGMAugment)."""
    try:
        yield
    except DataError as exc:
        if "must be in [0, 1]" not in str(exc):    # NaN, binary masks...: their own message says it
            raise
        raise DataError(f"the evaluator takes images in [0, 1] (uint8 or float): {exc}. A dataset whose transform "
                        "normalizes its images: score it without that transform") from None


def _shift_flip(x: torch.Tensor, g: torch.Generator, shift: int, flip: bool) -> torch.Tensor:
    """A random translation by up to ``shift`` pixels (zero padded) per image, and a random
    horizontal flip when ``flip``: the standard light augmentation for small-image classifiers."""
    if shift:
        h, w = x.shape[-2:]
        padded = F.pad(x, (shift, shift, shift, shift))
        dy, dx = torch.randint(0, 2 * shift + 1, (2, len(x)), generator=g).tolist()
        x = torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])
    if flip:
        mirror = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


def train_feature_net(dataset, epochs: int = 2, seed: int = 0, batch_size: int = 128, lr: float = 1e-3,
                      width: int = 32, feature_dim: int = 128, device=None, progress: bool = True,
                      max_batches: int | None = None, weight_decay: float = 0.0, cosine: bool = False,
                      shift: int = 0, flip: bool = False, on_epoch=None) -> FeatureNet:
    """Train a :class:`FeatureNet` (AdamW, cross-entropy) on ``dataset`` (an ImageDataset or any
    ``(image, label)`` dataset with integer labels). Initialisation, batch order and augmentation
    come from ``seed``. ``cosine`` anneals the learning rate to 0 over the run; ``shift``/``flip``
    augment each batch (:func:`_shift_flip`). ``on_epoch(epoch, net)`` is called after each epoch
    (in eval mode), e.g. to log a validation accuracy. Returns the net in eval mode, its run in
    ``net.info["training"]``."""
    images, labels = _images_and_labels(dataset)
    if labels.min() < 0:
        raise DataError("labels must be class indices >= 0")
    torch.manual_seed(seed)
    net = FeatureNet(images.shape[1], int(labels.max()) + 1, width, feature_dim).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n_batches = math.ceil(len(images) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * n_batches) if cosine else None
    start, net_device = time.perf_counter(), next(net.parameters()).device
    with tqdm(total=epochs * n_batches, desc="FeatureNet", disable=not progress) as bar:
        for epoch in range(epochs):
            net.train()
            perm = torch.randperm(len(images), generator=g)
            for b in range(n_batches):
                idx = perm[b * batch_size:(b + 1) * batch_size]
                x = _shift_flip(_unit(images[idx]), g, shift, flip)
                loss = F.cross_entropy(net(x.to(net_device)), labels[idx].to(net_device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}")
            net.eval()
            if on_epoch is not None:
                on_epoch(epoch + 1, net)
    net.eval()
    net.info["training"] = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, n_images=len(images),
                                batches_per_epoch=n_batches, weight_decay=weight_decay, cosine=cosine,
                                shift=shift, flip=flip, wall_time_s=round(time.perf_counter() - start, 3))
    return net


@torch.inference_mode()
def features(net: FeatureNet, images01: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate-layer features ``[N, feature_dim]`` (float32, CPU) of images ``[N, C, H, W]``
    in [0, 1] (uint8 is divided by 255), computed in eval mode."""
    if not isinstance(images01, torch.Tensor) or images01.ndim != 4 or images01.shape[1] != net.channels:
        raise DataError(f"features takes [N, {net.channels}, H, W] images, got "
                        f"{getattr(images01, 'shape', type(images01).__name__)}")
    with evaluating(net):
        device = next(net.parameters()).device
        out = [net.features(_unit(images01[i:i + batch_size]).to(device)).float().cpu()
               for i in range(0, len(images01), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, net.feature_dim)


@torch.inference_mode()
def accuracy(net: FeatureNet, dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``net`` on ``dataset`` (what the feature space is worth)."""
    images, labels = _images_and_labels(dataset)
    with evaluating(net):
        device = next(net.parameters()).device
        hits = sum(int((net(_unit(images[i:i + batch_size]).to(device)).argmax(1).cpu()
                        == labels[i:i + batch_size]).sum()) for i in range(0, len(images), batch_size))
    return hits / len(images)


def save_feature_net(net: FeatureNet, path) -> None:
    """Write ``net`` to a safetensors file (config in the metadata), atomically."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    write_tensors(path, tensors, {METADATA_KEY: json.dumps(net.config())}, "feature-net")


def load_feature_net(path, device=None) -> FeatureNet:
    """Read a net written by :func:`save_feature_net`; returns it in eval mode. A file of another
    format raises a FormatError naming both (a CheckpointError, as every unreadable file does)."""
    meta, state = read_tensors(path, "feature-net")
    try:
        with torch.random.fork_rng(devices=[]):   # the init is overwritten: leave the caller's random stream
            net = FeatureNet(**json.loads(meta[METADATA_KEY]))
        net.load_state_dict(state)
    except Exception as exc:   # json / config / shape mismatches
        raise CheckpointError(f"{path}: not a valid FeatureNet file ({type(exc).__name__}: {exc})") from None
    return net.to(device).eval() if device is not None else net.eval()


@torch.inference_mode()
def neighbour_quality(net: FeatureNet, images01: torch.Tensor, labels: torch.Tensor, ref_features) -> dict:
    """The yardstick's scores of images ``[N, C, H, W]`` in [0, 1] made from sources with
    ``labels``: sharpness, Frechet distance to ``ref_features`` (real images' features from the
    same ``net``), and label preservation (share that ``net`` assigns to their source's class)."""
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images01),):   # [N, 1] broadcast to [N, N]: a wrong share, silently
        raise DataError(f"labels must be 1-D, one per image ({len(images01)}), got shape {tuple(labels.shape)}")
    f = features(net, images01)
    logits = net.head(f)
    n_classes = logits.shape[1]
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        bad = sorted({int(v) for v in labels.tolist() if not 0 <= v < n_classes})
        raise DataError(f"labels {bad[:5]}{'...' if len(bad) > 5 else ''} are not classes of the evaluator "
                        f"({n_classes} classes, indices 0..{n_classes - 1}): give the labels as its class indices")
    kept = (logits.argmax(1) == labels.to(f.device)).double().mean()
    return dict(sharpness=sharpness(images01), frechet_distance=frechet_distance(f, ref_features),
                label_preservation=float(kept))

"""Bad-input rows of the class-conditional option: labels missing, of the wrong kind or out of
range, and data without labels for a conditional trainer."""
import torch

from dkgm_aug import DataError, DKGMAugment, Trainer
from conftest import micro_model, shapes_batch


def _conditional():
    return micro_model(image_size=8).with_labels(3, stages=(1,))


def rows(ckpt, model, tmp):
    x = shapes_batch(2, size=8) * 2 - 1
    return [
        ("conditional generator: no labels", lambda: _conditional().sample(x), (DataError, "class-conditional")),
        ("conditional generator: label out of range", lambda: _conditional().sample(x, labels=[0, 3]),
         (DataError, "[0, 3)")),
        ("conditional generator: float labels", lambda: _conditional().sample(x, labels=[0.0, 1.0]),
         (DataError, "integer")),
        ("conditional generator: image without a label (transform)",
         lambda: DKGMAugment(_conditional(), seed=0)(shapes_batch(2, size=8)), (DataError, "label")),
        ("conditional trainer: images without labels",
         lambda: Trainer(_conditional(), shapes_batch(4, size=8), out_dir=f"{tmp}/cond", max_steps=1, progress=False),
         (DataError, "label")),
        ("trainer: float images in [0, 255]",
         lambda: Trainer(micro_model(image_size=8), shapes_batch(4, size=8) * 255, out_dir=f"{tmp}/t255",
                         max_steps=1, progress=False), (DataError, "[0, 1]")),
    ]

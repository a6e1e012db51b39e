"""Bad-input rows for the transforms (DKGMAugment and its albumentations twin); see bad_inputs.py."""
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

import dkgm_aug.albumentations as dalb
from dkgm_aug import DataError, DKGMAugment, DKGMError


def _evae8():
    from dkgm_aug import EVAE
    torch.manual_seed(0)
    return EVAE(channels=1, image_size=8, d_z=3, widths=(4, 4, 8, 8)).eval()


def _mask_kept(ckpt):
    mask = tv_tensors.Mask(torch.tensor([[[0, 1], [1, 0]]]).repeat(1, 4, 4))
    _, out = v2.Compose([DKGMAugment(ckpt, seed=0)])(tv_tensors.Image(torch.rand(1, 8, 8)), mask)
    return out is mask


def _boxes_kept(ckpt):
    boxes = tv_tensors.BoundingBoxes([[0, 0, 4, 4]], format="XYXY", canvas_size=(8, 8))
    out = DKGMAugment(ckpt, seed=0)({"image": tv_tensors.Image(torch.rand(1, 8, 8)), "boxes": boxes, "label": 1})
    return out["boxes"] is boxes


def _album(ckpt, img, p):
    import albumentations as A
    return A.Compose([dalb.DKGMAugment(ckpt, p=p)], seed=0)(image=img)["image"]


def _bicubic(x):
    return v2.Resize((16, 16), interpolation=v2.InterpolationMode.BICUBIC)(x)


class NoNetworks(torch.nn.Module):
    """A generator with no child modules: nothing for compile=True to compile."""
    channels = 1

    def neighbours_from_seeds(self, x, seeds, *, labels=None, alpha=None, steps=None):
        return x


def rows(ckpt, model, tmp):
    aug = DKGMAugment(ckpt, seed=0)
    nan = torch.full((1, 8, 8), float("nan"))
    table = [
        ("mask next to an image (transform)", lambda: _mask_kept(ckpt),
         "ok: the image is augmented, the tv_tensors.Mask passes through as is"),
        ("bounding boxes in a sample dict (transform)", lambda: _boxes_kept(ckpt),
         "ok: the image is augmented, BoundingBoxes and the label pass through as is"),
        ("tv_tensors.Video (transform)", lambda: aug(tv_tensors.Video(torch.rand(2, 1, 8, 8))), (DataError, "Video")),
        ("float image in [0, 255] (transform)", lambda: aug(torch.rand(1, 8, 8) * 255), (DataError, "divide by 255")),
        ("float image on a 0 .. 16 scale, as sklearn's digits (transform)", lambda: aug(torch.rand(1, 8, 8) * 16),
         (DataError, "divide by the scale's maximum (16 there")),
        ("float image in [0, 255] (albumentations)", lambda: _album(ckpt, np.full((8, 8), 200, np.float32), 1.0),
         (DataError, "divide by 255")),
        ("normalized image, after Normalize (transform)",
         lambda: aug(v2.Normalize([0.1307], [0.3081])(torch.rand(1, 8, 8))), (DataError, "before Normalize")),
        ("image in [-1, 1] (transform)", lambda: aug(torch.rand(1, 8, 8) * 2 - 1), (DataError, "(x + 1) / 2")),
        ("float image 1e-4 outside [0, 1] (transform)", lambda: float(aug(torch.full((1, 8, 8), 1.0001)).max()) <= 1,
         "ok: within 1e-3 of [0, 1] is rounding (a bilinear Resize's); clamped"),
        ("bicubic-resized float image (transform)", lambda: aug(_bicubic((torch.rand(1, 8, 8) > 0.5).float())),
         (DataError, "bicubic")),
        ("NaN image at p=0 (transform)", lambda: DKGMAugment(ckpt, p=0.0)(nan), (DataError, "NaN or inf")),
        ("NaN image at p=0 (albumentations)", lambda: _album(ckpt, nan[0].numpy(), 0.0), (DataError, "NaN or inf")),
        ("one NaN image in a batch at p=0.5 (transform)",
         lambda: DKGMAugment(ckpt, p=0.5, seed=1)(torch.cat([torch.rand(3, 1, 8, 8), nan[None]])),
         (DataError, "NaN or inf")),
        ("2048x2048 image into an 8x8 generator (transform)", lambda: aug(torch.rand(1, 2048, 2048)),
         (DataError, "resize first")),
        ("steps=10**6 (transform)", lambda: DKGMAugment(ckpt, steps=10 ** 6),
         (DKGMError, "steps must be an integer in [0, 1000]")),
        ("steps=10**6 (albumentations)", lambda: dalb.DKGMAugment(ckpt, steps=10 ** 6), (DKGMError, "steps")),
        ("alpha=1e30 (transform)", lambda: DKGMAugment(ckpt, alpha=1e30),
         (DKGMError, "alpha must be a number in [0.0, 10.0]")),
        ("alpha=1e30 (albumentations)", lambda: dalb.DKGMAugment(ckpt, alpha=1e30), (DKGMError, "alpha")),
        ("seed=2**70 (transform)", lambda: DKGMAugment(ckpt, seed=2 ** 70),
         (DKGMError, "seed must be an integer in [0, 2**63)")),
        ("HWC tensor (28, 28, 1) (transform)", lambda: aug(torch.rand(28, 28, 1)), (DataError, "looks like HWC")),
        ("albumentations to_dict of a transform built from a model object",
         lambda: __import__("albumentations").to_dict(dalb.DKGMAugment(model)), (DKGMError, "model object")),
        ("dtype=torch.float16 on the CPU (transform)", lambda: DKGMAugment(ckpt, dtype=torch.float16),
         (DKGMError, "runs on CUDA only")),
        ("dtype=torch.bfloat16 (transform)", lambda: DKGMAugment(ckpt, dtype=torch.bfloat16),
         (DKGMError, "dtype must be None, torch.float32 or torch.float16")),
        ("dtype='fp16', a string (transform)", lambda: DKGMAugment(ckpt, dtype="fp16"),
         (DKGMError, "dtype must be None, torch.float32 or torch.float16")),
        ("compile='yes' (transform)", lambda: DKGMAugment(ckpt, compile="yes"),
         (DKGMError, "compile must be True or False")),
        ("compile=True, a generator without networks (transform)",
         lambda: DKGMAugment(NoNetworks(), compile=True)(torch.rand(1, 8, 8)), (DKGMError, "no networks")),
        ("an EVAE given images of another size than it was trained on (transform)",
         lambda: DKGMAugment(_evae8(), p=1.0, seed=0)(torch.rand(1, 10, 10)),
         (DataError, "was trained on 8x8 images and generates at that size only")),
        ("steps= given to an EVAE, which has no stage 2 (transform)",
         lambda: DKGMAugment(_evae8(), p=1.0, seed=0, steps=3)(torch.rand(1, 8, 8)),
         (DKGMError, "an EVAE or VAE has none, and would ignore them")),
    ]
    if not torch.cuda.is_available():
        table.append(("device='cuda' on a machine without CUDA (transform)", lambda: DKGMAugment(ckpt, device="cuda"),
                      (DKGMError, "CUDA is not available")))
    return table

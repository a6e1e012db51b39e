"""The networks of :mod:`dkgm_aug.vae`'s EVAE and VAE, and their image geometry.

Both models share the encoder and decoder of the paper's Appendix C (MNIST / Fashion-MNIST,
32x32 input, 4x4 kernels)::

    encoder: x -> [Conv 4x4 stride 2 -> BatchNorm -> ReLU] x 4 (32, 64, 128, 256 channels)
               -> AdaptiveAvgPool2d(1) -> two Linear(256, d_z) heads
    decoder: z -> Linear(d_z, 256) -> (256 x 1 x 1)
               -> ConvT 4x4 stride 1 (128) -> BN -> ReLU        1 -> 4
               -> ConvT 4x4 stride 2 (64)  -> BN -> ReLU        4 -> 8
               -> ConvT 4x4 stride 2 (32)  -> BN -> ReLU        8 -> 16
               -> ConvT 4x4 stride 2 (C)   -> Sigmoid          16 -> 32

``C`` is the number of image channels (1 for gray). Images that are not 32x32 go in and
out through a fixed geometry: images no larger than 32x32 are zero-padded (black, in
[0, 1] units) to 32x32, centred, and the decoder's output is cropped back (28x28
Fashion-MNIST: 2 pixels on each side); larger images are resized to 32x32 (bilinear,
antialiased) and the output resized back. The paper resizes 28x28 to 32x32 instead; we
pad so that the reconstruction loss is taken on the image's own pixels only.
"""
import torch
from torch import nn
import torch.nn.functional as F

WIDTHS = (32, 64, 128, 256)   # Appendix C channel counts
SIDE = 32                     # the networks' input and output size


def to32(x: torch.Tensor) -> torch.Tensor:
    """Images ``[B, C, H, W]`` (in [0, 1]) to the networks' 32x32 geometry: centred
    zero-padding when both sides are at most 32, else a bilinear (antialiased) resize."""
    h, w = x.shape[-2:]
    if h <= SIDE and w <= SIDE:
        top, left = (SIDE - h) // 2, (SIDE - w) // 2
        return F.pad(x, (left, SIDE - w - left, top, SIDE - h - top))
    return F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)


def from32(y: torch.Tensor, size) -> torch.Tensor:
    """The inverse geometry of :func:`to32`: crop the centre back to ``size`` or resize to it."""
    h, w = size
    if h <= SIDE and w <= SIDE:
        top, left = (SIDE - h) // 2, (SIDE - w) // 2
        return y[..., top:top + h, left:left + w]
    return F.interpolate(y, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


class Encoder(nn.Module):
    """Appendix C encoder: four stride-2 4x4 convolutions with BatchNorm and ReLU,
    adaptive average pooling and two linear heads (``[B, d_z]`` each, raw)."""

    def __init__(self, channels: int, d_z: int, widths=WIDTHS):
        super().__init__()
        layers, c = [], channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head_mu = nn.Linear(c, d_z)
        self.head_spread = nn.Linear(c, d_z)

    def forward(self, x32):
        h = self.body(x32)
        return self.head_mu(h), self.head_spread(h)


class Decoder(nn.Module):
    """Appendix C decoder: linear to ``widths[-1] x 1 x 1``, then transposed convolutions
    1 -> 4 -> 8 -> 16 -> 32; returns logits (the Sigmoid is applied by the caller)."""

    def __init__(self, channels: int, d_z: int, widths=WIDTHS):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.fc = nn.Linear(d_z, w4)
        self.body = nn.Sequential(
            nn.ConvTranspose2d(w4, w3, 4, 1, 0), nn.BatchNorm2d(w3), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w3, w2, 4, 2, 1), nn.BatchNorm2d(w2), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w2, w1, 4, 2, 1), nn.BatchNorm2d(w1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w1, channels, 4, 2, 1))

    def forward(self, z):
        return self.body(self.fc(z)[:, :, None, None])

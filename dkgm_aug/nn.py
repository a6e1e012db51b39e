"""Layers shared by the U-Nets: time embedding, normalisation, ResBlock, attention (and the
``evaluating`` context every eval-mode pass uses).

Follows the DDPM / guided-diffusion building blocks: the last conv of each
residual branch starts at zero, so every block starts as the identity.
"""
import contextlib
import math

import torch
from torch import nn
import torch.nn.functional as F


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode inside the block, every submodule's previous mode restored after
    (``module.train(was)`` alone would switch a frozen, eval-mode BatchNorm of a training model
    back to train mode, and its running statistics would then drift)."""
    was = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:   # parents first (module.modules() is pre-order); train() itself, so overrides run
        for m, mode in was.items():
            if m.training != mode:
                m.train(mode)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal embedding of (possibly fractional) time steps ``t`` (shape ``[B]``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also takes a single 1x1 image with one channel per group
    (PyTorch refuses that case; the math is well defined: the output is the bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * (x.shape[1] // self.num_groups) * x[0, 0].numel() > 1:
            return super().forward(x)
        g = x.reshape(x.shape[0], self.num_groups, -1)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, keepdim=True, correction=0) + self.eps)
        return g.reshape(x.shape) * self.weight[:, None, None] + self.bias[:, None, None]


def group_norm(channels: int) -> GroupNorm:
    # 32 groups as in DDPM; fewer when a small preset has fewer channels.
    return GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding (time, label, or their sum) added in between.

    ``film=True`` (class-conditional U-Nets) also scales and shifts the second norm's output by
    the embedding, ``h * (1 + scale) + shift``: the DDPM bias before that norm is a per-channel
    constant, which a GroupNorm of one channel per group (every group of the small presets)
    removes entirely, so without it a label would change nothing."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None, dropout: float = 0.0, film: bool = False):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch) if temb_dim else None
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.film = nn.Linear(temb_dim, 2 * out_ch) if film else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        emb = None if temb is None else F.silu(temb)
        if self.temb is not None:
            h = h + self.temb(emb)[:, :, None, None]
        h = self.norm2(h)
        if self.film is not None:
            scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the spatial positions (DDPM style)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        # contiguous [B, 1, HW, C]: strided inputs send the GPU to the kernel that stores the
        # whole HW x HW matrix (out of memory at 256x256, benchmarks/speed_gpu.py)
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2)
        q, k, v = (t[:, None].contiguous() for t in qkv.unbind(1))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

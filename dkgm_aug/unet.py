"""The DDPM-style U-Net used by both DKGM stages, and its presets.

``UNet(time_input=False)`` is stage 1's ``f_theta`` (no time embedding at all);
``UNet(time_input=True)`` is stage 2's ``u_gamma(., t)``. Any image size works:
inputs are padded (replicate) up to a multiple of the down-sampling factor and
the output is cropped back.

``num_classes > 0`` (opt-in, beside the paper's unconditional model) adds a label embedding
``nn.Embedding(num_classes, 4 * base_channels)``, summed with the time embedding where there is
one, that every ResBlock takes, both as the DDPM bias and as a scale and shift after its second
norm (:class:`dkgm_aug.nn.ResBlock`): ``net(x, t, labels=y)`` with ``y`` the class indices ``[B]``.
"""
from dataclasses import asdict, dataclass

import torch
from torch import nn
import torch.nn.functional as F

from ._validate import check_int
from .errors import DKGMError
from .nn import AttentionBlock, Downsample, ResBlock, Upsample, group_norm, timestep_embedding, zero_module


@dataclass
class UNetConfig:
    channels: int = 1                       # image channels in and out
    base_channels: int = 32
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attn_levels: tuple = ()                 # levels (0 = full resolution) with self-attention
    mid_attention: bool = True
    dropout: float = 0.0
    time_input: bool = False
    num_classes: int = 0                    # > 0: class-conditional (a label embedding); 0: unconditional

    def __post_init__(self):
        # Limits checked before any layer is built: a hostile checkpoint config must not
        # make us allocate (or even enumerate) an absurd network.
        def whole(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise DKGMError(f"U-Net {name} must be an integer in [{lo}, {hi}], got {v!r}")
        whole("channels", 1, 16)
        whole("base_channels", 1, 1024)
        whole("num_res_blocks", 1, 8)
        whole("num_classes", 0, 100_000)
        mult, attn = self.channel_mult, self.attn_levels
        if not isinstance(mult, tuple) or not 1 <= len(mult) <= 8 or not all(
                isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= 16 for m in mult):
            raise DKGMError(f"channel_mult must be 1 to 8 integers in [1, 16], got {mult!r}")
        if not isinstance(attn, tuple) or not all(isinstance(a, int) and 0 <= a < len(mult) for a in attn):
            raise DKGMError(f"attn_levels must be levels in [0, {len(mult) - 1}], got {attn!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise DKGMError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.mid_attention, bool) or not isinstance(self.time_input, bool):
            raise DKGMError("mid_attention and time_input must be booleans")

    def to_dict(self) -> dict:
        """The config as a dict; ``num_classes`` only when it is not 0, so that an unconditional
        U-Net's config (and so its checkpoints and training states) reads as before it existed."""
        d = asdict(self)
        if not d["num_classes"]:
            del d["num_classes"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise DKGMError(f"unknown U-Net config keys {sorted(unknown)}; known: {sorted(known)}")
        if not isinstance(d, dict):
            raise DKGMError(f"a U-Net config must be a dict, got {type(d).__name__}")
        d = dict(d)
        for key in ("channel_mult", "attn_levels"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)


# Presets: network sizes for both stages. `cifar` is the DDPM CIFAR-10 U-Net the
# DKGM paper uses (35.7M parameters with a time embedding).
PRESETS = {
    "tiny": dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(), mid_attention=True),
    "small": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(), mid_attention=True),
    "cifar": dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,),
                  mid_attention=True, dropout=0.1),
}


def preset_config(name: str, channels: int, time_input: bool, num_classes: int = 0) -> UNetConfig:
    if name not in PRESETS:
        raise DKGMError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return UNetConfig(channels=channels, time_input=time_input, num_classes=num_classes, **PRESETS[name])


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch = c.base_channels
        temb_dim = 4 * ch if c.time_input or c.num_classes else None   # the embedding every ResBlock takes
        if c.time_input:
            self.time_mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        if c.num_classes:
            self.label_emb = nn.Embedding(c.num_classes, temb_dim)
        self.conv_in = nn.Conv2d(c.channels, ch, 3, padding=1)
        film = bool(c.num_classes)

        self.down = nn.ModuleList()
        skip_chs, cur = [ch], ch
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, temb_dim, c.dropout, film))
                cur = ch * mult
                if level in c.attn_levels:
                    self.down.append(AttentionBlock(cur))
                skip_chs.append(cur)
            if level != len(c.channel_mult) - 1:
                self.down.append(Downsample(cur))
                skip_chs.append(cur)

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_dim, c.dropout, film)]
                                 + ([AttentionBlock(cur)] if c.mid_attention else [])
                                 + [ResBlock(cur, cur, temb_dim, c.dropout, film)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for _ in range(c.num_res_blocks + 1):
                self.up.append(ResBlock(cur + skip_chs.pop(), ch * mult, temb_dim, c.dropout, film))
                cur = ch * mult
                if level in c.attn_levels:
                    self.up.append(AttentionBlock(cur))
            if level != 0:
                self.up.append(Upsample(cur))

        self.norm_out = group_norm(cur)
        self.conv_out = zero_module(nn.Conv2d(cur, c.channels, 3, padding=1))
        self.factor = 2 ** (len(c.channel_mult) - 1)

    def embedding(self, x: torch.Tensor, t, labels) -> torch.Tensor | None:
        """What every ResBlock takes: the time embedding (time input), plus the label embedding
        (class-conditional); ``None`` for an unconditional U-Net without time input."""
        c, temb = self.config, None
        if c.time_input:
            if t is None:
                raise DKGMError("this U-Net takes a time step: call it as net(x, t)")
            t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
            temb = self.time_mlp(timestep_embedding(t, c.base_channels).to(x.dtype))
        if not c.num_classes:
            if labels is not None:
                raise DKGMError("this U-Net is unconditional (num_classes=0): call it without labels")
            return temb
        if labels is None:
            raise DKGMError(f"this U-Net is class-conditional ({c.num_classes} classes): call it as "
                            "net(x, t, labels=y), y the class indices [B]")
        if (not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],)
                or labels.dtype not in (torch.int64, torch.int32)):
            raise DKGMError(f"labels must be an integer tensor [B] = [{x.shape[0]}] of class indices, got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
        lemb = self.label_emb(labels.to(x.device))
        return lemb if temb is None else temb + lemb

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.embedding(x, t, labels)
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.factor, -width % self.factor
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")

        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, temb)
            if not isinstance(layer, AttentionBlock):
                skips.append(h)
            else:
                skips[-1] = h
        for layer in self.mid:
            h = layer(h, temb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, temb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[..., :height, :width]

    def with_labels(self, num_classes: int) -> "UNet":
        """A new class-conditional U-Net holding this (unconditional) one's weights, whose new label
        pathway starts silent, so that it computes this U-Net's function for every label: the
        ResBlocks' new layers (the scale-shift, and the embedding bias where there was no time input)
        start at zero; with a time embedding the label embedding starts at zero too, without one it is
        normal (so that the new layers learn from the first step)."""
        c = self.config
        num_classes = check_int("num_classes", num_classes, 1, 100_000)
        if c.num_classes:
            raise DKGMError(f"this U-Net is class-conditional already ({c.num_classes} classes)")
        net = UNet(UNetConfig(**dict(c.to_dict(), num_classes=num_classes)))
        like = next(self.parameters())
        net = net.to(device=like.device, dtype=like.dtype).train(self.training)
        missing, unexpected = net.load_state_dict(self.state_dict(), strict=False)
        if unexpected or not all(k.startswith("label_emb.") or ".temb." in k or ".film." in k for k in missing):
            raise DKGMError(f"cannot copy the U-Net's weights (missing {missing}, unexpected {unexpected})")
        with torch.no_grad():
            nn.init.zeros_(net.label_emb.weight) if c.time_input else nn.init.normal_(net.label_emb.weight)
            for block in net.modules():
                if isinstance(block, ResBlock):
                    zero_module(block.film)
                    if not c.time_input:
                        zero_module(block.temb)
        return net

"""EVAE (Epanechnikov VAE, Qin & Huang, arXiv:2405.12783) and a Gaussian VAE baseline
(docs/design.md, section 6), as dkgm_aug generators.

Both models share the encoder and decoder of the paper's Appendix C, and a fixed 32x32
geometry for images of other sizes: see :mod:`dkgm_aug.vae_nets`.

EVAE (paper, section 4, Algorithm 1 and eq. 10). The encoder gives ``mu`` and
``r = softplus(.) > 0``; the latent is::

    z = b_m * (mu + r * k) + U,   k ~ standard Epanechnikov on [-1, 1] (median of three
    U[-1, 1], Algorithm 2), U ~ Unif[-B/2, B/2], b_m = 100^(-2/9) ~ 0.3594

(all per latent dimension), so ``E z = b_m mu``, ``Var z = b_m^2 r^2 / 5 + B^2 / 12`` and
``|z - b_m mu| <= b_m r + B/2``. The training loss of an image is::

    BCE(decoder(z), x)  (summed over pixels, images in [0, 1])  +  3B / (5M) * sum_k 1 / r_k

and a batch's loss is the mean over its images. Which ``M``? Eq. (8) derives the bound
``KL <= B * I(K) / n`` with ``n`` the number of data points, and ``I(K*) = 3 / (5 r)`` for
the Epanechnikov kernel (Lemma 3.2); eq. (9) says "n can be the sample size or minibatch
size", and eq. (10), the version the paper's experiments implement, writes ``M`` = the
minibatch size (100 in Appendix D). We follow eq. (8): ``M`` is the number of training
images, a config value that :func:`fit` sets from the data; set ``M`` to the batch size
to reproduce the paper's eq. (10) exactly (its penalty is then ``n / batch`` times
stronger: 600x for Fashion-MNIST). Averaging rather than summing over the batch only
rescales the gradient, which Adam undoes. As in the paper (footnote 3), ``mu`` enters
only the reconstruction term.

VAE: the same networks; the encoder gives ``mu`` and ``log sigma^2``; ``z = mu + sigma *
eps``, ``eps ~ N(0, I)``; loss = the same BCE + ``KL(N(mu, sigma^2) || N(0, I))``, mean
over the batch.

Training: both go through :class:`dkgm_aug.Trainer` as a one-stage model whose stage trains
the whole model (:func:`fit`, or ``dkgm-aug train --kind evae|vae``). The trainer's batches
are in [-1, 1], the library's convention; ``forward`` maps them to the [0, 1] BCE targets.

Generation (the generator interface of :mod:`dkgm_aug.augment`): encode the image, draw
the latent noise (EVAE: ``k`` and ``U``; VAE: ``eps``) from the image's own seed, decode.
``alpha`` scales the latent noise around the posterior centre: EVAE ``z = b_m mu +
alpha (b_m r k + U)``, VAE ``z = mu + alpha sigma eps``. ``alpha = 1`` (the default knob)
samples the model's own posterior; ``alpha = 0`` gives the deterministic reconstruction
from the posterior mean. Generation always runs the networks in eval mode (BatchNorm
running statistics), so an image's output does not depend on its batch.

Example::

    model = EVAE(channels=1, image_size=28, d_z=64, B=0.1)
    fit(model, train_set.images, epochs=5, batch_size=100, lr=3e-4, seed=0)
    model.save("evae.safetensors")
    x_new = model.neighbours(x, k=4)           # x: [B, 1, 28, 28] in [-1, 1]
"""
import numbers
import time

import torch
from torch import nn
import torch.nn.functional as F

from ._validate import check_int
from .checkpoint import register_kind
from .dkgm import check_images, check_knobs
from .errors import DataError, DKGMError
from .images import from_model, to_model
from .kernels import rand, randn, standard_epanechnikov
from .nn import evaluating
from .trainer import Trainer
from .vae_nets import WIDTHS, Decoder, Encoder, from32, to32

B_M = 100.0 ** (-2.0 / 9.0)   # b(100), the paper's "step size" (section 4)


def _check_pos(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < float("inf"):
        raise DKGMError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


class _LatentAutoencoder(nn.Module):
    """What EVAE and VAE share: networks, image geometry, loss assembly, generation."""

    kind = None

    def __init__(self, channels: int = 1, image_size=28, d_z: int = 64, widths=WIDTHS,
                 alpha: float = 1.0, info: dict | None = None):
        super().__init__()
        self.channels = check_int("channels", channels, 1, 64)
        self.d_z = check_int("d_z", d_z, 1, 4096)
        if not isinstance(widths, (tuple, list)) or len(widths) != 4:
            raise DKGMError(f"widths must be 4 channel counts (the paper's (32, 64, 128, 256)), got {widths!r}")
        self.widths = tuple(check_int("widths[i]", w, 1, 4096) for w in widths)
        size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        if len(size) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                     and 1 <= v <= 8192 for v in size):
            raise DKGMError(f"image_size must be an int or (H, W) with sides in [1, 8192], got {image_size!r}")
        self.image_size = tuple(int(v) for v in size)
        self.alpha = check_knobs(alpha=alpha)
        if not isinstance(info, (dict, type(None))):
            raise DKGMError(f"info must be a dict, got {type(info).__name__}")
        self.info = dict(info or {})
        self.encoder = Encoder(self.channels, self.d_z, self.widths)
        self.decoder = Decoder(self.channels, self.d_z, self.widths)

    # -- configuration stored in checkpoints ----------------------------------------------------
    def config(self) -> dict:
        return dict(channels=self.channels, image_size=list(self.image_size), d_z=self.d_z,
                    widths=list(self.widths), alpha=self.alpha, info=self.info)

    @classmethod
    def from_config(cls, cfg: dict):
        if not isinstance(cfg, dict):
            raise DKGMError(f"a {cls.__name__} config must be a dict, got {type(cfg).__name__}")
        try:
            return cls(**cfg)
        except TypeError as exc:   # unknown or missing keys
            raise DKGMError(f"invalid {cls.__name__} config: {exc}") from None

    def save(self, path, **info) -> None:
        from .checkpoint import save
        save(self, path, **info)

    # -- the networks ----------------------------------------------------------------------------
    def encode(self, x01: torch.Tensor):
        """``(mu, spread)`` of images in [0, 1]: EVAE's spread is ``r > 0``, VAE's ``log sigma^2``."""
        mu, h = self.encoder(to32(x01))
        return mu, self.spread(h)

    def decode_logits(self, z: torch.Tensor, size=None) -> torch.Tensor:
        """Decoder logits at ``size`` (default: the model's ``image_size``)."""
        return from32(self.decoder(z), self.image_size if size is None else tuple(size))

    def decode(self, z: torch.Tensor, size=None) -> torch.Tensor:
        """Decoded images in [0, 1] (the Bernoulli means)."""
        return torch.sigmoid(self.decode_logits(z, size))

    # -- what the subclasses define ---------------------------------------------------------------
    def spread(self, h):
        raise NotImplementedError

    def draw_noise(self, n: int, generator=None, device=None) -> torch.Tensor:
        """Standardised latent noise for ``n`` images, ``[n, parts, d_z]``."""
        raise NotImplementedError

    def sample_latent(self, mu, spread, noise=None, alpha=None, generator=None) -> torch.Tensor:
        raise NotImplementedError

    def posterior_mean(self, mu, spread) -> torch.Tensor:
        raise NotImplementedError

    def regulariser(self, mu, spread) -> torch.Tensor:
        """The per-image term added to the reconstruction loss, ``[B]``."""
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------------------
    def loss_terms(self, x01: torch.Tensor, generator=None):
        """``(reconstruction [B], regulariser [B])`` of a batch in [0, 1]: BCE summed over pixels."""
        check_images(x01, self.channels, "x01")
        if float(x01.min()) < 0 or float(x01.max()) > 1:
            raise DataError("x01 must hold images in [0, 1] (the BCE targets)")
        mu, spread = self.encode(x01)
        z = self.sample_latent(mu, spread, noise=self.draw_noise(len(x01), generator, mu.device).to(mu.dtype))
        logits = self.decode_logits(z, x01.shape[-2:])
        rec = F.binary_cross_entropy_with_logits(logits, x01, reduction="none").flatten(1).sum(1)
        return rec, self.regulariser(mu, spread)

    def loss(self, x01: torch.Tensor, generator=None) -> torch.Tensor:
        """The training loss of a batch of images in [0, 1]: mean over images of BCE + regulariser."""
        rec, reg = self.loss_terms(x01, generator)
        return (rec + reg).mean()

    # -- what the trainer asks of a model (dkgm_aug.trainer): [-1, 1] in, [0, 1] inside ---------
    stages = (1,)

    def stage_module(self, stage: int) -> nn.Module:
        """The network that training ``stage`` updates: the whole model, its one stage."""
        if stage not in self.stages:
            raise DKGMError(f"{type(self).__name__} has one training stage; stage must be 1, got {stage!r}")
        return self

    def forward(self, x: torch.Tensor, stage: int = 1, generator=None) -> torch.Tensor:
        """Training loss of a batch in [-1, 1] (the library's convention; one stage only)."""
        self.stage_module(stage)
        check_images(x, self.channels)
        return self.loss(from_model(x), generator)

    @torch.no_grad()
    def preview(self, x: torch.Tensor, stage: int = 1, generator=None) -> list:
        """The rows of a training sample grid, in [-1, 1]: the real images, their reconstructions
        from the posterior mean and one posterior sample of each."""
        x01 = from_model(x)
        return [x, to_model(self.reconstruct(x01)), to_model(self.reconstruct(x01, sample=True, generator=generator))]

    # -- generation -------------------------------------------------------------------------------
    def _check_size(self, x: torch.Tensor) -> None:
        """Generation takes images of the training size only: the decoder's 32x32 canvas is trained on
        that crop alone, so any other size came back with a grey frame (or cut), with no error."""
        if tuple(x.shape[-2:]) != self.image_size:
            (h, w), (h0, w0) = x.shape[-2:], self.image_size
            raise DataError(f"this {type(self).__name__} was trained on {h0}x{w0} images and generates at that size "
                            f"only, got {h}x{w} (the rest of its decoder's canvas is untrained: a grey frame); resize "
                            f"first, e.g. v2.Resize(({h0}, {w0})) before DKGMAugment and v2.Resize(({h}, {w})) after it")

    @torch.inference_mode()
    def reconstruct(self, x01: torch.Tensor, sample: bool = False, alpha=None, generator=None) -> torch.Tensor:
        """Encode and decode images in [0, 1] (eval mode): from the posterior mean, or, with
        ``sample=True``, from one posterior draw (noise scaled by ``alpha``, default 1: the
        posterior itself, whatever the model's generation knob ``alpha`` is)."""
        check_images(x01, self.channels, "x01")
        self._check_size(x01)
        with evaluating(self):
            mu, spread = self.encode(x01)
            z = (self.sample_latent(mu, spread, alpha=alpha, generator=generator) if sample
                 else self.posterior_mean(mu, spread))
            return self.decode(z, x01.shape[-2:])

    @torch.inference_mode()
    def _generate(self, x: torch.Tensor, noise: torch.Tensor, alpha) -> torch.Tensor:
        check_images(x, self.channels)
        self._check_size(x)
        alpha = self.alpha if alpha is None else check_knobs(alpha=alpha)
        with evaluating(self):
            mu, spread = self.encode(from_model(x))
            z = self.sample_latent(mu, spread, noise=noise.to(mu.device, mu.dtype), alpha=alpha)
            return to_model(self.decode(z, x.shape[-2:])).clamp(-1, 1)

    @torch.inference_mode()
    def neighbours_from_seeds(self, x: torch.Tensor, seeds, *, labels=None, alpha: float | None = None,
                              steps: int | None = None) -> torch.Tensor:
        """The generator interface: one posterior sample per image (``[-1, 1]`` in and out),
        image ``i``'s latent noise drawn from ``torch.Generator().manual_seed(seeds[i])``.
        ``alpha`` scales the latent noise (1.0: the model's own posterior spread; 0: the
        posterior-mean reconstruction); ``labels`` are accepted and unused (unconditional), ``steps``
        must be None (there is no stage 2: a value would be ignored)."""
        _no_steps(steps)
        if len(seeds) != len(x):
            raise DKGMError(f"{len(seeds)} seeds for {len(x)} images")
        noise = torch.cat([self.draw_noise(1, torch.Generator().manual_seed(int(s))) for s in seeds])
        return self._generate(x, noise, alpha)

    @torch.inference_mode()
    def neighbours(self, x: torch.Tensor, k: int = 1, *, labels=None, alpha: float | None = None,
                   steps: int | None = None, generator=None) -> torch.Tensor:
        """``k`` posterior samples per image: ``[B, k, C, H, W]`` in [-1, 1]."""
        _no_steps(steps)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise DKGMError(f"k must be an integer >= 1, got {k!r}")
        check_images(x, self.channels)
        xk = x.repeat_interleave(int(k), dim=0)
        out = self._generate(xk, self.draw_noise(len(xk), generator), alpha)
        return out.view(x.shape[0], int(k), *x.shape[1:])


@register_kind
class EVAE(_LatentAutoencoder):
    """Epanechnikov VAE: posterior ``b_m (mu + r k) + U`` (see the module docstring).

    Knobs: ``d_z`` (latent dimension), ``B`` (support length of the uniform prior; the
    paper's default 0.1), ``M`` (the ``n`` of the penalty ``3B / (5M) sum 1/r``: number of
    training images, set by :func:`fit`), ``b_m`` (default ``100^(-2/9)``), ``alpha``
    (generation noise scale), ``widths`` (encoder channels; the paper's (32, 64, 128, 256)).
    """

    kind = "evae"

    def __init__(self, channels: int = 1, image_size=28, d_z: int = 64, B: float = 0.1, M: int = 60_000,
                 b_m: float = B_M, widths=WIDTHS, alpha: float = 1.0, info: dict | None = None):
        super().__init__(channels, image_size, d_z, widths, alpha, info)
        self.B = _check_pos("B", B)
        self.M = check_int("M (number of training images)", M, 1, 2 ** 62)
        self.b_m = _check_pos("b_m", b_m)

    def config(self) -> dict:
        return dict(super().config(), B=self.B, M=self.M, b_m=self.b_m)

    def spread(self, h):
        return F.softplus(h)

    def draw_noise(self, n, generator=None, device=None):
        """``[n, 2, d_z]``: standard Epanechnikov ``k``, then ``v ~ U[-1/2, 1/2]`` (``U = B v``)."""
        k = standard_epanechnikov((n, self.d_z), generator, device)
        v = rand((n, self.d_z), generator, device) - 0.5
        return torch.stack([k, v], dim=1)

    def sample_latent(self, mu, spread, noise=None, alpha=None, generator=None):
        """``z = b_m mu + alpha (b_m r k + B v)``; ``alpha = 1`` is Algorithm 1."""
        if noise is None:
            noise = self.draw_noise(len(mu), generator, mu.device).to(mu.dtype)
        alpha = 1.0 if alpha is None else alpha
        return self.b_m * mu + alpha * (self.b_m * spread * noise[:, 0] + self.B * noise[:, 1])

    def posterior_mean(self, mu, spread):
        return self.b_m * mu

    def regulariser(self, mu, spread):
        """``3B / (5M) * sum_k 1 / r_k``: ``B * I(K*) / M`` with ``I(K*) = 3 / (5r)`` (eq. 8, 10)."""
        return (3.0 * self.B / (5.0 * self.M)) * spread.reciprocal().sum(1)


@register_kind
class VAE(_LatentAutoencoder):
    """Gaussian VAE baseline with EVAE's networks: ``z = mu + sigma eps``, KL to ``N(0, I)``."""

    kind = "vae"

    def spread(self, h):
        return h   # log sigma^2

    def draw_noise(self, n, generator=None, device=None):
        """``[n, 1, d_z]`` standard normal."""
        return randn((n, 1, self.d_z), generator, device)

    def sample_latent(self, mu, spread, noise=None, alpha=None, generator=None):
        if noise is None:
            noise = self.draw_noise(len(mu), generator, mu.device).to(mu.dtype)
        alpha = 1.0 if alpha is None else alpha
        return mu + alpha * torch.exp(0.5 * spread) * noise[:, 0]

    def posterior_mean(self, mu, spread):
        return mu

    def regulariser(self, mu, spread):
        """``KL(N(mu, sigma^2) || N(0, I))`` summed over latent dimensions."""
        return -0.5 * (1 + spread - mu.pow(2) - spread.exp()).sum(1)


def _no_steps(steps) -> None:
    if steps is not None:
        raise DKGMError(f"steps={steps!r}: steps are DKGM's stage-2 iterations (or the score sampler's); an EVAE "
                        "or VAE has none, and would ignore them: leave steps unset")


def _as_uint8_images(images) -> torch.Tensor:
    images = getattr(images, "images", images)   # an ImageDataset gives its tensor
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.dtype != torch.uint8 or len(images) == 0:
        raise DataError(f"fit takes a non-empty uint8 tensor [N, C, H, W] (or an ImageDataset), "
                        f"got {images.dtype} {tuple(images.shape)}")
    return images


def fit(model: _LatentAutoencoder, images_uint8, epochs: int = 1, batch_size: int = 100, lr: float = 3e-4,
        seed: int = 0, progress: bool = True, set_M: bool = True, max_batches: int | None = None,
        ema_decay: float = 0.999, grad_clip: float = 0.0) -> list:
    """Train ``model`` on uint8 images ``[N, C, H, W]`` with :class:`dkgm_aug.Trainer` (Adam; the
    paper's Appendix D: batch 100, lr 3e-4), on the model's device, in fp32, writing no files.
    Batch order and latent noise come from ``seed``; an epoch is ``N // batch_size`` steps (at
    least one), each on a full batch. For an EVAE, ``set_M`` sets the penalty's ``M`` to ``N``
    first (see the module docstring). ``max_batches`` shortens each epoch to that many steps
    (for quick runs). The model ends with the trainer's EMA weights (``ema_decay``; 0 keeps
    the last weights); ``grad_clip`` is off by default, as BCE summed over pixels makes large
    gradients. Returns the mean loss of each epoch and records the run in ``model.info["training"]``."""
    images = _as_uint8_images(images_uint8)
    epochs = check_int("epochs", epochs, 0, 10 ** 6)
    batch_size = check_int("batch_size", batch_size, 1, 10 ** 6)
    lr = _check_pos("lr", lr)
    if images.shape[1] != model.channels:
        raise DataError(f"images have {images.shape[1]} channels, the model takes {model.channels}")
    if set_M and isinstance(model, EVAE):
        model.M = len(images)
    steps = max(1, len(images) // batch_size)
    if max_batches is not None:
        steps = min(steps, check_int("max_batches", max_batches, 1, 10 ** 9))
    history, start = [], time.perf_counter()
    if epochs:
        trainer = _train(model, images, epochs * steps, batch_size=batch_size, lr=lr, seed=seed,
                         progress=progress, ema_decay=ema_decay, grad_clip=grad_clip)
        history = [sum(trainer.losses[e * steps:(e + 1) * steps]) / steps for e in range(epochs)]
    model.eval()
    model.info["training"] = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, n_images=len(images),
                                  batches_per_epoch=steps, optimizer="Adam", ema_decay=ema_decay,
                                  grad_clip=grad_clip, wall_time_s=round(time.perf_counter() - start, 3),
                                  final_epoch_loss=history[-1] if history else None)
    return history


def _train(model, images, max_steps: int, **settings) -> Trainer:
    """Train ``model`` where it is, leaving torch's global RNG as it was (the trainer seeds it)."""
    device = next(model.parameters()).device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        trainer = Trainer(model, images, out_dir=None, max_steps=max_steps, amp=False, device=device, **settings)
        trainer.fit(1)
    return trainer

"""Checks written once: every user-facing argument goes through one of these, so that a bad
value raises a :class:`~dkgm_aug.errors.DKGMError` that names it and says what to do."""
import math
import numbers

import torch

from .errors import DKGMError

SEED_MAX = 2 ** 63          # seeds are in [0, 2**63): they fit torch's and numpy's seed types
STEPS_MAX = 1000            # stage-2 iterations; more is never useful and only burns time
ALPHA_MAX = 10.0            # noise level; images live in [-1, 1], so 10 is already pure noise


def check_int(name: str, value, lo=None, hi=None) -> int:
    """``value`` as an int in ``[lo, hi]`` (either bound optional); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DKGMError(f"{name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"in [{lo}, {hi}]" if lo is not None and hi is not None else (f">= {lo}" if hi is None else f"<= {hi}")
        raise DKGMError(f"{name} must be an integer {span}, got {value!r}")
    return int(value)


def check_float(name: str, value, lo=None, hi=None) -> float:
    """``value`` as a finite float in ``[lo, hi]`` (either bound optional); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DKGMError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"in [{lo}, {hi}]" if lo is not None and hi is not None else (f">= {lo}" if hi is None else f"<= {hi}")
        raise DKGMError(f"{name} must be a number {span}, got {value!r}")
    return float(value)


def check_seed(seed, name: str = "seed") -> int:
    """A seed as an int in ``[0, 2**63)``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_MAX:
        raise DKGMError(f"{name} must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def check_device(device):
    """``device`` as a ``torch.device`` (``None`` stays ``None``), refused now, at construction,
    when its backend is not available on this machine rather than at the first call."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DKGMError(f"device {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DKGMError(f"device {device!r} asks for CUDA, but CUDA is not available on this machine; "
                        "use device='cpu' or None")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DKGMError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DKGMError(f"device {device!r} asks for MPS, which is not available on this machine")
    return dev

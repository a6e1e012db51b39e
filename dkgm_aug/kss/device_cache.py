"""The reference set of a kernel-smoothed score model, as float chunks on the device that
computes, cached while small.

The model stores its images once, as uint8. Every step of the reverse SDE visits all of
them (or all of one class), so converting them to floats on the computing device each step
would dominate the cost for small sets; large sets are streamed chunk by chunk instead,
so memory stays ``chunk_size * D`` whatever the set's size.

The cache is a plain dict owned by the model (``model._cache``), keyed by what the
float copy depends on: class, device, dtype, and the stamp of the image and label buffers
(device, storage address and version counter of each: an in-place write, a ``.data``
swap or a relabel makes old entries unreachable). The model empties it when its buffers
move, load or are assigned, and when it is pickled (DataLoader workers rebuild their own copies).
"""
import torch

from ..images import uint8_to_model

# Values held by all float copies together: 2**26, 256 MiB in float32. A subset larger than this
# is streamed; a new copy that would pass it first drops every cached copy.
CACHE_ELEMENTS = 2 ** 26


def stamp(*buffers) -> tuple:
    """What identifies the contents of ``buffers`` (None allowed) for the cache."""
    return tuple(None if b is None else (b.device, b.data_ptr(), b._version) for b in buffers)


def class_members(cache: dict, images: torch.Tensor, label_codes, code):
    """Indices of the images of class ``code`` (None: the whole set, returned as None)."""
    if code is None:
        return None
    key = ("members", code, stamp(images, label_codes))
    if key not in cache:
        cache[key] = torch.nonzero(label_codes == code).flatten().to(images.device)
    return cache[key]


def _cached_values(cache: dict) -> int:
    return sum(v[0].numel() for k, v in cache.items() if k[0] == "ref")


def reference_chunks(cache: dict, images: torch.Tensor, members, key, chunk_size: int, device, dtype):
    """A function returning an iterator of ``(ref [n, D] floats in [-1, 1], ||ref||^2 / 2)``
    chunks of ``images`` (or of its rows ``members``, not empty); ``key`` names the subset in the
    cache, with the stamp of every buffer the subset depends on."""
    n_images = images.shape[0]
    n = n_images if members is None else len(members)
    d = images[0].numel()
    flat = images.reshape(n_images, d)
    if n * d > CACHE_ELEMENTS:
        def stream():
            for a in range(0, n, chunk_size):
                rows = flat[a:a + chunk_size] if members is None else flat[members[a:a + chunk_size]]
                r = uint8_to_model(rows, dtype, device)
                yield r, 0.5 * r.pow(2).sum(1)
        return stream

    full_key = ("ref", key, torch.device(device), dtype)
    if full_key not in cache:
        if _cached_values(cache) + n * d > CACHE_ELEMENTS:
            for k in [k for k in cache if k[0] == "ref"]:
                del cache[k]
        rows = flat if members is None else flat[members]
        ref = uint8_to_model(rows, dtype, device)
        cache[full_key] = (ref, 0.5 * ref.pow(2).sum(1))
    ref, half = cache[full_key]
    return lambda: ((ref[a:a + chunk_size], half[a:a + chunk_size]) for a in range(0, n, chunk_size))

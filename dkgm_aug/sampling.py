"""Which synthetic items :class:`~dkgm_aug.balanced.BalancedDKGMDataset` adds: labels, counts
and the index plan. No image is read here."""
import numbers
import warnings

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset
from tqdm.auto import tqdm

from .errors import DataError, DKGMError

STRATEGIES = ("auto", "minority", "not minority", "not majority", "all")


def plain_label(y):
    """A label as a hashable Python value: 0-d tensors and numpy scalars become int/float/bool."""
    if isinstance(y, torch.Tensor):
        if y.numel() != 1:
            raise DataError(f"a label must be a single value, got a tensor of shape {tuple(y.shape)}")
        return y.item()
    return y.item() if isinstance(y, (np.generic, np.ndarray)) and np.size(y) == 1 else y


def _class_index(v) -> int:
    """One class label as an int; refuses bools, floats and anything else that is not an integer."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and not v.is_complex() \
            and v.dtype != torch.bool:
        return int(v.item())
    if isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return int(v)
    raise DataError(f"labels must be integer class indices, got {v!r}")


def label_tensor(labels) -> torch.Tensor:
    """Class labels as a 1-D LongTensor (on the tensor's device): a 0-d or 1-D integer tensor or
    array, or a list or tuple of ints, numpy integers or one-element integer tensors. The one
    conversion of labels for the class-conditional models and their trainer."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels) if labels.dtype.kind in "iub" else labels.tolist()
    if isinstance(labels, torch.Tensor):
        if labels.ndim > 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DataError(f"labels must be integer class indices, one per image: a 1-D integer tensor, "
                            f"got {labels.dtype} of shape {tuple(labels.shape)}")
        return labels.reshape(-1).long()
    if not isinstance(labels, (list, tuple)):
        raise DataError(f"labels must be a 1-D integer tensor or a list of class indices, got {type(labels).__name__}")
    return torch.tensor([_class_index(v) for v in labels], dtype=torch.long)


def _as_array(raw) -> np.ndarray:
    """Labels (list, tuple, array or tensor) as a numpy array of numbers or of strings."""
    if isinstance(raw, torch.Tensor):
        raw = raw.cpu().numpy()
    if isinstance(raw, np.ndarray) and raw.dtype == object:
        raw = raw.tolist()
    if isinstance(raw, (list, tuple)):
        raw = [plain_label(v) for v in raw]
        kinds = {str if isinstance(v, str) else numbers.Number if isinstance(v, numbers.Number) else type(v)
                 for v in raw}
        if len(kinds) > 1 or not kinds <= {str, numbers.Number}:
            raise DataError(f"labels must be all numbers or all strings, found {sorted(k.__name__ for k in kinds)}")
    return np.asarray(raw)


def stored_labels(ds):
    """The labels ``ds`` keeps beside its images, or None: a torchvision ``DatasetFolder``'s
    ``.samples`` (what its ``__getitem__`` reads: classes merged by editing ``samples`` leave
    ``.targets`` stale), ``.targets`` or ``.labels``, through ``Subset`` (the base's labels at ``.indices``) and
    ``ConcatDataset`` (each part's, in order)."""
    from torchvision.datasets import DatasetFolder
    if type(ds).__getitem__ is DatasetFolder.__getitem__ and len(ds.samples) == len(ds):   # its items read samples
        return _as_array([s[1] for s in ds.samples])
    for name in ("targets", "labels"):
        raw = getattr(ds, name, None)
        if isinstance(raw, (list, tuple, np.ndarray, torch.Tensor)):
            return _as_array(raw)
    if isinstance(ds, Subset):
        base = stored_labels(ds.dataset)
        return None if base is None else base[np.asarray(ds.indices, dtype=np.int64)]
    if isinstance(ds, ConcatDataset):
        parts = [stored_labels(d) for d in ds.datasets]
        if any(p is None for p in parts):
            return None
        parts = [p for p in parts if len(p)]   # an empty part's float64 dtype would turn int labels into floats
        if len({p.dtype.kind in "US" for p in parts}) > 1:
            raise DataError("the parts of the ConcatDataset mix string and number labels; use one kind")
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return None


def _target_transform(ds):
    while isinstance(ds, Subset):
        ds = ds.dataset
    if isinstance(ds, ConcatDataset):
        return any(_target_transform(d) for d in ds.datasets)
    return getattr(ds, "target_transform", None) is not None


SPOT_CHECKS = 16   # items whose labels are read to trust stored labels (evenly spaced, first and last among them)
CLASS_CHECKS = 64  # and the first item of each of the smallest classes, up to this many (one image read each)


def stored_match(ds, stored, label_of) -> bool:
    """Whether the stored labels are the ones the items give: not under a ``target_transform``, and
    equal on ``SPOT_CHECKS`` evenly spaced items and on the first item of each of the ``CLASS_CHECKS``
    smallest stored classes (a
    ``label_key`` other than the one ``.targets`` holds; labels changed in ``__getitem__``, a small
    class merged into another among them)."""
    if _target_transform(ds):
        return False
    n = len(stored)
    if stored.ndim != 1 or n != len(ds) or n == 0:
        return True              # refused by read_labels' own checks, with the stored labels' shape
    spread = {int(v) for v in np.linspace(0, n - 1, min(n, SPOT_CHECKS))}
    for i in sorted(spread | set(_smallest_classes_firsts(stored))):
        y = label_of(ds[i])
        if isinstance(y, (torch.Tensor, np.ndarray, np.generic)):
            if (y.numel() if isinstance(y, torch.Tensor) else np.size(y)) != 1:
                return False      # array labels: read_labels reads them and says what is wrong
            y = y.item()
        if y != stored[i].item():
            return False
    return True


def _smallest_classes_firsts(stored, n: int = CLASS_CHECKS) -> list:
    """The first item of each of the ``n`` smallest stored classes (those evenly spaced checks miss);
    none for NaN or unorderable labels, which read_labels refuses later."""
    if stored.dtype.kind == "f" and np.isnan(stored).any():
        return []
    try:
        _, first, counts = np.unique(stored, return_index=True, return_counts=True)
    except TypeError:
        return []
    return first[np.argsort(counts, kind="stable")[:n]].tolist()


def read_labels(ds, labels=None, label_of=lambda item: item[1], progress: bool = True):
    """``(sorted distinct label values, int32 class code per item)``. From ``labels`` when given,
    else from :func:`stored_labels` so that no image is loaded (when they are the items' own: no
    ``target_transform``, and equal to ``SPOT_CHECKS`` items' labels), else one pass ``label_of(ds[i])``."""
    n = len(ds)
    if n == 0:
        raise DataError("the dataset is empty: BalancedDKGMDataset needs at least one labelled item")
    arr = _as_array(labels) if labels is not None else stored_labels(ds)
    if arr is not None and labels is None and not stored_match(ds, arr, label_of):
        arr = None               # the items' labels are not the stored ones: read them as the items give them
    if arr is None:
        arr = _as_array([label_of(ds[i]) for i in tqdm(range(n), desc="reading labels", disable=not progress)])
    if arr.ndim != 1 or len(arr) != n:
        given = "labels= has" if labels is not None else "its targets have"
        raise DataError(f"the dataset has {n} items but {given} shape {arr.shape}; "
                        "give one label per item (class indices, not one-hot)")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        nan = np.flatnonzero(np.isnan(arr))
        raise DataError(f"NaN labels on {len(nan)} of {n} items (the first: item {nan[0]}); NaN is not a "
                        "class: drop those items or give them a label")
    values, codes = np.unique(arr, return_inverse=True)
    values = values.tolist()
    check_negative(ds, values, codes, labels is not None)
    return values, torch.from_numpy(codes.astype(np.int32).reshape(-1))


def check_negative(ds, values: list, codes, given: bool) -> None:
    """Negative integer labels: -1 commonly marks an unlabelled item (torchvision's STL10
    ``train+unlabeled``), which would be balanced as a class of its own (and synthesised). Refused
    when the dataset names its classes (its labels are then indices into ``classes``); warned
    when -1 sits beside 0 with no names (``{-1, 1}`` binary labels pass)."""
    if given or not values or not isinstance(values[0], numbers.Integral) or isinstance(values[0], bool) \
            or values[0] >= 0:
        return
    negative = [v for v in values if v < 0]
    n = int(np.isin(codes, np.arange(len(negative))).sum())
    names = _names(ds)
    if isinstance(names, (list, tuple)):
        raise DataError(f"{n} items have negative labels {negative[:5]}, which are not indices into the dataset's "
                        f"{len(names)} classes (-1 usually marks an unlabelled item, as in STL10 'train+unlabeled'): "
                        "drop them (e.g. torch.utils.data.Subset of the labelled items) before balancing")
    if -1 in values and 0 in values:
        warnings.warn(f"{n} items have label -1, balanced as a class of its own beside 0..: if -1 marks unlabelled "
                      "items, drop them before balancing", stacklevel=3)


def _names(ds):
    names = getattr(ds, "classes", None)
    if names is None and isinstance(ds, Subset):
        return _names(ds.dataset)
    if names is None and isinstance(ds, ConcatDataset):
        found = [_names(d) for d in ds.datasets]
        if not all(isinstance(f, (list, tuple)) for f in found):
            return found[0] if all(f == found[0] for f in found) else None
        found = [[str(c) for c in f] for f in found]
        named = [f for f in found if f != [str(i) for i in range(len(f))]] or found   # '0', '1', ...: no names
        longest = max(named, key=len)
        for f in named:
            moved = [(j, c) for j, c in enumerate(f) if j >= len(longest) or longest[j] != c]
            if moved:       # label j may mean another class in this part: say so, balance by the numbers
                j, c = moved[0]
                warnings.warn(f"the ConcatDataset's parts name their classes differently ({c!r} at label {j} in one, "
                              f"{longest[j] if j < len(longest) else 'no class'!r} in another): balancing by label "
                              "number. If a part's labels mean other classes than the same numbers in another part, "
                              "remap its targets (and classes) to one class list, or pass labels=", stacklevel=4)
                return None
        return longest      # every part's names are the start of the longest list
    return names


def class_names(ds, values: list, given: bool = False):
    """``ds.classes`` (through ``Subset`` and ``ConcatDataset``) when the label ``values`` are integer
    indices into it, torchvision's convention; else None. ``given`` (labels the user passed, which
    need not index the dataset's names): no warning about parts of a ``ConcatDataset`` that name
    their classes differently."""
    with warnings.catch_warnings():
        if given:
            warnings.simplefilter("ignore")
        names = _names(ds)
    if not isinstance(names, (list, tuple)) or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                       for v in values):
        return None
    return list(names) if 0 <= values[0] and values[-1] < len(names) else None


def check_class_order(model, ds) -> None:
    """A class-conditional ``model`` takes class indices: refuse a dataset whose ``classes`` (by name)
    sit at other indices than the ones the model was trained with (:func:`check_class_names`)."""
    check_class_names(model, _names(ds))


def check_class_names(model, names) -> None:
    """Refuse class ``names`` (in label order: the name of label 0 first) that put a class at another
    index than the one a class-conditional ``model`` was trained with (an image folder's sorted folder
    names against the training data's order), which would condition each image on another class.
    Names are compared as names, numbers too: folders '0' .. '10' sort as '0', '1', '10', '2', ..., so
    folder '10' is index 2 of an image folder while it is class 10 to a generator trained on integer
    labels. No check when the model records no class names or ``names`` is not a list."""
    trained = getattr(model, "info", {}).get("classes") if getattr(model, "conditional", False) else None
    if not isinstance(trained, (list, tuple)) or not isinstance(names, (list, tuple)):
        return
    trained, names = [str(c) for c in trained], [str(c) for c in names]
    at = {c: i for i, c in reversed(list(enumerate(trained)))}   # the first index of each name, as list.index
    here = {c: i for i, c in reversed(list(enumerate(names)))}
    moved = [c for c in names if c in at and here[c] != at[c]]
    if moved:
        raise DataError(f"the generator was trained with classes {trained}, the dataset's are {names}: class "
                        f"{moved[0]!r} is index {at[moved[0]]} to the generator but "
                        f"{here[moved[0]]} here, so its images would be conditioned on another class; "
                        "pass labels= with the generator's class index of each item (or reorder both the "
                        "dataset's classes and its targets)")


def oversampling_targets(strategy, counts: dict, y) -> dict:
    """How many items to add to each class: imbalanced-learn's over-sampling semantics.
    ``counts`` maps each label to its count in sorted label order, as imblearn's
    ``np.unique`` does, so ties for majority/minority go to the smallest label."""
    if len(counts) < 2:
        raise DataError(f"the dataset has only {len(counts)} class; over-sampling needs at least 2")
    n_max, majority, minority = max(counts.values()), max(counts, key=counts.get), min(counts, key=counts.get)
    choices = (f"one of {STRATEGIES}, a float in (0, 1] (two classes only), a dict "
               "{label: wanted count} or a callable y -> dict")
    if isinstance(strategy, str):
        chosen = {"auto": lambda c: c != majority, "not majority": lambda c: c != majority,
                  "minority": lambda c: c == minority, "not minority": lambda c: c != minority,
                  "all": lambda c: True}.get(strategy)
        if chosen is None:
            raise DKGMError(f"unknown sampling_strategy {strategy!r}: use {choices}")
        return {c: n_max - n for c, n in counts.items() if chosen(c)}
    if isinstance(strategy, numbers.Real) and not isinstance(strategy, bool):
        if not 0 < strategy <= 1:
            raise DKGMError(f"a float sampling_strategy must be in (0, 1], got {strategy}")
        if len(counts) != 2:
            raise DKGMError(f"a float sampling_strategy needs exactly 2 classes, the dataset has "
                            f"{len(counts)}; use a dict {{label: wanted count}} instead")
        wanted = {c: int(n_max * strategy - n) for c, n in counts.items() if c != majority}
        if any(v <= 0 for v in wanted.values()):
            raise DKGMError(f"sampling_strategy={strategy} asks for no new minority items "
                            f"(class counts {counts}); increase the ratio")
        return wanted
    if callable(strategy):
        strategy = strategy(y)
    if not isinstance(strategy, dict):
        raise DKGMError(f"sampling_strategy must be {choices}, got {type(strategy).__name__}")
    strategy = {plain_label(k): v for k, v in strategy.items()}
    unknown = [k for k in strategy if k not in counts]
    if unknown:
        raise DKGMError(f"sampling_strategy names classes {unknown} that are not in the dataset "
                        f"(its classes: {list(counts)})")
    for c, v in strategy.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < counts[c]:
            raise DKGMError(f"sampling_strategy asks for {v!r} items of class {c!r}, which already has "
                            f"{counts[c]}; over-sampling only adds items: ask for an integer >= {counts[c]}")
    return {c: int(v) - counts[c] for c, v in strategy.items()}


def index_plan(real_codes: torch.Tensor, n_new: list, seed: int):
    """``(class code per item, source item per synthetic item)``: for class ``k``, ``n_new[k]``
    synthetic items cycling through a seeded permutation of its real items, grouped by class."""
    g = torch.Generator().manual_seed(seed)
    index_dtype = torch.int32 if len(real_codes) < 2 ** 31 else torch.int64
    codes, sources = [real_codes], [torch.zeros(0, dtype=index_dtype)]
    for k, n in enumerate(n_new):
        if n > 0:
            members = torch.nonzero(real_codes == k).flatten()
            perm = members[torch.randperm(len(members), generator=g)]
            sources.append(perm.repeat(-(-n // len(perm)))[:n].to(index_dtype))
            codes.append(torch.full((n,), k, dtype=torch.int32))
    return torch.cat(codes), torch.cat(sources)


def plan_siblings(j, codes, counts: list, n_new: list) -> tuple:
    """``(rank, siblings)`` of synthetic items ``j`` (an int array) in :func:`index_plan`'s layout,
    ``codes`` their class codes: item ``t`` of class ``c``'s block has source ``perm[t % counts[c]]``,
    so it is the ``t // counts[c]``-th of that source's items, of which there are
    ``n_new[c] // counts[c]``, plus one for the first ``n_new[c] % counts[c]`` sources. Nothing is
    stored per item: a dataset of millions of synthetic items pickles as small as before."""
    counts, n_new = np.asarray(counts, dtype=np.int64), np.asarray(n_new, dtype=np.int64)
    starts = np.cumsum(n_new) - n_new
    j, codes = np.asarray(j, dtype=np.int64), np.asarray(codes, dtype=np.int64)
    t, n = j - starts[codes], counts[codes]
    return t // n, n_new[codes] // n + (t % n < n_new[codes] % n)

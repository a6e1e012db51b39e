"""Label-safe generation: reject a neighbour that a classifier puts in another class than its
source, and redraw it with the next seed.

    from dkgm_aug import DKGMAugment, LabelFilter
    aug = DKGMAugment("fashion-mnist-tiny", label_filter=LabelFilter("fashion-mnist-evaluator"), seed=0)
    aug(images)                      # every neighbour the evaluator keeps in its source's class
    aug.label_filter.rejection_rate  # {class index: share of drawn neighbours rejected}

The classifier is any ``nn.Module`` from images ``[B, C, H, W]`` in [0, 1] to logits
``[B, n_classes]``, or the name of a shipped evaluator (:func:`list_evaluators`). The class of a
source is its label where the caller knows it (``BalancedDKGMDataset``: labels must then be class
indices of the classifier, or ``class_index`` maps them), else the classifier's prediction on the
source itself (the transforms, which see images only).

Try ``k`` of an image with noise seed ``s`` uses seed :func:`retry_seed` ``(s, k)``, so the result
depends only on the image and its seed, never on the batch. When ``max_tries`` neighbours are all
rejected, ``on_exhausted`` decides: ``"source"`` (the default) returns the source image itself,
a copy as random oversampling would make; ``"keep"`` returns the last neighbour drawn. Both
are counted in ``exhausted``.

The counters count the draws of the process that holds the filter: with DataLoader workers each
worker counts its own and the main process's filter stays at zero. To see the rates of a filtered
run, generate in the main process (``BalancedDKGMDataset.precompute()``, or a ``NeighbourBank``,
whose ``filter_counts`` also survive in its files) or read them with ``num_workers=0``.
"""
import threading
import warnings
from pathlib import Path

import torch

from ._validate import SEED_MAX, check_int
from .errors import CheckpointError, DataError, DKGMError
from .nn import evaluating

EVALUATOR_DIR = Path(__file__).parent / "pretrained" / "evaluators"
_GOLDEN = 0x9E3779B97F4A7C15          # odd 64-bit constant: retry seeds never collide with the first


def list_evaluators() -> list:
    """Names of the shipped evaluator classifiers (``LabelFilter(name)`` takes them)."""
    return sorted(p.stem for p in EVALUATOR_DIR.glob("*.safetensors")) if EVALUATOR_DIR.is_dir() else []


def load_evaluator(name_or_path):
    """A shipped evaluator by name, or a FeatureNet file written by ``save_feature_net``."""
    from .features import load_feature_net
    path = EVALUATOR_DIR / f"{name_or_path}.safetensors" if str(name_or_path) in list_evaluators() else Path(name_or_path)
    if not path.is_file():
        raise CheckpointError(f"no evaluator named {str(name_or_path)!r} (shipped: {list_evaluators()}) and no "
                              "file at that path")
    return load_feature_net(path)


def retry_seed(seed: int, k: int) -> int:
    """The noise seed of try ``k`` (0 = the first) of an image whose seed is ``seed``."""
    return (int(seed) + k * _GOLDEN) % SEED_MAX


class LabelFilter:
    """Keep only neighbours that ``classifier`` assigns to their source's class (module docstring)."""

    def __init__(self, classifier, max_tries: int = 4, on_exhausted: str = "source", class_index=None):
        if isinstance(classifier, (str, Path)):
            self.spec, self.classifier = str(classifier), load_evaluator(classifier)
        elif isinstance(classifier, torch.nn.Module):
            self.spec, self.classifier = type(classifier).__name__, classifier
        else:
            raise DKGMError(f"classifier must be an nn.Module or a shipped evaluator name {list_evaluators()}, "
                            f"got {type(classifier).__name__}")
        self.max_tries = check_int("max_tries", max_tries, 1, 64)
        if on_exhausted not in ("source", "keep"):
            raise DKGMError(f"on_exhausted must be 'source' or 'keep', got {on_exhausted!r}")
        self.on_exhausted, self.class_index = on_exhausted, dict(class_index) if class_index else None
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Zero the counters: per class, neighbours drawn, rejected, sources filtered, and images whose
        tries ran out."""
        self.drawn, self.rejected, self.exhausted, self.sources = {}, {}, {}, {}
        self._warned = set()

    @property
    def rejection_rate(self) -> dict:
        """Share of drawn neighbours rejected, per class index (this process's draws: DataLoader
        workers count their own, see the module docstring)."""
        return {c: self.rejected.get(c, 0) / n for c, n in sorted(self.drawn.items())}

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update({"sources": {}, "_warned": set()} | state, _lock=threading.Lock())   # older pickles

    @torch.inference_mode()
    def predict(self, x01: torch.Tensor, want=None) -> torch.Tensor:
        """The classifier's class index for each image; ``want`` (the sources' class indices) must lie
        among its outputs, else no neighbour could ever be accepted."""
        with evaluating(self.classifier) as net:
            weight = next(net.parameters(), None)     # a classifier without weights runs where the images are
            logits = net(x01 if weight is None else x01.to(weight.device))
        if want is not None and len(want) and (int(want.min()) < 0 or int(want.max()) >= logits.shape[1]):
            raise DataError(f"class indices {sorted(set(want.tolist()) - set(range(logits.shape[1])))[:5]} are not "
                            f"outputs of the classifier ({logits.shape[1]} classes): give the labels as its class "
                            "indices, or pass LabelFilter(..., class_index={label: index})")
        return logits.argmax(1).cpu()

    def classes_of(self, x01: torch.Tensor, labels=None) -> torch.Tensor:
        """Each source's class index: its label (mapped by ``class_index``), else the prediction."""
        if labels is None:
            return self.predict(x01)
        if self.class_index and any(y not in self.class_index for y in labels):
            missing = sorted({repr(y) for y in labels if y not in self.class_index})
            raise DataError(f"labels {missing[:5]} are not in class_index: map every label to a class index of "
                            "the classifier (an unmapped label was taken as an index: another class, silently)")
        mapped = [self.class_index[y] if self.class_index else y for y in labels]
        if not all(isinstance(y, int) and not isinstance(y, bool) for y in mapped):
            raise DKGMError(f"labels {sorted(set(map(repr, mapped)))[:5]} are not class indices of the classifier; "
                            "pass LabelFilter(..., class_index={label: index})")
        return torch.as_tensor(mapped, dtype=torch.long)

    def __call__(self, make, x01: torch.Tensor, seeds, labels=None) -> torch.Tensor:
        """Neighbours of ``x01`` (``[B, C, H, W]`` in [0, 1]); ``make(idx, seeds)`` generates those of
        ``x01[idx]`` with noise seeds ``seeds``. Each is redrawn while it is rejected."""
        want = self.classes_of(x01, labels)
        todo = torch.arange(len(x01))
        out = make(todo, list(seeds)).clone()
        for k in range(self.max_tries):
            if k:
                out[todo] = make(todo, [retry_seed(seeds[i], k) for i in todo.tolist()])
            bad = self.predict(out[todo], want[todo]) != want[todo]
            self._count(want[todo], bad)
            todo = todo[bad]
            if not len(todo):
                break
        with self._lock:
            for c in want.tolist():
                self.sources[c] = self.sources.get(c, 0) + 1
            for c in want[todo].tolist():
                self.exhausted[c] = self.exhausted.get(c, 0) + 1
        if len(todo):
            self._warn_if_most_run_out(set(want[todo].tolist()))
            if self.on_exhausted == "source":
                out[todo] = x01[todo].to(out)
        return out

    def _warn_if_most_run_out(self, classes) -> None:
        """Warn once per class (per process: a DataLoader worker counts its own sources, and with many
        workers each may see fewer than 16; ``precompute()`` and a bank's build count them all in one)
        when the tries ran out for at least half of its sources (16 or more):
        the classifier then rejects the class's neighbours wholesale, most often because its class
        indices are not the dataset's labels (an image folder of digits 3 and 7 has labels 0 and 1),
        and the "neighbours" are copies of the sources (or rejected neighbours, with "keep")."""
        for c in sorted(classes - self._warned):
            n, out = self.sources.get(c, 0), self.exhausted.get(c, 0)
            if n >= 16 and out >= 0.5 * n:
                self._warned.add(c)
                given = "the source itself (a copy)" if self.on_exhausted == "source" else "a rejected neighbour"
                warnings.warn(f"label filter ({self.spec}): for {out} of {n} sources of class index {c} every try was "
                              f"rejected, so each gave {given}: if the classifier's class indices are not the data's "
                              "labels, pass LabelFilter(..., class_index={label: index}); else its neighbours of this "
                              "class rarely keep the label", stacklevel=4)

    def _count(self, classes: torch.Tensor, bad: torch.Tensor) -> None:
        with self._lock:
            for c, b in zip(classes.tolist(), bad.tolist()):
                self.drawn[c] = self.drawn.get(c, 0) + 1
                self.rejected[c] = self.rejected.get(c, 0) + int(b)

    def fingerprint(self) -> dict:
        """What filtered images depend on: the classifier's weights and the filter's settings."""
        from .cache import generator_digest
        _, digest = generator_digest(self.classifier)
        return dict(classifier=self.spec, classifier_sha256=digest, max_tries=self.max_tries,
                    on_exhausted=self.on_exhausted,
                    class_index=sorted((repr(k), v) for k, v in (self.class_index or {}).items()))

    def summary(self) -> str:
        rates = ", ".join(f"{c}: {r:.1%}" for c, r in self.rejection_rate.items())
        return (f"label filter ({self.spec}): rejected per class {{{rates}}}; tries ran out for "
                f"{sum(self.exhausted.values())} image(s) ({self.on_exhausted!r} used)")


def check_label_filter(label_filter):
    """``label_filter`` if it is None or a :class:`LabelFilter`, else a clear error."""
    if label_filter is not None and not isinstance(label_filter, LabelFilter):
        raise DKGMError(f"label_filter must be a dkgm_aug.LabelFilter or None, got {type(label_filter).__name__}; "
                        "wrap a classifier as LabelFilter(classifier)")
    return label_filter

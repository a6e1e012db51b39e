"""One run of the long-tailed benchmark: a method and a seed trained from scratch, then scored
on the balanced test split (``run``), with the metrics it reports."""
import time
from pathlib import Path

import numpy as np
import torch

from dkgm_aug.nn import evaluating
from common import tail_classes
from lt_data import Augmenter, Pool, build_pool, rejection_share, splits, to_input
from lt_losses import DEFERRED, LOSSES, loss_fn, mixup
from lt_records import append_curves, code_version, config_of, generator_sha, hardware, knobs_of


# -- metrics ---------------------------------------------------------------------------------------
def per_class_recall(y_true, y_pred, n_classes: int) -> np.ndarray:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return np.array([(y_pred[y_true == c] == c).mean() if (y_true == c).any() else np.nan
                     for c in range(n_classes)])


def balanced_accuracy(y_true, y_pred, n_classes: int = 10) -> float:
    return float(np.nanmean(per_class_recall(y_true, y_pred, n_classes)))


def metrics(y_true, y_pred, n_classes: int, tail: list) -> dict:
    from sklearn.metrics import f1_score
    recall = per_class_recall(y_true, y_pred, n_classes)
    return dict(accuracy=float(np.mean(np.asarray(y_true) == np.asarray(y_pred))),
                macro_f1=float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro",
                                        zero_division=0)),
                tail_recall=float(np.nanmean(recall[tail])),
                class_recall=";".join(f"{r:.4f}" for r in recall))


# -- one run ---------------------------------------------------------------------------------------
def build_model(args):
    import timm
    kwargs = dict(channels=tuple(args.channels)) if args.channels else {}
    return timm.create_model(args.model, num_classes=10, in_chans=1, pretrained=False, **kwargs)


@torch.no_grad()
def predict(model, images, size) -> torch.Tensor:
    device = next(model.parameters()).device
    with evaluating(model):
        return torch.cat([model(to_input(images[i:i + 512], size, device)).argmax(1).cpu()
                          for i in range(0, len(images), 512)])


def run(method: str, args, seed: int, curves: Path | None = None) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    lt, val, test = splits(args)
    counts = torch.bincount(lt.targets, minlength=10)
    start = time.perf_counter()
    pool = build_pool(DEFERRED.get(method, method), args, lt, seed)
    plain = Pool(lt.images, lt.targets) if method in DEFERRED else pool   # a deferred method's first phase
    setup_s = time.perf_counter() - start
    size = args.size if args.data == "digits" else None
    loss_method = args.combine_loss if method == "loss_dkgm" else method if method in LOSSES else "ce"
    per_epoch = -(-len(lt) // args.batch)
    total = args.epochs * per_epoch if args.epochs else args.steps

    model = build_model(args).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    augment = Augmenter(method, args, lt, counts, seed)
    best, history, epoch_loss = (-1.0, 0, None), [], []
    start = time.perf_counter()
    model.train()
    for step in range(total):
        progress = step / total
        source = plain if progress < args.drw_start else pool
        x, y = source.draw(args.batch, g)
        x, y, mix = to_input(augment(x, y, g), size, args.device), y.to(args.device), None
        if loss_method in ("mixup", "mixup_drw"):
            x, mix = mixup(x, y, args.mixup_alpha, g)
        loss = loss_fn(loss_method, model(x), y, counts, progress, args, mix)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        epoch_loss.append(loss.item())
        if (step + 1) % per_epoch:
            continue
        epoch = (step + 1) // per_epoch
        pool.set_epoch(epoch)               # after each pass, a bank-backed pool shows its next neighbours
        if args.epochs:
            val_bacc = balanced_accuracy(val.targets.numpy(), predict(model, val.images, size).numpy())
            history.append(dict(method=method, seed=seed, epoch=epoch, train_loss=round(float(np.mean(epoch_loss)), 5),
                                val_bacc=round(val_bacc, 5)))
            epoch_loss = []
            if val_bacc > best[0]:   # the first best epoch: later ties add nothing the validation set can see
                best = (val_bacc, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    gen_s = pool.draw_s + augment.seconds
    train_s = time.perf_counter() - start - gen_s
    if best[2] is not None:
        model.load_state_dict(best[2])
    if curves is not None and history:
        append_curves(curves, history, config_of(args), knobs_of(method, args))
    pred = predict(model, test.images, size)     # the test split, read once
    res = metrics(test.targets.numpy(), pred.numpy(), 10, tail_classes(counts.tolist()))
    return dict(method=method, seed=seed, **config_of(args), n_train=len(lt), n_pool=len(pool),
                n_generated=pool.n_generated + augment.n_changed, rejected=rejection_share(
                    getattr(pool.balanced, "label_filter", None), getattr(pool.balanced, "bank", None),
                    getattr(augment.dkgm, "label_filter", None), getattr(augment.bank, "bank", None)),
                final_loss=round(loss.item(), 4),
                train_s=round(train_s, 2), setup_s=round(setup_s, 2), generate_s=round(gen_s, 2),
                knobs=knobs_of(method, args), hardware=hardware(args.device),
                generator_sha256=generator_sha(method, args), code=code_version(),
                chosen_epoch=best[1] if args.epochs else "", val_bacc=round(best[0], 5) if args.epochs else "", **res)

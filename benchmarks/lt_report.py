"""The long-tailed benchmark's report, rebuilt from the rows of ``runs.csv``: per method the
knob variant chosen on validation, summaries over seeds and paired differences, the tables of
``results.md`` (``write_outputs``) and the plots ``results.png`` and ``curves.png``."""
import csv
from pathlib import Path

import numpy as np
import torch

from lt_data import splits
from lt_losses import AUGMENTED, GENERATIVE
from lt_records import NUMBERS, config_of, hardware, parse_knobs, with_recorded_later


# -- choosing and summarising ----------------------------------------------------------------------
def select_knobs(rows: list) -> tuple:
    """``(rows of each method's chosen variant, {method: (knobs, mean val bacc, variants tried)})``:
    the variant with the best mean validation balanced accuracy over the seeds all variants ran
    (all seeds when they share none), label-filter variants only when a method has no other (the
    shipped evaluators saw training images outside the split: an upper bound, shown in the variants
    table). Without a validation split nothing may choose, so a method may then have only one variant."""
    chosen, keep = {}, []
    for m in dict.fromkeys(r["method"] for r in rows):
        variants = {}
        for r in rows:
            if r["method"] == m:
                variants.setdefault(r["knobs"], []).append(r)
        if len(variants) > 1 and any(r["val_bacc"] is None for rs in variants.values() for r in rs):
            raise SystemExit(f"{m} was run with {len(variants)} knob variants ({', '.join(sorted(variants))}) and "
                             "not all of them with a validation split (--epochs), so none can be chosen: give each "
                             "variant its own --out, or run them all with --epochs")
        # compared on the seeds every variant ran, where they share any: a variant's extra seeds are
        # other draws of the split's noise, not evidence for its knobs
        shared = set.intersection(*({r["seed"] for r in rs} for rs in variants.values()))
        score = {k: np.mean([r["val_bacc"] for r in rs if not shared or r["seed"] in shared])
                 if all(r["val_bacc"] is not None for r in rs) else -1.0 for k, rs in variants.items()}
        # a label-filter variant is an upper bound, not a choice: the shipped evaluators saw training images
        # outside the split (its validation part among them), so it competes only when it is all there is
        eligible = [k for k in variants if "label_filter=" not in k] or list(variants)
        best = max(eligible, key=lambda k: (score[k], len(variants[k])))
        own = [r["val_bacc"] for r in variants[best]]          # shown: the chosen variant's mean over its seeds
        chosen[m] = (best, float(np.mean(own)) if score[best] >= 0 else -1.0, len(variants))
        keep += variants[best]
    return keep, chosen


def sd(xs) -> float:
    """Sample standard deviation (n - 1 in the denominator, as the seed-to-seed spread of a method
    is an estimate from 3 to 5 seeds); 0 for a single seed (the tables then show no spread)."""
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def mean_sd(xs, d: int = 3) -> str:
    """``mean ± sd`` of ``xs`` to ``d`` decimals; the mean alone for one value (no spread to show)."""
    return f"{np.mean(xs):.{d}f}" + (f" ± {sd(xs):.{d}f}" if len(xs) > 1 else "")


def summarise(rows: list) -> dict:
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        out[m] = {k: (float(np.mean([r[k] for r in rs])), sd([r[k] for r in rs])) for k in NUMBERS}
        out[m]["seeds"] = sorted(r["seed"] for r in rs)
    return out


def best_method(methods: list, s: dict, chosen: dict, args):
    """The method with the best mean validation balanced accuracy where there is a validation split
    (test accuracy without one, as in --quick); ties go to the one with more seeds."""
    return max(methods, key=lambda m: (chosen[m][1], len(s[m]["seeds"])) if args.epochs else s[m]["accuracy"][0],
               default=None)


def mean_class_recall(rows: list, method: str):
    """Mean recall of each class over ``method``'s seeds, or None unless all its rows logged it."""
    logged = [r["class_recall"] for r in rows if r["method"] == method]
    return np.mean([[float(v) for v in c.split(";")] for c in logged], axis=0) if logged and all(logged) else None


def paired_difference(rows: list, method: str, baseline: str) -> tuple:
    """``(mean, std, n)`` over the ``n`` seeds both ran of ``method``'s accuracy minus ``baseline``'s."""
    acc = {(r["method"], r["seed"]): r["accuracy"] for r in rows}
    d = [acc[(method, s)] - acc[(baseline, s)] for (m, s) in acc if m == method and (baseline, s) in acc]
    return (float(np.mean(d)), sd(d), len(d)) if d else (float("nan"), float("nan"), 0)


# -- results.md ------------------------------------------------------------------------------------
def trained_on(spec: str) -> str:
    """A checkpoint's own record of its training data."""
    from dkgm_aug import load
    try:
        return load(spec).info.get("training", {}).get("data", "unknown")
    except Exception as exc:   # the report must still be written
        return f"unreadable ({exc})"


def used(rows, name: str) -> list:
    """The values of the generator setting ``name`` (generator, evae, kss) that the rows shown ran
    with: a knob of their method (converged protocol) or a column (fixed steps)."""
    methods = {"generator": ("dkgm_balanced", "dkgm_deferred") + AUGMENTED, "evae": ("evae_balanced",),
               "kss": ("kss_balanced",)}[name]
    values = {parse_knobs(r["knobs"]).get(name) or r.get(name) for r in rows if r["method"] in methods}
    return sorted(values - {None, ""})


def generator_lines(rows) -> list:
    """What made the synthetic images of the rows shown (from the rows, not from the last
    command), each DKGM generator with its own record of its training data."""
    gens, evae, kss = used(rows, "generator"), used(rows, "evae"), used(rows, "kss")
    made = "; ".join(f"`{g}`, trained on: {trained_on(g)}" for g in gens)
    return [f"- DKGM generator(s) of the rows shown: {made}" if gens else "- DKGM generator: none (no DKGM row shown)",
            f"- EVAE: {'; '.join(evae) or 'no row'}; kernel-smoothed score: {'; '.join(kss) or 'no row'}, built from "
            "the long-tailed split"]


def code_lines(rows) -> list:
    """Which code made the rows shown (``lt_records.code_version``), and the methods whose seeds
    ran on different code: ``--resume`` and ``--report-only`` pool rows across code changes."""
    if not rows:
        return []
    versions = sorted({r.get("code") or "not recorded" for r in rows})
    mixed = sorted({r["method"] for r in rows if len({q.get("code") or "not recorded" for q in rows
                                                      if q["method"] == r["method"]}) > 1})
    return [f"- code of the rows shown (source hash, `lt_records.code_version`): {', '.join(versions)}"
            + (f"; methods whose rows ran on more than one: {', '.join(mixed)}" if mixed else "")]


def protocol_lines(args, cfg, counts, rows=()) -> list:
    lines = [f"- data: {args.data}, train split long-tailed with rho={args.rho} ({args.profile} profile, class order "
             f"{args.class_order}, split seed {args.split_seed}, class counts {counts}); "
             "test balanced, so accuracy = balanced accuracy; tail classes (the rarest third, ties included): "
             f"{args.tail}",
             f"- model: timm `{args.model}`" + (f" with channels {tuple(args.channels)}" if args.channels else "")
             + " from scratch, in_chans=1" + (f", 8x8 inputs upsampled to {args.size}x{args.size}"
                                              if args.data == "digits" else "")]
    if args.epochs:
        lines += [f"- {args.epochs} epochs of Adam (lr {args.lr}, cosine), batch {args.batch}; validation: "
                  f"{args.val_fraction:g} of each class of the long-tailed split held out (long-tailed too); the "
                  "weights of the best validation epoch are tested, once; per method, the knob variant with the best "
                  "mean validation balanced accuracy is shown (`knobs`); loss curves: `curves.csv`, `curves.png`"]
    else:
        lines += [f"- {args.steps} Adam steps (lr {args.lr}, cosine), batch {args.batch}"]
    return lines + [
        f"- base aug: random shift <= {args.shift} px, the same for every method",
        *generator_lines(rows),
        *code_lines(rows),
        f"- threads per run: {args.threads}; hardware of the runs: "
        + "; ".join(sorted({r.get("hardware") or "not recorded" for r in rows} or {hardware(args.device)})),
        "- mean ± sample std (n - 1) over the seeds listed; `vs best` is the paired difference in accuracy to the best "
        "non-generative method over the seeds both ran (their number in brackets: where it is smaller than the "
        "seeds listed, the difference is not the gap between the two means shown); `generate s` is time spent "
        "making synthetic images, `train s` the rest of the training loop"]


def class_recall_table(rows: list, summary: dict, counts: list) -> list:
    """Mean recall of each class over the seeds, for the methods whose rows all logged it."""
    lines = ["", "Recall per class (mean over the seeds; training images per class in the header):", "",
             "| method | " + " | ".join(f"{c} ({n})" for c, n in enumerate(counts)) + " |",
             "|---|" + "---|" * len(counts)]
    for m in summary:
        mean = mean_class_recall(rows, m)
        if mean is not None:
            lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in mean) + " |")
    return lines if len(lines) > 5 else []


def variants_table(rows: list) -> list:
    """Every knob variant of the methods that tried more than one, chosen or not (the chosen one
    is the best mean validation balanced accuracy among those without a label filter, see
    :func:`select_knobs`); test accuracy is shown for the record only."""
    variants = {}
    for r in rows:
        variants.setdefault(r["method"], {}).setdefault(r["knobs"], []).append(r)
    lines = ["", "Knob variants tried (per method, the chosen one is the row above: the best `val bacc` among "
             "the variants without a label filter, which is an upper bound; test accuracy shown for the record, "
             "never used to choose):", "",
             "| method | knobs | val bacc | accuracy | tail recall | rejected by the filter | seeds |",
             "|---|---|---|---|---|---|---|"]
    for m, by_knobs in variants.items():
        if len(by_knobs) < 2:
            continue
        for knobs, rs in by_knobs.items():
            val = [r["val_bacc"] for r in rs if r["val_bacc"] is not None]
            rej = [float(r["rejected"]) for r in rs if r.get("rejected")]
            ms = lambda k: mean_sd([r[k] for r in rs])   # noqa: E731
            lines.append(f"| {m} | {knobs or '-'} | {f'{np.mean(val):.3f}' if val else '-'} | {ms('accuracy')} | "
                         f"{ms('tail_recall')} | {f'{np.mean(rej):.3f}' if rej else '-'} | "
                         f"{sorted(r['seed'] for r in rs)} |")
    return lines if len(lines) > 5 else []


def write_outputs(rows: list, args, out: Path) -> None:
    all_rows = rows
    rows, chosen = select_knobs(rows)
    s = summarise(rows)
    cfg = config_of(args)
    lt, _, _ = splits(args)
    counts = torch.bincount(lt.targets, minlength=10).tolist()
    commands = (out / "commands.txt").read_text().splitlines() if (out / "commands.txt").exists() else []
    plain = [m for m in s if m not in GENERATIVE]
    # the baseline of `vs best`: by validation balanced accuracy where there is one, never by test accuracy
    best = best_method(plain, s, chosen, args)
    lines = ["# Long-tailed classification benchmark", "", "Commands (each appended rows to `runs.csv`):", ""]
    lines += [f"    {c}" for c in commands] + [""] + protocol_lines(args, cfg, counts, rows) + [
        f"- best non-generative method{' (by validation balanced accuracy)' if args.epochs else ''}: {best}",
        "- `results.png`: left, test balanced accuracy per method (mean ± std, a dot per seed; dashed: the best "
        "non-generative method's mean); right, recall per class from head to tail (mean over the seeds)", "",
        "| method | accuracy | vs best (paired) | macro-F1 | tail recall | knobs | val bacc | epoch | train s | "
        "generate s | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, v in s.items():
        f = lambda k: mean_sd([r[k] for r in rows if r["method"] == m])  # noqa: E731
        d, sd, n = paired_difference(rows, m, best) if best and m != best else (float("nan"),) * 2 + (0,)
        ep = [r["chosen_epoch"] for r in rows if r["method"] == m and r.get("chosen_epoch")]
        knobs, val, tried = chosen[m]
        diff = f"{d:+.3f}" + (f" ± {sd:.3f}" if n > 1 else "") + f" ({n})"
        lines.append(f"| {m} | {f('accuracy')} | {diff if n else '-'} | {f('macro_f1')} | "
                     f"{f('tail_recall')} | {knobs or '-'}{f' (of {tried})' if tried > 1 else ''} | "
                     f"{f'{val:.3f}' if val >= 0 else '-'} | {'/'.join(ep) or '-'} | {v['train_s'][0]:.0f} | "
                     f"{v['generate_s'][0]:.0f} | {v['seeds']} |")
    lines += class_recall_table(rows, s, counts) + variants_table(all_rows)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    best_gen = best_method([m for m in s if m in GENERATIVE], s, chosen, args)
    plot_results(rows, s, counts, (best, best_gen), args, out)
    if (out / "curves.csv").exists():
        plot_curves(out / "curves.csv", cfg, out / "curves.png", {m: c[0] for m, c in chosen.items()})


# -- plots -----------------------------------------------------------------------------------------
PLAIN_COLOUR, GENERATIVE_COLOUR = "tab:blue", "tab:orange"


def plot_results(rows: list, s: dict, counts: list, best: tuple, args, out: Path) -> None:
    """``results.png``: balanced accuracy per method (left) and recall per class (right); ``best`` is
    ``(best non-generative, best generative)`` method, by validation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    widths = (0.45 * max(len(s), 5) + 1.5, 6.0)                    # inches: left grows with the methods
    fig, (left, right) = plt.subplots(1, 2, figsize=(sum(widths), 4.8), gridspec_kw={"width_ratios": widths})
    plot_accuracy(left, rows, s, best[0])
    plot_class_recall(right, rows, s, counts, best)
    n_seeds = max(len(v["seeds"]) for v in s.values())
    budget = f"{args.epochs} epochs" if args.epochs else f"{args.steps} steps"
    fig.suptitle(f"{args.data}, rho={args.rho:g}, {args.model}, {budget}, up to {n_seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    plt.close(fig)


def plot_accuracy(ax, rows: list, s: dict, best) -> None:
    """Mean ± std of test balanced accuracy per method, a dot per seed, the y axis zoomed to the data."""
    names = list(s)
    for i, m in enumerate(names):
        colour = GENERATIVE_COLOUR if m in GENERATIVE else PLAIN_COLOUR
        seeds = [r["accuracy"] for r in rows if r["method"] == m]
        ax.scatter(i + np.linspace(-0.12, 0.12, len(seeds)) if len(seeds) > 1 else [i], seeds, s=10,
                   color=colour, alpha=0.45, zorder=2, linewidths=0)
        mean, std = s[m]["accuracy"]
        ax.errorbar(i, mean, yerr=std, fmt="o", ms=6, color=colour, capsize=4, zorder=3)
    if best:
        ax.axhline(s[best]["accuracy"][0], ls="--", lw=1, color=PLAIN_COLOUR, zorder=1)
    low = min(min(r["accuracy"] for r in rows), min(v["accuracy"][0] - v["accuracy"][1] for v in s.values()))
    high = max(max(r["accuracy"] for r in rows), max(v["accuracy"][0] + v["accuracy"][1] for v in s.values()))
    pad = max(0.12 * (high - low), 0.003)
    ax.set_ylim(low - pad, high + 2.5 * pad)                    # headroom for the legend
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    for tick in ax.get_xticklabels():
        tick.set_color(GENERATIVE_COLOUR if tick.get_text() in GENERATIVE else "black")
    ax.set_ylabel("test balanced accuracy")
    ax.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=c, marker="o", ls="", label=label) for c, label in
               ((PLAIN_COLOUR, "non-generative"), (GENERATIVE_COLOUR, "generative"))]
    handles += [Line2D([], [], color=PLAIN_COLOUR, ls="--", label=f"best non-generative: {best}")] if best else []
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_title("mean ± std over seeds, dots: seeds", fontsize=9)


def plot_class_recall(ax, rows: list, s: dict, counts: list, best: tuple) -> None:
    """Mean recall per class, classes from head to tail; the best non-generative and the best
    generative method (by validation) in colour, the other methods thin and grey."""
    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    recall = {m: r for m in s if (r := mean_class_recall(rows, m)) is not None}
    if not recall:
        ax.text(0.5, 0.5, "no per-class recall logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    colours = dict(zip(best, (PLAIN_COLOUR, GENERATIVE_COLOUR)))
    for m, r in sorted(recall.items(), key=lambda item: item[0] in colours):    # highlighted ones on top
        lead = m in colours
        ax.plot(range(len(order)), r[order], marker="o" if lead else None, ms=4, lw=2 if lead else 0.8,
                color=colours.get(m, "0.6"), alpha=1 if lead else 0.7, zorder=3 if lead else 2,
                label=m if lead else None)
    if set(recall) - set(colours):
        ax.plot([], [], lw=0.8, color="0.6", label="other methods")
    ax.set_xticks(range(len(order)), [f"{c} ({counts[c]})" for c in order], rotation=35, ha="right", fontsize=8)
    ax.set(xlabel="class (training images), head to tail", ylabel="test recall (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("recall per class; coloured: the best non-generative and generative method", fontsize=9)


def curve_rows(path: Path, cfg: dict, chosen: dict) -> list:
    """The rows of ``curves.csv`` made with the settings ``cfg`` by each method's chosen knob variant
    (``chosen``: method -> knobs), the latest run of each seed; rows saved with more settings than
    ``cfg`` names still match."""
    def matches(config: str) -> bool:
        saved = with_recorded_later(dict(item.split("=", 1) for item in config.split(";") if "=" in item))
        return all(saved.get(k) == str(v) for k, v in cfg.items())
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if matches(r["config"])
                and r["method"] in chosen and (r.get("knobs") or "") == chosen[r["method"]]]
    latest = {(r["method"], r["seed"], r["epoch"]): r for r in rows}   # a rerun replaces the older run's epochs
    return list(latest.values())


def plot_curves(path: Path, cfg: dict, png: Path, chosen: dict) -> None:
    """Mean training loss and validation balanced accuracy per epoch, one line per method: over the
    runs of its chosen knob variant only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = curve_rows(path, cfg, chosen)
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        by_epoch = {}
        for r in rows:
            if r["method"] == m:
                by_epoch.setdefault(int(r["epoch"]), []).append((float(r["train_loss"]), float(r["val_bacc"])))
        ep = sorted(by_epoch)
        for ax, i in zip(axes, (0, 1)):
            ax.plot(ep, [np.mean([v[i] for v in by_epoch[e]]) for e in ep], label=m)
    axes[0].set(xlabel="epoch", ylabel="training loss (mean over the epoch)", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="validation balanced accuracy")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)

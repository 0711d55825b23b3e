"""The accuracy sweep's figures (see accuracy.py): the eval metric by mode, and against the density."""

from __future__ import annotations

import textwrap
from pathlib import Path


def plot(results: dict, names: list[str], modes: list[str], scales: list[int], path: Path,
         metrics: dict[str, tuple[str, bool]], ranks: int = 2) -> None:
    """The eval metric of each mode, one panel per job, a bar per epochs multiple (``ranks``: the runs'
    rank count, for the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(5 * ((len(names) + 1) // 2), 8),
                             squeeze=False)
    width = 0.8 / len(scales)
    for ax, name in zip(axes.flat, names):
        model, base = results[name]["model"], results[name]["epochs"]
        metric, higher = metrics[model]
        shown, labels = [], []
        for j, s in enumerate(scales):
            cells = [results[name]["runs"].get((m, s), {}).get("metrics", {}) for m in modes]
            values = [c.get(metric) for c in cells]
            spreads = [c.get(metric + "_std", 0.0) for c in cells]
            xs = [i + j * width for i in range(len(modes))]
            ax.bar(xs, [v if v is not None else 0 for v in values], width, label=f"{base * s} epochs",
                   yerr=spreads if any(spreads) else None, capsize=2)
            for x, v, m in zip(xs, values, modes):   # the figure on each bar; say why one is missing
                missing = "not run" if (m, s) not in results[name]["runs"] else "failed"
                labels.append((x, missing if v is None else f"{v:.3f}", v is None))
            shown += [v for v in values if v is not None]
        if higher and shown:   # accuracies sit near 1: start the axis near the lowest one
            ax.set_ylim(max(0.0, min(shown) - 0.05), 1.01)
        bottom = ax.get_ylim()[0]
        for x, text, missing in labels:   # inside the bar's foot, clear of the whiskers
            ax.annotate(text, (x, bottom), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7, rotation=90, color="black" if missing else "white")
        ax.set_xticks([i + width * (len(scales) - 1) / 2 for i in range(len(modes))])
        ax.set_xticklabels(modes, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{name}: {metric} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.legend(fontsize=8)
    seeds = _seed_count(results, names)
    _finish(fig, axes, len(names), f"Eval metric by mode after the same epochs ({ranks} ranks, Gloo)"
            + (f"; bars: mean over {seeds} seeds, whiskers: stdev" if seeds > 1 else ""), path)


def _seed_count(results: dict, names: list[str]) -> int:
    return max((r.get("seeds", 1) for n in names for r in results[n]["runs"].values()), default=1)


def _finish(fig, axes, used: int, title: str, path: Path) -> None:
    """Blanks the panels past the ``used`` ones, titles the figure and writes it."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    # wrapped to the figure's width, so that a one-column figure keeps the whole title
    fig.suptitle(textwrap.fill(title, width=max(40, int(fig.get_figwidth() * 13))), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_density(results: dict, names: list[str], by_density: dict[float, str], scale: int, path: Path,
                 metrics: dict[str, tuple[str, bool]], bar: tuple) -> None:
    """The eval metric against the density (log axis, ``by_density``: {d: mode}), dense as a line with
    its stdev as a band and the bar for d = 0.01 at these epochs (``bar``: allowed points, allowed GAN
    ratio) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bar_gap, bar_ratio = bar
    cols = 2 if len(names) in (2, 4) else min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        model, base = results[name]["model"], results[name]["epochs"]
        metric, higher = metrics[model]
        points = [(d, results[name]["runs"].get((m, scale), {}).get("metrics", {})) for d, m in by_density.items()]
        points = [(d, c[metric], c.get(metric + "_std", 0.0)) for d, c in points if metric in c]
        if points:
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label="Ranger (top-k + error feedback)")
        dense = results[name]["runs"].get(("dense", scale), {}).get("metrics", {})
        if metric in dense:
            dv, ds = dense[metric], dense.get(metric + "_std", 0.0)
            ax.axhline(dv, color="black", lw=1, label="dense fp32")
            ax.axhspan(dv - ds, dv + ds, color="black", alpha=0.08)
            if higher and bar_gap is not None:
                ax.axhline(dv - bar_gap / 100, color="tab:red", ls="--", lw=1, label=f"target: dense - {bar_gap:g} pt")
            elif not higher and bar_ratio is not None:
                ax.axhline(bar_ratio * dv, color="tab:red", ls="--", lw=1, label=f"target: {bar_ratio:g}x dense")
        ax.set_xscale("log")
        ax.set_xlabel("density d (fraction of entries sent per step)")
        ax.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"{name}, {base * scale} epochs", fontsize=9)
        ax.legend(fontsize=7)
    seeds = _seed_count(results, names)
    _finish(fig, axes, len(names), "Eval metric against density after the same epochs as dense"
            + (f" (mean over {seeds} seeds, whiskers and band: stdev)" if seeds > 1 else ""), path)

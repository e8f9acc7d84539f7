"""Pictures for reports (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def layer_scores_chart(
    scores: Mapping[str, Sequence[float]],
    selected: Sequence[int],
    path: str | Path,
    title: str = "Per-layer scores",
) -> Path:
    """One bar chart per scorer over LLM layers, the selected region's layers highlighted."""
    names = list(scores)
    fig, axes = plt.subplots(
        len(names), 1, figsize=(10, 1.9 * len(names) + 0.8), sharex=True, squeeze=False
    )
    chosen = set(selected)
    for ax, name in zip(axes[:, 0], names, strict=True):
        values = list(scores[name])
        colors = ["tab:orange" if i in chosen else "tab:blue" for i in range(len(values))]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_ylabel(name.replace("_", "\n"), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    n = len(next(iter(scores.values()))) if names else 0
    axes[-1, 0].set_xticks(range(n))
    axes[-1, 0].set_xlabel("LLM layer (orange: selected region)")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_figure(fig, path: str | Path) -> Path:
    """Lay out `fig`, write it to `path` (parents created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_chart(
    tables: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: str | Path,
    title: str = "Held-out visual accuracy",
) -> Path:
    """Per question kind: each model's accuracy (bars), its blind control (hatched) and chance.

    `tables` maps a model name to `vregion.eval.visual.visual_accuracy` output.
    """
    import numpy as np

    models = list(tables)
    kinds = [k for k in next(iter(tables.values())) if k != "overall"] + ["overall"]
    x = np.arange(len(kinds))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(kinds) * max(1, len(models) / 2)), 4))
    for m, name in enumerate(models):
        table = tables[name]
        offset = (m - (len(models) - 1) / 2) * width
        seen = [table[k]["accuracy"] for k in kinds]
        blind = [table[k]["blind"] for k in kinds]
        bars = ax.bar(x + offset, seen, width * 0.95, label=name)
        ax.bar(
            x + offset,
            blind,
            width * 0.95,
            fill=False,
            hatch="//",
            edgecolor=bars.patches[0].get_facecolor(),
            linewidth=0,
        )
    chance = [next(iter(tables.values()))[k]["chance"] for k in kinds]
    ax.scatter(x, chance, marker="_", s=900, color="black", zorder=3, label="chance")
    ax.set_xticks(x, kinds)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (hatched: images shuffled)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(models) + 1, 4))
    ax.set_title(title)
    return save_figure(fig, path)


def line_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """Lines named by `series` keys, each given as (x values, y values)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path)


def note_chart(path: str | Path, text: str) -> Path:
    """A picture that only says `text`: a declared plot output whose data was not asked for."""
    fig, ax = plt.subplots(figsize=(7, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10)
    return save_figure(fig, path)

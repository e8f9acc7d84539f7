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

"""The comparison report of a sweep: tables, charts and the paper's figures beside ours.

Input: for each finished run (`vregion.sweep.Run`), the metrics files its experiment
committed (metrics/eval.json, train.json, region.json). Every number in the report is copied
from those files or is a ratio of two of them; `comparison.json` keeps the copied values with
the experiment revision they came from, so they can be checked against the files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from vregion.plots import line_chart

PAPER_SOURCE = (
    "Wang et al., arXiv 2412.12785 (ACL 2025), as summarised in DESIGN.md §2 "
    "(from a paper summary, not checked against the PDF)"
)
PAPER_RETENTION_BY_LAYERS = {1: 91.9, 2: 96.5, 4: 98.0, 8: 99.4}
"""Bunny-Llama-3-8B-V, layers tuned of 32 -> % of the all-layer visual average."""
PAPER_TIME_RATIO = {"LLaVA-1.5-7B/13B": 0.77, "Bunny-Llama-3-8B-V": 0.87}
"""Region (25%) training time / all-layer training time."""


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n questions."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(n, 1))


def run_row(name: str, labels: str, metrics: Mapping[str, dict], rev: str) -> dict:
    """The figures of one run, copied from its metrics files."""
    tuned = metrics["eval"]["models"]["tuned"]
    visual = tuned["visual"]
    text = tuned.get("text", {})
    train = metrics["train"]
    acc, n = visual["overall"]["accuracy"], visual["overall"]["n"]
    return {
        "run": name,
        "label": labels,
        "rev": rev,
        "layers": metrics["region"]["region"],
        "region_size": metrics["region"]["region_size"],
        "num_layers": metrics["region"]["num_layers"],
        "accuracy": acc,
        "accuracy_se": round(standard_error(acc, n), 4),
        "blind": visual["overall"]["blind"],
        "n": n,
        "per_kind": {k: v["accuracy"] for k, v in visual.items() if k != "overall"},
        "text_mc_accuracy": text.get("mc_accuracy"),
        "text_mc_vs_base": text.get("mc_accuracy_vs_base"),
        "text_nll_vs_base": text.get("answer_nll_vs_base"),
        "seconds_per_step": train["seconds_per_step"],
        "trainable_params": train["trainable_params"],
        "trainable_percent": train["trainable_percent"],
        "prune_curve": [
            {"layers_removed": c["layers_removed"], "accuracy": c["accuracy"]}
            for c in metrics["eval"].get("prune_curve", [])
        ],
    }


def add_ratios(rows: Sequence[dict], baseline: dict | None) -> None:
    """Retention % and step-time ratio against the all-layer run."""
    for row in rows:
        if baseline is None:
            row["retention_percent"] = row["time_ratio"] = None
            continue
        row["retention_percent"] = round(100 * row["accuracy"] / baseline["accuracy"], 1)
        row["time_ratio"] = round(row["seconds_per_step"] / baseline["seconds_per_step"], 3)


def _fmt(x, spec: str, empty: str = "–") -> str:
    return empty if x is None else format(x, spec)


def sweep_table(rows: Sequence[dict]) -> str:
    header = [
        "run",
        "layers tuned",
        "visual acc. ± s.e.",
        "blind",
        "retention vs all",
        "text MC vs base",
        "text NLL vs base",
        "s/step",
        "time vs all",
        "trainable params",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        layers = f"{r['region_size']}/{r['num_layers']}"
        if r["region_size"] < r["num_layers"]:
            layers += f" {r['layers']}"
        lines.append(
            "| "
            + " | ".join(
                [
                    f"**{r['label']}**",
                    layers,
                    f"{r['accuracy']:.3f} ± {r['accuracy_se']:.3f}",
                    f"{r['blind']:.3f}",
                    _fmt(r["retention_percent"], ".1f")
                    + ("%" if r["retention_percent"] is not None else ""),
                    _fmt(r["text_mc_vs_base"], "+.3f"),
                    _fmt(r["text_nll_vs_base"], "+.4f"),
                    f"{r['seconds_per_step']:.3f}",
                    _fmt(r["time_ratio"], ".3f"),
                    f"{r['trainable_params']:,} ({r['trainable_percent']}%)",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def claims(by_label: Mapping[str, Mapping[str, dict]]) -> list[dict]:
    """The paper's claims that this sweep can check, each with our figure and whether it holds.

    A claim about an ordering holds only if the gap is larger than the two runs' combined
    standard error; otherwise it is "not resolved" at this sample size.
    """
    out = []
    strategies = by_label.get("strategies", {})
    sizes = by_label.get("sizes", {})
    base = strategies.get("all layers") or next(
        (r for k, r in sizes.items() if k.endswith("(all)")), None
    )
    uniform = strategies.get("uniform")

    def gap_verdict(better: dict, worse: dict) -> str:
        gap = better["accuracy"] - worse["accuracy"]
        noise = math.hypot(better["accuracy_se"], worse["accuracy_se"])
        if abs(gap) <= noise:
            return "not resolved (within 1 s.e.)"
        return "holds" if gap > 0 else "does not hold"

    if base and uniform:
        ret = uniform["retention_percent"]
        out.append(
            {
                "claim": "A sparse uniform 25% region keeps ~99% of all-layer visual accuracy",
                "paper": "99.4% (8 of 32 layers)",
                "ours": f"{ret:.1f}% ({uniform['region_size']} of {uniform['num_layers']} layers)",
                "verdict": "holds" if ret >= 97.0 else "does not hold",
            }
        )
        ratio = uniform["time_ratio"]
        out.append(
            {
                "claim": "Region tuning takes less time per step than all-layer tuning",
                "paper": "0.77× (LLaVA-1.5), 0.87× (Bunny)",
                "ours": f"{ratio:.2f}× s/step (runs timed one after another)",
                "verdict": "holds" if ratio < 1.0 else "does not hold",
            }
        )
        if uniform["text_mc_accuracy"] is not None and base["text_mc_accuracy"] is not None:
            d = uniform["text_mc_accuracy"] - base["text_mc_accuracy"]
            out.append(
                {
                    "claim": "Text skill is kept at least as well as with all-layer tuning",
                    "paper": "equal or better on MMLU, BBH, C-Eval, CMMLU",
                    "ours": f"text MC accuracy {uniform['text_mc_accuracy']:.3f} vs "
                    f"{base['text_mc_accuracy']:.3f} ({d:+.3f}); answer NLL vs base "
                    f"{uniform['text_nll_vs_base']:+.4f} vs {base['text_nll_vs_base']:+.4f}",
                    "verdict": "holds" if d >= 0 else "does not hold",
                }
            )
    top, bottom = strategies.get("top"), strategies.get("bottom")
    if top and bottom:
        out.append(
            {
                "claim": "Tuning the bottom block beats tuning the top block",
                "paper": "top block worst, bottom block better",
                "ours": f"bottom {bottom['accuracy']:.3f} vs top {top['accuracy']:.3f}",
                "verdict": gap_verdict(bottom, top),
            }
        )
    if uniform:
        others = {k: r for k, r in strategies.items() if k not in ("all layers", "uniform")}
        if others:
            best_label, best = max(others.items(), key=lambda kv: kv[1]["accuracy"])
            out.append(
                {
                    "claim": "Sparse uniform is the best 25% selection",
                    "paper": "uniform best among the 25% strategies",
                    "ours": f"uniform {uniform['accuracy']:.3f}; best other: {best_label} "
                    f"{best['accuracy']:.3f}",
                    "verdict": gap_verdict(uniform, best),
                }
            )
    ours = {  # the paper's counts are of 32 layers; an all-layer run is not one of them
        r["region_size"]: r["retention_percent"]
        for r in sizes.values()
        if r["region_size"] < r["num_layers"]
    }
    shared = [k for k in PAPER_RETENTION_BY_LAYERS if k in ours and ours[k] is not None]
    if len(shared) >= 2:  # an ordering needs two points
        out.append(
            {
                "claim": "Retention falls as fewer layers are tuned (1 < 2 < 4 < 8)",
                "paper": ", ".join(f"{k}: {PAPER_RETENTION_BY_LAYERS[k]}%" for k in shared),
                "ours": ", ".join(f"{k}: {ours[k]:.1f}%" for k in shared),
                "verdict": "holds"
                if all(ours[a] <= ours[b] for a, b in zip(shared, shared[1:], strict=False))
                else "does not hold",
            }
        )
    pruning = by_label.get("pruning", {})
    region_tuned, all_tuned = pruning.get("region-tuned (uniform)"), pruning.get("all-layer-tuned")
    if region_tuned and all_tuned and region_tuned["prune_curve"] and all_tuned["prune_curve"]:

        def drop(r: dict) -> tuple[int, float]:
            c = r["prune_curve"]
            return c[-1]["layers_removed"], c[0]["accuracy"] - c[-1]["accuracy"]

        k, d_region = drop(region_tuned)
        _, d_all = drop(all_tuned)
        out.append(
            {
                "claim": "Pruning outside the region hurts the region-tuned model less than the "
                "all-layer-tuned one",
                "paper": "all-layer-tuned model degrades much faster",
                "ours": f"accuracy drop with {k} layers removed: region-tuned {d_region:+.3f}, "
                f"all-layer-tuned {d_all:+.3f}",
                "verdict": "holds" if d_region < d_all else "does not hold",
            }
        )
    return out


def charts(by_label: Mapping[str, Mapping[str, dict]], out_dir: Path) -> dict[str, str]:
    """Retention vs layers tuned (ours and the paper's), and both pruning curves."""
    made = {}
    sizes = sorted(by_label.get("sizes", {}).values(), key=lambda r: r["region_size"])
    if sizes and all(r["retention_percent"] is not None for r in sizes):
        paper = sorted(PAPER_RETENTION_BY_LAYERS.items())
        made["retention"] = line_chart(
            {
                f"vregion, embedded default ({sizes[0]['num_layers']} layers)": (
                    [r["region_size"] for r in sizes],
                    [r["retention_percent"] for r in sizes],
                ),
                "paper, Bunny-Llama-3-8B-V (32 layers)": (
                    [k for k, _ in paper] + [32],
                    [v for _, v in paper] + [100.0],
                ),
            },
            out_dir / "retention_vs_layers.png",
            xlabel="LLM layers tuned (uniform)",
            ylabel="visual accuracy, % of all-layer tuning",
            title="Retention vs layers tuned",
        ).name
    pruning = by_label.get("pruning", {})
    curves = {
        label: (
            [c["layers_removed"] for c in r["prune_curve"]],
            [c["accuracy"] for c in r["prune_curve"]],
        )
        for label, r in pruning.items()
        if r["prune_curve"]
    }
    if curves:
        made["pruning"] = line_chart(
            curves,
            out_dir / "pruning_curves.png",
            xlabel="layers removed outside the uniform region (angular distance order)",
            ylabel="visual accuracy",
            title="Pruning the region-tuned and the all-layer-tuned model",
        ).name
    return made


def comparison_markdown(
    by_label: Mapping[str, Mapping[str, dict]],
    claim_rows: Sequence[dict],
    pictures: Mapping[str, str],
    reference: Mapping[str, object],
    command: str,
    missing: Sequence[str] = (),
) -> str:
    titles = {
        "strategies": "Layer selection at 25%",
        "sizes": "Uniform regions by size",
        "pruning": "Pruning outside the region",
    }
    parts = [
        "# vregion: the paper's comparisons on the embedded default",
        f"Reproduce: `{command}` (each run is a DVC experiment: `dvc exp show`). Every figure "
        "is copied from the metrics files the runs committed (`comparison.json` names the "
        "experiment revision of each); ± is the binomial standard error of the accuracy. Step "
        "times come from runs made one after another, so their ratios carry machine noise; "
        "`benchmarks/selective_step_time.py` measures them side by side.",
    ]
    if reference:
        parts.append(
            "Reference (main pipeline): "
            + "; ".join(f"{k} {v}" for k, v in reference.items())
            + "."
        )
    if missing:
        parts.append(f"**Not finished yet:** {', '.join(missing)} (rerun the command to complete).")
    parts += ["## The paper's claims", _claims_table(claim_rows), f"Paper figures: {PAPER_SOURCE}."]
    for sweep, rows in by_label.items():
        if not rows:
            continue
        parts += [f"## {titles.get(sweep, sweep)}", sweep_table(list(rows.values()))]
        if sweep == "sizes" and "retention" in pictures:
            parts.append(f"![retention vs layers](plots/{pictures['retention']})")
        if sweep == "pruning":
            parts.append(_curve_table(rows))
            if "pruning" in pictures:
                parts.append(f"![pruning curves](plots/{pictures['pruning']})")
    return "\n\n".join(parts) + "\n"


def _claims_table(rows: Sequence[dict]) -> str:
    if not rows:
        return "_No claim can be checked yet: the runs it needs have not finished._"
    lines = ["| claim | paper | ours | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['paper']} | {r['ours']} | **{r['verdict']}** |" for r in rows]
    return "\n".join(lines)


def _curve_table(rows: Mapping[str, dict]) -> str:
    ks = sorted({c["layers_removed"] for r in rows.values() for c in r["prune_curve"]})
    lines = [
        "| model | " + " | ".join(f"{k} removed" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for label, r in rows.items():
        acc = {c["layers_removed"]: c["accuracy"] for c in r["prune_curve"]}
        lines.append(f"| {label} | " + " | ".join(_fmt(acc.get(k), ".3f") for k in ks) + " |")
    return "\n".join(lines)

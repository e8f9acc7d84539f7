"""The comparison report of a sweep: tables, charts and the paper's figures beside ours.

Input: for each finished run (`vregion.sweep.plan.Run`), the metrics files its experiment
committed (metrics/eval.json, train.json, region.json), as its record in `results/runs/` holds
them (`vregion.sweep.experiments.RunRecord`). Every number in the report is copied from those
files or is a ratio of two of them; `comparison.json` keeps the copied values with the
experiment revision they came from, so they can be checked against the files.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from vregion.eval.questions import correctness_matrix, paired_scores
from vregion.eval.stats import Interval, all_hold, mcnemar, paired_bootstrap, verdict
from vregion.plots import line_chart, save_figure
from vregion.sweep.experiments import RunRecord
from vregion.sweep.plan import SWEEPS, Run

PAPER_SOURCE = (
    "Wang et al., arXiv 2412.12785 (ACL 2025), as summarised in DESIGN.md §2 "
    "(from a paper summary, not checked against the PDF)"
)
PAPER_RETENTION_BY_LAYERS = {1: 91.9, 2: 96.5, 4: 98.0, 8: 99.4}
"""Bunny-Llama-3-8B-V, layers tuned of 32 -> % of the all-layer visual average."""
PAPER_TIME_RATIO = {"LLaVA-1.5-7B/13B": 0.77, "Bunny-Llama-3-8B-V": 0.87}
"""Region (25%) training time / all-layer training time."""
SIGNIFICANT = 2.0
"""A gap counts only beyond this many (combined) standard errors; below it a claim is
"not resolved" at this sample size. Used only for runs without per-question results: treating
errors as independent when the runs answer the same questions overstates the noise."""
RETENTION_TOLERANCE = 0.02
"""The retention claim ("~99%") holds when the whole interval lies above the paper's figure
minus this (2 points), fails when it lies below."""


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n questions."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(n, 1))


def run_row(
    name: str, labels: str, metrics: Mapping[str, dict], rev: str, curve_n: int | None = None
) -> dict:
    """The figures of one run, copied from its metrics files. `curve_n`: the questions each
    point of the pruning curve was measured on (evaluate.curve_samples; default: all)."""
    tuned = metrics["eval"]["models"]["tuned"]
    visual = tuned["visual"]
    text = tuned.get("text", {})
    train = metrics["train"]
    acc, n = visual["overall"]["accuracy"], visual["overall"]["n"]
    curve_size = min(curve_n or n, n)  # the curve samples from the same held-out questions
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
        "chance_per_kind": {k: v.get("chance") for k, v in visual.items() if k != "overall"},
        "text_mc_accuracy": text.get("mc_accuracy"),
        "text_mc_vs_base": text.get("mc_accuracy_vs_base"),
        "text_nll_vs_base": text.get("answer_nll_vs_base"),
        "text_mc_items": text.get("mc_items"),
        "harness": harness_figures(tuned),
        "seconds_per_step": train["seconds_per_step"],
        "trainable_params": train["trainable_params"],
        "trainable_percent": train["trainable_percent"],
        "prune_curve": [
            {
                "layers_removed": c["layers_removed"],
                "accuracy": c["accuracy"],
                "n": curve_size,
                "accuracy_se": round(standard_error(c["accuracy"], curve_size), 4),
            }
            for c in metrics["eval"].get("prune_curve", [])
        ],
    }


def harness_figures(model: Mapping[str, dict]) -> dict[str, float]:
    """A model's lm-eval / lmms-eval figures as `{"<harness> <task> <metric>": value}`, as
    evaluate read them from the harnesses' results files (no standard errors, no counts)."""
    return {
        f"{harness} {task} {metric}": value
        for harness in ("lm_eval", "lmms_eval")
        for task, figures in model.get(harness, {}).items()
        for metric, value in figures.items()
        if metric != "n" and "_stderr" not in metric
    }


def harness_table(rows: Sequence[dict]) -> str:
    """The tuned model's harness figures per run; empty when no run has any."""
    keys = sorted({k for r in rows for k in r.get("harness", {})})
    if not keys:
        return ""
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        figures = r.get("harness", {})
        lines.append(
            f"| {r['label']} | " + " | ".join(_fmt(figures.get(k), ".3f") for k in keys) + " |"
        )
    return "Evaluation harnesses on the tuned model:\n\n" + "\n".join(lines)


def combine_seeds(rows: Sequence[dict]) -> dict:
    """One row for a run measured with several training seeds (the first seed's row first): its
    figures are means over the seeds, `accuracy_seeds` and `accuracy_sd` their spread, and
    `questions` / `curve_questions` every seed's answers (the paired intervals resample seeds)."""
    first = rows[0]
    if len(rows) == 1:
        return {**first, "seeds": 1}
    accs = [r["accuracy"] for r in rows]
    out = {
        **first,
        "seeds": len(rows),
        "revs": [r["rev"] for r in rows],
        "accuracy": round(statistics.fmean(accs), 4),
        "accuracy_seeds": accs,
        "accuracy_sd": round(statistics.stdev(accs), 4),
    }
    kinds = [k for k in first.get("per_kind", {}) if all(k in r.get("per_kind", {}) for r in rows)]
    out["per_kind"] = {k: round(statistics.fmean(r["per_kind"][k] for r in rows), 4) for k in kinds}
    for key in (
        "blind",
        "text_mc_accuracy",
        "text_mc_vs_base",
        "text_nll_vs_base",
        "seconds_per_step",
    ):
        values = [r.get(key) for r in rows]
        out[key] = None if None in values else round(statistics.fmean(values), 4)
        if key in ("text_nll_vs_base", "seconds_per_step") and None not in values:
            out[f"{key}_seeds"] = values  # no per-item file: the seeds are its spread
    if all(len(r["prune_curve"]) == len(first["prune_curve"]) for r in rows):
        out["prune_curve"] = [
            {
                **c,
                "accuracy": round(
                    statistics.fmean(r["prune_curve"][i]["accuracy"] for r in rows), 4
                ),
            }
            for i, c in enumerate(first["prune_curve"])
        ]
    have = all(r.get("questions") for r in rows)
    out["questions"] = [q for r in rows for q in r["questions"]] if have else None
    if all(r.get("curve_questions") for r in rows):
        out["curve_questions"] = [
            [q for r in rows for q in r["curve_questions"][point]] for point in (0, 1)
        ]
    return out


def add_ratios(rows: Sequence[dict], baseline: dict | None) -> None:
    """Retention % (± its standard error) and step-time ratio against the all-layer run."""
    for row in rows:
        if baseline is None:
            row["retention_percent"] = row["retention_se"] = row["time_ratio"] = None
            continue
        ratio = row["accuracy"] / baseline["accuracy"]
        row["retention_percent"] = round(100 * ratio, 1)
        # a ratio's relative error is the two relative errors combined; none for the baseline
        rel = (
            0.0
            if row is baseline
            else math.hypot(
                row["accuracy_se"] / max(row["accuracy"], 1e-9),
                baseline["accuracy_se"] / max(baseline["accuracy"], 1e-9),
            )
        )
        row["retention_se"] = round(100 * ratio * rel, 1)
        row["time_ratio"] = round(row["seconds_per_step"] / baseline["seconds_per_step"], 3)


def gap_verdict(gap: float, noise: float) -> str:
    """'holds' if `gap` (claimed direction positive) exceeds SIGNIFICANT x `noise`, 'does not
    hold' if it is that far the other way, else 'not resolved' with the gap in s.e."""
    if noise > 0 and abs(gap) <= SIGNIFICANT * noise:
        return f"not resolved ({gap / noise:+.1f} s.e.)"
    return "holds" if gap > 0 else "does not hold"


def paired(a: dict, b: dict, stat: str = "difference", key: str = "questions") -> Interval | None:
    """b against a on the same questions (mean(b) - mean(a), or mean(b)/mean(a) for "ratio"):
    a paired bootstrap over questions and seeds, or None when a run has no per-question file."""
    if not (a.get(key) and b.get(key)):
        return None
    _, x, y = paired_scores(a[key], b[key])
    return paired_bootstrap(x, y, stat=stat, seed=0)


def _mcnemar(a: dict, b: dict) -> str:
    """Exact McNemar test on the first seed of each run (the questions only one got right)."""
    _, x, y = paired_scores(a["questions"][:1], b["questions"][:1])
    m = mcnemar(x[0] > 0, y[0] > 0)
    return f"McNemar: {m.only_a} vs {m.only_b} discordant, p = {m.p_value:.3g}"


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
                    f"{r['accuracy']:.3f} ± {r['accuracy_se']:.3f}"
                    + (
                        f" ({r['seeds']} seeds, sd {r['accuracy_sd']:.3f})"
                        if r.get("seeds", 1) > 1
                        else ""
                    ),
                    f"{r['blind']:.3f}",
                    _retention(r),
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
    """The paper's claims that this sweep can check, each with our figure and a verdict.

    Where the runs carry per-question results (`questions`: one list of rows per seed), each
    claim is decided on the paired difference (or retention ratio) with a 95% paired bootstrap
    interval over questions and seeds (`vregion.eval.stats`): "holds" when the interval lies
    on the claimed side, "fails" when it lies on the other, else "not resolved". Runs without
    them (older experiments) fall back to SIGNIFICANT combined standard errors.
    """
    out = []
    strategies = by_label.get("strategies", {})
    sizes = by_label.get("sizes", {})
    base = strategies.get("all layers") or next(
        (r for k, r in sizes.items() if k.endswith("(all)")), None
    )
    uniform = strategies.get("uniform")

    def noise(*rows: dict) -> float:
        return math.hypot(*(r["accuracy_se"] for r in rows))

    if base and uniform:
        ret, se = uniform["retention_percent"], uniform["retention_se"]
        paper = PAPER_RETENTION_BY_LAYERS[8]
        size = f"{uniform['region_size']} of {uniform['num_layers']} layers"
        iv = paired(base, uniform, "ratio")
        out.append(
            {
                "claim": "A sparse uniform 25% region keeps ~99% of all-layer visual accuracy",
                "paper": f"{paper}% (8 of 32 layers)",
                "ours": f"{ret:.1f} ± {se:.1f}% ({size})"
                if iv is None
                else f"retention {iv} ({size})",
                # the claim is "about as good as all layers": it fails only if ours is
                # clearly below the paper's figure
                "verdict": ("holds" if ret >= paper else gap_verdict(ret - paper, se))
                if iv is None
                else verdict(iv, threshold=paper / 100 - RETENTION_TOLERANCE).outcome,
            }
        )
        out.append(time_claim(base, uniform))
        if uniform["text_mc_accuracy"] is not None and base["text_mc_accuracy"] is not None:
            d = uniform["text_mc_accuracy"] - base["text_mc_accuracy"]
            mc_noise = math.hypot(
                *(
                    standard_error(r["text_mc_accuracy"], r.get("text_mc_items") or 1)
                    for r in (uniform, base)
                )
            )
            out.append(
                {
                    "claim": "Text skill is kept at least as well as with all-layer tuning",
                    "paper": "equal or better on MMLU, BBH, C-Eval, CMMLU",
                    "ours": f"text MC accuracy {uniform['text_mc_accuracy']:.3f} vs "
                    f"{base['text_mc_accuracy']:.3f} ({d:+.3f}, s.e. {mc_noise:.3f}); answer "
                    f"NLL vs base {_nll(uniform)} vs {_nll(base)}",
                    # "at least as well": only a clearly worse region-tuned model refutes it
                    "verdict": "holds" if d >= 0 else gap_verdict(d, mc_noise),
                }
            )
    top, bottom = strategies.get("top"), strategies.get("bottom")
    if top and bottom:
        ours = f"bottom {bottom['accuracy']:.3f} vs top {top['accuracy']:.3f}"
        iv = paired(top, bottom)
        out.append(
            {
                "claim": "Tuning the bottom block beats tuning the top block",
                "paper": "top block worst, bottom block better",
                "ours": ours if iv is None else f"{ours}; difference {iv}; {_mcnemar(top, bottom)}",
                "verdict": gap_verdict(bottom["accuracy"] - top["accuracy"], noise(bottom, top))
                if iv is None
                else verdict(iv).outcome,
            }
        )
    if uniform:
        others = {k: r for k, r in strategies.items() if k not in ("all layers", "uniform")}
        if others:
            best_label, best = max(others.items(), key=lambda kv: kv[1]["accuracy"])
            ours = f"uniform {uniform['accuracy']:.3f}; best other: {best_label} {best['accuracy']:.3f}"
            parts = {k: paired(r, uniform) for k, r in others.items()}
            if all(iv is not None for iv in parts.values()):
                # uniform must beat every other rule: the closest one decides "holds"
                outcome = all_hold(verdict(iv) for iv in parts.values())
                ours += f"; uniform minus {best_label}: {parts[best_label]}"
            else:
                outcome = gap_verdict(uniform["accuracy"] - best["accuracy"], noise(uniform, best))
            out.append(
                {
                    "claim": "Sparse uniform is the best 25% selection",
                    "paper": "uniform best among the 25% strategies",
                    "ours": ours,
                    "verdict": outcome,
                }
            )
    ours = {  # the paper's counts are of 32 layers; an all-layer run is not one of them
        r["region_size"]: r
        for r in sizes.values()
        if r["region_size"] < r["num_layers"] and r["retention_percent"] is not None
    }
    shared = [k for k in PAPER_RETENTION_BY_LAYERS if k in ours]
    if len(shared) >= 2:  # an ordering needs two points
        pairs = list(zip(shared, shared[1:], strict=False))
        intervals = {f"{a}→{b}": paired(ours[a], ours[b]) for a, b in pairs}
        if all(iv is not None for iv in intervals.values()):
            parts = {k: verdict(iv) for k, iv in intervals.items()}
            head = all_hold(parts.values())
            outcome = (
                head
                if head == "holds"
                else f"{head}: " + ", ".join(f"{k} {v}" for k, v in parts.items())
            )
        else:
            steps = {
                f"{a}→{b}": gap_verdict(
                    ours[b]["accuracy"] - ours[a]["accuracy"], noise(ours[a], ours[b])
                )
                for a, b in pairs
            }
            if all(v == "holds" for v in steps.values()):
                outcome = "holds"
            else:  # one clear reversal refutes it; otherwise some steps are within the noise
                head = "does not hold" if "does not hold" in steps.values() else "not resolved"
                outcome = f"{head}: " + ", ".join(f"{k} {v}" for k, v in steps.items())
        out.append(
            {
                "claim": "Retention falls as fewer layers are tuned (1 < 2 < 4 < 8)",
                "paper": ", ".join(f"{k}: {PAPER_RETENTION_BY_LAYERS[k]}%" for k in shared),
                "ours": ", ".join(
                    f"{k}: {ours[k]['retention_percent']:.1f} ± {ours[k]['retention_se']:.1f}%"
                    for k in shared
                ),
                "verdict": outcome,
            }
        )
    pruning = by_label.get("pruning", {})
    region_tuned, all_tuned = pruning.get("region-tuned (uniform)"), pruning.get("all-layer-tuned")
    if region_tuned and all_tuned and region_tuned["prune_curve"] and all_tuned["prune_curve"]:

        def drop(r: dict) -> tuple[int, float, float]:
            first, last = r["prune_curve"][0], r["prune_curve"][-1]
            se = math.hypot(first["accuracy_se"], last["accuracy_se"])
            return last["layers_removed"], first["accuracy"] - last["accuracy"], se

        k, d_region, se_region = drop(region_tuned)
        _, d_all, se_all = drop(all_tuned)
        ours = f"accuracy drop with {k} layers removed: region-tuned {d_region:+.3f}, all-layer-tuned {d_all:+.3f}"
        if region_tuned.get("curve_questions") and all_tuned.get("curve_questions"):
            # per question: right with none removed minus right with k removed, on both models
            (r0, rk), (a0, ak) = region_tuned["curve_questions"], all_tuned["curve_questions"]
            ids, r0 = correctness_matrix(r0)
            drops = [r0 - correctness_matrix(rk, ids)[1]]
            drops.append(correctness_matrix(a0, ids)[1] - correctness_matrix(ak, ids)[1])
            iv = paired_bootstrap(*drops, seed=0)
            ours += f"; all-layer minus region-tuned drop {iv}"
            outcome = verdict(iv).outcome
        else:
            noise_drop = math.hypot(se_region, se_all)
            ours += f" (s.e. of the difference {noise_drop:.3f})"
            outcome = gap_verdict(d_all - d_region, noise_drop)
        out.append(
            {
                "claim": "Pruning outside the region hurts the region-tuned model less than the "
                "all-layer-tuned one",
                "paper": "all-layer-tuned model degrades much faster",
                "ours": ours,
                "verdict": outcome,
            }
        )
    return out


def time_claim(base: dict, uniform: dict) -> dict:
    """Step time of the uniform region against all layers. Runs are timed one after another and
    a run's step time moves by up to 40% between runs of the same work on one machine, so with
    several seeds the claim holds only if every pairing of a uniform seed with an all-layer seed
    is faster: the range of those ratios is its interval."""
    region = uniform.get("seconds_per_step_seeds") or [uniform["seconds_per_step"]]
    full = base.get("seconds_per_step_seeds") or [base["seconds_per_step"]]
    low, high = min(region) / max(full), max(region) / min(full)
    spread = (
        f"mean over seeds; every seed pairing {low:.2f}–{high:.2f}×"
        if len(region) > 1 or len(full) > 1
        else "one run each"
    )
    return {
        "claim": "Region tuning takes less time per step than all-layer tuning",
        "paper": "0.77× (LLaVA-1.5), 0.87× (Bunny)",
        "ours": f"{uniform['time_ratio']:.2f}× s/step ({spread}, timed one after another)",
        "verdict": "holds" if high < 1.0 else "does not hold" if low > 1.0 else "not resolved",
    }


def charts(by_label: Mapping[str, Mapping[str, dict]], out_dir: Path) -> dict[str, str]:
    """Retention vs layers tuned (ours ± 2 s.e. and the paper's), accuracy per 25% strategy,
    and both pruning curves."""
    import matplotlib.pyplot as plt  # vregion.plots (imported above) chose the Agg backend

    made = {}
    sizes = sorted(by_label.get("sizes", {}).values(), key=lambda r: r["region_size"])
    if sizes and all(r["retention_percent"] is not None for r in sizes):
        paper = sorted(PAPER_RETENTION_BY_LAYERS.items())
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.errorbar(
            [r["region_size"] for r in sizes],
            [r["retention_percent"] for r in sizes],
            yerr=[SIGNIFICANT * (r["retention_se"] or 0) for r in sizes],
            marker="o",
            capsize=3,
            label=f"vregion, embedded default ({sizes[0]['num_layers']} layers), ± 2 s.e.",
        )
        ax.plot(
            [k for k, _ in paper] + [32],
            [v for _, v in paper] + [100.0],
            marker="s",
            label="paper, Bunny-Llama-3-8B-V (32 layers)",
        )
        ax.set_xscale("log", base=2)
        ticks = sorted({r["region_size"] for r in sizes})  # the paper's 32 sits beside our 30
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("LLM layers tuned (uniform region; log scale)")
        ax.set_ylabel("visual accuracy, % of all-layer tuning")
        ax.set_title("Retention vs layers tuned")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        made["retention"] = save_figure(fig, out_dir / "retention_vs_layers.png").name
    strategies = by_label.get("strategies", {})
    if len(strategies) >= 2:
        rows = sorted(strategies.items(), key=lambda kv: kv[1]["accuracy"])
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.4))
        ys = range(len(rows))
        ax.barh(
            ys,
            [r["accuracy"] for _, r in rows],
            xerr=[SIGNIFICANT * r["accuracy_se"] for _, r in rows],
            color=["tab:orange" if k == "uniform" else "tab:blue" for k, _ in rows],
            capsize=3,
        )
        ax.scatter([r["blind"] for _, r in rows], ys, marker="|", s=200, color="k", zorder=3)
        ax.set_yticks(list(ys), [k for k, _ in rows], fontsize=8)
        ax.set_xlabel("visual accuracy ± 2 s.e. (black tick: blind control)")
        ax.set_xlim(0.3, min(1.0, max(r["accuracy"] for _, r in rows) + 0.1))
        ax.set_title("Layer selection: 25% of the layers by each rule, and all layers")
        ax.grid(axis="x", alpha=0.3)
        made["strategies"] = save_figure(fig, out_dir / "strategies.png").name
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


def write_report(
    repo: Path,
    runs: Sequence[Run],
    done: Mapping[str, RunRecord],
    reference: Mapping[str, str],
    command: str,
    metric_files: Mapping[str, str],
    results: str = "results",
    questions: str | None = None,
) -> Path:
    """`results`/comparison.{md,json} and `results`/plots/ in `repo` from the finished runs
    (`done`: run name -> its record; `metric_files`: name -> path of the metrics files it
    reads); `command` is how the report says to rerun. `questions`: evaluate's per-question
    results folder, for the paired comparisons."""
    rows = {}
    for run in runs:
        if run.name in done:
            record = done[run.name]
            metrics = {k: record.metrics(f) for k, f in metric_files.items()}
            params = record.params() or {}
            curve_n = params.get("evaluate", {}).get("curve_samples")
            rows[run.name] = run_row(run.name, run.name, metrics, record.rev, curve_n)
            if questions:
                rows[run.name].update(run_questions(record, params, questions, rows[run.name]))
    add_ratios(list(rows.values()), rows.get("all-layers"))  # each run on its own
    # a run and its repeats with other training seeds (`<run>-s<k>`): one row, means and spread
    seeds: dict[str, list[dict]] = {}
    for run in runs:
        if run.name in rows:
            first = run.name.removesuffix(f"-s{run.seed}") if run.seed else run.name
            seeds.setdefault(first, []).append(rows[run.name])
    combined = {name: combine_seeds(group) for name, group in seeds.items() if name in rows}
    add_ratios(list(combined.values()), combined.get("all-layers"))
    by_label: dict[str, dict[str, dict]] = {s: {} for s in SWEEPS}
    for run in runs:
        for sweep, label in run.labels:
            if run.name in combined:
                by_label[sweep][label] = {**combined[run.name], "label": label}
    by_label["sizes"] = dict(sorted(by_label["sizes"].items(), key=lambda kv: kv[1]["region_size"]))
    out = Path(repo) / results
    (out / "plots").mkdir(parents=True, exist_ok=True)
    pictures = charts(by_label, out / "plots")
    claim_rows = claims(by_label)
    missing = [r.name for r in runs if r.name not in done]
    markdown = comparison_markdown(by_label, claim_rows, pictures, reference, command, missing)
    (out / "comparison.md").write_text(markdown)
    (out / "comparison.json").write_text(
        json.dumps(
            {
                "runs": {k: _without_questions(r) for k, r in rows.items()},
                "sweeps": {
                    k: {label: _without_questions(r) for label, r in v.items()}
                    for k, v in by_label.items()
                },
                "claims": claim_rows,
                "missing": missing,
            },
            indent=2,
        )
        + "\n"
    )
    return out / "comparison.md"


def run_questions(record: RunRecord, params: Mapping, folder: str, row: Mapping) -> dict:
    """The tuned model's answer to each question of its first held-out set, and to the curve's
    questions at its first and last point, as the run's record holds them: one list of rows
    per seed (one seed per experiment), None where the experiment wrote none."""
    entry = (params.get("evaluate", {}).get("data") or [None])[0]
    source = entry if isinstance(entry, str) else (entry or {}).get("source")
    tuned = source and record.questions(f"{folder}/models/tuned/{source}.jsonl")
    curve = row["prune_curve"]
    ends = [
        record.questions(f"{folder}/prune_curve/{c['layers_removed']}.jsonl")
        for c in ([curve[0], curve[-1]] if len(curve) >= 2 else [])
    ]
    return {
        "questions": [tuned] if tuned else None,
        "curve_questions": [[e] for e in ends] if len(ends) == 2 and all(ends) else None,
    }


def _without_questions(row: Mapping) -> dict:
    return {k: v for k, v in row.items() if k not in ("questions", "curve_questions")}


def reference_figures(repo: Path) -> dict:
    """The aligned model's accuracy and the base LLM's text skill from the main pipeline."""
    path = repo / "metrics" / "eval.json"
    if not path.is_file():
        return {}
    ev = json.loads(path.read_text())
    ref = {}
    aligned = ev.get("models", {}).get("aligned")
    if aligned:
        v = aligned["visual"]["overall"]
        ref["aligned model (before tuning): visual accuracy"] = (
            f"{v['accuracy']:.3f} (blind {v['blind']:.3f})"
        )
    if ev.get("base_text"):
        ref["base LLM text MC accuracy"] = f"{ev['base_text']['mc_accuracy']:.3f}"
    return ref


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
        f"Reproduce: `{command}` (each run is a DVC experiment: `dvc exp show`; its files are "
        "kept in `results/runs/<run>/`). Every figure is copied from the metrics files the runs "
        "committed (`comparison.json` names the experiment revision of each); ± is the binomial standard error of the accuracy. "
        "Every run answers the same held-out questions, so each claim is decided on the paired "
        "difference (or retention ratio) with a 95% paired bootstrap interval over questions "
        'and seeds: "holds" or "fails" when the interval lies on one side, "not resolved" when '
        "it straddles (runs without per-question results fall back to a gap beyond "
        f"{SIGNIFICANT:g} standard errors). Step "
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
    if kinds := _kind_table(by_label):
        parts += ["## Accuracy per question kind", kinds]
    for sweep, rows in by_label.items():
        if not rows:
            continue
        parts += [f"## {titles.get(sweep, sweep)}", sweep_table(list(rows.values()))]
        if harness := harness_table(list(rows.values())):
            parts.append(harness)
        if sweep == "strategies" and "strategies" in pictures:
            parts.append(f"![accuracy per strategy](plots/{pictures['strategies']})")
        if sweep == "sizes" and "retention" in pictures:
            parts.append(f"![retention vs layers](plots/{pictures['retention']})")
        if sweep == "pruning":
            parts.append(_curve_table(rows))
            if "pruning" in pictures:
                parts.append(f"![pruning curves](plots/{pictures['pruning']})")
    return "\n\n".join(parts) + "\n"


def _nll(r: dict) -> str:
    """Answer NLL against the base LLM; with several seeds, the mean and each seed's."""
    seeds = r.get("text_nll_vs_base_seeds")
    text = f"{r['text_nll_vs_base']:+.4f}"
    return (
        text
        if not seeds or len(seeds) < 2
        else f"{text} (seeds {'/'.join(f'{x:+.2f}' for x in seeds)})"
    )


def _retention(r: dict) -> str:
    if r["retention_percent"] is None:
        return "–"
    se = r.get("retention_se")
    return f"{r['retention_percent']:.1f}%" + (f" ± {se:.1f}" if se else "")


def _claims_table(rows: Sequence[dict]) -> str:
    if not rows:
        return "_No claim can be checked yet: the runs it needs have not finished._"
    lines = ["| claim | paper | ours | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['paper']} | {r['ours']} | **{r['verdict']}** |" for r in rows]
    return "\n".join(lines)


KIND_MARGIN = 0.15
"""A question kind counts as seen when a model scores at least this far above its chance level."""


def _kind_table(by_label: Mapping[str, Mapping[str, dict]]) -> str:
    """Each run's accuracy per question kind (seed means) beside chance, so a kind the model
    cannot see (near chance for every run) shows before any claim is read from the totals."""
    rows = {r["run"]: r for group in by_label.values() for r in group.values()}
    kinds = sorted({k for r in rows.values() for k in r.get("per_kind", {})})
    if not kinds:
        return ""
    chance = {
        k: next((r["chance_per_kind"][k] for r in rows.values() if r.get("chance_per_kind")), None)
        for k in kinds
    }
    lines = ["| run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    lines.append("| chance | " + " | ".join(_fmt(chance[k], ".3f") for k in kinds) + " |")
    for name, r in rows.items():
        cells = []
        for k in kinds:
            acc = r.get("per_kind", {}).get(k)
            seen = acc is not None and chance[k] is not None and acc >= chance[k] + KIND_MARGIN
            cells.append(_fmt(acc, ".3f") + ("" if seen or acc is None else " ✗"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n = min(r["n"] for r in rows.values()) // len(kinds)
    lines.append(
        f"\n✗: less than {KIND_MARGIN:g} above chance. Each kind has about {n} questions per "
        f"seed (one binomial s.e. up to {standard_error(0.5, max(n, 1)):.3f})."
    )
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
    points = [c for r in rows.values() for c in r["prune_curve"]]
    if points:
        n = min(c["n"] for c in points)
        se = max(c["accuracy_se"] for c in points)
        lines.append(
            f"\nEach point is measured on {n} held-out questions (`evaluate.curve_samples`; "
            f"s.e. up to ±{se:.3f}), so the 0-removed point differs from the accuracy on all "
            "questions in the table above."
        )
    return "\n".join(lines)

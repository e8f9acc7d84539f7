"""reports/summary.md: what ran, the region, tables and pictures, as markdown.

Every number comes from the metrics files of the stages before (metrics/*.json,
reports/region.json); nothing is computed here but ratios of those numbers.
"""

from __future__ import annotations


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}%"


def visual_section(models: dict, baseline: str | None) -> str:
    kinds = [k for k in next(iter(models.values()))["visual"] if k != "overall"]
    header = ["model", "overall", "blind", *kinds, "chance (overall)"]
    if baseline:
        header.append(f"retention vs {baseline}")
    rows = []
    for name, r in models.items():
        v = r["visual"]
        row = [f"**{name}**", f"{v['overall']['accuracy']:.3f}", f"{v['overall']['blind']:.3f}"]
        row += [f"{v[k]['accuracy']:.3f} ({v[k]['blind']:.2f})" for k in kinds]
        row.append(f"{v['overall']['chance']:.3f}")
        if baseline:
            row.append(pct(v["overall"].get("retention_percent")))
        rows.append(row)
    n = next(iter(models.values()))["visual"]["overall"]["n"]
    return (
        f"Held-out synthetic questions (n = {n}); per kind: accuracy (blind control in brackets: "
        "the same questions with images shuffled across questions).\n\n" + table(header, rows)
    )


def text_section(models: dict, base_text: dict | None) -> str:
    if not base_text:
        return "_Text skill was not measured (`evaluate.text: false`)._"
    rows = [
        ["base LLM", f"{base_text['mc_accuracy']:.3f}", "", f"{base_text['answer_nll']:.4f}", ""]
    ]
    for name, r in models.items():
        t = r["text"]
        rows.append(
            [
                name,
                f"{t['mc_accuracy']:.3f}",
                f"{t['mc_accuracy_vs_base']:+.3f}",
                f"{t['answer_nll']:.4f}",
                f"{t['answer_nll_vs_base']:+.4f}",
            ]
        )
    return table(["model", "multiple choice acc.", "vs base", "answer NLL", "vs base"], rows)


HARNESS_NAMES = {"lm_eval": "lm-evaluation-harness", "lmms_eval": "lmms-eval"}
OWN_FIGURE = {  # a harness task -> vregion's own figure on the same items, and how it differs
    "vregion_text_mc": (
        lambda r: r.get("text", {}).get("mc_accuracy"),
        "text multiple choice",
        "the same items, context and replies (each scored by its log-likelihood), so the two "
        "agree; they differ only if `limit` cuts the items",
    ),
    "vregion_vqa": (
        lambda r: r.get("visual", {}).get("overall", {}).get("accuracy"),
        "visual accuracy",
        "vregion picks the most likely of the listed choices (chance 1/choices, formatting never "
        "matters); lmms-eval lets the model generate freely, with no system prompt and no "
        "choices shown, and counts exact matches of the answer (on its first `limit` questions), "
        "so a model that knows the answer but words it otherwise scores lower here",
    ),
}


def harness_section(ev: dict) -> str:
    """Each harness's figures per model and task, beside vregion's own on the same items."""
    status = ev.get("harnesses") or {}
    if not status:
        return "_No harness was configured for this run._"
    parts = []
    for harness, st in status.items():
        name = HARNESS_NAMES.get(harness, harness)
        if st["status"] != "ran":
            parts.append(f"**{name}**: {st['status']}; no figure from it.")
            continue
        rows, notes = [], {}
        for model, r in ev["models"].items():
            for task, figures in r.get(harness, {}).items():
                own, own_name, why = OWN_FIGURE.get(task, (lambda r: None, "", ""))
                own_value = own(r)
                for metric, value in figures.items():
                    if metric == "n" or metric.endswith("_stderr") or "_stderr" in metric:
                        continue
                    err = figures.get(f"{metric}_stderr")
                    rows.append(
                        [
                            model,
                            f"`{task}`",
                            metric,
                            f"{value:.3f}" + (f" ± {err:.3f}" if err else ""),
                            figures.get("n", ""),
                            "" if own_value is None else f"{own_value:.3f} ({own_name})",
                        ]
                    )
                if why:
                    notes[task] = why
        version = f" {st['version']}" if st.get("version") else ""
        parts.append(
            f"**{name}{version}**, tasks {', '.join(f'`{t}`' for t in st['tasks'])}"
            + (f", limit {st['limit']}" if st.get("limit") else "")
            + " (figures read from its results files, `reports/harness/<model>/`):"
        )
        parts.append(table(["model", "task", "metric", "value", "n", "vregion's own"], rows))
        parts += [f"`{task}` against vregion's own figure: {why}." for task, why in notes.items()]
    return "\n\n".join(parts)


def cost_section(models: dict) -> str:
    rows = []
    for name, r in models.items():
        s = r.get("speed", {})
        rows.append(
            [
                name,
                r["num_layers"],
                f"{r['parameters'] / 1e6:.2f} M",
                f"{r['size_mb']:.1f}",
                f"{s.get('prefill_tokens_per_s', 0):.0f}",
                f"{s.get('decode_tokens_per_s', 0):.1f}",
                f"{r['peak_memory_mb']:.0f}",
            ]
        )
    return table(
        [
            "model",
            "LLM layers",
            "parameters",
            "size (MB)",
            "prefill tok/s",
            "decode tok/s",
            "peak memory (MB)",
        ],
        rows,
    )


def summary(base_model: str, region: dict, align: dict, train: dict, prune: dict, ev: dict) -> str:
    """reports/summary.md from the stages' outputs: reports/region.json and metrics/align.json
    (empty when there is none), train.json, prune.json and eval.json."""
    models = ev["models"]
    n = prune["num_layers_before"]
    parts = [
        "# vregion run summary",
        f"Base model: `{base_model}`. Stages: prepare → align → probe → region → finetune → "
        "prune → evaluate → report (`dvc repro`). Every figure below is read from `metrics/*.json`.",
        "## Visual region",
        f"{len(region['layers'])} of {n} LLM layers ({100 * len(region['layers']) / n:.0f}%), "
        f"strategy `{region['strategy']}`: **{region['layers']}**. Rule: {region.get('rule', '')}",
        "![layer scores](plots/layer_scores.png)",
        "## Training",
        table(
            [
                "stage",
                "trained",
                "steps",
                "s/step",
                "samples/s",
                "trainable params",
                "peak memory (MB)",
            ],
            [
                [
                    "align",
                    "skipped: base projector kept" if align.get("skipped") else "projector",
                    align.get("steps", ""),
                    align.get("seconds_per_step", ""),
                    "",
                    align.get("trainable_params", ""),
                    "",
                ],
                [
                    f"finetune ({train['mode']}, {train['world_size']} worker(s))",
                    f"projector + layers {train['region']}",
                    train["steps"],
                    train["seconds_per_step"],
                    train["samples_per_second"],
                    f"{train['trainable_params']:,} ({train['trainable_percent']}%)",
                    train["peak_memory_mb"],
                ],
            ],
        ),
        f"Tuning loss {train['first_loss']:.3f} → {train['final_loss']:.3f} (mean of the last 10 steps).",
        "## Pruning",
        f"Removed layers **{prune['removed']}** ({prune['reason']}, `{prune['scorer']}` on "
        f"{prune['scored_on']}); {prune['num_layers_after']} of {n} layers remain; parameters "
        f"{prune['parameters_before'] / 1e6:.2f} M → {prune['parameters_after'] / 1e6:.2f} M. "
        f"Healing steps: {prune['healing_steps']}.",
        "![prune scores](plots/prune_scores.png)",
        "## Visual accuracy",
    ]
    with_choices = all("visual" in r for r in models.values())
    if with_choices:
        parts.append(visual_section(models, ev.get("baseline")))
    else:
        parts.append("No multiple-choice set in `evaluate.data`: see the exact-match table below.")
    if "tuned" in models and with_choices:
        tuned = models["tuned"]["visual"]["overall"]
        parts.append(
            f"The tuned model answers {tuned['accuracy']:.3f} with the right images against "
            f"{tuned['blind']:.3f} blind (chance {tuned['chance']:.3f})."
        )
    parts += [
        "![accuracy per kind](plots/eval_accuracy.png)",
    ]
    if ev.get("prune_curve"):
        parts += [
            "### Layers removed",
            table(
                ["layers removed", "which", "accuracy"],
                [
                    [r["layers_removed"], r["removed"], f"{r['accuracy']:.3f}"]
                    for r in ev["prune_curve"]
                ],
            ),
            "![prune curve](plots/prune_curve.png)",
        ]
    parts += [
        "## Text skill (against the base LLM)",
        text_section(models, ev.get("base_text")),
        "## Evaluation harnesses (lm-eval, lmms-eval)",
        harness_section(ev),
        "## Speed and size",
        cost_section(models),
        f"Ideal decode speed-up from removing {len(prune['removed'])} of {n} layers: "
        f"{n / max(n - len(prune['removed']), 1):.3f}× (the vision tower, embeddings and LM head do not shrink). "
        "The models above are timed one after another, each in its own process, so their speeds "
        "differ by machine noise as well; for ratios measured side by side run "
        "`python benchmarks/prune_speed.py`.",
    ]
    rows = [
        [model, name, v["accuracy"], v["blind"], v["n"]]
        for model, r in models.items()
        for name, v in r.get("open_answer", {}).items()
    ]
    if rows:
        parts += [
            "## Held-out sets without choices (exact match of the greedy answer)",
            table(["model", "set", "accuracy", "blind", "n"], rows),
        ]
    return "\n\n".join(parts) + "\n"

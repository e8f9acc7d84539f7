"""evaluate: measure every model the pipeline produced (metrics/eval.json, plots).

For the aligned, tuned and pruned models (and any `evaluate.extra_models`, e.g. an all-layer
baseline): held-out visual accuracy per question kind beside the blind control (images shuffled
across questions) and chance on each multiple-choice set of `evaluate.data`; exact match beside
the blind control on each set without choices (LLaVA-format records from `data.sources`); text skill against the base LLM; prefill/decode tokens/s; parameters; size on disk; peak
memory (each model in its own process). Then the accuracy of the tuned model with 0, 1, 2, ...
layers removed in the prune stage's order: the layers-removed curve.

When `evaluate.lm_eval.tasks` / `evaluate.lmms_eval.tasks` name tasks, the field's harnesses run
on every model first (a failing task stops the stage before any metric is written): lm-eval on
each model's LLM, exported to `models/llm/<name>` as a plain causal LM, and lmms-eval on the
LVLM checkpoint. Their logs and results files go to `reports/harness/<model>/<harness>/`; the
figures in metrics/eval.json are read from those results files.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from prefect import flow, task

from stages._common import run_stage, write_csv, write_json
from vregion.config import ConfigError, Params, load_params
from vregion.data.dataset import balanced_parts, balanced_set, part_to_dict, resolve_mix
from vregion.devices import pick_device, resolve_precision
from vregion.eval import harness as hx
from vregion.eval.checkpoint import (
    EvalJob,
    add_comparisons,
    checkpoint_exists,
    evaluate_isolated,
)
from vregion.eval.questions import write_question_results
from vregion.eval.visual import pruning_curve
from vregion.models.loading import load_lvlm
from vregion.plots import accuracy_chart, line_chart, note_chart


def text_items(data: str) -> str:
    """The text-skill set prepare writes under the data directory."""
    return f"{data}/text/text_skill.jsonl"


def eval_sets(p: Params, data: str) -> dict[str, list[dict]]:
    """Each `evaluate.data` entry as its own held-out set, the same rows for every model."""
    return {
        entry.source: [
            part_to_dict(part)
            for part in balanced_parts(
                resolve_mix([entry], p.model.seed, data), p.evaluate.samples, p.model.seed
            )
        ]
        for entry in p.evaluate.data
    }


def eval_job(
    p: Params, checkpoint: str, sets: dict[str, list[dict]], data: str, visual: bool = True
) -> EvalJob:
    e = p.evaluate
    return EvalJob(
        checkpoint=checkpoint,
        system_prompt=p.model.system_prompt,
        sets=sets if visual else {},
        text_items=text_items(data) if e.text else None,
        batch_size=e.batch_size,
        precision=e.precision,
        seed=p.model.seed,
        speed_batch=e.speed_batch,
        new_tokens=e.new_tokens,
        speed_repeats=e.speed_repeats if visual else 0,
    )


@task(name="measure-model")
def measure(name: str, job: EvalJob) -> dict:
    print(f"evaluating {name}: {job.checkpoint}")
    return evaluate_isolated(job)


@task(name="prune-curve")
def prune_curve(p: Params, tuned: str, prune_metrics: str, data: str) -> list[dict]:
    """Visual accuracy of the tuned model with the first k layers of the prune ranking removed."""
    ranking = json.loads(Path(prune_metrics).read_text())["ranking_outside_region"]
    ks = [k for k in p.evaluate.prune_curve if k <= len(ranking)]
    source = next(e for e in p.evaluate.data if e.source.startswith("synthetic/"))
    questions = balanced_set([source], p.evaluate.curve_samples, p.model.seed, data)
    device = pick_device()
    model, processor = load_lvlm(tuned)
    model.to(device).eval()
    return pruning_curve(
        model,
        processor,
        questions,
        ranking,
        ks,
        p.model.system_prompt,
        batch_size=p.evaluate.batch_size,
        precision=resolve_precision(p.evaluate.precision, device),
        device=device,
    )


@task(name="harnesses")
def run_harnesses(
    p: Params,
    models: dict[str, str],
    sets: dict,
    status: dict,
    data: str,
    llm_exports: str,
    harness_dir: str,
) -> dict:
    """The field's harnesses on every model; figures read from their results files."""
    return hx.run_harnesses(
        p.evaluate,
        p.model.system_prompt,
        models,
        sets,
        status,
        text_items(data),
        llm_exports,
        harness_dir,
    )


@flow(name="evaluate", log_prints=True)
def evaluate(
    base: str,
    aligned: str,
    tuned: str,
    pruned: str,
    data: str,
    prune_metrics: str,
    metrics: str,
    accuracy_csv: str,
    curve_csv: str,
    accuracy_png: str,
    curve_png: str,
    llm_exports: str,
    harness_dir: str,
    questions: str,
    params: str = "params.yaml",
) -> dict:
    """Measure every model the pipeline produced.

    Args:
        base: base checkpoint (its LLM is the text-skill reference)
        aligned: aligned checkpoint
        tuned: tuned (merged) checkpoint
        pruned: pruned checkpoint
        data: data directory (prepare's and ingest's outputs)
        prune_metrics: the prune stage's metrics (its layer ranking drives the curve)
        metrics: metrics file to write
        accuracy_csv: accuracy per model and question kind, CSV to write
        curve_csv: layers-removed curve, CSV to write
        accuracy_png: accuracy chart to write
        curve_png: layers-removed chart to write
        llm_exports: directory for each model's LLM as a plain causal LM (lm-eval reads them)
        harness_dir: directory for the harnesses' logs and results files
        questions: directory for each model's answer to each question (JSONL per model and set,
            and per point of the layers-removed curve)
        params: params file
    """
    p = load_params(params)
    checkpoints = {"aligned": aligned, "tuned": tuned, "pruned": pruned}
    models = {**{n: checkpoints[n] for n in p.evaluate.models}, **p.evaluate.extra_models}
    missing = {n: d for n, d in models.items() if not checkpoint_exists(d)}
    if missing:
        raise FileNotFoundError(
            f"no checkpoint for {missing} (run `dvc repro` for the pipeline's models; "
            "check evaluate.extra_models paths)"
        )
    if p.evaluate.baseline and p.evaluate.baseline not in models:
        raise ConfigError(
            f"evaluate.baseline: {p.evaluate.baseline!r} is not one of {sorted(models)}"
        )
    Path(metrics).unlink(missing_ok=True)  # a failing run leaves no metrics, not stale ones
    shutil.rmtree(questions, ignore_errors=True)
    sets = eval_sets(p, data)
    status = hx.harness_status(p.evaluate)
    harness_results = run_harnesses(p, models, sets, status, data, llm_exports, harness_dir)
    write_json(Path(harness_dir) / "harness.json", status)
    results = {name: measure(name, eval_job(p, path, sets, data)) for name, path in models.items()}
    for name, r in results.items():
        for set_name, rows in r.pop("questions", {}).items():
            write_question_results(Path(questions, "models", name, f"{set_name}.jsonl"), rows)
    for name, r in results.items():
        r.update(harness_results[name])
    base_text = None
    if p.evaluate.text:
        base_job = eval_job(p, base, {}, data, visual=False)
        base_text = measure("base LLM (text only)", base_job)["text"]
    add_comparisons(results, base_text, p.evaluate.baseline)
    # The curve reads kinds and choices: it needs a synthetic multiple-choice set.
    with_choices = any(e.source.startswith("synthetic/") for e in p.evaluate.data)
    curve = []
    if p.evaluate.prune_curve and with_choices:
        curve = prune_curve(p, tuned, prune_metrics, data)
        for row in curve:
            k = row["layers_removed"]
            write_question_results(
                Path(questions, "prune_curve", f"{k}.jsonl"), row.pop("questions")
            )
    # always there (a declared output), and says what is: sets without choices have no rows
    written = sorted(str(f.relative_to(questions)) for f in Path(questions).rglob("*.jsonl"))
    write_json(Path(questions, "index.json"), {"files": written})
    write_json(
        metrics,
        {
            "models": results,
            "base_text": base_text,
            "baseline": p.evaluate.baseline,
            "prune_curve": curve,
            "harnesses": status,
        },
    )
    write_csv(
        accuracy_csv,
        [
            {
                "model": name,
                "kind": kind,
                "accuracy": row["accuracy"],
                "blind": row["blind"],
                "chance": row["chance"],
            }
            for name, r in results.items()
            for kind, row in r.get("visual", {}).items()
        ],
        fields=["model", "kind", "accuracy", "blind", "chance"],
    )
    write_csv(
        curve_csv,
        [{"layers_removed": r["layers_removed"], "accuracy": r["accuracy"]} for r in curve],
        fields=["layers_removed", "accuracy"],
    )
    if all("visual" in r for r in results.values()):
        accuracy_chart({n: r["visual"] for n, r in results.items()}, accuracy_png)
    else:
        note_chart(accuracy_png, "No multiple-choice set in evaluate.data: see open_answer.")
    if curve:
        line_chart(
            {"tuned model": ([r["layers_removed"] for r in curve], [r["accuracy"] for r in curve])},
            curve_png,
            xlabel="layers removed (outside the region)",
            ylabel="visual accuracy",
            title="Accuracy as layers are pruned",
        )
    else:  # still a declared output of the stage
        note_chart(curve_png, "No layers-removed curve: evaluate.prune_curve is empty.")
    for name, r in results.items():
        for set_name, v in {
            **{k: t["overall"] for k, t in r.get("visual_sets", {}).items()},
            **r.get("open_answer", {}),
        }.items():
            print(
                f"{name} on {set_name}: accuracy {v['accuracy']:.3f} (blind {v['blind']:.3f}), "
                f"{r['num_layers']} layers"
            )
        for harness in ("lm_eval", "lmms_eval"):
            for task_name, figures in r.get(harness, {}).items():
                shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items() if v is not None)
                print(f"{name}, {harness} {task_name}: {shown}")
    return results


if __name__ == "__main__":
    sys.exit(run_stage(evaluate, __doc__))

"""The field's evaluation harnesses, run as unmodified clients beside vregion's own measures.

- **lm-evaluation-harness** (`lm_eval`) scores text skill on a model's language model alone:
  its `hf` model loads plain causal-LM checkpoints, not LLaVA configs, so the LLM is first
  exported as one (`export_llm`: `AutoModelForCausalLM` + tokenizer).
- **lmms-eval** scores image tasks on the LVLM checkpoint itself (`llava_hf` by default:
  generation tasks only).

Each harness runs as its own process (`python -m lm_eval` / `python -m lmms_eval`) with its
threads set, offline unless the config says otherwise, and writes its results file; figures are
read from that file and nothing else. lmms-eval exits 0 even when a task raised, so a missing
task or metric in the results file is the failure, whatever the exit code says. Every failure
raises `HarnessError` naming the harness, task and log file; the stage then exits 2.

Two local tasks ship with vregion (`vregion/eval/tasks/`), so the embedded default exercises
both harnesses with no download: `vregion_text_mc` (lm-eval, multiple choice: the text-skill
items with the very context and replies `score_text_skill` scores) and `vregion_vqa`
(lmms-eval, generation: the held-out synthetic questions, exact match of the answer).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from vregion.config import ConfigError, EvaluateConfig

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
TEXT_MC_TASK = "vregion_text_mc"
VQA_TASK = "vregion_vqa"
MODULES = {"lm_eval": "lm_eval", "lmms_eval": "lmms_eval"}
NEEDS = {"lm_eval": ["lm_eval", "datasets"], "lmms_eval": ["lmms_eval", "lm_eval", "decord"]}
"""Modules each harness's CLI and default model import (lmms-eval installs with --no-deps)."""


class HarnessError(ConfigError):
    """A harness run that gave no figure for a task it was asked for (bad task name, missing
    data, a model it cannot run): the user's to fix, so the stage exits 2 with this message."""


def harness_version(harness: str) -> str | None:
    """The installed version of `lm_eval` or `lmms_eval`, None when it is not installed."""
    try:
        return importlib.metadata.version(MODULES[harness])
    except importlib.metadata.PackageNotFoundError:
        return None


def harness_missing(harness: str) -> list[str]:
    """The modules `harness` needs that cannot be found here ([] when it can run)."""
    return [m for m in NEEDS[harness] if importlib.util.find_spec(m) is None]


# ---------------------------------------------------------------------------------------------
# The LLM as a standalone causal LM


@torch.inference_mode()
def export_llm(lvlm_dir: str | Path, out_dir: str | Path) -> dict:
    """Save the LVLM's language model as a plain `AutoModelForCausalLM` checkpoint with the
    tokenizer (chat template included): the same decoder layers, embeddings and LM head, so
    text-only logits equal the LVLM's. Returns what was exported."""
    from transformers import AutoModelForCausalLM

    from vregion.models.layer_map import layer_map
    from vregion.models.loading import load_lvlm

    lvlm, processor = load_lvlm(lvlm_dir)
    text_config = lvlm.config.get_text_config()
    try:
        llm = AutoModelForCausalLM.from_config(text_config, dtype=lvlm.dtype)
    except ValueError as err:
        raise ConfigError(
            f"cannot export the LLM of {lvlm_dir} for lm-eval: transformers has no causal LM for "
            f"its text config ({text_config.model_type}); set evaluate.lm_eval.tasks: [] to skip "
            f"lm-eval: {err}"
        ) from None
    lm = layer_map(lvlm)
    decoder = lvlm.get_submodule(lm.layers_path.rsplit(".", 1)[0])  # the module holding layers
    llm.model.load_state_dict(decoder.state_dict())
    llm.lm_head.load_state_dict(lvlm.lm_head.state_dict())
    ids = torch.tensor([[1, 2, 3, 4, 5]]) % text_config.vocab_size
    if not torch.allclose(llm(input_ids=ids).logits, lvlm(input_ids=ids).logits, atol=1e-4):
        raise RuntimeError(f"the exported LLM of {lvlm_dir} does not reproduce its text logits")
    out_dir = Path(out_dir)
    llm.save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    return {"source": str(lvlm_dir), "num_layers": text_config.num_hidden_layers}


# ---------------------------------------------------------------------------------------------
# Local task data


def write_text_mc_data(items: list[dict], tokenizer, system_prompt: str, path: Path) -> int:
    """The multiple-choice text-skill items as `vregion_text_mc` rows: the chat context and each
    reply with its end-of-turn token, split where `score_text_skill` starts scoring."""
    from vregion.eval.text_skill import reply_split

    rows = []
    for item in items:
        if item["type"] != "mc":
            continue
        splits = [reply_split(tokenizer, system_prompt, item["prompt"], o) for o in item["options"]]
        rows.append(
            {
                "id": item["id"],
                "family": item["family"],
                "context": splits[0][0],
                "choices": [c for _, c in splits],
                "label": item["options"].index(item["answer"]),
            }
        )
    _write_jsonl(path, rows)
    return len(rows)


def write_vqa_data(parts: list[dict], path: Path) -> int:
    """Held-out questions (a `part_to_dict` list) as `vregion_vqa` rows: question text, answer,
    kind and the image's absolute path."""
    from vregion.data.dataset import RecordFile, part_from_dict
    from vregion.data.images import resolve_image

    rows = []
    for d in parts:
        part = part_from_dict(d)
        records = RecordFile(part.records)
        for r in part.rows:
            s = records[int(r)]
            if s.image is None:  # an image task: text-only records have nothing to show
                continue
            question = s.conversations[0]["value"].replace("<image>", "").strip()
            image = str(resolve_image(Path(part.image_root), s.image).resolve())
            rows.append(
                {
                    "id": s.id,
                    "kind": s.kind,
                    "question": question,
                    "answer": s.answer,
                    "image": image,
                }
            )
    _write_jsonl(path, rows)
    return len(rows)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# Running a harness


def harness_env(threads: int, offline: bool) -> dict:
    """The harness process's environment: its thread count set (2 cores oversubscribed made an
    lmms-eval run 13x slower), and offline unless turned off."""
    env = dict(os.environ)
    for key in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_MAX_THREADS",
    ):
        env[key] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[key] = "1" if offline else "0"
    return env


def default_threads() -> int:
    """All the CPUs this process may use: the stage waits while the harness runs."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _model_args(args: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in args.items())


def run_harness(
    harness: str,
    model: str,
    model_args: dict,
    tasks: list[str],
    workdir: Path,
    *,
    include_paths: list[str],
    limit: int | float | None,
    batch_size: int,
    threads: int,
    offline: bool,
    extra_args: list[str] = (),
    timeout: float | None = None,
) -> dict:
    """Run `python -m <harness>` on `tasks`, in `workdir` (where the local tasks' data files
    are), and return `{"results_file", "results": {task: {metric: value}}, "n_samples"}` read
    from the results file it wrote. Raises `HarnessError` naming the task it has no figure for.
    """
    workdir = Path(workdir).resolve()  # the harness runs there: every path it gets is absolute
    if harness_missing(harness):
        raise HarnessError(
            f"{harness} cannot run here: {', '.join(harness_missing(harness))} not installed "
            "(`make install` installs both harnesses)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if Path(model_args.get("pretrained", "")).is_absolute():
        # Both harnesses name their output folder after the model path: a link in the workdir
        # keeps this machine's directories out of the results' names (removed after the run, so
        # DVC does not hash the model again inside this output).
        link = workdir / "model"
        link.unlink(missing_ok=True)
        link.symlink_to(model_args["pretrained"], target_is_directory=True)
        model_args = {**model_args, "pretrained": link.name}
    out = workdir / "output"
    log = workdir / f"{harness}.log"
    cmd = [
        sys.executable,
        "-m",
        MODULES[harness],
        "--model",
        model,
        "--model_args",
        _model_args(model_args),
        "--tasks",
        ",".join(tasks),
        "--batch_size",
        str(batch_size),
        "--output_path",
        str(out),
        "--include_path",
        ",".join([str(TASKS_DIR / harness), *include_paths]),
        *extra_args,
    ]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(
                cmd,
                cwd=workdir,
                env=harness_env(threads, offline),
                stdout=f,
                stderr=f,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            (workdir / "model").unlink(missing_ok=True)
    return read_results(harness, tasks, out, log, rc)


def read_results(harness: str, tasks: list[str], out: Path, log: Path, rc) -> dict:
    """Per task and metric figures from the newest results file under `out`."""
    files = sorted(out.rglob("*results*.json"), key=lambda p: p.stat().st_mtime)
    results = json.loads(files[-1].read_text()).get("results", {}) if files else {}
    for task in tasks:
        metrics = _metrics(results.get(task, {}))
        if not metrics:
            raise HarnessError(
                f"{harness} gave no result for task {task!r} (exit code {rc}; a task name it "
                f"does not know, data it cannot load offline, or a model it cannot run): see "
                f"{log}\n{_tail(log)}"
            )
    n_samples = json.loads(files[-1].read_text()).get("n-samples", {})
    return {
        "results_file": str(files[-1]),
        "results": {task: _metrics(results[task]) for task in tasks},
        "samples": {t: n_samples.get(t, {}).get("effective") for t in tasks},
    }


def _metrics(task_results: dict) -> dict:
    """`{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}` -> `{"acc": 0.5, ...}`: numeric
    figures only, the filter name dropped when it is `none`."""
    out = {}
    for key, value in task_results.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or key == "sample_len":
            continue
        name, _, filt = key.partition(",")
        out[name if filt in ("", "none") else f"{name},{filt}"] = value
    return out


def _tail(path: Path, n: int = 25) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()  # loguru's colours
    return "\n".join(lines[-n:])


def run_harnesses(
    evaluate: EvaluateConfig,
    system_prompt: str,
    models: dict[str, str],
    sets: dict,
    status: dict,
    text_items: str,
    llm_exports: str,
    harness_dir: str,
) -> dict:
    """Each requested, installed harness on every model: `{model: {harness: {task: {metric:
    value}}}}`, each figure read from the results file the harness wrote (recorded in
    `status[harness]["results_files"]`). Raises HarnessError at the first task without one.
    Each model's LLM is exported under `llm_exports`, each harness's files go under
    `harness_dir`/<model>/<harness>. `evaluate` is the stage's `EvaluateConfig`, `status`
    `harness_status(evaluate)`, `sets` the held-out parts (the first feeds `vregion_vqa`),
    `text_items` the text-skill JSONL (it feeds `vregion_text_mc`)."""
    cuda = torch.cuda.is_available()
    out: dict[str, dict] = {name: {} for name in models}
    exports = {}
    for harness in ("lm_eval", "lmms_eval"):
        cfg, st = getattr(evaluate, harness), status[harness]
        if st["status"].startswith("not installed"):
            log.info("%s is %s: its tasks %s are not measured", harness, st["status"], cfg.tasks)
        if st["status"] == "ran":
            st["results_files"] = {}
    # Model by model, so a failing task stops the stage after one model's runs, not three.
    for name, checkpoint in models.items():
        for harness in ("lm_eval", "lmms_eval"):
            cfg, st = getattr(evaluate, harness), status[harness]
            if st["status"] != "ran":
                continue
            workdir = Path(harness_dir) / name / harness
            shutil.rmtree(workdir, ignore_errors=True)
            if harness == "lm_eval":
                target = Path(llm_exports) / name
                shutil.rmtree(target, ignore_errors=True)
                exports[name] = export_llm(checkpoint, target)
                model_args = {"pretrained": str(target.resolve())}
                if TEXT_MC_TASK in cfg.tasks:
                    from transformers import AutoTokenizer

                    from vregion.data.text_skill import read_text_set

                    write_text_mc_data(
                        read_text_set(text_items),
                        AutoTokenizer.from_pretrained(target),
                        system_prompt,
                        workdir / f"{TEXT_MC_TASK}.jsonl",
                    )
            else:
                model_args = {"pretrained": str(Path(checkpoint).resolve())}
                if not cuda:
                    model_args["device_map"] = "cpu"  # llava_hf puts the model on CUDA otherwise
                if VQA_TASK in cfg.tasks:
                    write_vqa_data(next(iter(sets.values())), workdir / f"{VQA_TASK}.jsonl")
            extra = ["--device", "cuda" if cuda else "cpu", *cfg.extra_args]
            if cfg.num_fewshot is not None:
                extra += ["--num_fewshot", str(cfg.num_fewshot)]
            log.info("%s on %s: %s", harness, name, ", ".join(cfg.tasks))
            run = run_harness(
                harness,
                cfg.model or ("hf" if harness == "lm_eval" else "llava_hf"),
                {**model_args, **cfg.model_args},
                cfg.tasks,
                workdir,
                include_paths=[str(Path(d).resolve()) for d in cfg.include_path],
                limit=cfg.limit,
                batch_size=cfg.batch_size,
                threads=cfg.threads or default_threads(),
                offline=cfg.offline,
                extra_args=extra,
                timeout=cfg.timeout_s,
            )
            st["results_files"][name] = os.path.relpath(run["results_file"])
            out[name][harness] = {
                task: {**figures, "n": run["samples"][task]}
                for task, figures in run["results"].items()
            }
    Path(llm_exports).mkdir(parents=True, exist_ok=True)
    (Path(llm_exports) / "exports.json").write_text(json.dumps(exports, indent=2) + "\n")
    return out


def harness_status(evaluate) -> dict:
    """What each harness will do for `evaluate` (the params' `evaluate` section): the tasks and
    settings, or why it does not run."""
    out = {}
    for harness in ("lm_eval", "lmms_eval"):
        cfg = getattr(evaluate, harness)
        missing = harness_missing(harness)
        status = (
            "not requested"
            if not cfg.tasks
            else f"not installed ({', '.join(missing)} missing)"
            if missing
            else "ran"
        )
        out[harness] = {
            "status": status,
            "version": harness_version(harness),
            "tasks": cfg.tasks,
            "limit": cfg.limit,
        }
    return out

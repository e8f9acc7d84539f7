"""The real pipeline under real DVC and Prefect, in a temporary git repo, on the embedded-tiny model.

Checks the contract users rely on: `dvc repro` builds every stage (base → prepare → align →
probe → region → finetune → prune → evaluate → report); a second `dvc repro` does nothing;
changing an `evaluate` param reruns only evaluate and report, nothing upstream; every stage
ran as a Completed Prefect flow run; every checkpoint loads with plain transformers (the
adapter with plain peft); the metrics agree with each other and with the report; and, last, Ctrl-C mid-finetune stops
fast and the next `dvc repro` resumes from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_repo import (
    DVC,
    LOG_EVERY,
    TINY_PARAMS,
    flow_runs,
    merge,
    pipeline_env,
    prefect_api,
    run,
)

from vregion.eval.questions import correctness

# A whole `dvc repro` of the pipeline (minutes on 2 cores): in the whole suite, not the quick one.
pytestmark = pytest.mark.slow


STAGES = (
    "base",
    "prepare",
    "align",
    "probe",
    "region",
    "finetune",
    "prune",
    "evaluate",
    "report",
)


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    return run(cmd, cwd, env, timeout)


@pytest.fixture(scope="module")
def pipeline_repo(built_pipeline):
    """The session's built pipeline, in place: the tests below read it, then change it."""
    return built_pipeline.repo, built_pipeline.env, DVC, built_pipeline.log


def test_repro_builds_every_stage(pipeline_repo):
    repo, _, _, first = pipeline_repo
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    align = json.loads((repo / "metrics" / "align.json").read_text())
    for key in (
        "before_caption_loss",
        "after_caption_loss",
        "after_shuffled_image_loss",
        "image_use_gap",
    ):
        assert isinstance(align[key], float)
    assert align["trainable_params"] < align["total_params"]
    curve = (repo / "metrics" / "align_loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss,lr,seconds" and len(curve) == 1 + TINY_PARAMS["align"]["steps"]
    prepare = json.loads((repo / "metrics" / "prepare.json").read_text())
    assert prepare["synthetic"]["train_captions"] == TINY_PARAMS["data"]["train_images"]
    assert (repo / "data" / "quarantine.json").is_file()


METRICS = {
    "base": "metrics/base.json",
    "prepare": "metrics/prepare.json",
    "align": "metrics/align.json",
    "probe": "metrics/probe.json",
    "region": "metrics/region.json",
    "finetune": "metrics/train.json",
    "prune": "metrics/prune.json",
    "evaluate": "metrics/eval.json",
}


def _rows(obj, prefix: str = "") -> dict:
    """A metrics file as the table artifact's rows: `a.b` keys, lists as JSON text."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _rows(val, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.dumps(obj) if isinstance(obj, list) else obj}


def test_the_repro_is_one_picture_in_prefect(pipeline_repo):
    """Read back through the Prefect API: the repro's runs under one tag, a metrics table per
    stage equal to its metrics file, finetune progress at 100% and the Ray worker's step lines."""
    repo, _, _, _ = pipeline_repo
    api = prefect_api(repo)
    (base,) = [r for r in flow_runs(api) if r["flow"] == "base"]  # base runs once per repo
    (tag,) = [t for t in base["tags"] if t.startswith("run:repro-")]
    runs = {r["flow"]: r for r in flow_runs(api, tag)}
    assert sorted(runs) == sorted(STAGES) and len(flow_runs(api, tag)) == len(STAGES)
    for stage, path in METRICS.items():
        table = runs[stage]["artifacts"][f"{stage}-metrics"]
        assert table["type"] == "table", table
        rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
        expected = _rows(json.loads((repo / path).read_text()))
        assert {row["metric"]: row["value"] for row in rows} == expected, stage
    summary = runs["report"]["artifacts"]["report-summary"]
    assert summary["data"] == (repo / "reports" / "summary.md").read_text()
    assert "data:image/png;base64," in runs["finetune"]["artifacts"]["finetune-plots"]["data"]

    finetune = runs["finetune"]
    steps = TINY_PARAMS["finetune"]["steps"]
    worker = finetune["artifacts"]["finetune-worker-0"]
    assert worker["type"] == "progress" and float(worker["data"]) == 100.0, worker
    assert f"step {steps}/{steps}" in worker["description"]
    lines = [m for name, m in finetune["logs"] if m.startswith("finetune (worker 0): step ")]
    logged = {int(m.split("step ")[1].split("/")[0]) for m in lines}
    assert logged == {1, steps} | set(range(LOG_EVERY, steps + 1, LOG_EVERY)), lines
    assert all(" loss " in m and " lr " in m and " s/step ETA " in m for m in lines), lines
    for stage, phase in (("base", "base-pretrain-vision-tower"), ("align", "align-projector")):
        assert float(runs[stage]["artifacts"][phase]["data"]) == 100.0, runs[stage]["artifacts"]


def test_each_stage_is_a_completed_prefect_flow_run(pipeline_repo):
    repo, _, _, _ = pipeline_repo
    seen = {(r["flow"], r["state"]) for r in flow_runs(prefect_api(repo))}
    for stage in STAGES:
        assert (stage, "COMPLETED") in seen, seen


def test_checkpoints_load_with_plain_transformers(pipeline_repo):
    repo, env, _, _ = pipeline_repo
    script = (
        "import sys, torch\n"
        "from PIL import Image\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "d = sys.argv[1]\n"
        "m = AutoModelForImageTextToText.from_pretrained(d); p = AutoProcessor.from_pretrained(d)\n"
        "msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Color?'}]}]\n"
        "text = p.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)\n"
        "x = p(images=[Image.new('RGB', (64, 64), 'red')], text=[text], return_tensors='pt')\n"
        "out = m.generate(**x, max_new_tokens=3, do_sample=False)\n"
        "print(type(m).__name__, out.shape[1] > x['input_ids'].shape[1])\n"
    )
    for ckpt in ("models/base", "models/aligned", "models/tuned/merged", "models/pruned"):
        out = _run([sys.executable, "-c", script, str(repo / ckpt)], repo, env)
        assert "LlavaForConditionalGeneration True" in out


def test_aligned_projector_changed_and_llm_did_not(pipeline_repo):
    from safetensors.torch import load_file

    repo, _, _, _ = pipeline_repo
    base = load_file(repo / "models/base/model.safetensors")
    aligned = load_file(repo / "models/aligned/model.safetensors")
    assert base.keys() == aligned.keys()
    changed = {k for k in base if not bool((base[k] == aligned[k]).all())}
    assert changed and all("multi_modal_projector" in k for k in changed), sorted(changed)[:5]


def test_probe_writes_scores_region_and_chart(pipeline_repo):
    repo, _, _, _ = pipeline_repo
    scores = json.loads((repo / "reports" / "layer_scores.json").read_text())
    assert scores["num_layers"] == 4
    for name in (
        "block_influence",
        "angular_distance",
        "attention_to_image",
        "parameter_change",
        "layer_ablation",
    ):
        assert len(scores["scores"][name]) == 4
    # the probe tuning moved every layer (all-layer LoRA), so every parameter change is positive
    assert all(v > 0 for v in scores["scores"]["parameter_change"])
    region = json.loads((repo / "reports" / "region.json").read_text())
    assert region["strategy"] == "uniform" and region["layers"] == [2] and region["num_layers"] == 4
    assert (repo / "reports" / "plots" / "layer_scores.png").stat().st_size > 10_000
    csv = (repo / "reports" / "layer_scores.csv").read_text().splitlines()
    assert csv[0].startswith("layer,") and len(csv) == 5


def _state(path: Path) -> dict:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


def test_finetune_trains_the_region_and_writes_adapter_merged_and_metrics(pipeline_repo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    repo, _, _, _ = pipeline_repo
    region = json.loads((repo / "reports" / "region.json").read_text())["layers"]
    aligned, merged = _state(repo / "models/aligned"), _state(repo / "models/tuned/merged")
    changed = {k for k in aligned if not torch.equal(aligned[k], merged[k])}
    layers = "model.language_model.layers."
    assert {int(k[len(layers) :].split(".")[0]) for k in changed if k.startswith(layers)} == set(
        region
    )
    assert all(k.startswith(layers) or "multi_modal_projector" in k for k in changed)
    peft_model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(repo / "models/aligned"),
        repo / "models/tuned/adapter",
    )
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        a = peft_model.merge_and_unload()(input_ids=ids).logits
        b = AutoModelForImageTextToText.from_pretrained(repo / "models/tuned/merged")(
            input_ids=ids
        ).logits
    assert torch.allclose(a, b, atol=1e-5)
    train = json.loads((repo / "metrics" / "train.json").read_text())
    assert train["region"] == region and train["mode"] == "lora" and train["world_size"] == 1
    assert train["seconds_per_step"] > 0 and train["samples_per_second"] > 0
    assert train["peak_memory_mb"] > 100  # a process holding torch and a model
    assert 0 < train["trainable_params"] < train["total_params"]
    kinds = train["visual"]
    assert kinds["overall"]["n"] == 12 and {"accuracy", "blind", "chance"} <= set(kinds["overall"])


def test_prune_removes_a_layer_outside_the_region(pipeline_repo):
    repo, _, _, _ = pipeline_repo
    prune = json.loads((repo / "metrics" / "prune.json").read_text())
    region = json.loads((repo / "reports" / "region.json").read_text())["layers"]
    assert len(prune["removed"]) == 1 and not set(prune["removed"]) & set(region)
    # the removed layer is the lowest-scoring one outside the region
    outside = [i for i in range(4) if i not in region]
    assert prune["removed"] == [min(outside, key=lambda i: prune["scores"][i])]
    config = json.loads((repo / "models/pruned/config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3
    assert prune["parameters_after"] < prune["parameters_before"]


def test_evaluate_measures_every_model_consistently(pipeline_repo):
    repo, _, _, _ = pipeline_repo
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    models = ev["models"]
    assert set(models) == {"aligned", "tuned", "pruned"}
    for r in models.values():
        assert r["visual"]["overall"]["n"] == 12
        assert r["speed"]["prefill_tokens_per_s"] > 0 and r["speed"]["decode_tokens_per_s"] > 0
        assert r["size_mb"] > 0 and r["peak_memory_mb"] > 100
        assert "mc_accuracy_vs_base" in r["text"]
    assert models["pruned"]["num_layers"] == 3 and models["tuned"]["num_layers"] == 4
    assert models["pruned"]["parameters"] < models["tuned"]["parameters"]
    assert models["pruned"]["size_mb"] < models["tuned"]["size_mb"]
    # the curve's 0 and 1 layers removed are the tuned and pruned models on the same questions
    curve = {r["layers_removed"]: r for r in ev["prune_curve"]}
    assert curve[0]["accuracy"] == models["tuned"]["visual"]["overall"]["accuracy"]
    assert curve[1]["accuracy"] == models["pruned"]["visual"]["overall"]["accuracy"]
    prune = json.loads((repo / "metrics" / "prune.json").read_text())
    assert curve[1]["removed"] == prune["removed"]
    assert (repo / "reports" / "plots" / "eval_accuracy.png").stat().st_size > 10_000
    # each model's answer to each question, in files that agree with its figures
    questions = repo / "metrics" / "questions"
    for name, r in models.items():
        (path,) = (questions / "models" / name).rglob("*.jsonl")
        _, correct = correctness(path)
        assert len(correct) == 12 and correct.mean() == pytest.approx(
            r["visual"]["overall"]["accuracy"], abs=1e-3
        )
    assert correctness(questions / "prune_curve" / "1.jsonl")[1].mean() == pytest.approx(
        curve[1]["accuracy"], abs=1e-3
    )
    assert "questions" not in models["tuned"] and "questions" not in curve[0]
    index = json.loads((questions / "index.json").read_text())["files"]
    assert len(index) == 3 + 2 and "prune_curve/1.jsonl" in index  # 3 models, 2 curve points


def test_report_shows_the_measured_figures(pipeline_repo):
    repo, _, _, _ = pipeline_repo
    summary = (repo / "reports" / "summary.md").read_text()
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    region = json.loads((repo / "reports" / "region.json").read_text())["layers"]
    assert str(region) in summary
    for r in ev["models"].values():
        assert f"{r['visual']['overall']['accuracy']:.3f}" in summary
    assert "![accuracy per kind](plots/eval_accuracy.png)" in summary
    assert (repo / "reports" / "plots" / "eval_accuracy.png").is_file()


def test_kind_learnability_benchmark_trains_on_one_kind_and_asks_another(pipeline_repo, tmp_path):
    """`benchmarks/kind_learnability.py` on the built repo: two steps on the relation questions
    of 30 fresh scenes, then held-out questions of the tiny set's commonest kind (the blind
    control needs two images; the tiny set has about one relation question), counted against
    the records."""
    repo, env, _, _ = pipeline_repo

    def kinds(split: str) -> list[str]:
        lines = (repo / "data" / split / "vqa.jsonl").read_text().splitlines()
        return [json.loads(line).get("kind") for line in lines if line.strip()]

    asked = max(set(kinds("eval")), key=kinds("eval").count)
    out = tmp_path / "kinds.json"
    script = Path(__file__).parents[1] / "benchmarks" / "kind_learnability.py"
    args = ["--aligned", str(repo / "models" / "aligned"), "--data", str(repo / "data")]
    args += ["--params", str(repo / "params.yaml"), "--train-kinds", "relation"]
    args += ["--eval-kinds", asked, "--steps", "2", "--n-eval", "4", "--threads", "1"]
    args += ["--fresh-images", "30"]
    scratch = tmp_path / "scratch"  # where the fresh scenes go, and are removed from
    scratch.mkdir()
    _run(
        [sys.executable, str(script), *args, "--out", str(out)],
        repo,
        {**env, "TMPDIR": str(scratch)},
    )
    result = json.loads(out.read_text())
    assert result["train_questions"] == result["fresh_questions_per_kind"]["relation"] > 0
    assert not list(scratch.glob("kind_learnability-*"))  # (torch leaves its own cache there)
    assert list(result["held_out"]) == [asked] and result["steps"] == 2
    assert result["held_out"][asked]["n"] == min(4, kinds("eval").count(asked))
    assert 0 <= result["held_out"][asked]["accuracy"] <= 1


def test_second_repro_does_nothing_and_a_param_reruns_only_its_stage(pipeline_repo):
    """After the tests that read the first repro's eval.json: the changed evaluate params
    measure the tuned model alone, the cheapest rerun that still leaves finetune and prune,
    upstream of it, alone."""
    repo, env, dvc, _ = pipeline_repo
    again = _run([*dvc, "repro"], repo, env)
    assert "Running stage" not in again
    assert "up to date" in again
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"].update(models=["tuned"], prune_curve=[])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _run([*dvc, "repro"], repo, env, timeout=900)
    for stage in ("base", "prepare", "align", "probe", "region", "finetune", "prune"):
        assert f"Running stage '{stage}'" not in changed
    for stage in ("evaluate", "report"):  # report reads eval.json
        assert f"Running stage '{stage}'" in changed
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    assert set(ev["models"]) == {"tuned"} and not ev["prune_curve"]


# The field's harnesses, once, on the tuned model: lm-eval on its exported LLM, lmms-eval on the
# LVLM, each on the local task vregion ships (about 12 s a harness run on 2 cores).
HARNESS_PARAMS = {
    "evaluate": {
        "models": ["tuned"],
        "speed_repeats": 0,
        "prune_curve": [],
        "lm_eval": {"tasks": ["vregion_text_mc"], "threads": 1, "extra_args": ["--log_samples"]},
        "lmms_eval": {"tasks": ["vregion_vqa"], "limit": 4, "threads": 1},
    }
}


def _params_file(repo: Path, name: str, patch: dict) -> str:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / name).write_text(yaml.safe_dump(merge(params, patch), sort_keys=False))
    return name


@pytest.fixture(scope="module")
def harness_run(pipeline_repo):
    repo, env, _, _ = pipeline_repo
    params = _params_file(repo, "harness.yaml", HARNESS_PARAMS)
    _run([sys.executable, "-m", "stages.evaluate", "--params", params], repo, env)
    return repo, json.loads((repo / "metrics" / "eval.json").read_text())


def test_evaluate_reads_both_harnesses_figures_from_their_results_files(harness_run):
    repo, ev = harness_run
    tuned = ev["models"]["tuned"]
    for harness, task, metric in (
        ("lm_eval", "vregion_text_mc", "acc"),
        ("lmms_eval", "vregion_vqa", "exact_match"),
    ):
        status = ev["harnesses"][harness]
        assert status["status"] == "ran" and status["version"]
        results = json.loads((repo / status["results_files"]["tuned"]).read_text())["results"]
        # no trace of this machine's directories in the results' names (lm-eval names its
        # folder after the model path it is given)
        assert str(repo).strip("/").replace("/", "__") not in status["results_files"]["tuned"]
        assert tuned[harness][task][metric] == results[task][f"{metric},none"]
    assert tuned["lmms_eval"]["vregion_vqa"]["n"] == 4  # its `limit`
    # lm-eval's accuracy is vregion's own on the same items (the LVLM's text path)
    assert tuned["lm_eval"]["vregion_text_mc"]["n"] == tuned["text"]["mc_items"]
    assert tuned["lm_eval"]["vregion_text_mc"]["acc"] == pytest.approx(
        tuned["text"]["mc_accuracy"], abs=1e-4
    )


def test_lm_eval_scores_each_reply_as_vregions_scorer_does(harness_run):
    """Per reply, lm-eval's log-likelihood on the exported LLM equals vregion's summed reply
    log-probability plus one constant per item (lm-eval moves the context's trailing newline
    into every continuation), so both pick the same reply on every item."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vregion.data.text_skill import read_text_set
    from vregion.eval.text_skill import _reply_logprobs, tokenize_reply

    repo, _ = harness_run
    llm_dir = repo / "models" / "llm" / "tuned"
    llm = AutoModelForCausalLM.from_pretrained(llm_dir)  # a plain causal LM
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    assert llm.config.num_hidden_layers == 4
    system = yaml.safe_load((repo / "harness.yaml").read_text())["model"]["system_prompt"]
    items = {i["id"]: i for i in read_text_set(repo / "data" / "text" / "text_skill.jsonl")}
    (samples,) = (repo / "reports/harness/tuned/lm_eval/output").rglob("samples_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == sum(i["type"] == "mc" for i in items.values())
    torch.set_num_threads(1)
    for row in rows[:24]:  # every family, in a couple of seconds
        item = items[row["doc"]["id"]]
        theirs = [float(ll) for ll, _ in row["filtered_resps"]]
        seqs = [tokenize_reply(tokenizer, system, item["prompt"], o) for o in item["options"]]
        ours = [sum(lp) for lp in _reply_logprobs(llm, tokenizer, seqs, batch_size=4)]
        shift = [t - o for t, o in zip(theirs, ours, strict=True)]
        assert max(shift) - min(shift) < 1e-3, (item["id"], theirs, ours)
        assert theirs.index(max(theirs)) == ours.index(max(ours))


def test_report_shows_harness_figures_beside_vregions_own(harness_run):
    from vregion.report import harness_section

    repo, ev = harness_run
    section = harness_section(ev)
    tuned = ev["models"]["tuned"]
    assert f"{tuned['lm_eval']['vregion_text_mc']['acc']:.3f}" in section
    assert f"{tuned['lmms_eval']['vregion_vqa']['exact_match']:.3f}" in section
    assert f"{tuned['text']['mc_accuracy']:.3f} (text multiple choice)" in section
    assert "generate freely" in section  # why the VQA figures differ


def test_a_failing_harness_task_exits_2_naming_it_and_writes_no_metrics(harness_run):
    """lmms-eval exits 0 when a task fails: the stage reads its results file instead."""
    import subprocess

    repo, _ = harness_run
    patch = {"evaluate": {"lm_eval": {"tasks": []}, "lmms_eval": {"tasks": ["no_such_task"]}}}
    params = _params_file(repo, "bad_harness.yaml", merge(HARNESS_PARAMS, patch))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.evaluate", "--params", params],
        cwd=repo,
        env=pipeline_env(repo),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "lmms_eval gave no result for task 'no_such_task' (exit code 0" in proc.stderr
    assert not (repo / "metrics" / "eval.json").exists()


# Ctrl-C mid-finetune (issue 19): finetune long enough to interrupt mid-way, a checkpoint every
# 5 steps; STOP_WITHIN: s from Ctrl-C to the end of `dvc repro` (measured 6.5-8 s).
STEPS, EVERY = 40, 5
STOP_WITHIN = 10.0


def _cache_is_consistent(repo: Path) -> int:
    """Every cached file's content hashes to its own name; returns how many were checked."""
    checked = 0
    for f in (repo / ".dvc" / "cache" / "files" / "md5").rglob("*"):
        if f.is_file() and not f.name.endswith((".dir", ".tmp")) and "." not in f.name:
            assert hashlib.md5(f.read_bytes()).hexdigest() == f.parent.name + f.name, f
            checked += 1
    return checked


def test_ctrl_c_mid_finetune_stops_fast_marks_the_run_and_resumes(pipeline_repo):
    """Ctrl-C in the middle of `dvc repro` (during finetune's Ray Train steps) stops the run
    within seconds, marks the stage's flow run Cancelled with the step it reached, leaves the
    DVC cache consistent, and the next `dvc repro` resumes finetune from its checkpoint.

    Ctrl-C in a terminal sends SIGINT to the whole foreground process group (dvc and the running
    stage's Python); the test does the same. The stages' shared Prefect server runs in its own
    session, so the signal does not reach it. Last in this module: it reuses the built pipeline
    (longer finetune params rerun finetune only) and leaves finetune at STEPS steps."""
    repo, base_env, _, _ = pipeline_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"].update(steps=STEPS, checkpoint_every=EVERY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**base_env, "VREGION_RUN_ID": "interrupted", "VREGION_LOG_EVERY": str(EVERY)}
    log = (repo / "repro.log").open("w")
    proc = subprocess.Popen(
        [*DVC, "repro"],
        cwd=repo,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        # Wait until finetune has checkpointed (step 10: checkpoints at 5 and 10), then Ctrl-C.
        while (
            f"finetune (worker 0): step {2 * EVERY}/{STEPS}" not in (repo / "repro.log").read_text()
        ):
            assert proc.poll() is None, (repo / "repro.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        pressed = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) != 0
        stopped = time.monotonic() - pressed
        log.close()
        out = (repo / "repro.log").read_text()
        assert stopped < STOP_WITHIN, f"stopped {stopped:.1f} s after Ctrl-C\n{out[-3000:]}"
        # One line says where it stopped; no traceback from the stage or from Prefect's API.
        assert "finetune: Interrupted (Ctrl-C) at finetune (worker 0) step" in out, out[-3000:]
        tail = out[out.index("Received SIGINT") :] if "Received SIGINT" in out else out
        assert "Traceback" not in tail, tail[-3000:]

        api = prefect_api(repo)
        (finetune,) = [r for r in flow_runs(api, "run:interrupted") if r["flow"] == "finetune"]
        assert finetune["state"] == "CANCELLED", finetune
        assert "Interrupted (Ctrl-C) at finetune (worker 0) step" in finetune["message"]

        assert _cache_is_consistent(repo) > 0
        status = _run([*DVC, "status"], repo, env)
        assert "finetune" in status
        for done in ("base:", "prepare:", "align:", "probe:", "region:"):
            assert done not in status, status
        # Resume up to finetune only: the stages after it are tested above.
        resume = {**env, "VREGION_RUN_ID": "resumed"}
        again = _run([*DVC, "repro", "finetune"], repo, resume, timeout=900)
        assert "Running stage 'finetune'" in again and "Running stage 'align'" not in again
        train = json.loads((repo / "metrics" / "train.json").read_text())
        # from the last checkpoint Ray Train committed before the signal (step 5 or 10)
        assert EVERY <= train["resumed_from"] <= 2 * EVERY and train["steps"] == STEPS, train
        assert "up to date" in _run([*DVC, "status", "finetune"], repo, env)
        _cache_is_consistent(repo)
        states = {r["flow"]: r["state"] for r in flow_runs(api, "run:resumed")}
        assert states == {"finetune": "COMPLETED"}, states
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

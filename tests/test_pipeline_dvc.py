"""The real pipeline under real DVC and Prefect, in a temporary git repo, on the embedded-tiny model.

Checks the contract users rely on: `dvc repro` builds base → prepare → align; a second
`dvc repro` does nothing; changing an `align` param reruns only `align`; every stage ran as a
Completed Prefect flow run; the checkpoints load with plain transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_repo import DVC, TINY_PARAMS, make_pipeline_repo, pipeline_env, run

STAGES = ("base", "prepare", "align", "probe")


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    return run(cmd, cwd, env, timeout)


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory):
    repo = make_pipeline_repo(tmp_path_factory.mktemp("pipeline"))
    env = pipeline_env(repo)
    dvc = DVC
    first = _run([*dvc, "repro"], repo, env, timeout=900)
    return repo, env, dvc, first


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


def test_second_repro_does_nothing_and_a_param_reruns_only_its_stage(pipeline_repo):
    repo, env, dvc, _ = pipeline_repo
    again = _run([*dvc, "repro"], repo, env)
    assert "Running stage" not in again
    assert "up to date" in again
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["align"]["steps"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _run([*dvc, "repro"], repo, env, timeout=900)
    assert "Running stage 'align'" in changed
    assert "Running stage 'base'" not in changed
    assert "Running stage 'prepare'" not in changed
    assert "Running stage 'probe'" in changed  # it reads the aligned model, which changed
    curve = (repo / "metrics" / "align_loss.csv").read_text().splitlines()
    assert len(curve) == 1 + 4


def test_each_stage_is_a_completed_prefect_flow_run(pipeline_repo):
    repo, env, _, _ = pipeline_repo
    script = (
        "import asyncio\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.sorting import FlowRunSort\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        runs = await c.read_flow_runs(limit=100, sort=FlowRunSort.START_TIME_DESC)\n"
        "        flows = {f.id: f.name for f in await c.read_flows()}\n"
        "        for r in runs: print(flows[r.flow_id], r.state_type.value)\n"
        "asyncio.run(main())\n"
    )
    out = _run([sys.executable, "-c", script], repo, env)
    seen = {tuple(line.split()) for line in out.splitlines() if line.strip()}
    for stage in STAGES:
        assert (stage, "COMPLETED") in seen, out


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
    for ckpt in ("models/base", "models/aligned"):
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

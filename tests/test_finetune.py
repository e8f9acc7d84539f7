"""Selective visual instruction tuning on Ray Train: 2 CPU workers, a learnable task, exact
freezing, resume after a kill, and outputs that plain transformers / peft load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vregion.config import FinetuneConfig, Params
from vregion.data import synthetic
from vregion.data.dataset import index_records
from vregion.train.finetune import FinetuneJob, export_tuned, run_finetune


@pytest.fixture(scope="module")
def ray_runtime():
    import tempfile

    from vregion.distributed import local_ray

    with (
        tempfile.TemporaryDirectory(prefix="r", dir="/tmp") as tmp,
        local_ray(temp_dir=tmp, num_cpus=2),
    ):
        yield


@pytest.fixture(scope="module")
def vqa(tmp_path_factory, tiny_processor):
    out = tmp_path_factory.mktemp("vqa")
    synthetic.build_split(out, "train", 24, seed=0, questions_per_image=2)
    index_records(out / "train" / "vqa.jsonl", out, tiny_processor, "Answer briefly.")
    return out


def _job(tiny_embedded_dir, vqa, steps: int = 12, **config) -> FinetuneJob:
    """A job of `config` (finetune fields over a fast test setting) on the tiny model."""
    base, _ = tiny_embedded_dir
    settings = dict(
        mode="full",
        projector_lr=1e-3,
        llm_lr=1e-3,
        steps=steps,
        batch_size=4,
        checkpoint_every=4,
        precision="fp32",
    )
    p = Params.model_validate({"finetune": {**settings, **config}})
    return FinetuneJob.resolve(p, [1, 3], aligned=base, data_dir=vqa)


def test_the_job_carries_the_config_whole_and_its_run_name_only_what_trains(tiny_embedded_dir, vqa):
    job = _job(tiny_embedded_dir, vqa, mode="lora", lora_r=4)
    assert isinstance(job.config, FinetuneConfig) and job.config.lora_r == 4
    assert job.seed == job.data_seed == 0  # finetune.seed null: model.seed, as before
    same = _job(tiny_embedded_dir, vqa, mode="lora", lora_r=4)
    assert same.run_name() == job.run_name()  # deterministic: a rerun resumes
    assert FinetuneJob.model_validate_json(job.model_dump_json()).run_name() == job.run_name()
    # the held-out check and where workers run leave the weights alone: same run ...
    assert _job(tiny_embedded_dir, vqa, mode="lora", lora_r=4, eval_samples=50).run_name() == (
        job.run_name()
    )
    # ... what trains does not
    assert _job(tiny_embedded_dir, vqa, mode="lora", lora_r=8).run_name() != job.run_name()
    seeded = _job(tiny_embedded_dir, vqa, mode="lora", lora_r=4, seed=5)
    assert (seeded.seed, seeded.data_seed) == (5, 0) and seeded.run_name() != job.run_name()


def test_two_workers_learn_and_only_the_region_changes(
    ray_runtime, tiny_embedded_dir, vqa, tmp_path
):
    job = _job(tiny_embedded_dir, vqa)
    result = run_finetune(job, name="two-workers", local_dir=tmp_path / "runs", num_workers=2)
    assert result.metrics["world_size"] == 2 and result.metrics["step"] == job.steps
    info = export_tuned(job, result.checkpoint.path, tmp_path / "tuned")
    assert info["step"] == job.steps
    history = [row["loss"] for row in info["curve"]]
    assert len(history) == job.steps
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3  # the answer loss falls
    from transformers import AutoModelForImageTextToText

    before = AutoModelForImageTextToText.from_pretrained(job.aligned).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(tmp_path / "tuned" / "merged").state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    layers = "model.language_model.layers."
    assert {int(k[len(layers) :].split(".")[0]) for k in changed if k.startswith(layers)} == {1, 3}
    # every weight of a selected layer moved (full mode); nothing outside region + projector did
    assert len([k for k in changed if k.startswith(layers)]) == 2 * 9
    assert all(k.startswith(layers) or "multi_modal_projector" in k for k in changed)


def test_lora_adapter_loads_with_plain_peft(ray_runtime, tiny_embedded_dir, vqa, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    job = _job(
        tiny_embedded_dir, vqa, mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, steps=3
    )
    result = run_finetune(job, name="lora", local_dir=tmp_path / "runs", num_workers=1)
    export_tuned(job, result.checkpoint.path, tmp_path / "tuned")
    base = AutoModelForImageTextToText.from_pretrained(job.aligned)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "tuned" / "adapter")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "tuned" / "merged")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a = peft_model.merge_and_unload()(input_ids=ids).logits
        b = merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    config = json.loads((tmp_path / "tuned" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4
    base = config["base_model_name_or_path"]  # relative: two clones write the same adapter
    assert not Path(base).is_absolute() and Path(base).resolve() == Path(job.aligned).resolve()
    card = (tmp_path / "tuned" / "adapter" / "README.md").read_text()
    assert f"base_model: {base}" in card and f"base_model:adapter:{base}" in card
    assert str(Path(job.aligned).resolve()) not in card.replace(base, "")  # nor elsewhere


@pytest.mark.slow  # over a minute on 2 cores
def test_killed_run_resumes_from_its_checkpoint(tiny_embedded_dir, vqa, tmp_path):
    # killed at its first registered checkpoint (step 2): 10 steps left, seconds of margin
    job = _job(tiny_embedded_dir, vqa, steps=12, checkpoint_every=2)
    runs = tmp_path / "runs"
    script = (
        "import json, sys, tempfile\n"
        "from vregion.distributed import local_ray\n"
        "from vregion.train.finetune import FinetuneJob, run_finetune\n"
        "job = FinetuneJob.model_validate_json(sys.argv[1])\n"
        "with tempfile.TemporaryDirectory(prefix='r', dir='/tmp') as t, local_ray(temp_dir=t, num_cpus=2):\n"
        "    r = run_finetune(job, name='killed', local_dir=sys.argv[2])\n"
        "    print('RESUMED_FROM', r.metrics['resumed_from'], 'STEP', r.metrics['step'])\n"
    )
    args = [sys.executable, "-c", script, job.model_dump_json(), str(runs)]
    proc = subprocess.Popen(
        args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    snapshot = runs / "killed" / "checkpoint_manager_snapshot.json"
    # Kill once Ray has registered a checkpoint (the snapshot is what a rerun resumes from).
    while not (snapshot.is_file() and "checkpoint_" in snapshot.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run, Ray included, dies mid-way
    proc.wait(timeout=60)
    done = torch.load(
        sorted(runs.glob("killed/checkpoint_*/trainable.pt"))[-1], weights_only=False
    )["step"]
    assert 0 < done < job.steps
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESUMED_FROM")][-1].split()
    # resumed from a checkpoint of the killed run (the latest Ray had registered), not from 0
    assert 0 < int(line[1]) <= done and int(line[3]) == job.steps


def dies_after_first_checkpoint(config: dict) -> None:
    """The finetune loop, but rank 0 dies (as a crashed worker would) right after the first
    checkpoint it reports, once per marker file."""
    from pathlib import Path

    import ray.train

    from vregion.train.finetune import finetune_worker

    marker = Path(config["job"].data_dir, "train", "died-at-step")
    report = ray.train.report

    def report_then_die(metrics, checkpoint=None, **kwargs):
        report(metrics, checkpoint=checkpoint, **kwargs)
        if checkpoint is not None and not marker.exists():
            marker.write_text(str(metrics["step"]))
            time.sleep(3)  # let the controller register the checkpoint, as after a real save
            os._exit(1)

    ray.train.report = report_then_die
    finetune_worker(config)


@pytest.mark.slow  # over 30 s on a quiet 2-core machine
def test_a_worker_that_dies_is_restarted_from_the_checkpoint(
    ray_runtime, tiny_embedded_dir, vqa, tmp_path
):
    import ray.cloudpickle

    job = _job(tiny_embedded_dir, vqa, steps=8, checkpoint_every=3)
    marker = vqa / "train" / "died-at-step"
    marker.unlink(missing_ok=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ship this test's function
    try:
        result = run_finetune(
            job,
            name="dies",
            local_dir=tmp_path / "runs",
            num_workers=2,
            train_fn=dies_after_first_checkpoint,
        )
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.read_text() == "3"  # rank 0 died once, right after its step-3 checkpoint
    assert result.error is None
    # the restarted worker group went on from that checkpoint and finished the run
    assert result.metrics["resumed_from"] == 3 and result.metrics["step"] == job.steps


@pytest.mark.slow  # over a minute on 2 cores
def test_fsdp_shards_the_model_and_matches_ddp(ray_runtime, tiny_embedded_dir, vqa, tmp_path):
    """`parallel: fsdp` on 2 CPU workers (gloo): the same training as DDP, unsharded
    checkpoints, and a resume that restores the name-keyed optimizer state."""
    from transformers import AutoModelForImageTextToText

    lora = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    tuned, resident = {}, {}
    for parallel in ("ddp", "fsdp"):
        job = _job(tiny_embedded_dir, vqa, mode="lora", **lora, steps=6, parallel=parallel)
        result = run_finetune(job, name=parallel, local_dir=tmp_path / "runs", num_workers=2)
        assert result.metrics["world_size"] == 2 and result.metrics["step"] == 6
        resident[parallel] = result.metrics["worker_resident_params"]
        info = export_tuned(job, result.checkpoint.path, tmp_path / parallel)
        history = [row["loss"] for row in info["curve"]]
        assert sum(history[-2:]) / 2 < sum(history[:2]) / 2, history
        tuned[parallel] = AutoModelForImageTextToText.from_pretrained(
            tmp_path / parallel / "merged"
        ).state_dict()
    # each FSDP worker holds about half of the parameters, a DDP worker all of them
    assert resident["ddp"] == result.metrics["total_params"]
    assert 0.45 < resident["fsdp"] / resident["ddp"] < 0.55, resident
    before = AutoModelForImageTextToText.from_pretrained(job.aligned).state_dict()
    changed = {k for k in before if not torch.equal(before[k], tuned["fsdp"][k])}
    layers = "model.language_model.layers."
    assert {int(k[len(layers) :].split(".")[0]) for k in changed if k.startswith(layers)} == {1, 3}
    assert all(k.startswith(layers) or "multi_modal_projector" in k for k in changed)
    for k in before:  # sharded or not, the same gradients and updates (up to float order)
        assert torch.allclose(tuned["fsdp"][k], tuned["ddp"][k], atol=1e-5), k
    # resume the FSDP run for 2 more steps: optimizer state goes back into the sharded model
    job = _job(tiny_embedded_dir, vqa, mode="lora", **lora, steps=8, parallel="fsdp")
    result = run_finetune(job, name="fsdp", local_dir=tmp_path / "runs", num_workers=2)
    assert result.metrics["resumed_from"] == 6 and result.metrics["step"] == 8

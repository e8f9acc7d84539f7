"""Two Ray nodes on 127.0.0.1, data and checkpoints in S3, and one node lost mid-run.

One test, in bounded time, everything real (SeaweedFS, `ray start` twice through `infra`, Ray
Train, the finetune loop on the tiny embedded model):

1. records and images uploaded to SeaweedFS, validated in place by `ingest_source`;
2. a reference run: 2 workers spread over both nodes, images read from S3, checkpoints in S3;
3. the same run again, but the worker node's raylet is SIGKILLed once a checkpoint is in S3:
   Ray Train restarts the worker group from that checkpoint on the surviving node, and the
   final weights equal the reference run's (same data order, restored optimizer and schedule);
4. an image deleted from the bucket mid-training: the run fails naming bucket and key, the
   checkpoint it had written stays in S3, and the rerun (image restored) resumes from it.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from vregion.config import Params, SourceConfig
from vregion.data import synthetic
from vregion.data.dataset import batch_plan
from vregion.data.sources import ingest_source
from vregion.storage import s3_client
from vregion.train.finetune import STATE_FILE, FinetuneJob, run_finetune

# Two Ray nodes and three training runs (minutes on 2 cores).
pytestmark = pytest.mark.slow

SYSTEM = "Answer briefly."


def placed_worker(config: dict) -> None:
    """The finetune loop, after noting which node this rank runs on (one line per start)."""
    import ray
    import ray.train

    from vregion.train.finetune import finetune_worker

    ctx = ray.train.get_context()
    row = {"rank": ctx.get_world_rank(), "node": ray.get_runtime_context().get_node_id()}
    with open(Path(config["job"].data_dir) / "placements.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    finetune_worker(config)


def _upload(settings, local: Path) -> tuple[str, str]:
    s3 = s3_client(settings)
    for png in sorted((local / "images").rglob("*.png")):
        key = settings.key("data", str(png.relative_to(local)))
        s3.put_object(Bucket=settings.bucket, Key=key, Body=png.read_bytes())
    body = (local / "train" / "vqa.jsonl").read_bytes()
    s3.put_object(Bucket=settings.bucket, Key=settings.key("data/train/vqa.jsonl"), Body=body)
    return settings.url("data/train/vqa.jsonl"), settings.url("data")


def _checkpoints(settings, run: str) -> list[str]:
    found = s3_client(settings).list_objects_v2(
        Bucket=settings.bucket, Prefix=settings.key("ray", run)
    )
    return sorted(o["Key"] for o in found.get("Contents", []) if o["Key"].endswith(STATE_FILE))


def _registered(settings, run: str) -> bool:
    """Whether Ray Train's controller has taken a checkpoint of `run` as its latest (its checkpoint
    manager writes this snapshot after each): a checkpoint in the bucket but not yet registered
    is lost with the node, and the restart would begin at step 0."""
    client = s3_client(settings)
    found = client.list_objects_v2(Bucket=settings.bucket, Prefix=settings.key("ray", run))
    for o in found.get("Contents", []):
        if o["Key"].endswith("checkpoint_manager_snapshot.json"):
            body = client.get_object(Bucket=settings.bucket, Key=o["Key"])["Body"].read()
            return json.loads(body).get("latest_checkpoint_result") is not None
    return False


def _weights(result) -> dict[str, torch.Tensor]:
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, weights_only=False)["weights"]


def _placements(data_dir: Path) -> list[dict]:
    path = data_dir / "placements.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    path.unlink(missing_ok=True)
    return rows


@pytest.fixture
def two_nodes(s3_env, tmp_path, monkeypatch):
    """Head (2 CPUs) + worker node (1 CPU) on loopback, started with the S3 settings in their
    environment (as a cluster's nodes get credentials), joined by this process."""
    import tempfile

    from s3_fixtures import free_port

    from infra import ray_nodes
    from vregion.distributed import local_ray

    # A lost node is declared dead after ~3 s instead of ~15 s.
    monkeypatch.setenv("RAY_health_check_period_ms", "1000")
    monkeypatch.setenv("RAY_health_check_timeout_ms", "1000")
    monkeypatch.setenv("RAY_health_check_failure_threshold", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    temp = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    port = free_port()
    # Set before the nodes start, so Ray's helper processes on them (Train's placement-group
    # cleaner) join this cluster, not another one running on the machine.
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    address = ray_nodes.start_cluster(temp, nodes=1, port=port, num_cpus=2)
    try:
        ray_nodes.start_node(
            ray_nodes.RayNode(ray_nodes.node_dir(temp, 1), address, num_cpus=1),
            expect_nodes=2,
        )
        with local_ray():
            yield ray_nodes.node_dir(temp, 1)
    finally:
        ray_nodes.stop_cluster(temp)


def test_two_nodes_s3_data_and_checkpoints_survive_a_lost_node(
    two_nodes, s3_env, tiny_embedded_dir, tiny_processor, tmp_path
):
    import ray
    import ray.cloudpickle

    from infra import ray_nodes

    started = time.monotonic()
    local = tmp_path / "upload"
    synthetic.build_split(local, "train", 12, seed=0, questions_per_image=2)
    records_url, root_url = _upload(s3_env, local)
    data = tmp_path / "data"
    ingest_source(
        "remote",
        SourceConfig(records=records_url, image_root=root_url),
        tiny_processor,
        data / "sources" / "remote",
        system_prompt=SYSTEM,
        max_tokens=512,
        workers=4,
    )
    base, _ = tiny_embedded_dir
    finetune = dict(
        data=["remote"],
        mode="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        projector_lr=1e-3,
        llm_lr=1e-3,
        steps=10,
        batch_size=2,
        checkpoint_every=2,
        precision="fp32",
        loader={"workers": 0},
    )
    p = Params.model_validate(
        {
            "model": {"system_prompt": SYSTEM},
            "data": {"sources": {"remote": {"records": records_url, "image_root": root_url}}},
            "finetune": finetune,
        }
    )
    job = FinetuneJob.resolve(p, [1, 3], aligned=base, data_dir=data)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    fit = dict(local_dir=tmp_path / "unused", num_workers=2, placement_strategy="SPREAD")
    fit["train_fn"] = placed_worker
    try:
        # 1. Reference: one worker per node, checkpoints in the bucket.
        reference = run_finetune(job, name="reference", **fit)
        placed = _placements(data)
        assert {p["node"] for p in placed} == nodes, placed
        assert reference.metrics["step"] == job.steps and reference.metrics["world_size"] == 2
        assert _checkpoints(s3_env, "reference") and s3_env.bucket in reference.checkpoint.path

        # 2. The worker node's raylet dies once a checkpoint has landed in S3 and Ray Train
        # has registered it.
        killed: dict = {}

        def kill_when_checkpointed() -> None:
            deadline = time.monotonic() + 120
            while not _registered(s3_env, "lost-node") and time.monotonic() < deadline:
                time.sleep(0.2)
            killed["at"] = len(_checkpoints(s3_env, "lost-node"))
            killed["raylet"] = ray_nodes.kill_raylet(two_nodes)

        killer = threading.Thread(target=kill_when_checkpointed, daemon=True)
        killer.start()
        survived = run_finetune(job, name="lost-node", **fit)
        killer.join(timeout=10)
        placed = _placements(data)
        assert killed.get("raylet") and killed["at"] >= 1, killed
        assert len(placed) == 4, placed  # 2 ranks started, then restarted once
        head = ray.get_runtime_context().get_node_id()  # the driver joins the head node
        assert {p["node"] for p in placed[:2]} == nodes  # first attempt: one rank per node
        assert {p["node"] for p in placed[2:]} == {head}  # restarted on the surviving node
        assert 0 < survived.metrics["resumed_from"] < job.steps
        assert survived.metrics["step"] == job.steps
        ours, theirs = _weights(survived), _weights(reference)
        assert ours.keys() == theirs.keys()
        worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        assert worst < 1e-6, worst  # the same training, resumed exactly
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    # 3. A key deleted from the bucket, needed only after the first checkpoint.
    short = job.model_copy(update={"steps": 4})
    image_key, body = _image_needed_late(short, s3_env, first_checkpoint=2)
    s3 = s3_client(s3_env)
    s3.delete_object(Bucket=s3_env.bucket, Key=image_key)
    once = dict(local_dir=tmp_path / "unused", num_workers=1, max_failures=0)
    with pytest.raises(Exception) as err:
        run_finetune(short, name="missing-key", **once)
    message = str(err.value)
    assert image_key in message and s3_env.bucket in message and "does not exist" in message
    kept = _checkpoints(s3_env, "missing-key")
    assert kept  # the checkpoint written before the failure is intact in S3 ...
    state = s3.get_object(Bucket=s3_env.bucket, Key=kept[-1])["Body"].read()
    assert torch.load(io.BytesIO(state), weights_only=False)["step"] == 2
    s3.put_object(Bucket=s3_env.bucket, Key=image_key, Body=body)
    resumed = run_finetune(short, name="missing-key", **once)  # ... and the rerun resumes there
    assert resumed.metrics["resumed_from"] == 2 and resumed.metrics["step"] == short.steps
    assert time.monotonic() - started < 300


def _image_needed_late(job: FinetuneJob, settings, first_checkpoint: int) -> tuple[str, bytes]:
    """An image key the run reads only after step `first_checkpoint` (one worker), and its bytes."""
    from vregion.train.finetune import job_dataset

    dataset = job_dataset(job, None)
    plan = batch_plan(dataset.lengths, dataset.has_image, job.config.batch_size, seed=job.seed)
    early = {dataset.image_ref(int(i)) for b in plan[:first_checkpoint] for i in b}
    late = [dataset.image_ref(int(i)) for b in plan[first_checkpoint : job.steps] for i in b]
    root, rel = next(ref for ref in late if ref is not None and ref not in early)
    key = settings.key("data", rel)
    assert root == settings.url("data")
    body = s3_client(settings).get_object(Bucket=settings.bucket, Key=key)["Body"].read()
    return key, body

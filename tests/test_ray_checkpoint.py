"""Ray Train checkpoints land in the S3 store, and a second run with the same name resumes there.

Real local Ray (one CPU worker), real SeaweedFS on loopback, a tiny torch model.
"""

from __future__ import annotations

import os
import tempfile

import pytest


def _train_loop(config: dict) -> None:
    import json

    import ray.train
    import torch

    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"))
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start = state["step"]
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for step in range(start, config["stop_at"]):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        with tempfile.TemporaryDirectory() as d:
            torch.save(
                {"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1},
                os.path.join(d, "state.pt"),
            )
            with open(os.path.join(d, "meta.json"), "w") as f:
                json.dump({"step": step + 1}, f)
            ray.train.report(
                {"step": step + 1, "first_step": start, "loss": float(loss)},
                checkpoint=ray.train.Checkpoint.from_directory(d),
            )


@pytest.fixture(scope="module")
def ray_runtime():
    import sys

    from ray import cloudpickle

    from vregion.distributed import local_ray

    # Ray workers cannot import this test module: ship the train loop by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with (
        tempfile.TemporaryDirectory(prefix="r", dir="/tmp") as tmp,
        local_ray(temp_dir=tmp, num_cpus=2),
    ):
        yield


def test_checkpoint_lands_in_the_bucket_and_a_second_run_resumes(ray_runtime, s3_env):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from vregion.distributed import run_config
    from vregion.storage import s3_client

    def fit(stop_at: int):
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"stop_at": stop_at},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
            run_config=run_config("resume-test", "unused-local-dir"),
        )
        return trainer.fit()

    first = fit(stop_at=2)  # an "interrupted" run: 2 of 4 steps done
    assert first.metrics["step"] == 2 and first.metrics["first_step"] == 0
    keys = [
        o["Key"]
        for o in s3_client(s3_env).list_objects_v2(Bucket=s3_env.bucket, Prefix=s3_env.key("ray"))[
            "Contents"
        ]
    ]
    checkpoints = [k for k in keys if k.endswith("state.pt")]
    assert checkpoints and all(
        k.startswith(s3_env.key("ray", "resume-test")) for k in checkpoints
    ), keys

    second = fit(stop_at=4)
    assert second.metrics["first_step"] == 2  # resumed from the checkpoint, not from step 0
    assert second.metrics["step"] == 4
    assert second.checkpoint is not None and "resume-test" in second.checkpoint.path


def test_wrong_credentials_fail_before_ray_starts_anything(s3_env, monkeypatch):
    from vregion.distributed import run_config
    from vregion.storage import StorageError

    monkeypatch.setenv("VREGION_S3_SECRET_ACCESS_KEY", "wrong-secret-000000")
    with pytest.raises(StorageError) as err:
        run_config("x", "unused")
    assert s3_env.endpoint_url in str(err.value)

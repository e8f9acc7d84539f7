"""`dvc repro` on embedded-tiny with every LLaVA records file and image in SeaweedFS.

The LLaVA-format set of `test_real_data` is uploaded to a real SeaweedFS; `data.sources` names
`s3://` records and image roots. Every stage runs (the ingest stages validate in place, training
reads images from the bucket and checkpoints to it), DVC records the three records objects as
external dependencies, and editing one makes its ingest stage stale.

Opt-in (5-6.5 minutes on 2 busy cores, so not in the default suite):
`VREGION_TEST_S3_REPRO=1 pytest tests/test_real_data_s3.py`.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml
from pipeline_repo import DVC, make_pipeline_repo, merge, pipeline_env, run
from test_real_data import REAL_PARAMS, write_llava_set

from vregion.storage import s3_client

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("VREGION_TEST_S3_REPRO"),
        reason="the whole pipeline on S3 data (~5-6.5 min): set VREGION_TEST_S3_REPRO=1",
    ),
]


def test_dvc_repro_with_records_and_images_in_s3(s3_settings, tmp_path):
    client = s3_client(s3_settings)
    data = write_llava_set(tmp_path / "llava")
    for f in sorted(p for p in data["images"].rglob("*") if p.is_file()):
        key = s3_settings.key("images", str(f.relative_to(data["images"])))
        client.put_object(Bucket=s3_settings.bucket, Key=key, Body=f.read_bytes())
    sources = {}
    for name in ("chat", "chat_eval", "captions"):
        key = s3_settings.key(data[name].name)
        client.put_object(Bucket=s3_settings.bucket, Key=key, Body=data[name].read_bytes())
        sources[name] = {
            "records": f"s3://{s3_settings.bucket}/{key}",
            "image_root": s3_settings.url("images"),
        }
    (tmp_path / "repo").mkdir()
    repo = make_pipeline_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params = merge(params, {**REAL_PARAMS, "data": {"sources": sources}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = pipeline_env(repo)
    env["PYTHONPATH"] = str(repo)  # Ray workers import this copy, not an editable install
    env["OMP_NUM_THREADS"] = "1"
    env.update(s3_settings.replace(prefix=s3_settings.key("ckpt")).as_env())
    # DVC's own S3 client (external dependencies) reads the AWS names only.
    env["AWS_ENDPOINT_URL_S3"] = s3_settings.endpoint_url
    env["AWS_ACCESS_KEY_ID"] = s3_settings.access_key_id
    env["AWS_SECRET_ACCESS_KEY"] = s3_settings.secret_access_key

    out = run([*DVC, "repro"], repo, env, timeout=1800)
    for stage in ("ingest@chat", "ingest@chat_eval", "ingest@captions", "align", "probe"):
        assert f"Running stage '{stage}'" in out
    for stage in ("finetune", "prune", "evaluate", "report"):
        assert f"Running stage '{stage}'" in out
    source = json.loads((repo / "data/sources/chat/source.json").read_text())
    assert source["image_root"] == s3_settings.url("images") and source["records"] == 240
    assert (repo / "dvc.lock").read_text().count("path: s3://") == 3
    assert "up to date" in run([*DVC, "status"], repo, env)

    edited = data["chat_eval"].read_bytes() + b"\n"
    key = s3_settings.key(data["chat_eval"].name)
    client.put_object(Bucket=s3_settings.bucket, Key=key, Body=edited)
    status = run([*DVC, "status"], repo, env)
    assert "ingest@chat_eval" in status and f"s3://{s3_settings.bucket}/{key}" in status

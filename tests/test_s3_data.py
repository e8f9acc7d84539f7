"""Records and images in S3 (real SeaweedFS on loopback): validated in place, read lazily.

`ingest_source` takes `s3://` records and image root; a key outside the image prefix is
quarantined as "outside the image root" and never requested; a missing image is quarantined by
name; the local copy of the records streams images from the store one batch at a time; a key
deleted after ingest and an unreachable endpoint give errors naming bucket, key and endpoint.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from vregion.config import SourceConfig
from vregion.data.dataset import Part, RecordDataset, RecordFile, source_files
from vregion.data.remote import MissingObjectError, RemoteDataError
from vregion.data.sources import ingest_source
from vregion.storage import s3_client

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(colour, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _record(i: int, image: str | None) -> dict:
    turns = [
        {"from": "human", "value": ("<image>\n" if image else "") + "What colour is it?"},
        {"from": "gpt", "value": "red"},
    ]
    return {"id": f"r{i}", **({"image": image} if image else {}), "conversations": turns}


def upload_set(settings, n: int = 8) -> tuple[str, str]:
    """n images under <prefix>/images/, a secret outside it, and a JSONL of records naming
    them (plus one outside, one missing): returns (records URL, image root URL)."""
    s3 = s3_client(settings)
    for i in range(n):
        s3.put_object(
            Bucket=settings.bucket, Key=settings.key("images", f"{i}.png"), Body=_png((200, 20, i))
        )
    s3.put_object(Bucket=settings.bucket, Key=settings.key("secret.png"), Body=_png((0, 0, 0)))
    records = [_record(i, f"{i}.png") for i in range(n)]
    records += [_record(n, "../secret.png"), _record(n + 1, "gone.png"), _record(n + 2, None)]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    s3.put_object(Bucket=settings.bucket, Key=settings.key("records.jsonl"), Body=body)
    return settings.url("records.jsonl"), settings.url("images")


def test_ingest_validates_in_place_and_training_reads_images_lazily(
    s3_env, tiny_processor, tmp_path, monkeypatch
):
    records_url, root_url = upload_set(s3_env)
    cfg = SourceConfig(records=records_url, image_root=root_url)
    t0 = time.perf_counter()
    metrics = ingest_source(
        "remote",
        cfg,
        tiny_processor,
        tmp_path / "data" / "sources" / "remote",
        system_prompt="Answer briefly.",
        max_tokens=512,
        workers=4,
    )
    assert time.perf_counter() - t0 < 60
    assert metrics["records"] == 9 and metrics["records_read"] == 11
    assert metrics["image_root"] == root_url and metrics["records_file"] == records_url
    report = json.loads((tmp_path / "data/sources/remote/quarantine.json").read_text())
    reasons = {e["record"]: (e["field"], e["reason"]) for e in report["entries"]}
    assert set(reasons) == {"r8", "r9"}
    assert reasons["r8"][0] == "image" and "outside the image root" in reasons["r8"][1]
    assert reasons["r9"][0] == "image" and "does not exist" in reasons["r9"][1]
    assert f"{root_url}/gone.png" in reasons["r9"][1]
    assert all(e["file"] == records_url for e in report["entries"])

    # The stages see a local records copy whose images stay in S3.
    records, root = source_files("remote", tmp_path / "data")
    assert root == root_url and records.is_file()
    rows = RecordFile(records)
    assert len(rows) == 9
    data = RecordDataset(
        [Part("remote", str(records), root, np.arange(len(rows)))],
        tiny_processor,
        "Answer briefly.",
    )
    item = data[0]
    assert item["pixel_values"].shape[-1] == 64
    assert data.image_ref(0) == (root_url, "0.png")

    # An image deleted after ingest: the batch that needs it names bucket and key.
    s3 = s3_client(s3_env)
    key = s3_env.key("images", "3.png")
    s3.delete_object(Bucket=s3_env.bucket, Key=key)
    index = next(i for i in range(len(data)) if data.sample(i).image == "3.png")
    with pytest.raises(MissingObjectError) as err:
        data[index]
    assert s3_env.bucket in str(err.value) and key in str(err.value)

    # An unreachable endpoint: bounded retries, then one error naming endpoint, bucket, key.
    from s3_fixtures import free_port

    from vregion.data import remote

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("VREGION_S3_ENDPOINT_URL", dead)
    remote._clients.clear()
    t0 = time.perf_counter()
    with pytest.raises(RemoteDataError) as err:
        data[0]
    assert time.perf_counter() - t0 < 60
    message = str(err.value)
    assert dead in message and s3_env.bucket in message and s3_env.key("images", "0.png") in message
    assert s3_env.secret_access_key not in message
    remote._clients.clear()


def test_missing_records_object_and_empty_image_prefix_are_named(
    s3_env, tiny_processor, tmp_path, monkeypatch
):
    records_url, root_url = upload_set(s3_env, n=2)
    for cfg, expected in (
        (SourceConfig(records=s3_env.url("nope.jsonl"), image_root=root_url), "nope.jsonl"),
        (SourceConfig(records=records_url, image_root=s3_env.url("no-images")), "no-images/"),
    ):
        with pytest.raises(FileNotFoundError) as err:
            ingest_source(
                "x",
                cfg,
                tiny_processor,
                tmp_path / "x",
                system_prompt=None,
                max_tokens=512,
                workers=2,
            )
        assert expected in str(err.value) and s3_env.bucket in str(err.value)

    # A store that cannot be reached is not the records' fault: no quarantine, one clear error.
    from s3_fixtures import free_port

    from vregion.data import remote

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("VREGION_S3_ENDPOINT_URL", dead)
    remote._clients.clear()
    try:
        with pytest.raises(RemoteDataError) as err:
            ingest_source(
                "x",
                SourceConfig(records=records_url, image_root=root_url),
                tiny_processor,
                tmp_path / "dead",
                system_prompt=None,
                max_tokens=512,
                workers=2,
            )
    finally:
        remote._clients.clear()
    assert dead in str(err.value) and s3_env.key("records.jsonl") in str(err.value)
    assert not (tmp_path / "dead" / "quarantine.json").exists()


def test_an_s3_image_root_confines_keys_to_its_prefix():
    from vregion.data.images import OutsideRootError, resolve_image
    from vregion.data.remote import S3Object

    assert resolve_image("s3://b/data/img", "a/./b.png") == S3Object("b", "data/img/a/b.png")
    for rel in ("../x.png", "a/../../x.png", "/data/img/x.png", "..", "a/../../img2/x.png"):
        with pytest.raises(OutsideRootError):
            resolve_image("s3://b/data/img", rel)

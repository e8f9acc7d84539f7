"""vregion.storage against a real SeaweedFS: settings, preflight errors, pyarrow, DVC remote."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vregion.storage import (
    S3Settings,
    StorageError,
    check_s3,
    configure_dvc_remote,
    ensure_bucket,
    pyarrow_filesystem,
    s3_client,
    s3_configured,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- settings (no server) -------------------------------------------------------------------


def test_from_env_prefers_vregion_names_and_hides_the_secret():
    env = {
        "VREGION_S3_ENDPOINT_URL": "http://127.0.0.1:8333/",
        "VREGION_S3_BUCKET": "team-cache",
        "VREGION_S3_PREFIX": "/proj/",
        "VREGION_S3_ACCESS_KEY_ID": "vkey1234",
        "VREGION_S3_SECRET_ACCESS_KEY": "vsecret-xyz",
        "AWS_ACCESS_KEY_ID": "awskey",
        "AWS_SECRET_ACCESS_KEY": "awssecret",
        "AWS_REGION": "eu-west-1",
    }
    s = S3Settings.from_env(env)
    assert (s.endpoint_url, s.bucket, s.prefix, s.region) == (
        "http://127.0.0.1:8333",
        "team-cache",
        "proj",
        "eu-west-1",
    )
    assert (s.access_key_id, s.secret_access_key) == ("vkey1234", "vsecret-xyz")
    assert "vsecret-xyz" not in repr(s) and "vsecret-xyz" not in str(s)
    assert "vkey1234" not in repr(s) and "1234" in repr(s)
    assert s.url("dvc") == "s3://team-cache/proj/dvc"
    assert s.path("ray", "run1") == "team-cache/proj/ray/run1"
    assert s.replace(prefix="").url() == "s3://team-cache"
    assert s.as_env()["VREGION_S3_SECRET_ACCESS_KEY"] == "vsecret-xyz"
    assert s3_configured(env) and not s3_configured({})


def test_from_env_falls_back_to_aws_names_as_a_pair():
    env = {
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_ENDPOINT_URL": "https://s3.x",
    }
    s = S3Settings.from_env(env)
    assert (s.access_key_id, s.secret_access_key, s.endpoint_url) == ("a", "b", "https://s3.x")
    assert S3Settings.from_env({}).bucket == "vregion"
    with pytest.raises(StorageError, match="both"):
        S3Settings.from_env({"VREGION_S3_ACCESS_KEY_ID": "only-key", **env})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bucket": "Bad_Bucket"}, "invalid S3 bucket name"),
        ({"bucket": "ab"}, "invalid S3 bucket name"),
        ({"endpoint_url": "127.0.0.1:8333"}, "invalid S3 endpoint"),
        ({"endpoint_url": "http://host:1/bucket"}, "has a path"),
    ],
)
def test_invalid_settings_are_refused(changes, message):
    with pytest.raises(StorageError, match=message):
        S3Settings(**changes)


# --- check_s3 against the real server ---------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"secret_access_key": "wrong-secret"}, r"refused the credentials \(SignatureDoesNotMatch"),
        ({"access_key_id": "unknown-key"}, r"refused the credentials \(InvalidAccessKeyId"),
        ({"bucket": "no-such-bucket"}, r"bucket 'no-such-bucket' does not exist"),
    ],
)
def test_check_s3_explains_bad_settings(s3_settings, changes, message):
    bad = s3_settings.replace(**changes)
    began = time.monotonic()
    with pytest.raises(StorageError, match=message) as info:
        check_s3(bad)
    assert time.monotonic() - began < 5
    assert s3_settings.endpoint_url in str(info.value)
    assert "wrong-secret" not in str(info.value) and s3_settings.secret_access_key not in str(
        info.value
    )


def test_check_s3_explains_an_unreachable_endpoint(s3_settings):
    dead = s3_settings.replace(endpoint_url=f"http://127.0.0.1:{free_port()}")
    began = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint") as info:
        check_s3(dead)
    assert time.monotonic() - began < 8
    assert dead.endpoint_url in str(info.value) and "python -m infra s3 start" in str(info.value)


def test_ensure_bucket_is_idempotent(s3_settings):
    fresh = s3_settings.replace(bucket=f"made-{os.urandom(3).hex()}")
    assert ensure_bucket(fresh) is True
    assert ensure_bucket(fresh) is False
    check_s3(fresh)


# --- pyarrow (what Ray Train's RunConfig(storage_filesystem=...) uses) ---------------------------


def test_pyarrow_filesystem_writes_and_reads_back(s3_settings):
    from pyarrow import fs as pafs

    filesystem = pyarrow_filesystem(s3_settings)
    payload = os.urandom(300_000)
    target = s3_settings.path("ray", "run-1", "checkpoint_000000", "model.bin")
    with filesystem.open_output_stream(target) as out:
        out.write(payload)
    with filesystem.open_input_stream(target) as src:
        assert src.read() == payload
    listed = filesystem.get_file_info(pafs.FileSelector(s3_settings.path("ray"), recursive=True))
    assert target in {info.path for info in listed if info.type == pafs.FileType.File}
    # The object is really in the bucket, under the prefix.
    head = s3_client(s3_settings).head_object(
        Bucket=s3_settings.bucket, Key=s3_settings.key("ray/run-1/checkpoint_000000/model.bin")
    )
    assert head["ContentLength"] == len(payload)


# --- DVC remote --------------------------------------------------------------------------------


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_dvc_push_then_pull_restores_identical_bytes(tmp_path, s3_settings):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]

    def run(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}{proc.stderr}"
        return proc.stdout + proc.stderr

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "config", "core.site_cache_dir", str(repo / ".dvc" / "site_cache"))
    url = configure_dvc_remote(repo, s3_settings)
    assert url == s3_settings.url("dvc")

    (repo / "blob.bin").write_bytes(os.urandom(50_000))
    images = repo / "images"
    (images / "nested").mkdir(parents=True)
    for i in range(3):
        (images / f"{i}.bin").write_bytes(os.urandom(2_000 + i))
    (images / "nested" / "deep.txt").write_text("a nested file\n")
    before = {"blob.bin": _digest(repo)["blob.bin"], **_digest(images)}

    run(*dvc, "add", "-q", "blob.bin", "images")
    run(*dvc, "push", "-q")
    listed = s3_client(s3_settings).list_objects_v2(
        Bucket=s3_settings.bucket, Prefix=s3_settings.key("dvc")
    )
    assert listed["KeyCount"] >= 5  # 4 files + the directory manifest

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(images)
    (repo / "blob.bin").unlink()
    run(*dvc, "pull", "-q")
    assert {"blob.bin": _digest(repo)["blob.bin"], **_digest(images)} == before

    committed = (repo / ".dvc" / "config").read_text()
    local = (repo / ".dvc" / "config.local").read_text()
    assert s3_settings.endpoint_url in committed and url in committed
    assert s3_settings.secret_access_key not in committed
    assert s3_settings.access_key_id not in committed
    assert s3_settings.secret_access_key in local
    assert "config.local" in (repo / ".dvc" / ".gitignore").read_text()


def test_configure_dvc_remote_outside_a_repo_names_the_failed_command(tmp_path, s3_settings):
    with pytest.raises(StorageError) as info:  # not a DVC repo: the first command fails
        configure_dvc_remote(tmp_path, s3_settings)
    assert "dvc remote add" in str(info.value)
    assert s3_settings.secret_access_key not in str(info.value)


def test_configure_dvc_remote_takes_keys_that_start_with_a_dash(tmp_path):
    """Generated secrets (e.g. token_urlsafe) start with "-" one time in 64: not an option."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    settings = S3Settings(
        bucket="vregion",
        endpoint_url="http://127.0.0.1:9",
        access_key_id="-key",
        secret_access_key="-sec-ret",
    )
    configure_dvc_remote(tmp_path, settings)
    local = (tmp_path / ".dvc" / "config.local").read_text()
    assert "access_key_id = -key" in local and "secret_access_key = -sec-ret" in local

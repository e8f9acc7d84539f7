"""Pytest fixtures for a real S3 store: SeaweedFS started through `infra`, no mocks.

Use them from a test module with `pytest_plugins = ["s3_fixtures"]` (pytest puts `tests/` on
sys.path because it has no `__init__.py`), or from `conftest.py` the same way.

- `s3_server`   session: a SeaweedFS on free loopback ports (never a user's 8333) in a temporary
                directory, random credentials, bucket `vregion-test`; stopped at session end,
                also after failures.
- `s3_settings` per test: `S3Settings` for that server with a fresh key prefix, so tests never
                see each other's objects.
- `s3_env`      per test: the same settings exported as `VREGION_S3_*` (AWS_* removed), for
                code under test that reads the environment or runs subprocesses (dvc, stages).
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]

from infra import seaweedfs  # noqa: E402
from infra.process import ServiceError  # noqa: E402
from vregion import storage  # noqa: E402
from vregion.storage import S3Settings  # noqa: E402

TEST_BUCKET = "vregion-test"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class RunningS3:
    """A SeaweedFS started for the test session."""

    server: seaweedfs.SeaweedFS
    """Its ports and state directory (log at `server.log_path`)."""
    settings: S3Settings
    """Endpoint, bucket `vregion-test` (created) and the session's credentials; no prefix."""


def free_port() -> int:
    """A loopback port with nothing listening on it (for 'unreachable endpoint' cases)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_test_s3(state_dir: Path) -> RunningS3:
    """Start SeaweedFS on free ports with random credentials; retry once if a port was raced."""
    key, secret = "test-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    error: ServiceError | None = None
    for _ in range(2):
        server = seaweedfs.SeaweedFS(state_dir=state_dir, ports=seaweedfs.WeedPorts.free())
        try:
            settings = seaweedfs.start(
                server,
                access_key_id=key,
                secret_access_key=secret,
                buckets=(TEST_BUCKET,),
                timeout=START_TIMEOUT,
                die_with_parent=True,  # a killed test run leaves no server behind
            )
            return RunningS3(server, settings)
        except ServiceError as err:
            error = err
            seaweedfs.stop(state_dir)
    raise ServiceError(f"SeaweedFS did not start for the tests: {error}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> RunningS3:
    state_dir = tmp_path_factory.mktemp("seaweedfs")
    running = start_test_s3(state_dir)
    try:
        yield running
    finally:
        seaweedfs.stop(state_dir)


@pytest.fixture
def s3_settings(s3_server: RunningS3) -> S3Settings:
    return s3_server.settings.replace(prefix=f"test-{secrets.token_hex(4)}")


@pytest.fixture
def s3_env(s3_settings: S3Settings, monkeypatch) -> S3Settings:
    names = [storage.ENDPOINT_URL, storage.BUCKET, storage.PREFIX, storage.REGION]
    names += [storage.ACCESS_KEY_ID, storage.SECRET_ACCESS_KEY, "AWS_ENDPOINT_URL"]
    names += [
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ]
    for name in names:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_settings.as_env().items():
        monkeypatch.setenv(name, value)
    return s3_settings

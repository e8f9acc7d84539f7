"""Where shared artifacts live: an S3-compatible store (AWS S3, MinIO, Ceph, SeaweedFS, R2).

One `S3Settings` is read from the environment and used three ways: DVC's remote
(`configure_dvc_remote`), Ray Train's checkpoint storage (`pyarrow_filesystem`), and a quick
preflight (`check_s3`) that turns a wrong endpoint, key or bucket into one clear message
instead of a retry storm deep inside DVC or Ray.

Environment (the `VREGION_S3_*` names win; the AWS names are the fallback, so a machine that
already talks to S3 needs nothing new):

    VREGION_S3_ENDPOINT_URL        http(s)://host:port; unset = AWS      (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL)
    VREGION_S3_BUCKET              bucket name (default "vregion")
    VREGION_S3_PREFIX              key prefix inside the bucket (default: none)
    VREGION_S3_REGION              region                                (AWS_REGION, AWS_DEFAULT_REGION)
    VREGION_S3_ACCESS_KEY_ID       access key                            (AWS_ACCESS_KEY_ID)
    VREGION_S3_SECRET_ACCESS_KEY   secret key                            (AWS_SECRET_ACCESS_KEY)

The key pair is taken as a pair from one family, never mixed. Without keys, boto3, DVC and
pyarrow fall back to their usual credential chain (profiles, instance roles).

The secret never appears in a repr, an error message, a log line or a file under git: DVC gets
it only in `.dvc/config.local`. This module imports no orchestrator; boto3 and pyarrow are
imported where they are used.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ENDPOINT_URL = "VREGION_S3_ENDPOINT_URL"
BUCKET = "VREGION_S3_BUCKET"
PREFIX = "VREGION_S3_PREFIX"
REGION = "VREGION_S3_REGION"
ACCESS_KEY_ID = "VREGION_S3_ACCESS_KEY_ID"
SECRET_ACCESS_KEY = "VREGION_S3_SECRET_ACCESS_KEY"

DEFAULT_BUCKET = "vregion"
START_HINT = "python -m infra s3 start"

# S3 bucket naming rules (lowercase letters, digits, dots, hyphens; 3-63 characters).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StorageError(RuntimeError):
    """The S3 store cannot be used as configured; the message says what to check."""


@dataclass(frozen=True, repr=False)
class S3Settings:
    """How to reach the shared S3-compatible store."""

    bucket: str = DEFAULT_BUCKET
    """Bucket that holds every vregion artifact."""
    endpoint_url: str | None = None
    """`http(s)://host:port` of a non-AWS store (SeaweedFS, MinIO, ...); None for AWS S3."""
    prefix: str = ""
    """Key prefix inside the bucket (no leading or trailing slash); "" for the bucket root."""
    region: str | None = None
    """Region; None lets the SDK decide (us-east-1 for a custom endpoint)."""
    access_key_id: str | None = None
    """Access key; None uses the SDK's credential chain."""
    secret_access_key: str | None = None
    """Secret key; never shown by repr or in messages."""

    def __post_init__(self) -> None:
        if not _BUCKET_RE.match(self.bucket) or ".." in self.bucket:
            raise StorageError(
                f"invalid S3 bucket name {self.bucket!r}: 3-63 characters of lowercase letters, "
                f"digits, '.' and '-' (set {BUCKET})"
            )
        if self.endpoint_url is not None:
            parts = urlsplit(self.endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise StorageError(
                    f"invalid S3 endpoint {self.endpoint_url!r}: expected http://host:port or "
                    f"https://host (set {ENDPOINT_URL})"
                )
            if parts.path.strip("/"):
                raise StorageError(
                    f"S3 endpoint {self.endpoint_url!r} has a path; put the bucket in {BUCKET} "
                    f"and the key prefix in {PREFIX}"
                )
            object.__setattr__(self, "endpoint_url", self.endpoint_url.rstrip("/"))
        object.__setattr__(self, "prefix", self.prefix.strip("/"))
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise StorageError(
                f"S3 credentials need both {ACCESS_KEY_ID} and {SECRET_ACCESS_KEY} (or both AWS "
                "names); only one of the pair is set"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        """Read the settings from `environ` (default: `os.environ`); see the module docstring."""
        env = os.environ if environ is None else environ

        def first(*names: str) -> str | None:
            for name in names:
                if env.get(name):
                    return env[name]
            return None

        if env.get(ACCESS_KEY_ID) or env.get(SECRET_ACCESS_KEY):
            key, secret = env.get(ACCESS_KEY_ID) or None, env.get(SECRET_ACCESS_KEY) or None
        else:
            key = env.get("AWS_ACCESS_KEY_ID") or None
            secret = env.get("AWS_SECRET_ACCESS_KEY") or None
        return cls(
            bucket=first(BUCKET) or DEFAULT_BUCKET,
            endpoint_url=first(ENDPOINT_URL, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            prefix=first(PREFIX) or "",
            region=first(REGION, "AWS_REGION", "AWS_DEFAULT_REGION"),
            access_key_id=key,
            secret_access_key=secret,
        )

    def replace(self, **changes) -> S3Settings:
        """A copy with some fields changed (e.g. another prefix)."""
        return dataclasses.replace(self, **changes)

    def key(self, *parts: str) -> str:
        """Object key under the prefix: key("dvc") -> "<prefix>/dvc"."""
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def path(self, *parts: str) -> str:
        """`bucket/prefix/parts` — the form pyarrow and Ray's `storage_path` take."""
        return "/".join(p for p in (self.bucket, self.key(*parts)) if p)

    def url(self, *parts: str) -> str:
        """`s3://bucket/prefix/parts` — the form DVC and s3fs take."""
        return "s3://" + self.path(*parts)

    @property
    def where(self) -> str:
        """The endpoint, for messages: the URL, or "AWS S3"."""
        return self.endpoint_url or "AWS S3"

    def as_env(self) -> dict[str, str]:
        """The `VREGION_S3_*` variables that reproduce these settings in a child process.

        Holds the secret: pass it as a subprocess environment, never print or log it.
        """
        values = {
            ENDPOINT_URL: self.endpoint_url,
            BUCKET: self.bucket,
            PREFIX: self.prefix,
            REGION: self.region,
            ACCESS_KEY_ID: self.access_key_id,
            SECRET_ACCESS_KEY: self.secret_access_key,
        }
        return {k: v for k, v in values.items() if v}

    def __repr__(self) -> str:
        secret = "'***'" if self.secret_access_key else "None"
        return (
            f"S3Settings(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r}, "
            f"prefix={self.prefix!r}, region={self.region!r}, "
            f"access_key_id={_masked(self.access_key_id)!r}, secret_access_key={secret})"
        )

    __str__ = __repr__


def s3_configured(environ: Mapping[str, str] | None = None) -> bool:
    """True when the user pointed vregion at a store (`VREGION_S3_ENDPOINT_URL` or `_BUCKET` set)."""
    env = os.environ if environ is None else environ
    return bool(env.get(ENDPOINT_URL) or env.get(BUCKET))


def s3_client(settings: S3Settings, *, timeout: float = 5.0, attempts: int = 2):
    """A boto3 S3 client with bounded timeouts and few retries, so a dead endpoint fails fast."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=min(timeout, 3.0),
        read_timeout=timeout,
        retries={"max_attempts": attempts, "mode": "standard"},
        s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region or ("us-east-1" if settings.endpoint_url else None),
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        config=config,
    )


def check_s3(settings: S3Settings, *, timeout: float = 5.0) -> None:
    """One real, time-bounded request (list one key under the prefix); StorageError if it fails.

    The message names the endpoint and what to check: an unreachable server, wrong
    credentials, a missing bucket, or missing permissions.
    """
    client = s3_client(settings, timeout=timeout)
    try:
        client.list_objects_v2(Bucket=settings.bucket, Prefix=settings.key(), MaxKeys=1)
    except Exception as err:  # translated into one clear message below
        raise _explain(err, settings) from None


def ensure_bucket(settings: S3Settings, *, timeout: float = 5.0) -> bool:
    """Create the bucket if it does not exist; True if it was created."""
    from botocore.exceptions import ClientError

    client = s3_client(settings, timeout=timeout)
    try:
        client.head_bucket(Bucket=settings.bucket)
        return False
    except ClientError as err:
        if _code(err) not in ("404", "NoSuchBucket", "NotFound"):
            raise _explain(err, settings) from None
    except Exception as err:
        raise _explain(err, settings) from None
    try:
        kwargs = {}
        if settings.region and settings.region != "us-east-1" and not settings.endpoint_url:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": settings.region}
        client.create_bucket(Bucket=settings.bucket, **kwargs)
    except ClientError as err:
        if _code(err) == "BucketAlreadyOwnedByYou":
            return False
        if _code(err) == "BucketAlreadyExists":
            raise StorageError(
                f"S3 bucket name {settings.bucket!r} is taken by another account at "
                f"{settings.where}: choose another {BUCKET}"
            ) from None
        raise _explain(err, settings) from None
    except Exception as err:
        raise _explain(err, settings) from None
    return True


def pyarrow_filesystem(settings: S3Settings, *, connect_timeout: float = 10.0):
    """A `pyarrow.fs.S3FileSystem` for Ray Train: `RunConfig(storage_path=settings.path("ray"),
    storage_filesystem=pyarrow_filesystem(settings))`."""
    from pyarrow import fs

    kwargs: dict = {
        "access_key": settings.access_key_id,
        "secret_key": settings.secret_access_key,
        "region": settings.region or ("us-east-1" if settings.endpoint_url else None),
        "connect_timeout": connect_timeout,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if settings.endpoint_url:
        parts = urlsplit(settings.endpoint_url)
        kwargs["scheme"] = parts.scheme
        kwargs["endpoint_override"] = parts.netloc
    return fs.S3FileSystem(**kwargs)


def configure_dvc_remote(
    repo_dir: str | Path,
    settings: S3Settings,
    name: str = "storage",
    *,
    subpath: str = "dvc",
    default: bool = True,
) -> str:
    """Point the DVC repo at `s3://bucket/prefix/<subpath>`; return that URL.

    URL, endpoint and region go into `.dvc/config` (committed); the key pair goes only into
    `.dvc/config.local` (git-ignored by DVC). Runs the real `dvc remote` commands.
    """
    url = settings.url(subpath)
    steps: list[list[str]] = [["remote", "add", "--force", *(["-d"] if default else []), name, url]]
    # `--` ends the options: a generated secret may well start with "-"
    if settings.endpoint_url:
        steps.append(["remote", "modify", "--", name, "endpointurl", settings.endpoint_url])
    if settings.region:
        steps.append(["remote", "modify", "--", name, "region", settings.region])
    if settings.access_key_id and settings.secret_access_key:
        for option, value in (
            ("access_key_id", settings.access_key_id),
            ("secret_access_key", settings.secret_access_key),
        ):
            steps.append(["remote", "modify", "--local", "--", name, option, value])
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for args in steps:
        result = subprocess.run(
            [sys.executable, "-m", "dvc", *args],
            cwd=repo_dir,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            shown = " ".join(_redact(a, settings) for a in args)
            detail = _redact((result.stderr or result.stdout).strip(), settings)
            raise StorageError(f"`dvc {shown}` failed in {repo_dir}: {detail}")
    return url


def _code(err: Exception) -> str:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _masked(key: str | None) -> str | None:
    """Like the AWS CLI: only the last 4 characters of an access key id."""
    if not key:
        return key
    return "*" * max(len(key) - 4, 0) + key[-4:]


def _redact(text: str, settings: S3Settings) -> str:
    if settings.secret_access_key:
        text = text.replace(settings.secret_access_key, "***")
    return text


def _explain(err: Exception, settings: S3Settings) -> StorageError:
    """Turn a boto3/botocore exception into a StorageError that says what to check."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    where = settings.where
    bucket = settings.bucket
    if isinstance(err, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
        return StorageError(
            f"cannot reach the S3 endpoint {where}: is the server running? `{START_HINT}` "
            f"starts the local one; otherwise check {ENDPOINT_URL}. ({type(err).__name__})"
        )
    if isinstance(err, ReadTimeoutError):
        return StorageError(
            f"the S3 endpoint {where} accepted the connection but did not answer in time: is it "
            f"an S3 server, and is it healthy? (check {ENDPOINT_URL})"
        )
    if isinstance(err, NoCredentialsError):
        return StorageError(
            f"no S3 credentials for {where}: set {ACCESS_KEY_ID} and {SECRET_ACCESS_KEY} "
            "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    if isinstance(err, ClientError):
        code = _code(err)
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        key = _masked(settings.access_key_id) or "from the default credential chain"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return StorageError(
                f"S3 at {where} refused the credentials ({code}, access key {key}): check "
                f"{ACCESS_KEY_ID} and {SECRET_ACCESS_KEY} against the server's identities"
            )
        if code == "NoSuchBucket":
            return StorageError(
                f"S3 bucket {bucket!r} does not exist at {where}: create it "
                f"(`{START_HINT} --bucket {bucket}` for the local server) or set {BUCKET}"
            )
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
            return StorageError(
                f"S3 at {where} denied access to bucket {bucket!r} ({code or status}, access key "
                f"{key}): wrong credentials, or the key lacks list/read/write permission on it"
            )
        if code.isdigit():  # an HTTP status without an S3 error document
            return StorageError(
                f"{where} answered HTTP {code} without an S3 error: is it an S3 endpoint? "
                f"(check {ENDPOINT_URL})"
            )
        return StorageError(f"S3 request to {where} (bucket {bucket!r}) failed: {code} {err}")
    return StorageError(
        f"S3 request to {where} (bucket {bucket!r}) failed: {type(err).__name__}: "
        f"{_redact(str(err), settings)}"
    )

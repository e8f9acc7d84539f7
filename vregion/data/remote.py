"""Records and images in an S3 store: `s3://bucket/prefix` wherever a local path is accepted.

`data.sources.<name>.records` and `image_root` may be `s3://` URLs. They are read through the
project's S3 settings (`vregion.storage.S3Settings.from_env`: endpoint and key pair; the bucket
comes from the URL), with boto3 and botocore's bounded "standard" retries (throttling, 5xx,
dropped connections: `ATTEMPTS` tries in all, each with a connect/read timeout). Anything else
is one `RemoteDataError` that names the bucket, the key and the endpoint.

Nothing is downloaded ahead: an image header is a ranged GET of its first bytes (the whole
object only when Pillow needs more), pixels are fetched when a batch needs them. A boto3 client
is made per process (DataLoader workers fork; clients are not fork-safe) and shared by threads.
"""

from __future__ import annotations

import io
import os
import posixpath
import threading
from dataclasses import dataclass

from vregion.storage import S3Settings, StorageError

SCHEME = "s3://"
HEADER_BYTES = 64 * 1024
"""First bytes fetched to read an image header (JPEG EXIF blocks stay under 64 KiB)."""
ATTEMPTS = 4
"""Tries per request (1 + 3 retries of transient errors), botocore standard retry mode."""
TIMEOUT = 10.0


class RemoteDataError(StorageError):
    """An object in S3 cannot be read; the message names the bucket, key and endpoint."""


class MissingObjectError(RemoteDataError, FileNotFoundError):
    """The key does not exist in the bucket."""


def is_s3(path: object) -> bool:
    return isinstance(path, str | S3Object) and str(path).startswith(SCHEME)


@dataclass(frozen=True, order=True)
class S3Object:
    """One object (or a prefix, for an image root) in a bucket."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> S3Object:
        if not url.startswith(SCHEME):
            raise ValueError(f"{url!r} is not an s3:// URL")
        bucket, _, key = url[len(SCHEME) :].partition("/")
        if not bucket:
            raise ValueError(f"{url!r} names no bucket: expected s3://bucket/key")
        return cls(bucket, key.strip("/"))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    def child(self, rel: str) -> S3Object:
        """The object `rel` under this prefix; OutsideRootError when `rel` leads out of it."""
        from vregion.data.images import OutsideRootError

        if rel.startswith("/") or rel.startswith("\\"):
            raise OutsideRootError(
                f"image path {rel!r} is absolute, so outside the image root {self}: "
                "write it relative to the image root"
            )
        key = (
            posixpath.normpath(posixpath.join(self.key, rel))
            if self.key
            else posixpath.normpath(rel)
        )
        inside = key.startswith(self.key + "/") if self.key else not key.startswith("..")
        if not inside or key in (".", "..") or key.startswith("../"):
            raise OutsideRootError(
                f"image path {rel!r} leads to s3://{self.bucket}/{key}, outside the image "
                f"root {self}"
            )
        return S3Object(self.bucket, key)


_lock = threading.Lock()
_clients: dict[tuple[int, str], object] = {}


def client(bucket: str):
    """This process's boto3 client for `bucket` (settings from the environment)."""
    from vregion.storage import s3_client

    key = (os.getpid(), bucket)
    with _lock:
        if key not in _clients:
            settings = S3Settings.from_env().replace(bucket=bucket, prefix="")
            _clients[key] = (s3_client(settings, timeout=TIMEOUT, attempts=ATTEMPTS), settings)
        return _clients[key]


def read_bytes(obj: S3Object, *, first: int | None = None) -> bytes:
    """The object's bytes (only the first `first` bytes when given)."""
    s3, settings = client(obj.bucket)
    kwargs = {"Range": f"bytes=0-{first - 1}"} if first else {}
    try:
        return s3.get_object(Bucket=obj.bucket, Key=obj.key, **kwargs)["Body"].read()
    except Exception as err:
        raise explain(err, obj, settings) from None


def exists_prefix(root: S3Object) -> bool:
    """True when at least one key lies under `root/`."""
    s3, settings = client(root.bucket)
    try:
        found = s3.list_objects_v2(
            Bucket=root.bucket, Prefix=root.key + "/" if root.key else "", MaxKeys=1
        )
    except Exception as err:
        raise explain(err, root, settings) from None
    return found.get("KeyCount", 0) > 0


def open_image(obj: S3Object, *, header_only: bool = False):
    """A Pillow image over the object's bytes (`header_only`: over its first bytes if enough)."""
    from PIL import Image

    if header_only:
        head = read_bytes(obj, first=HEADER_BYTES)
        try:
            return Image.open(io.BytesIO(head))
        except Exception:
            if len(head) < HEADER_BYTES:
                raise  # the whole object, and not an image
    return Image.open(io.BytesIO(read_bytes(obj)))


def explain(err: Exception, obj: S3Object, settings: S3Settings) -> RemoteDataError:
    """One clear error naming the bucket, the key and the endpoint."""
    from vregion.storage import _code, _explain

    code = _code(err)
    where = settings.where
    if code in ("NoSuchKey", "404", "NotFound"):
        return MissingObjectError(
            f"s3://{obj.bucket}/{obj.key} does not exist (bucket {obj.bucket!r}, key "
            f"{obj.key!r}) at {where}"
        )
    base = _explain(err, settings)
    return RemoteDataError(
        f"cannot read s3://{obj.bucket}/{obj.key} (bucket {obj.bucket!r}, key {obj.key!r}): {base}"
    )

"""Images named by data records: confined to their root, opened as 8-bit RGB.

Every image path built from a record goes through `resolve_image`, so a record cannot make the
pipeline read a file outside the data set's image root (`../`, absolute paths, symlinks that
lead out). `open_rgb` is the one way pixels are read: high-bit-depth images are scaled to
0..255 rather than clipped, and transparent pixels are composited on white.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from vregion.data import remote
from vregion.data.remote import S3Object, is_s3

WHITE = (255, 255, 255, 255)
"""Background for transparent pixels: plain `.convert("RGB")` would expose whatever colour the
transparent pixels happen to hold (often black), which changes what the model sees."""

SUPPORTED_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
    | {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
)
"""Pillow modes `open_rgb` turns into RGB; a header with another mode is not a usable image."""

_ALPHA_MODES = frozenset({"LA", "PA", "RGBA", "RGBa"})


class OutsideRootError(ValueError):
    """An image path from a record that leads outside the image root."""


def resolve_image(root: str | Path, rel: str) -> Path | S3Object:
    """The real path of image `rel` under `root`, symlinks followed.

    Raises OutsideRootError for an absolute `rel`, or one that (through `..` or symlinks)
    leads outside `realpath(root)`. Only path metadata is read, never the file itself.
    An `s3://bucket/prefix` root gives the `S3Object` of key `prefix/rel` (normalized; a key
    outside the prefix is outside the image root); nothing is requested from the store.
    """
    if "\x00" in rel:
        raise ValueError(f"image path {rel!r} contains a NUL byte")
    if is_s3(root):
        return (root if isinstance(root, S3Object) else S3Object.parse(str(root))).child(rel)
    if os.path.isabs(rel) or rel.startswith("\\"):
        raise OutsideRootError(
            f"image path {rel!r} is absolute, so outside the image root {root}: "
            f"write it relative to the image root"
        )
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, rel))
    if os.path.commonpath([real_root, target]) != real_root:
        raise OutsideRootError(
            f"image path {rel!r} leads to {target}, outside the image root {real_root}"
        )
    return Path(target)


def image_header(path: str | Path | S3Object) -> tuple[int, int, str]:
    """(width, height, Pillow mode) from the file's header, without decoding pixels.

    Catches missing, non-image and truncated-header files (Pillow raises); truncated pixel
    data only shows when decoding (`open_rgb`). An S3 object: a ranged GET of its first bytes.
    """
    with open_image(path, header_only=True) as image:
        return image.width, image.height, image.mode


def open_rgb(path: str | Path) -> Image.Image:
    """The image at `path` decoded into memory as 8-bit RGB (the file is closed on return).

    16-bit and 32-bit images are scaled to 0..255 (see `to_rgb`); transparency is composited
    on white. EXIF orientation is not applied, as in LLaVA's own loaders, so sizes match
    `image_header`.
    """
    with open_image(path) as image:
        image.load()
        return to_rgb(image)  # always a new image: convert() copies even RGB


def open_image(path: str | Path | S3Object, *, header_only: bool = False) -> Image.Image:
    """A lazily decoded Pillow image of a local file or an S3 object (use it as a context)."""
    if is_s3(path):
        obj = path if isinstance(path, S3Object) else S3Object.parse(str(path))
        return remote.open_image(obj, header_only=header_only)
    return Image.open(path)


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB image from `image` of any supported mode.

    Pillow's `.convert("RGB")` clips high-bit values (a full-range 16-bit gradient becomes
    almost all white), so `I;16*`, `I` and `F` images are scaled to 8 bits first.
    """
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_scaled_to_8bit(image), mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, WHITE)
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    return image.convert("RGB")


def _scaled_to_8bit(image: Image.Image) -> np.ndarray:
    """Gray levels 0..255 of a single-channel high-bit image.

    `I;16*`: value >> 8 (equal-width bins over the full 16-bit range). `I` (32-bit int, what
    older Pillow and some TIFF/PGM readers give for 16-bit data): assumed 16-bit, unless values
    exceed 65535, then scaled by the maximum. `F`: full scale is the smallest of 1.0, 255,
    65535 and the maximum that holds the data. Negative and non-finite values become 0.
    """
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        return (values.astype(np.uint16) >> 8).astype(np.uint8)
    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    values = np.clip(values, 0.0, None)
    peak = float(values.max(initial=0.0))
    ladder = (65535.0,) if image.mode == "I" else (1.0, 255.0, 65535.0)
    full = next((s for s in ladder if peak <= s), peak)
    # 256 equal-width bins over 0..full, as >> 8 gives for 16 bits (full itself lands in 255)
    return np.clip(np.floor(values * (256.0 / full)), 0, 255).astype(np.uint8)

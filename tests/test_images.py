"""Record image paths stay inside their root; pixels come out as 8-bit RGB, scaled, not clipped."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vregion.data.images import (
    OutsideRootError,
    image_header,
    open_rgb,
    resolve_image,
    to_rgb,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (6, 4)).save(root / "sub" / "a.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "outside.png")
    return root


def test_paths_inside_the_root_resolve(root, tmp_path):
    target = (root / "sub" / "a.png").resolve()
    assert resolve_image(root, "sub/a.png") == target
    assert resolve_image(root, "sub/../sub/./a.png") == target
    (root / "alias.png").symlink_to(root / "sub" / "a.png")  # a symlink within the root is fine
    assert resolve_image(root, "alias.png") == target
    (tmp_path / "root-link").symlink_to(root, target_is_directory=True)  # so is a linked root
    assert resolve_image(tmp_path / "root-link", "sub/a.png") == target
    assert resolve_image(root, "missing.png") == root.resolve() / "missing.png"  # no I/O check


@pytest.mark.parametrize("rel", ["../outside.png", "sub/../../outside.png", "ABS", "link.png"])
def test_paths_leading_outside_the_root_raise(root, tmp_path, rel):
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    rel = str(tmp_path / "outside.png") if rel == "ABS" else rel
    with pytest.raises(OutsideRootError, match="outside the image root"):
        resolve_image(root, rel)
    assert issubclass(OutsideRootError, ValueError)


def test_a_sibling_with_the_roots_name_as_prefix_is_outside(tmp_path, root):
    (tmp_path / "root2").mkdir()
    with pytest.raises(OutsideRootError):
        resolve_image(root, "../root2/x.png")


def _gradient16() -> np.ndarray:
    return np.arange(65536, dtype=np.uint16).reshape(256, 256)


def test_full_range_16bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(_gradient16()).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
        clipped = np.asarray(raw.convert("RGB"))
    assert (clipped == 255).mean() > 0.99  # the bug this guards against
    pixels = np.asarray(open_rgb(path))
    assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8
    assert pixels.min() == 0 and pixels.max() == 255
    assert (pixels == 255).mean() < 0.05
    np.testing.assert_array_equal(pixels[..., 0], (_gradient16() >> 8).astype(np.uint8))


@pytest.mark.parametrize(
    "image",
    [
        Image.frombytes("I;16B", (256, 256), _gradient16().astype(">u2").tobytes()),
        Image.fromarray(_gradient16().astype(np.int32)),  # mode I
        Image.fromarray((_gradient16() / 65535).astype(np.float32)),  # mode F in 0..1
        Image.fromarray(_gradient16().astype(np.float32)),  # mode F in 0..65535
    ],
    ids=["I;16B", "I", "F-unit", "F-16bit"],
)
def test_other_high_bit_modes_span_the_8bit_range(image):
    pixels = np.asarray(to_rgb(image))
    assert pixels.dtype == np.uint8 and pixels.min() == 0 and pixels.max() == 255
    assert (pixels == 255).mean() < 0.05
    assert abs(int(pixels[128, 0, 0]) - 128) <= 1  # the middle stays in the middle


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (255, 0, 0, 128))
    rgba.save(tmp_path / "a.png")
    out = open_rgb(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (255, 0, 0)
    assert out.getpixel((2, 0))[0] == 255 and 120 <= out.getpixel((2, 0))[1] <= 135
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    assert list(open_rgb(tmp_path / "p.png").getdata()) == [(255, 255, 255), (0, 0, 255)]


def _open_fds_to(path: Path) -> list[str]:
    fds = Path("/proc/self/fd")
    return [f for f in os.listdir(fds) if os.path.realpath(fds / f) == str(path.resolve())]


def test_open_rgb_returns_a_loaded_image_and_closes_the_file(tmp_path):
    path = tmp_path / "c.jpg"
    Image.new("CMYK", (5, 3), (0, 255, 0, 0)).save(path)
    image = open_rgb(path)
    assert _open_fds_to(path) == []
    path.unlink()
    assert image.mode == "RGB" and image.size == (5, 3)
    assert image.getpixel((0, 0))[1] < 40  # magenta ink: little green


def test_image_header_reads_only_the_header(tmp_path):
    big = tmp_path / "big.png"
    Image.effect_noise((64, 48), 50).convert("RGB").save(big)
    cut = tmp_path / "cut.png"
    cut.write_bytes(big.read_bytes()[:200])  # header whole, pixels cut
    assert image_header(cut) == (64, 48, "RGB")
    assert _open_fds_to(cut) == []
    with pytest.raises(OSError):
        open_rgb(cut)
    (tmp_path / "not.png").write_bytes(b"hello")
    with pytest.raises(OSError):
        image_header(tmp_path / "not.png")

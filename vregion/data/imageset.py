"""Records with their images: the set every scorer, probe and eval loop walks in batches.

Images are held by reference (image root, path) and opened when a batch needs them, so a
held-out set of thousands of records costs only their paths until it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vregion.data.records import Sample


class LazyImages(Sequence):
    """Images by reference, opened when a batch needs them (eval sets hold paths, not pixels)."""

    def __init__(self, refs: Sequence[tuple[str, str] | None]):
        self.refs = list(refs)  # (image root, path under it) or None for text-only records

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LazyImages(self.refs[i])
        ref = self.refs[i]
        if ref is None:
            return None
        from vregion.data.images import open_rgb, resolve_image

        return open_rgb(resolve_image(ref[0], ref[1]))  # a local root or an s3:// one


def take(images: Sequence, indices: Sequence[int | None]) -> Sequence:
    """`images` reordered by `indices` (None gives no image), still lazy if they were."""
    if isinstance(images, LazyImages):
        return LazyImages([None if i is None else images.refs[i] for i in indices])
    return [None if i is None else images[i] for i in indices]


@dataclass
class ImageSet:
    """Records plus their images; images open per batch, so an eval set holds only paths."""

    samples: list[Sample]
    images: Sequence  # PIL images or None, or LazyImages, aligned with samples

    @classmethod
    def load(cls, samples: list[Sample], image_root: str | Path) -> ImageSet:
        """The records with their images under `image_root` (opened when used)."""
        root = str(image_root)
        return cls(samples, LazyImages([(root, s.image) if s.image else None for s in samples]))

    @classmethod
    def from_parts(cls, parts) -> ImageSet:
        """Every row of some `vregion.data.dataset.Part`s, each with its own image root."""
        from vregion.data.dataset import RecordFile

        samples, refs = [], []
        for part in parts:
            records = RecordFile(part.records)
            for row in part.rows:
                s = records[int(row)]
                samples.append(s)
                refs.append((part.image_root, s.image) if s.image else None)
        return cls(samples, LazyImages(refs))

    def batch(self, idx: Sequence[int]) -> tuple[list[Sample], list]:
        return [self.samples[i] for i in idx], [self.images[i] for i in idx]

    def __len__(self) -> int:
        return len(self.samples)

"""Streaming records for every stage: nothing holds a data set's images or all its records.

- A validated records file (JSONL, from `prepare` or `ingest`) has an index beside it,
  `<file>.index.npz`: each record's byte offset, token length (image tokens included) and
  whether it has an image. Records are read one at a time by offset.
- `resolve_mix` turns a stage's `data` list (sources with weights and caps) into `Part`s.
- `RecordDataset` is a torch `Dataset`: `__getitem__` reads one record, opens its image (only
  under its image root) and encodes it with one processor call, in DataLoader worker processes.
- `batch_plan` orders one epoch into batches: seeded, grouped by modality and length (less
  padding), cut into global steps of `world` batches, so rank r takes every world-th batch.
  `ShardedBatchSampler` walks those epochs from any batch: an exact resume is an index.
"""

from __future__ import annotations

import json
import math
import random
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import count
from pathlib import Path

import numpy as np
import torch

from vregion.data.records import Sample

SYNTHETIC = {  # source name -> (records file under data/, image root under data/)
    "synthetic/train/vqa": ("train/vqa.jsonl", "."),
    "synthetic/train/captions": ("train/captions.jsonl", "."),
    "synthetic/eval/vqa": ("eval/vqa.jsonl", "."),
    "synthetic/eval/captions": ("eval/captions.jsonl", "."),
}
INDEX_SUFFIX = ".index.npz"


def index_path(records: str | Path) -> Path:
    return Path(str(records) + INDEX_SUFFIX)


def write_index(records: str | Path, lengths: Sequence[int], has_image: Sequence[bool]) -> Path:
    """Write the byte offsets of `records` (one JSON object per line) with lengths and modality."""
    offsets = []
    with Path(records).open("rb") as f:
        pos = 0
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    if not (len(offsets) == len(lengths) == len(has_image)):
        raise ValueError(
            f"{records}: {len(offsets)} records but {len(lengths)} lengths / "
            f"{len(has_image)} image flags"
        )
    out = index_path(records)
    np.savez(
        out,
        offsets=np.asarray(offsets, dtype=np.int64),
        lengths=np.asarray(lengths, dtype=np.int32),
        has_image=np.asarray(has_image, dtype=bool),
    )
    return out


class RecordFile:
    """Random access to a validated records file through its index (no record held)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        idx = index_path(self.path)
        if not idx.is_file():
            raise FileNotFoundError(f"{idx} is missing: rerun the stage that wrote {self.path}")
        with np.load(idx) as z:
            self.offsets, self.lengths, self.has_image = z["offsets"], z["lengths"], z["has_image"]
        self._handle = None  # opened per process (DataLoader workers fork after construction)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Sample:
        if self._handle is None:
            self._handle = self.path.open("rb")
        self._handle.seek(int(self.offsets[i]))
        return Sample.from_dict(json.loads(self._handle.readline()))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}


@dataclass
class Part:
    """Rows of one records file taken into a stage's data, with where their images are."""

    source: str
    records: str
    image_root: str
    rows: np.ndarray


def source_files(source: str, data_dir: str | Path = "data") -> tuple[Path, Path | str]:
    """(validated records file, image root) of a source name, as `prepare`/`ingest` wrote them.

    The image root is an `s3://` URL (a str) for images in S3: the records are local, the
    images are read from the store when a batch needs them."""
    data_dir = Path(data_dir)
    if source in SYNTHETIC:
        rel, root = SYNTHETIC[source]
        return data_dir / rel, data_dir / root
    folder = data_dir / "sources" / source
    meta = folder / "source.json"
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta} is missing: run `dvc repro ingest@{source}` (is `{source}` under "
            f"data.sources in params.yaml?)"
        )
    root = json.loads(meta.read_text()).get("image_root")
    if root and root.startswith("s3://"):
        return folder / "records.jsonl", root
    return folder / "records.jsonl", Path(root) if root else folder


def resolve_mix(mix: Sequence, seed: int, data_dir: str | Path = "data") -> list[Part]:
    """A stage's `data` list (DataMix entries) as parts: weight = share taken (seeded, >1 repeats
    every record), then `max_samples` caps it."""
    parts = []
    for k, entry in enumerate(mix):
        records, root = source_files(entry.source, data_dir)
        n = len(RecordFile(records))
        rng = np.random.default_rng([seed, k])
        whole, frac = divmod(entry.weight, 1.0)
        rows = [np.arange(n)] * int(whole)
        if frac:
            rows.append(np.sort(rng.permutation(n)[: round(frac * n)]))
        taken = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        if entry.max_samples is not None and len(taken) > entry.max_samples:
            taken = np.sort(rng.permutation(taken)[: entry.max_samples])
        parts.append(Part(entry.source, str(records), str(root), taken.astype(np.int64)))
    return parts


class RecordDataset(torch.utils.data.Dataset):
    """The records of some parts, each item encoded for the model (tokens + image tensors)."""

    def __init__(self, parts: Sequence[Part], processor=None, system_prompt: str | None = None):
        self.parts = list(parts)
        self.files = [RecordFile(p.records) for p in self.parts]
        self.processor, self.system_prompt = processor, system_prompt
        self._starts = np.cumsum([0] + [len(p.rows) for p in self.parts])
        self.lengths = (
            np.concatenate([f.lengths[p.rows] for f, p in zip(self.files, self.parts, strict=True)])
            if self.parts
            else np.zeros(0, dtype=np.int32)
        )
        self.has_image = (
            np.concatenate(
                [f.has_image[p.rows] for f, p in zip(self.files, self.parts, strict=True)]
            )
            if self.parts
            else np.zeros(0, dtype=bool)
        )

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(part, row in its file) of item `i`."""
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return part, int(self.parts[part].rows[i - self._starts[part]])

    def sample(self, i: int) -> Sample:
        part, row = self.locate(i)
        return self.files[part][row]

    def image_ref(self, i: int) -> tuple[str, str] | None:
        """(image root, relative path) of item `i`, or None for a text-only record."""
        part, row = self.locate(i)
        s = self.files[part][row]
        return None if s.image is None else (self.parts[part].image_root, s.image)

    def __getitem__(self, i: int) -> dict:
        from vregion.data.encode import encode_sample, load_image

        part, row = self.locate(i)
        s = self.files[part][row]
        image = load_image(self.parts[part].image_root, s)
        return encode_sample(self.processor, s, image, self.system_prompt, return_tensors=True)


def batch_plan(
    lengths: np.ndarray,
    has_image: np.ndarray,
    batch_size: int,
    *,
    world: int = 1,
    seed: int = 0,
    epoch: int = 0,
    group_by_length: bool = False,
    megabatch: int = 32,
) -> list[np.ndarray]:
    """One epoch's batches in order; batch j belongs to rank j % world. Whole global steps only.

    With length grouping, each modality (image / text-only records) is shuffled, cut into
    megabatches of `megabatch` global steps, and sorted by length inside each: batches hold
    similar lengths, and the order of batches is shuffled again, so no length trend runs
    through the epoch. Without it, a plain seeded shuffle.
    """
    rng = np.random.default_rng([seed, epoch])
    per_step = batch_size * world
    if not group_by_length:
        order = rng.permutation(len(lengths))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        batches = []
        for modality in (True, False):
            idx = np.flatnonzero(has_image == modality)
            idx = idx[rng.permutation(len(idx))]
            size = per_step * megabatch
            for start in range(0, len(idx), size):
                mega = idx[start : start + size]
                mega = mega[np.argsort(-lengths[mega], kind="stable")]
                batches += [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
        # Shuffle whole global steps, so the ranks of one step see records of similar length.
        steps = [batches[i : i + world] for i in range(0, len(batches), world)]
        batches = [b for j in rng.permutation(len(steps)) for b in steps[j]]
    batches = [b for b in batches if len(b) == batch_size] or batches[:world]
    usable = len(batches) // world * world
    return batches[:usable]


def steps_per_epoch(n: int, batch_size: int, world: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over `n` records."""
    return max(1, n // (batch_size * world * grad_accum))


def total_steps(
    steps: int | None, epochs: float | None, n: int, batch_size: int, world: int, grad_accum: int
) -> int:
    """`steps`, or `epochs` passes over `n` records in optimizer steps."""
    if steps is not None:
        return steps
    return max(1, math.ceil(epochs * steps_per_epoch(n, batch_size, world, grad_accum)))


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Endless epochs of `batch_plan`, this rank's batches only, starting at batch `start`."""

    def __init__(
        self,
        lengths: np.ndarray,
        has_image: np.ndarray,
        batch_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        group_by_length: bool = False,
        start: int = 0,
    ):
        self.lengths, self.has_image = np.asarray(lengths), np.asarray(has_image)
        if len(self.lengths) < batch_size * world:
            raise ValueError(
                f"{len(self.lengths)} records cannot fill one step of {batch_size} x {world} "
                f"worker(s): lower the batch size or add data"
            )
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.group_by_length, self.start = group_by_length, start

    def plan(self, epoch: int) -> list[np.ndarray]:
        return batch_plan(
            self.lengths,
            self.has_image,
            self.batch_size,
            world=self.world,
            seed=self.seed,
            epoch=epoch,
            group_by_length=self.group_by_length,
        )

    def __iter__(self) -> Iterator[list[int]]:
        skip = self.start
        for epoch in count():
            mine = self.plan(epoch)[self.rank :: self.world]
            if skip >= len(mine):  # a whole epoch already done: no batch is read for it
                skip -= len(mine)
                continue
            for batch in mine[skip:]:
                yield batch.tolist()
            skip = 0


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the loader's processes must not compete with the model's threads
    # A forked worker inherits the parent's thread-exit callbacks (an orchestrator's log
    # shipper registers one); run in the worker they fail against threads it does not have,
    # and the worker exits 1 when the loader shuts it down ("worker exited unexpectedly").
    threading._threading_atexits.clear()


def loader_workers(workers: int | str, device: torch.device) -> int:
    """`auto`: 4 per GPU, 1 on CPU (decoding is cheap next to a CPU model's step)."""
    if workers != "auto":
        return int(workers)
    return 4 if device.type == "cuda" else 1


def training_loader(
    dataset: RecordDataset,
    batch_size: int,
    *,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    start_batch: int = 0,
    workers: int | str = "auto",
    prefetch_factor: int = 2,
    group_by_length: bool = False,
) -> torch.utils.data.DataLoader:
    """An endless DataLoader of this rank's padded batches, resuming at `start_batch`."""
    from vregion.data.encode import pad_batch, pad_id_of

    sampler = ShardedBatchSampler(
        dataset.lengths,
        dataset.has_image,
        batch_size,
        rank=rank,
        world=world,
        seed=seed,
        group_by_length=group_by_length,
        start=start_batch,
    )
    n = loader_workers(workers, device)
    pad_id = pad_id_of(dataset.processor)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=n,
        collate_fn=partial(pad_batch, pad_id=pad_id),
        pin_memory=device.type == "cuda",
        prefetch_factor=prefetch_factor if n else None,
        worker_init_fn=_worker_init if n else None,
    )


def padding_share(batches: Sequence[np.ndarray], lengths: np.ndarray) -> float:
    """Share of the padded batch area that is padding."""
    total = sum(len(b) * int(lengths[b].max()) for b in batches)
    real = sum(int(lengths[b].sum()) for b in batches)
    return 1 - real / max(total, 1)


def sample_parts(parts: Sequence[Part], n: int | None, seed: int) -> list[Part]:
    """At most `n` rows over all parts, a seeded sample (rows keep their file order)."""
    total = sum(len(p.rows) for p in parts)
    if n is None or n >= total:
        return list(parts)
    chosen = np.sort(np.random.default_rng(seed).permutation(total)[:n])
    starts = np.cumsum([0] + [len(p.rows) for p in parts])
    out = []
    for k, p in enumerate(parts):
        mine = chosen[(chosen >= starts[k]) & (chosen < starts[k + 1])] - starts[k]
        out.append(Part(p.source, p.records, p.image_root, p.rows[mine]))
    return out


def stratified(samples: Sequence[Sample], n: int | None, seed: int) -> list[Sample]:
    """Up to `n` questions with every kind equally represented (as far as each kind allows)."""
    if n is None or n >= len(samples):
        return list(samples)
    by_kind: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_kind[s.kind or ""].append(s)
    rng = random.Random(seed)
    for group in by_kind.values():
        rng.shuffle(group)
    picked: list[Sample] = []
    while len(picked) < n:
        for group in by_kind.values():
            if group and len(picked) < n:
                picked.append(group.pop())
    return sorted(picked, key=lambda s: s.id)


def balanced_parts(parts: Sequence[Part], n: int | None, seed: int) -> list[Part]:
    """At most `n` rows, every question kind equally represented when the records have kinds
    (the synthetic questions), else a seeded sample. Reads the records' text, never images."""
    tagged = []  # (sample, part, row): rows are found again by identity after stratifying
    for k, part in enumerate(parts):
        records = RecordFile(part.records)
        tagged += [(records[int(r)], k, int(r)) for r in part.rows]
    if not any(s.kind for s, _, _ in tagged):
        return sample_parts(parts, n, seed)
    chosen = {id(s) for s in stratified([s for s, _, _ in tagged], n, seed)}
    rows: list[list[int]] = [[] for _ in parts]
    for s, k, r in tagged:
        if id(s) in chosen:
            rows[k].append(r)
    return [
        Part(p.source, p.records, p.image_root, np.asarray(sorted(r), dtype=np.int64))
        for p, r in zip(parts, rows, strict=True)
    ]


def balanced_set(mix: Sequence, n: int | None, seed: int, data_dir: str | Path = "data"):
    """A held-out `ImageSet`: at most `n` records of the data mix `mix`, balanced over question
    kinds when the records have kinds (`balanced_parts`), images opened per batch."""
    from vregion.data.imageset import ImageSet

    return ImageSet.from_parts(balanced_parts(resolve_mix(mix, seed, data_dir), n, seed))


def part_to_dict(part: Part) -> dict:
    """A picklable, JSON-able form (for a process or a Ray worker)."""
    return {**part.__dict__, "rows": part.rows.tolist()}


def part_from_dict(d: dict) -> Part:
    return Part(d["source"], d["records"], d["image_root"], np.asarray(d["rows"], dtype=np.int64))


def index_records(records: str | Path, image_root: str | Path, processor, system_prompt) -> Path:
    """Index a records file that no stage wrote (tests, benchmarks): token lengths from the
    tokenizer and the image headers, no image decoded."""
    from vregion.data.encode import ImageTokenCounter, text_tokens
    from vregion.data.images import image_header, resolve_image
    from vregion.data.records import read_jsonl

    image_tokens = ImageTokenCounter(processor)
    lengths, has_image = [], []
    for s in read_jsonl(records):
        n = text_tokens(processor, s, system_prompt)
        if s.image is not None:
            w, h, _ = image_header(resolve_image(image_root, s.image))
            n += image_tokens((w, h))
        lengths.append(n)
        has_image.append(s.image is not None)
    return write_index(records, lengths, has_image)

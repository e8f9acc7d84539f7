"""The streaming data path: indexed records, mixes, sharded length-grouped batches, exact resume."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vregion.config import DataMix
from vregion.data.dataset import (
    RecordDataset,
    RecordFile,
    ShardedBatchSampler,
    batch_plan,
    index_records,
    padding_share,
    resolve_mix,
    total_steps,
    training_loader,
)
from vregion.data.encode import _labels_by_prefix_lengths, encode_sample, load_image
from vregion.data.records import Sample, write_jsonl

SYSTEM = "Answer briefly."


def _lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 400, n), rng.random(n) < 0.8


def test_ranks_get_disjoint_batches_that_cover_the_epoch():
    lengths, has_image = _lengths(203)
    for group in (True, False):
        plan = batch_plan(lengths, has_image, 4, world=2, seed=3, group_by_length=group)
        assert len(plan) % 2 == 0  # whole global steps only: every rank does the same steps
        ranks = [np.concatenate(plan[r::2]) for r in range(2)]
        assert not set(ranks[0]) & set(ranks[1])
        seen = np.concatenate(ranks)
        assert len(seen) == len(set(seen.tolist())) > 203 - 2 * 4 * 2  # at most a few left over
    # another epoch is another order
    assert not np.array_equal(
        np.concatenate(batch_plan(lengths, has_image, 4, seed=3, epoch=0)),
        np.concatenate(batch_plan(lengths, has_image, 4, seed=3, epoch=1)),
    )


def test_length_grouping_cuts_padding_and_keeps_modalities_apart():
    lengths, has_image = _lengths(2000)
    plain = batch_plan(lengths, has_image, 8, group_by_length=False)
    grouped = batch_plan(lengths, has_image, 8, group_by_length=True)
    assert padding_share(grouped, lengths) < padding_share(plain, lengths) / 3
    assert all(len(set(has_image[b].tolist())) == 1 for b in grouped)
    # still the whole epoch, once each
    assert sorted(np.concatenate(grouped).tolist()) == sorted(set(np.concatenate(grouped).tolist()))


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("group", [False, True])
def test_a_resumed_sampler_continues_exactly_across_epochs(world, group):
    lengths, has_image = _lengths(37)
    for rank in range(world):
        kw = dict(rank=rank, world=world, seed=5, group_by_length=group)
        full = list(itertools.islice(ShardedBatchSampler(lengths, has_image, 4, **kw), 25))
        for start in (0, 3, 4, 9, 13):  # an epoch here is 37 // 4 // world batches per rank
            resumed = ShardedBatchSampler(lengths, has_image, 4, start=start, **kw)
            assert list(itertools.islice(resumed, 25 - start)) == full[start:]


def test_steps_from_epochs():
    assert total_steps(300, None, 10_000, 8, 1, 1) == 300
    assert total_steps(None, 1, 665_000, 16, 8, 1) == 665_000 // 128
    assert total_steps(None, 0.5, 1000, 8, 1, 2) == 31  # 62 steps an epoch


@pytest.fixture
def records(tmp_path, tiny_processor):
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(64, 64), (80, 48), (32, 96)]):
        Image.new("RGB", size, (40 * i, 200, 10)).save(images / f"{i}.png")
    samples = []
    for k in range(30):
        turns = [
            {"from": "human", "value": ("<image>\n" if k % 5 else "") + f"Question {k}?"},
            {"from": "gpt", "value": "yes " * (k % 7 + 1)},
        ]
        if k % 3 == 0:
            turns += [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": "no"}]
        samples.append(Sample(f"r{k}", f"{k % 3}.png" if k % 5 else None, turns))
    path = tmp_path / "records.jsonl"
    write_jsonl(path, samples)
    index_records(path, images, tiny_processor, SYSTEM)
    return path, images, samples


def test_record_file_reads_by_offset_and_the_index_holds_true_lengths(records, tiny_processor):
    path, images, samples = records
    f = RecordFile(path)
    assert len(f) == 30 and f[17] == samples[17] and f[0] == samples[0]
    for i in (0, 4, 9):  # the index's length is the length the model sees
        enc = encode_sample(tiny_processor, samples[i], load_image(images, samples[i]), SYSTEM)
        assert f.lengths[i] == len(enc["input_ids"])
        assert f.has_image[i] == (samples[i].image is not None)


def test_one_processor_call_labels_equal_prefix_counting(records, tiny_processor):
    path, images, samples = records
    for s in samples[:12]:
        image = load_image(images, s)
        enc = encode_sample(tiny_processor, s, image, SYSTEM)
        slow = _labels_by_prefix_lengths(tiny_processor, s, image, SYSTEM, enc["input_ids"])
        assert enc["labels"] == slow


def test_mix_weights_and_caps(records, tmp_path):
    path, images, _ = records
    (tmp_path / "sources" / "a").mkdir(parents=True)
    (tmp_path / "sources" / "a" / "records.jsonl").write_bytes(path.read_bytes())
    (tmp_path / "sources" / "a" / "records.jsonl.index.npz").write_bytes(
        path.with_name("records.jsonl.index.npz").read_bytes()
    )
    (tmp_path / "sources" / "a" / "source.json").write_text(json.dumps({"image_root": str(images)}))

    def rows(**kw):
        return resolve_mix([DataMix(source="a", **kw)], seed=0, data_dir=tmp_path)[0].rows

    assert len(rows()) == 30
    half = rows(weight=0.5)
    assert len(half) == 15 and len(set(half.tolist())) == 15
    assert sorted(rows(weight=2.0).tolist()) == sorted(list(range(30)) * 2)
    assert len(rows(weight=2.0, max_samples=40)) == 40
    assert len(rows(max_samples=7)) == 7


def test_loader_batches_are_identical_with_worker_processes_and_after_resume(
    records, tiny_processor
):
    from vregion.data.dataset import Part

    path, images, _ = records
    part = Part("a", str(path), str(images), np.arange(30))
    ds = RecordDataset([part], tiny_processor, SYSTEM)
    cpu = torch.device("cpu")

    def batches(workers: int, start: int, n: int):
        loader = training_loader(ds, 4, device=cpu, seed=1, start_batch=start, workers=workers)
        return list(itertools.islice(iter(loader), n))

    inline = batches(0, 0, 9)  # 9 batches: past the end of the first epoch (7 batches)
    forked = batches(1, 0, 9)
    resumed = batches(1, 5, 4)
    for a, b in zip(inline, forked, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(inline[5:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert inline[0]["labels"].shape == inline[0]["input_ids"].shape
    with_images = [b for b in inline if "pixel_values" in b]
    assert with_images and all(b["pixel_values"].shape[1:] == (3, 64, 64) for b in with_images)


def test_loader_worker_exits_cleanly_when_its_parent_has_thread_exit_callbacks(
    records, tiny_processor
):
    """A stage runs inside a Prefect flow, whose log shipper registers a thread-exit callback;
    a forked worker that ran it exited 1 on shutdown ("worker exited unexpectedly")."""
    import threading

    from vregion.data.dataset import Part

    parent = os.getpid()

    def fails_outside_its_process():
        if os.getpid() != parent:
            raise RuntimeError("a callback of the parent's threads, run in a forked worker")

    path, images, _ = records
    ds = RecordDataset([Part("a", str(path), str(images), np.arange(30))], tiny_processor, SYSTEM)
    threading._register_atexit(fails_outside_its_process)
    try:
        it = iter(training_loader(ds, 4, device=torch.device("cpu"), workers=1))
        next(it)
        (worker,) = it._workers
        it._shutdown_workers()  # what the loader does when training stops before its data ends
    finally:
        callbacks = threading._threading_atexits  # each wrapped in a functools.partial
        callbacks[:] = [c for c in callbacks if c.func is not fails_outside_its_process]
    assert worker.exitcode == 0

"""Stage entry points: bad config stops a stage with the field named; ingest quarantines bad
LLaVA records and keeps the valid ones, under a real Prefect test harness, and stops with exit 2
on a file that yields no record."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from pipeline_repo import flow_runs

ROOT = Path(__file__).resolve().parents[1]


def session_prefect_api() -> str:
    home = Path(os.environ["PREFECT_HOME"])  # the test session's (conftest)
    return json.loads((home / "server.json").read_text())["api_url"]


def test_wrong_config_value_exits_2_and_names_the_field(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"align": {"steps": -1, "lr": "fast"}}))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.align", "--params", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert proc.returncode == 2
    assert "align.steps" in proc.stderr and "align.lr" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stage_help_says_what_it_does():
    proc = subprocess.run(
        [sys.executable, "-m", "stages.prepare", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert "quarantine" in proc.stdout and "--params" in proc.stdout
    shown = " ".join(proc.stdout.split())  # each path and its default, from dvc.yaml's cmd
    assert (
        "--base PATH base checkpoint (its processor counts tokens) (default: models/base)" in shown
    )
    assert "--out PATH data directory to write" in shown and "(default: data)" in shown


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _llava_dir(root: Path) -> tuple[Path, Path]:
    images = root / "llava_images"
    images.mkdir()
    Image.new("RGB", (64, 64), "red").save(images / "red.png")
    (images / "broken.png").write_bytes(b"not a png at all")
    turns = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    records = [
        {"id": "ok-1", "image": "red.png", "conversations": turns("<image>\nWhat color?", "red")},
        {"id": "ok-2", "conversations": turns("Say hi.", "Hi.")},
        {"id": "missing-image", "image": "nope.png", "conversations": turns("<image>\nA?", "b")},
        {"id": "corrupt-image", "image": "broken.png", "conversations": turns("<image>\nA?", "b")},
        {
            "id": "two-placeholders",
            "image": "red.png",
            "conversations": turns("<image><image>\nA?", "b"),
        },
        {"id": "no-conversations", "image": "red.png"},
        {
            "id": "too-long",
            "image": "red.png",
            "conversations": turns("<image>\n" + "word " * 400, "b"),
        },
    ]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    return path, images


def test_ingest_quarantines_bad_llava_records_and_keeps_valid_ones(
    tmp_path, monkeypatch, tiny_embedded_dir, prefect_harness
):
    from stages._common import stage_defaults
    from stages.ingest import ingest
    from vregion.data.dataset import RecordFile

    base, _ = tiny_embedded_dir
    shutil.copytree(base, tmp_path / "models" / "base")
    train, images = _llava_dir(tmp_path)
    params = {
        "model": {"base": "embedded-tiny"},
        "data": {
            "max_tokens": 128,
            "sources": {"mine": {"records": str(train), "image_root": str(images)}},
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    paths = stage_defaults(ingest, "mine", "source")  # dvc.yaml's, relative to tmp_path
    assert paths["out"] == "data/sources/mine"
    metrics = ingest(source="mine", params="params.yaml", **paths)

    out = tmp_path / "data/sources/mine"
    records = RecordFile(out / "records.jsonl")
    assert [records[i].id for i in range(len(records))] == ["ok-1", "ok-2"]
    assert records.has_image.tolist() == [True, False] and records.lengths[0] > 16
    report = json.loads((out / "quarantine.json").read_text())
    reasons = {e["record"]: e for e in report["entries"]}
    assert set(reasons) == {
        "missing-image",
        "corrupt-image",
        "two-placeholders",
        "no-conversations",
        "too-long",
        "#7",
    }
    assert "tokens > max_tokens 128" in reasons["too-long"]["reason"]
    assert reasons["no-conversations"]["field"] == "conversations"
    assert all(e["file"] == str(train) for e in report["entries"])
    assert metrics["quarantined"] == 6 == report["skipped"]
    assert metrics["records"] == 2 and metrics["records_read"] == 8
    assert metrics["records_per_second"] > 0
    assert json.loads((tmp_path / "metrics/ingest_mine.json").read_text()) == metrics


@pytest.mark.parametrize(
    "content, says",
    [
        ("", "no records"),
        ('{"data": [{"id": 1}]}', "JSON list"),
        ('{"id": "x", "image": "nope.png", "conversations": []}\n', "quarantined"),
    ],
)
def test_ingest_of_an_unusable_file_exits_2_and_writes_no_records(
    tmp_path, tiny_embedded_dir, content, says
):
    base, _ = tiny_embedded_dir
    shutil.copytree(base, tmp_path / "models" / "base")
    (tmp_path / "images").mkdir()
    (tmp_path / "bad.jsonl").write_text(content)
    params = {"data": {"sources": {"bad": {"records": "bad.jsonl", "image_root": "images"}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # The session's PREFECT_HOME (conftest): the cases share the server the first one starts.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VREGION_RUN_ID": tmp_path.name}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.ingest", "bad"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "bad.jsonl" in proc.stderr and says in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data/sources/bad/records.jsonl").exists()
    # The flow run says the same: failed, with the file and the fix in its state message.
    (failed,) = flow_runs(session_prefect_api(), f"run:{tmp_path.name}")
    assert failed["flow"] == "ingest" and failed["state"] == "FAILED", failed
    assert "bad.jsonl" in failed["message"] and says in failed["message"], failed["message"]
    assert not any("Traceback" in message for _, message in failed["logs"]), failed["logs"]


def test_region_refuses_a_region_larger_than_the_model_and_writes_nothing(
    tmp_path, monkeypatch, prefect_harness
):
    from stages._common import stage_defaults
    from stages.region import region
    from vregion.config import ConfigError

    paths = stage_defaults(region)

    (tmp_path / "reports").mkdir()
    scores = {"block_influence": [0.1, 0.4, 0.2, 0.3]}
    (tmp_path / "reports/layer_scores.json").write_text(
        json.dumps({"num_layers": 4, "scores": scores})
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"region": {"amount": 9}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"region.amount: .*the LLM has 4 layers"):
        region(params="params.yaml", **paths)
    assert not (tmp_path / "reports/region.json").exists()
    # a scorer the probe did not run is named, and a valid top-k choice reads the scores
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"region": {"strategy": "topk:angular_distance", "amount": 2}})
    )
    with pytest.raises(ConfigError, match="angular_distance"):
        region(params="params.yaml", **paths)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"region": {"strategy": "topk:block_influence", "amount": 2}})
    )
    metrics = region(params="params.yaml", **paths)
    assert metrics["region"] == [1, 3] and metrics["region_percent"] == 50.0
    chosen = json.loads((tmp_path / "reports/region.json").read_text())
    assert chosen["layers"] == [1, 3] and chosen["scorer"] == "block_influence"
    # `all` takes every layer whatever the (default) size says
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"region": {"strategy": "all"}}))
    assert region(params="params.yaml", **paths)["region"] == [0, 1, 2, 3]


def test_align_skip_keeps_the_base_as_hard_links(
    tmp_path, monkeypatch, tiny_embedded_dir, prefect_harness
):
    from safetensors.torch import load_file

    from stages._common import stage_defaults
    from stages.align import align

    base, _ = tiny_embedded_dir
    shutil.copytree(base, tmp_path / "models" / "base")
    (tmp_path / "models" / "aligned").mkdir()
    (tmp_path / "models" / "aligned" / "stale.bin").write_bytes(b"from an earlier run")
    params = {"model": {"base": "embedded-tiny"}, "align": {"skip": True}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)  # no data/: a skipped align reads none
    metrics = align(params="params.yaml", **stage_defaults(align))

    base, aligned = tmp_path / "models" / "base", tmp_path / "models" / "aligned"
    files = sorted(p.relative_to(base) for p in base.rglob("*") if p.is_file())
    assert sorted(p.relative_to(aligned) for p in aligned.rglob("*") if p.is_file()) == files
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert weights
    for f in files:  # the same bytes, stored once
        assert (aligned / f).stat().st_ino == (base / f).stat().st_ino, f
    for f in weights:
        a, b = load_file(aligned / f), load_file(base / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["skipped"] is True and metrics["steps"] == 0
    assert metrics["files_linked"] == len(files) and metrics["files_copied"] == 0
    assert json.loads((tmp_path / "metrics/align.json").read_text()) == metrics
    assert (tmp_path / "metrics/align_loss.csv").read_text().strip() == "step,loss,lr,seconds"

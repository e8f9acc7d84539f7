"""Stage entry points: bad config stops a stage with the field named; prepare quarantines bad
LLaVA records and keeps the valid ones, under a real Prefect test harness."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


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


def test_prepare_quarantines_bad_llava_records_and_keeps_valid_ones(
    tmp_path, monkeypatch, tiny_embedded_dir, prefect_harness
):
    from stages.prepare import prepare

    base, _ = tiny_embedded_dir
    shutil.copytree(base, tmp_path / "models" / "base")
    train, images = _llava_dir(tmp_path)
    params = {
        "model": {"base": "embedded-tiny"},
        "data": {
            "train_images": 12,
            "eval_images": 4,
            "text_items": 10,
            "max_tokens": 128,
            "llava": {"train": str(train), "image_root": str(images)},
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    metrics = prepare(params="params.yaml")

    kept = [
        json.loads(line)["id"]
        for line in (tmp_path / "data/llava/train.jsonl").read_text().splitlines()
    ]
    assert kept == ["ok-1", "ok-2"]
    report = json.loads((tmp_path / "data/quarantine.json").read_text())
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
    assert metrics["llava"] == {"train": 2}
    on_disk = json.loads((tmp_path / "metrics/prepare.json").read_text())
    assert on_disk["quarantined_by_file"] == {str(train): 6}
    # The synthetic data was still built in full.
    assert on_disk["synthetic"]["train_captions"] == 12


def test_region_refuses_a_region_larger_than_the_model_and_writes_nothing(
    tmp_path, monkeypatch, prefect_harness
):
    from stages.region import region
    from vregion.config import ConfigError

    (tmp_path / "reports").mkdir()
    scores = {"block_influence": [0.1, 0.4, 0.2, 0.3]}
    (tmp_path / "reports/layer_scores.json").write_text(
        json.dumps({"num_layers": 4, "scores": scores})
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"region": {"amount": 9}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"region.amount: .*the LLM has 4 layers"):
        region(params="params.yaml")
    assert not (tmp_path / "reports/region.json").exists()
    # a scorer the probe did not run is named, and a valid top-k choice reads the scores
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"region": {"strategy": "topk:angular_distance", "amount": 2}})
    )
    with pytest.raises(ConfigError, match="angular_distance"):
        region(params="params.yaml")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"region": {"strategy": "topk:block_influence", "amount": 2}})
    )
    metrics = region(params="params.yaml")
    assert metrics["region"] == [1, 3] and metrics["region_percent"] == 50.0
    chosen = json.loads((tmp_path / "reports/region.json").read_text())
    assert chosen["layers"] == [1, 3] and chosen["scorer"] == "block_influence"
    # `all` takes every layer whatever the (default) size says
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"region": {"strategy": "all"}}))
    assert region(params="params.yaml")["region"] == [0, 1, 2, 3]

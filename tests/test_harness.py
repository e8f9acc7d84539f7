"""The harness plumbing that needs no harness run: what a missing harness reports, and how
results-file figures are named. Both harnesses themselves run in test_pipeline_dvc.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vregion.config import load_params
from vregion.eval import harness as hx

ROOT = Path(__file__).resolve().parents[1]


def test_a_harness_that_cannot_run_is_reported_and_gives_no_figure(monkeypatch, tmp_path):
    from vregion.report import harness_section

    monkeypatch.setitem(hx.NEEDS, "lmms_eval", ["lmms_eval", "no_such_module_here"])
    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "params.yaml")  # both local tasks requested
    status = hx.harness_status(p.evaluate)
    assert status["lmms_eval"]["status"] == "not installed (no_such_module_here missing)"
    monkeypatch.setitem(hx.NEEDS, "lm_eval", ["no_such_module_here"])
    status = hx.harness_status(p.evaluate)
    text = "data/text/text_skill.jsonl"
    ran = hx.run_harnesses(
        p.evaluate, p.model.system_prompt, {"tuned": "tuned"}, {}, status, text, "llm", "harness"
    )
    assert ran == {"tuned": {}}
    assert json.loads(Path("llm/exports.json").read_text()) == {}
    section = harness_section({"harnesses": status, "models": {"tuned": {}}})
    assert (
        "**lmms-eval**: not installed (no_such_module_here missing); no figure from it." in section
    )
    with pytest.raises(hx.HarnessError, match="no_such_module_here not installed"):
        hx.run_harness(
            "lm_eval",
            "hf",
            {},
            ["vregion_text_mc"],
            tmp_path,
            include_paths=[],
            limit=None,
            batch_size=1,
            threads=1,
            offline=True,
        )


def test_results_file_figures_keep_their_filter_and_drop_the_rest(tmp_path):
    out = tmp_path / "output" / "model"
    out.mkdir(parents=True)
    results = {
        "results": {
            "bbh": {
                "alias": "bbh",
                "exact_match,get-answer": 0.25,
                "exact_match_stderr,get-answer": 0.01,
            },
            "mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.02, "sample_len": 14042},
        },
        "n-samples": {"mmlu": {"original": 14042, "effective": 100}},
    }
    (out / "results_2026.json").write_text(json.dumps(results))
    run = hx.read_results("lm_eval", ["bbh", "mmlu"], tmp_path / "output", tmp_path / "x.log", 0)
    assert run["results"] == {
        "bbh": {"exact_match,get-answer": 0.25, "exact_match_stderr,get-answer": 0.01},
        "mmlu": {"acc": 0.5, "acc_stderr": 0.02},
    }
    assert run["samples"] == {"bbh": None, "mmlu": 100}
    with pytest.raises(hx.HarnessError, match="no result for task 'gqa'"):
        hx.read_results("lmms_eval", ["gqa"], tmp_path / "output", tmp_path / "x.log", 0)

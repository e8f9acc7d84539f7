"""The comparison report's arithmetic: retention and its error, and when a claim is decided.

The sweep test (test_sweep.py) checks the report against real experiments; these check the
verdict rules on figures chosen to sit on either side of the noise.
"""

from __future__ import annotations

import math

import pytest

from vregion.sweep.compare import (
    add_ratios,
    charts,
    claims,
    combine_seeds,
    gap_verdict,
    run_row,
    standard_error,
)


def row(label: str, accuracy: float, n: int, size: int, layers: int = 30, **extra) -> dict:
    r = {
        "label": label,
        "accuracy": accuracy,
        "accuracy_se": round(standard_error(accuracy, n), 4),
        "n": n,
        "region_size": size,
        "num_layers": layers,
        "seconds_per_step": 1.0 if size == layers else 0.7,
        "text_mc_accuracy": None,
        "prune_curve": [],
    }
    return {**r, **extra}


def test_gap_verdict_needs_two_standard_errors():
    assert gap_verdict(0.05, 0.02) == "holds"
    assert gap_verdict(-0.05, 0.02) == "does not hold"
    assert gap_verdict(0.03, 0.02) == "not resolved (+1.5 s.e.)"
    assert gap_verdict(-0.01, 0.02) == "not resolved (-0.5 s.e.)"


def test_retention_carries_the_error_of_both_accuracies():
    base, uniform = row("all", 0.677, 600, 30), row("uniform", 0.635, 600, 8)
    add_ratios([base, uniform], base)
    assert base["retention_percent"] == 100.0 and base["retention_se"] == 0.0
    assert uniform["retention_percent"] == 93.8
    rel = math.hypot(uniform["accuracy_se"] / 0.635, base["accuracy_se"] / 0.677)
    assert uniform["retention_se"] == pytest.approx(100 * 0.635 / 0.677 * rel, abs=0.05)
    assert uniform["time_ratio"] == 0.7


def _verdict(rows: dict[str, dict[str, dict]], claim: str) -> str:
    """The verdict on the claim starting with `claim`, retention against rows' all-layer run."""
    add_ratios(
        [r for sweep in rows.values() for r in sweep.values()], rows["strategies"]["all layers"]
    )
    return next(c["verdict"] for c in claims(rows) if c["claim"].startswith(claim))


def test_retention_claim_is_unresolved_within_the_noise_and_refuted_beyond_it():
    noisy = {
        "strategies": {
            "all layers": row("all layers", 0.677, 600, 30),
            "uniform": row("uniform", 0.635, 600, 8),
        }
    }
    assert _verdict(noisy, "A sparse") == "not resolved (-1.4 s.e.)"
    # the same accuracies on 20x the questions: the gap is now far beyond the noise
    precise = {
        "strategies": {
            "all layers": row("all layers", 0.677, 12000, 30),
            "uniform": row("uniform", 0.635, 12000, 8),
        }
    }
    assert _verdict(precise, "A sparse") == "does not hold"


def test_size_ordering_is_refuted_only_by_a_clear_reversal():
    def sizes(accs: dict[int, float], n: int) -> dict:
        rows = {f"{k} layers": row(f"{k} layers", a, n, k) for k, a in accs.items()}
        return {"strategies": {"all layers": row("all layers", 0.70, n, 30)}, "sizes": rows}

    falls = "Retention falls"
    assert _verdict(sizes({1: 0.40, 2: 0.50, 4: 0.60, 8: 0.68}, 2000), falls) == "holds"
    mixed = _verdict(sizes({1: 0.40, 2: 0.41, 4: 0.60}, 2000), falls)
    assert mixed.startswith("not resolved: 1→2 not resolved") and "2→4 holds" in mixed
    assert _verdict(sizes({1: 0.60, 2: 0.40}, 2000), falls).startswith("does not hold")


def test_pruning_claim_uses_the_error_of_the_curve_points():
    curve = [{"layers_removed": 0, "accuracy": 0.66}, {"layers_removed": 4, "accuracy": 0.48}]
    metrics = {
        "eval": {
            "models": {
                "tuned": {"visual": {"overall": {"accuracy": 0.677, "n": 600, "blind": 0.39}}}
            },
            "prune_curve": curve,
        },
        "train": {"seconds_per_step": 1.9, "trainable_params": 10, "trainable_percent": 1.0},
        "region": {"region": list(range(30)), "region_size": 30, "num_layers": 30},
    }
    all_tuned = run_row("all-layers", "all-layer-tuned", metrics, "abc", curve_n=300)
    assert [c["n"] for c in all_tuned["prune_curve"]] == [300, 300]
    assert all_tuned["prune_curve"][0]["accuracy_se"] == round(standard_error(0.66, 300), 4)
    assert run_row("x", "x", metrics, "abc", curve_n=None)["prune_curve"][0]["n"] == 600

    def region(drop: float, n: int) -> dict:
        pts = [(0, 0.62), (4, 0.62 - drop)]
        return row(
            "region-tuned (uniform)",
            0.635,
            600,
            8,
            prune_curve=[
                {"layers_removed": k, "accuracy": a, "accuracy_se": standard_error(a, n)}
                for k, a in pts
            ],
        )

    def verdict(drop: float, n: int) -> str:
        base = {**all_tuned, "label": "all-layer-tuned"}
        for c in base["prune_curve"]:
            c["accuracy_se"] = standard_error(c["accuracy"], n)
        rows = {"pruning": {"all-layer-tuned": base, "region-tuned (uniform)": region(drop, n)}}
        return claims(rows)[-1]["verdict"]

    assert verdict(0.17, 300).startswith("not resolved")  # 0.18 vs 0.17 on 300 questions
    assert verdict(0.02, 300) == "holds"  # the all-layer model loses 0.18, ours 0.02
    assert verdict(0.40, 300) == "does not hold"


def test_charts_draw_every_sweep_with_error_bars(tmp_path):
    base = row("all layers", 0.68, 600, 30)
    strategies = {"all layers": base, "uniform": row("uniform", 0.64, 600, 8)}
    strategies["top"] = row("top", 0.66, 600, 8)
    sizes = {f"{k} layers": row(f"{k} layers", a, 600, k) for k, a in {1: 0.55, 8: 0.64}.items()}
    sizes["30 layers (all)"] = base
    for r in [*strategies.values(), *sizes.values()]:
        r["blind"] = 0.4
    add_ratios([*strategies.values(), *sizes.values()], base)
    made = charts({"strategies": strategies, "sizes": sizes, "pruning": {}}, tmp_path)
    assert made == {"retention": "retention_vs_layers.png", "strategies": "strategies.png"}
    for name in made.values():
        assert (tmp_path / name).stat().st_size > 10_000


def test_harness_figures_of_the_tuned_model_reach_the_comparison():
    from vregion.sweep.compare import comparison_markdown

    tuned = {
        "visual": {"overall": {"accuracy": 0.6, "n": 600, "blind": 0.4}},
        "lm_eval": {"vregion_text_mc": {"acc": 0.75, "acc_stderr": 0.04, "n": 72}},
        "lmms_eval": {"vregion_vqa": {"exact_match": 0.5, "exact_match_stderr": 0.05, "n": 120}},
    }
    metrics = {
        "eval": {"models": {"tuned": tuned}, "prune_curve": []},
        "train": {"seconds_per_step": 1.2, "trainable_params": 10, "trainable_percent": 1.0},
        "region": {"region": [1, 5], "region_size": 2, "num_layers": 8},
    }
    r = run_row("uniform", "uniform", metrics, "abc")
    assert r["harness"] == {
        "lm_eval vregion_text_mc acc": 0.75,
        "lmms_eval vregion_vqa exact_match": 0.5,
    }
    add_ratios([r], None)
    page = comparison_markdown({"strategies": {"uniform": r}}, [], {}, {}, "make sweep")
    assert "| lm_eval vregion_text_mc acc | lmms_eval vregion_vqa exact_match |" in page
    assert "| uniform | 0.750 | 0.500 |" in page


def answers(correct: list[int], prefix: str = "q") -> list[list[dict]]:
    """Per-question results of one seed: question i right when correct[i]."""
    return [[{"id": f"{prefix}{i}", "kind": "k", "correct": c} for i, c in enumerate(correct)]]


def test_paired_questions_resolve_what_independent_errors_cannot():
    """Two runs 0.04 apart on 300 questions: within 2 independent s.e. (not resolved), but the
    pairing shows one run right on every question the other gets right, plus 12 more."""
    n = 300
    a = [1] * 120 + [0] * 180
    b = [1] * 132 + [0] * 168
    top = row("top", sum(a) / n, n, 8, questions=answers(a))
    bottom = row("bottom", sum(b) / n, n, 8, questions=answers(b))
    rows = {
        "strategies": {"all layers": row("all layers", 0.5, n, 30), "top": top, "bottom": bottom}
    }
    unpaired = {
        "strategies": {
            k: {kk: vv for kk, vv in r.items() if kk != "questions"}
            for k, r in rows["strategies"].items()
        }
    }
    assert _verdict(unpaired, "Tuning the bottom").startswith("not resolved")
    claim = next(c for c in claims(rows) if c["claim"].startswith("Tuning the bottom"))
    assert claim["verdict"] == "holds"
    assert "95% CI" in claim["ours"] and "McNemar: 0 vs 12 discordant" in claim["ours"]
    # the same accuracies, but 30 questions lost and 42 gained: within the pairs' noise
    mixed = [1] * 90 + [0] * 30 + [1] * 42 + [0] * 138
    rows["strategies"]["bottom"] = row("bottom", sum(mixed) / n, n, 8, questions=answers(mixed))
    assert (
        next(c for c in claims(rows) if c["claim"].startswith("Tuning the bottom"))["verdict"]
        == "not resolved"
    )


def test_paired_retention_and_pruning_claims():
    n = 400
    base = [1] * 280 + [0] * 120
    same = list(base)
    rows = {
        "strategies": {
            "all layers": row("all layers", 0.7, n, 30, questions=answers(base)),
            "uniform": row("uniform", 0.7, n, 8, questions=answers(same)),
        }
    }
    claim = next(c for c in claims_with_ratios(rows) if c["claim"].startswith("A sparse"))
    # identical answers: retention exactly 100% (CI 100 to 100), above 99.4% - 2 points
    assert claim["verdict"] == "holds" and "retention 100.0%" in claim["ours"]
    worse = [1] * 240 + [0] * 160  # 40 fewer right: retention 85.7%, far below
    rows["strategies"]["uniform"] = row("uniform", 0.6, n, 8, questions=answers(worse))
    assert (
        next(c for c in claims_with_ratios(rows) if c["claim"].startswith("A sparse"))["verdict"]
        == "fails"
    )

    def tuned(first: list[int], last: list[int], label: str) -> dict:
        curve = [
            {"layers_removed": k, "accuracy": sum(c) / n, "accuracy_se": 0.05}
            for k, c in ((0, first), (4, last))
        ]
        return row(
            label, 0.7, n, 8, prune_curve=curve, curve_questions=[answers(first), answers(last)]
        )

    region = tuned(base, [1] * 270 + [0] * 130, "region-tuned (uniform)")  # loses 10
    all_layers = tuned(base, [1] * 200 + [0] * 200, "all-layer-tuned")  # loses 80
    pruning = {"pruning": {"all-layer-tuned": all_layers, "region-tuned (uniform)": region}}
    claim = claims(pruning)[-1]
    assert claim["verdict"] == "holds" and "all-layer minus region-tuned drop" in claim["ours"]
    reversed_ = {"pruning": {"all-layer-tuned": region, "region-tuned (uniform)": all_layers}}
    assert claims(reversed_)[-1]["verdict"] == "fails"


def claims_with_ratios(rows: dict) -> list[dict]:
    add_ratios([r for s in rows.values() for r in s.values()], rows["strategies"]["all layers"])
    return claims(rows)


def test_seeds_combine_into_one_row_whose_interval_resamples_them():
    n = 200
    rows = [
        row("uniform", acc, n, 8, rev=f"r{i}", questions=answers([1] * k + [0] * (n - k)))
        for i, (acc, k) in enumerate([(0.60, 120), (0.62, 124), (0.64, 128)])
    ]
    one = combine_seeds(rows)
    assert one["seeds"] == 3 and one["revs"] == ["r0", "r1", "r2"]
    assert one["accuracy"] == pytest.approx(0.62) and one["accuracy_sd"] == pytest.approx(0.02)
    assert len(one["questions"]) == 3  # one list of answers per seed
    texts = [
        {"text_mc_accuracy": 0.7, "text_mc_vs_base": 0.0, "text_nll_vs_base": x}
        for x in (0.3, 0.1, 0.2)
    ]
    nll = combine_seeds([{**r, **t} for r, t in zip(rows, texts, strict=True)])
    assert nll["text_nll_vs_base"] == pytest.approx(0.2)
    assert nll["text_nll_vs_base_seeds"] == [0.3, 0.1, 0.2]
    all_text = row("all layers", 0.72, n, 30, **texts[0], questions=answers([1] * 144 + [0] * 56))
    text = next(
        c
        for c in claims_with_ratios({"strategies": {"all layers": all_text, "uniform": nll}})
        if c["claim"].startswith("Text skill")
    )
    # each seed's figure beside the mean: the spread the mean alone hides
    assert "NLL vs base +0.2000 (seeds +0.30/+0.10/+0.20) vs +0.3000" in text["ours"]
    assert combine_seeds(rows[:1])["seeds"] == 1
    # against an all-layer run that is right on every question uniform gets right, plus 20:
    # a clear gap whichever seed, so the interval over questions and seeds lies above 0
    base = row("all layers", 0.72, n, 30, questions=answers([1] * 144 + [0] * 56))
    strategies = {"strategies": {"all layers": base, "uniform": one, "bottom": rows[0]}}
    claim = next(
        c for c in claims_with_ratios(strategies) if c["claim"].startswith("Sparse uniform")
    )
    assert "95% CI" in claim["ours"]


def test_more_seeds_repeat_the_runs_the_claims_compare():
    from vregion.sweep.plan import SEEDED, plan_runs

    one = plan_runs(30, ["angular_distance"])
    three = plan_runs(30, ["angular_distance"], seeds=3)
    assert [r.name for r in three[: len(one)]] == [r.name for r in one]  # first seeds first
    repeats = three[len(one) :]
    assert {r.name.rsplit("-s", 1)[0] for r in repeats} == set(SEEDED)
    assert {r.overrides["finetune.seed"] for r in repeats} == {1, 2}
    assert all("finetune.seed" not in r.overrides for r in one)


def test_the_kind_table_marks_kinds_a_model_cannot_see():
    from vregion.sweep.compare import _kind_table

    chance = {"color": 1 / 6, "relation": 0.5}
    seeds = [
        row(
            "all",
            0.7,
            800,
            30,
            run="all-layers",
            rev="r",
            chance_per_kind=chance,
            per_kind={"color": c, "relation": r},
        )
        for c, r in ((0.90, 0.60), (0.80, 0.70))
    ]
    both = combine_seeds(seeds)
    assert both["per_kind"] == {"color": pytest.approx(0.85), "relation": pytest.approx(0.65)}
    blind = row(
        "uniform",
        0.5,
        800,
        8,
        run="uniform",
        chance_per_kind=chance,
        per_kind={"color": 0.31, "relation": 0.52},
    )
    table = _kind_table({"strategies": {"all layers": both, "uniform": blind}})
    assert "| chance | 0.167 | 0.500 |" in table
    assert "| all-layers | 0.850 | 0.650 |" in table  # 0.15 above chance on both: no mark
    assert "| uniform | 0.310 ✗ | 0.520 ✗ |" in table
    assert "about 400 questions per seed" in table


def test_a_claim_s_runs_can_go_first():
    from vregion.sweep.plan import plan_runs

    runs = plan_runs(30, ["angular_distance"], seeds=3, only=["uniform", "all-layers"])
    assert [r.name for r in runs] == [
        "all-layers",
        "uniform",
        "all-layers-s1",
        "uniform-s1",
        "all-layers-s2",
        "uniform-s2",
    ]
    everything = {r.name: r for r in plan_runs(30, ["angular_distance"], seeds=3)}
    assert all(r.overrides == everything[r.name].overrides for r in runs)
    with pytest.raises(
        ValueError, match="no run named unifrom in these sweeps; valid: all-layers, uniform, "
    ):
        plan_runs(30, [], only=["unifrom"])


def test_time_claim_holds_only_if_every_seed_pairing_is_faster():
    """Step times move by up to 40% between runs: a mean ratio below 1 is not enough when one
    uniform seed ran slower than one all-layer seed."""

    def timed(label: str, size: int, times: list[float]) -> dict:
        seeds = [
            row(label, 0.6, 600, size, seconds_per_step=t, rev=f"r{i}", blind=0.4)
            for i, t in enumerate(times)
        ]
        return combine_seeds(seeds)

    def claim(uniform_times: list[float], all_times: list[float]) -> dict:
        rows = {
            "strategies": {
                "all layers": timed("all layers", 30, all_times),
                "uniform": timed("uniform", 8, uniform_times),
            }
        }
        add_ratios(list(rows["strategies"].values()), rows["strategies"]["all layers"])
        return next(c for c in claims(rows) if c["claim"].startswith("Region tuning takes"))

    fast = claim([0.94, 1.03, 1.0], [1.96, 1.61, 1.8])
    assert fast["verdict"] == "holds" and "every seed pairing 0.48–0.64×" in fast["ours"]
    overlap = claim([0.9, 1.3], [1.0, 1.4])
    assert overlap["ours"].startswith("0.92× s/step") and overlap["verdict"] == "not resolved"
    assert claim([1.5, 1.6], [1.0, 1.2])["verdict"] == "does not hold"
    single = claim([0.7], [1.0])
    assert single["verdict"] == "holds" and "one run each" in single["ours"]

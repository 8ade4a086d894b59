"""Tests for the tracing chapter's study runner, its cache and its verdict rules (emolib.studies.tracing)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_tracing import FAST, GOLD, PHASES, TEXTS, curve_row, planted  # noqa: F401 (the fixture `study` uses)

from emolib.methods import ablation
from emolib.methods.ablation import top_vs_random
from emolib.methods.common import FlowError
from emolib.methods.tracing import FeatureTracer
from emolib.studies import tracing
from emolib.studies.flow import phases_from_results
from emolib.studies.tracing import (
    StudyConfig,
    TracingRule,
    cached_study,
    run_study,
    small_set_verdict,
    varies_verdict,
    weaker_diffuse_verdict,
)

STUDY = StudyConfig(tracing=FAST, cross_k=1, n_boot=50)
RULE = TracingRule(small_k=2)


@pytest.fixture(scope="module")
def study(planted):  # noqa: F811 (the fixture imported above)
    classifier, saes = planted
    tracer = FeatureTracer(classifier, saes, FAST)
    return tracer, run_study(tracer, (TEXTS, GOLD), (TEXTS, GOLD), PHASES, STUDY)


def test_study_finds_the_planted_feature_and_calls_it_a_small_set(study):
    _, result = study
    k50 = result.k50.set_index(["emotion", "phase", "ablation", "metric"])
    assert k50.loc[("joy", "late", "zero", "prob"), "k50"] == 1.0
    # the model answers joy on every item, so anger and fear have no gold probability to lose
    assert np.isnan(k50.loc[("anger", "late", "zero", "prob"), "k50"])
    versus = top_vs_random(result.curves, n_boot=50)
    verdict = small_set_verdict(result.k50, versus, "late", RULE)
    assert verdict.verdict == "holds" and "1 of 1" in verdict.reason and "joy (k50 1)" in verdict.reason
    top = result.top_features[
        (result.top_features["emotion"] == "joy") & (result.top_features["phase"] == "late")
    ]
    assert (top.iloc[0]["layer"], top.iloc[0]["feature"]) == (1, 5)
    assert result.meta["n_held_out"] == len(TEXTS) and set(result.meta["timings_seconds"]) >= {
        "ablation_curves"
    }
    assert set(result.verification_summary["phase"]) == set(PHASES)


def test_cached_study_reuses_and_rebuilds_a_corrupt_entry(study, tmp_path, monkeypatch):
    monkeypatch.setenv("EMOLIB_CACHE_DIR", str(tmp_path))
    tracer, _ = study
    calls = []
    real = tracing.run_study

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tracing, "run_study", counted)
    args = (tracer, "tiny", "saes-a", (TEXTS, GOLD), (TEXTS, GOLD), PHASES, STUDY)
    first = cached_study(*args)
    second = cached_study(*args)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first.k50, second.k50)
    (entry,) = (tmp_path / "tracing").iterdir()
    (entry / "k50.csv").write_text("emotion\nbroken\n")
    third = cached_study(*args)
    assert len(calls) == 2
    pd.testing.assert_frame_equal(first.k50, third.k50)
    cached_study(tracer, "tiny", "saes-b", *args[3:])  # other SAEs: another entry
    assert len(calls) == 3 and len(list((tmp_path / "tracing").iterdir())) == 2


def curves(spec: dict[str, dict], n_items: int = 20, seed: int = 0) -> pd.DataFrame:
    """Per-item rows: `spec[emotion]` has "top" {k: mean drop}, "random" {k: mean drop}, "whole" (drop); items
    scatter around the means by a small noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for emotion, parts in spec.items():
        plans = [("top", k, -1, v) for k, v in parts["top"].items()]
        plans += [("random", k, s, v) for k, v in parts["random"].items() for s in (0, 1)]
        plans += [("whole", 99, -1, parts["whole"])]
        for condition, k, seed_, mean in plans:
            for item in range(n_items):
                rows.append(
                    curve_row(emotion, condition, k, seed_, f"{emotion}{item}", mean + rng.normal(0, 0.01))
                )
    return pd.DataFrame(rows)


CONCENTRATED = {"top": {1: 0.3, 2: 0.5, 16: 0.6}, "random": {1: 0.0, 2: 0.0, 16: 0.01}, "whole": 0.6}
DIFFUSE_WEAK = {"top": {1: 0.0, 2: 0.01, 16: 0.1}, "random": {1: 0.0, 2: 0.0, 16: 0.0}, "whole": 0.15}


def test_top_vs_random_is_the_paired_excess():
    frame = curves({"joy": CONCENTRATED}, n_items=30)
    versus = top_vs_random(frame, n_boot=200).set_index("k")
    assert versus.loc[2, "excess"] == pytest.approx(0.5, abs=0.01)
    assert versus.loc[2, "excess_low"] > 0.49 and versus.loc[16, "excess"] == pytest.approx(0.59, abs=0.01)


def test_verdicts_on_known_curves():
    frame = curves({"joy": CONCENTRATED, "anger": CONCENTRATED, "disgust": DIFFUSE_WEAK})
    k50 = ablation.k50_table(frame, metrics=("prob",), n_boot=100, min_effect=0.01)
    versus = top_vs_random(frame, n_boot=100)
    small = small_set_verdict(k50, versus, "p", RULE)
    assert small.verdict == "holds" and "2 of 3" in small.reason
    assert varies_verdict(frame, k50, "p", RULE).verdict == "holds"
    assert weaker_diffuse_verdict(frame, k50, "p", RULE).verdict == "holds"
    same = curves({"joy": CONCENTRATED, "anger": CONCENTRATED, "disgust": CONCENTRATED})
    same_k50 = ablation.k50_table(same, metrics=("prob",), n_boot=100, min_effect=0.01)
    assert weaker_diffuse_verdict(same, same_k50, "p", RULE).verdict == "does not hold"
    assert varies_verdict(same, same_k50, "p", RULE).verdict == "does not hold"
    without = curves({"joy": CONCENTRATED, "anger": CONCENTRATED})
    assert weaker_diffuse_verdict(without, same_k50, "p", RULE).verdict == "inconclusive"
    nothing = curves({"joy": {**CONCENTRATED, "whole": -0.2}})
    none_k50 = ablation.k50_table(nothing, metrics=("prob",), n_boot=50, min_effect=0.01)
    assert small_set_verdict(none_k50, top_vs_random(nothing), "p", RULE).verdict == "inconclusive"


def test_phases_from_flow_results():
    record = {
        "models": {"m": {"subsets": {"all": {"boundaries": {"3": {"phases": [[0, 3], [4, 8], [9, 11]]}}}}}}
    }
    phases = phases_from_results(record, "m")
    assert phases == {"phase 1": (0, 1, 2, 3), "phase 2": (4, 5, 6, 7, 8), "phase 3": (9, 10, 11)}
    with pytest.raises(FlowError, match="no model 'other'.*run chapter 01_flow"):
        phases_from_results(record, "other")
    with pytest.raises(FlowError, match="no 2-phase cut"):
        phases_from_results(record, "m", n_phases=2)
    with pytest.raises(FlowError, match="subset 'correct'"):
        phases_from_results(record, "m", subset="correct")


def test_ablation_metrics_read_without_the_vocabulary_normaliser_equal_the_classifiers(study):
    tracer, result = study
    classifier = tracer.classifier
    predictions = classifier.predict(TEXTS)
    gold = np.array([predictions.labels.index(g) for g in GOLD])
    probs = predictions.label_probs[np.arange(len(GOLD)), gold]
    clean = result.curves.groupby("item")[["clean_prob", "clean_correct"]].first().sort_index()
    np.testing.assert_allclose(clean["clean_prob"], probs[clean.index], atol=1e-5)
    np.testing.assert_array_equal(
        clean["clean_correct"], (np.array(predictions.predicted) == GOLD)[clean.index]
    )

"""Tests for the tracing chapter's study (emolib.studies.tracing): the per-item study and its cache on a planted
model, the verdict rules on known curves, and `run_tracing` in its quick preset on a tiny model (JSON round trip,
cache reuse, the chapter's tables)."""

from __future__ import annotations

import dataclasses
import json

import matplotlib
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_loaded
from matplotlib import pyplot as plt
from test_sae_suite import TINY_SUITE
from test_tracing import FAST, GOLD, PHASES, TEXTS, curve_row, planted  # noqa: F401 (the fixture `study` uses)

from emolib import plots
from emolib.lm import baselines
from emolib.methods import ablation
from emolib.methods.ablation import top_vs_random
from emolib.methods.common import FlowError
from emolib.methods.tracing import FeatureTracer, TracingError
from emolib.studies import tracing
from emolib.studies.base import combined
from emolib.studies.features import FinalPhase
from emolib.studies.presets import PRESETS
from emolib.studies.tracing import (
    CLAIMS,
    TracingConfig,
    TracingResult,
    TracingRule,
    cached_study,
    run_study,
    run_tracing,
    small_set_verdict,
    study_phases,
    varies_verdict,
    weaker_diffuse_verdict,
)
from emolib.verdicts import Verdict, findings_markdown, goals_missed, stable_across_seeds

matplotlib.use("Agg")

STUDY = TracingConfig(tracing=FAST, cross_k=1, n_boot=50)
RULE = TracingRule(small_k=2)


@pytest.fixture(scope="module")
def study(planted):  # noqa: F811 (the fixture imported above)
    classifier, saes = planted
    tracer = FeatureTracer(classifier, saes, FAST)
    return tracer, run_study(tracer, (TEXTS, GOLD), (TEXTS, GOLD), PHASES, STUDY)


def test_study_finds_the_planted_feature_and_calls_it_a_small_set(study):
    _, result = study
    k50 = result.k50.set_index(["emotion", "phase", "ablation", "metric"])
    assert k50.loc[("joy", "late", "zero", "gap"), "k50"] == 1.0
    # the model answers joy on every item: anger and fear items prefer joy, so they have no gold gap to lose
    assert np.isnan(k50.loc[("anger", "late", "zero", "gap"), "k50"])
    versus = top_vs_random(result.curves, n_boot=50)
    verdict = small_set_verdict(result.k50, versus, "late", RULE)
    # the two emotions the model does not prefer count against the claim: one of three is not "most"
    assert verdict.verdict == "partly" and "1 of 3" in verdict.reason and "joy (k50 1)" in verdict.reason
    assert verdict.numbers["n_undefined"] == 2 and "count against" in verdict.reason
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


def test_a_study_without_the_cross_emotion_run_keeps_every_table_the_verdicts_read(
    study, tmp_path, monkeypatch
):
    monkeypatch.setenv("EMOLIB_CACHE_DIR", str(tmp_path))
    tracer, full = study
    lean = run_study(tracer, (TEXTS, GOLD), (TEXTS, GOLD), PHASES, STUDY, cross_emotion=False)
    assert lean.cross.empty and not full.cross.empty
    assert "cross_emotion" not in lean.meta["timings_seconds"]
    for name in ("curves", "k50", "verification", "verification_summary", "top_features"):
        pd.testing.assert_frame_equal(getattr(lean, name), getattr(full, name))
    args = (tracer, "tiny", "saes-a", (TEXTS, GOLD), (TEXTS, GOLD), PHASES, STUDY)
    cached = cached_study(*args, cross_emotion=False)
    assert cached.cross.empty
    cached_study(*args)  # with the cross-emotion run: another entry, not the lean one read back
    assert len(list((tmp_path / "tracing").iterdir())) == 2


def test_the_positions_table_sets_the_text_positions_beside_the_answer_position(study):
    """Both runs are read by the same rules, phase by phase, and compared at the largest k both trace."""
    tracer, last = study
    config = dataclasses.replace(STUDY, text_positions=dataclasses.replace(FAST, positions="suffix"))
    text_config = tracing.text_positions_config(config)
    assert (
        text_config.tracing.positions == "suffix" and text_config.shuffled_control == config.shuffled_control
    )
    assert text_config.held_out_per_label == config.text_positions_per_label and text_config.sae_seeds == ()
    text_tracer = FeatureTracer(tracer.classifier, tracer.saes, text_config.tracing)
    text = run_study(text_tracer, (TEXTS, GOLD), (TEXTS, GOLD), PHASES, text_config, cross_emotion=False)
    assert (text.curves["condition"] == "shuffled").any()  # the same controls as the answer position's run
    verdicts = {p: tracing.phase_verdicts(*tracing._versus(last, config), p, RULE, "disgust") for p in PHASES}
    table = tracing._positions_table(last, verdicts, text, config)
    assert tracing.compared_k(config) == 8
    assert table.index.tolist() == [
        (phase, kind) for phase in PHASES for kind in ("answer position", "text positions")
    ]
    assert set(CLAIMS.values()) <= set(table.columns)
    excess = table["mean excess at k = 8"]
    # layer 1 is the last block: what it writes at the text's positions never reaches the answer position, so
    # ablating there too changes nothing; the planted feature moves the answer from either run
    assert excess[("late", "text positions")] == pytest.approx(excess[("late", "answer position")])
    assert excess[("late", "answer position")] > 1.0 and abs(excess[("early", "answer position")]) < 0.1
    for phase in PHASES:
        for key, verdict in verdicts[phase].items():
            assert table.loc[(phase, "answer position"), CLAIMS[key]] == verdict.verdict


def test_the_text_position_run_needs_a_suffix_tracer_that_the_rule_can_read():
    with pytest.raises(TracingError, match="no text-position tracer"):
        tracing.text_positions_config(dataclasses.replace(STUDY, text_positions=None))
    with pytest.raises(TracingError, match="positions='suffix'"):
        tracing.text_positions_config(dataclasses.replace(STUDY, text_positions=FAST))
    mean_only = dataclasses.replace(FAST, positions="suffix", ablations=("mean",))
    with pytest.raises(TracingError, match="must include it"):
        tracing.text_positions_config(dataclasses.replace(STUDY, text_positions=mean_only))
    unshared = dataclasses.replace(FAST, positions="suffix", ks=(3,))
    with pytest.raises(TracingError, match="share no k"):
        tracing.compared_k(dataclasses.replace(STUDY, text_positions=unshared))


def curves(spec: dict[str, dict], n_items: int = 20, seed: int = 0) -> pd.DataFrame:
    """Per-item rows: `spec[emotion]` has "top" {k: mean drop}, "random" {k: mean drop}, "whole" (drop) and
    optionally "clean" (the clean value, default 0.8); items scatter around the means by a small noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for emotion, parts in spec.items():
        plans = [("top", k, -1, v) for k, v in parts["top"].items()]
        plans += [("random", k, s, v) for k, v in parts["random"].items() for s in (0, 1)]
        plans += [("whole", 99, -1, parts["whole"])]
        for condition, k, seed_, mean in plans:
            for item in range(n_items):
                drop = mean + rng.normal(0, 0.01)
                rows.append(
                    curve_row(emotion, condition, k, seed_, f"{emotion}{item}", drop, parts.get("clean", 0.8))
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
    # clean value 0.8 everywhere: k50 is the first k whose drop reaches 0.4 (2 concentrated; never for the diffuse)
    frame = curves({"joy": CONCENTRATED, "anger": CONCENTRATED, "disgust": DIFFUSE_WEAK})
    k50 = ablation.k50_table(frame, metrics=("gap",), n_boot=100)
    assert list(k50.set_index("emotion")["k50"]) == [2.0, 2.0, np.inf]
    versus = top_vs_random(frame, n_boot=100)
    small = small_set_verdict(k50, versus, "p", RULE)
    assert small.verdict == "holds" and "2 of 3" in small.reason
    assert small.rule == "small_set_verdict"
    assert small.numbers == {"n_small": 2, "n_emotions": 3, "n_undefined": 0, "small_k": 2}
    varies = varies_verdict(frame, k50, "p", RULE)
    assert varies.rule == "varies_verdict" and varies.numbers["kruskal_p"] < RULE.alpha
    weaker = weaker_diffuse_verdict(frame, k50, "p", RULE)
    assert (
        weaker.numbers["drop"] < weaker.numbers["others_drop"]
        and weaker.numbers["mannwhitney_p"] < RULE.alpha
    )
    assert varies_verdict(frame, k50, "p", RULE).verdict == "holds"
    assert weaker_diffuse_verdict(frame, k50, "p", RULE).verdict == "holds"
    same = curves({"joy": CONCENTRATED, "anger": CONCENTRATED, "disgust": CONCENTRATED})
    same_k50 = ablation.k50_table(same, metrics=("gap",), n_boot=100)
    assert weaker_diffuse_verdict(same, same_k50, "p", RULE).verdict == "does not hold"
    assert varies_verdict(same, same_k50, "p", RULE).verdict == "does not hold"
    without = curves({"joy": CONCENTRATED, "anger": CONCENTRATED})
    assert weaker_diffuse_verdict(without, same_k50, "p", RULE).verdict == "inconclusive"
    # impact measured as excess over random features: large raw drops that random features match do not vary
    matched = {"top": {1: 0.0, 2: 0.0, 16: 0.7}, "random": {1: 0.0, 2: 0.0, 16: 0.6}, "whole": 0.7}
    loud = {"top": {1: 0.0, 2: 0.0, 16: 0.2}, "random": {1: 0.0, 2: 0.0, 16: 0.1}, "whole": 0.2}
    raw_differs = curves({"joy": matched, "anger": loud})
    raw_k50 = ablation.k50_table(raw_differs, metrics=("gap",), n_boot=100)
    assert varies_verdict(raw_differs, raw_k50, "p", RULE).numbers["kruskal_p"] > RULE.alpha
    # top features that do no better than random ones: no small set (partly when one emotion has one)
    no_better = {**CONCENTRATED, "random": CONCENTRATED["top"]}
    plain = curves({"joy": no_better, "anger": no_better, "disgust": no_better})
    plain_k50 = ablation.k50_table(plain, metrics=("gap",), n_boot=100)
    assert small_set_verdict(plain_k50, top_vs_random(plain), "p", RULE).verdict == "does not hold"
    one = curves({"joy": CONCENTRATED, "anger": no_better, "disgust": no_better})
    one_k50 = ablation.k50_table(one, metrics=("gap",), n_boot=100)
    partly = small_set_verdict(one_k50, top_vs_random(one), "p", RULE)
    assert partly.verdict == "partly" and "1 of 3" in partly.reason
    # emotions the model does not prefer have no k50 and count against the claim, not out of it
    unpreferred = {**CONCENTRATED, "clean": -0.5}
    mostly = curves({"joy": CONCENTRATED, "anger": unpreferred, "disgust": unpreferred})
    mostly_k50 = ablation.k50_table(mostly, metrics=("gap",), n_boot=100)
    against = small_set_verdict(mostly_k50, top_vs_random(mostly), "p", RULE)
    assert against.verdict == "partly" and against.numbers["n_undefined"] == 2
    nothing = curves({"joy": unpreferred})
    none_k50 = ablation.k50_table(nothing, metrics=("gap",), n_boot=50)
    assert small_set_verdict(none_k50, top_vs_random(nothing), "p", RULE).verdict == "does not hold"
    assert small_set_verdict(none_k50.iloc[:0], top_vs_random(nothing), "p", RULE).verdict == "inconclusive"


class Cuts:
    """Stands for chapter 1's `FlowResult` (its two accessors tracing reads): cuts by phase count, the test's choice."""

    def __init__(self, cuts: dict[int, list[tuple[int, int]]], chosen: int) -> None:
        self.cuts, self.chosen = cuts, chosen

    def phases(self, n_phases: int = 3, subset: str = "all") -> dict[str, tuple[int, ...]]:
        if n_phases not in self.cuts:
            raise FlowError(f"no {n_phases}-phase cut")
        return {f"phase {i}": tuple(range(a, b + 1)) for i, (a, b) in enumerate(self.cuts[n_phases], 1)}

    def chosen_phase_count(self, subset: str = "all") -> int:
        return self.chosen


def flow_result() -> Cuts:
    return Cuts({2: [(0, 8), (9, 11)], 3: [(0, 3), (4, 8), (9, 11)]}, chosen=2)


def test_phases_come_from_the_flow_result_or_by_hand():
    phases, chosen = study_phases(flow_result(), 3)
    assert phases == {"phase 1": (0, 1, 2, 3), "phase 2": (4, 5, 6, 7, 8), "phase 3": (9, 10, 11)}
    assert chosen == 2
    assert study_phases({"late": [1, 2]}, 3) == ({"late": (1, 2)}, None)
    with pytest.raises(FlowError, match="no 4-phase cut"):
        study_phases(flow_result(), 4)


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


# ------------------------------------------------------------------------------ the study on a tiny model

#: Labels whose first tokens differ in the tiny tokenizer (the tracer needs first-token scoring).
TINY_LABELS = ("anger", "fear", "joy")


@pytest.fixture
def tiny_study(tiny_model, tiny_tokenizer, tmp_cache, monkeypatch):
    """(model, config, phases) of the quick preset on the tiny model: the built-in items restricted to three
    labels, a tiny SAE suite, and a two-phase cut standing for chapter 1's result."""
    monkeypatch.delenv("EMOLIB_DATA_DIR", raising=False)
    monkeypatch.setattr(baselines, "run_labels", lambda dataset, label_set: TINY_LABELS)
    lm = tiny_loaded(tiny_model, tiny_tokenizer, name="tiny-tracing", chat=True)
    quick = PRESETS["quick"].tracing
    config = dataclasses.replace(
        quick,
        preset="test",
        items=dataclasses.replace(quick.items, dataset="builtin"),
        saes=TINY_SUITE,
        n_phases=2,
        tracing=dataclasses.replace(quick.tracing, progress=False),
        text_positions=dataclasses.replace(quick.text_positions, progress=False),
    )
    flow = Cuts({2: [(0, 0), (1, 1)]}, chosen=2)
    return lm, config, flow


def assert_same_result(a: TracingResult, b: TracingResult) -> None:
    for field in dataclasses.fields(TracingResult):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, pd.DataFrame):
            pd.testing.assert_frame_equal(x, y)
        else:
            assert x == y, field.name


def test_run_tracing_quick_on_a_tiny_model(tiny_study, monkeypatch):
    lm, config, flow = tiny_study
    result = run_tracing(lm, config, flow)
    assert result.phases == {"phase 1": (0,), "phase 2": (1,)} and result.final_phase == "phase 2"
    assert result.chosen_phase_count == 2 and result.facts["phases chosen by ch. 1's test"] == 2
    assert set(result.k50["emotion"]) == set(TINY_LABELS)
    assert set(result.effects["condition"]) == {"top", "random", "shuffled", "whole"}
    assert list(result.gold_drop.index) == list(TINY_LABELS) == list(result.gold_drop.columns)
    assert result.confusion_source == "anger"  # no disgust label: the first source
    assert result.meta["n_held_out"] == 2 * 6 * len(TINY_LABELS)

    again = TracingResult.from_json(json.loads(json.dumps(result.to_json())))
    assert_same_result(result, again)

    # the per-model entry keeps the chapter's old keys
    entry = result.to_json()
    assert {
        "meta", "final_phase", "effects", "top_vs_random", "k50", "gold_drop_matrix", "verification_summary",
        "top_features", "verdicts", "verdicts_by_phase",
    } <= set(entry)  # fmt: skip
    assert set(entry["verdicts"]) == set(CLAIMS)
    assert entry["verdicts_by_phase"]["phase 2"] == {
        CLAIMS[k]: v.verdict for k, v in result.final_verdicts.items()
    }
    assert (result.top_features["rank"] <= 5).all()

    # the final phase traced again through SAEs retrained with the quick preset's other seed
    seeds = result.seeds
    assert seeds.index.tolist() == [0, *config.sae_seeds] and set(CLAIMS.values()) <= set(seeds.columns)
    assert seeds.loc[1, "k50 per emotion"].startswith("anger ")
    assert all(cell.endswith(" of 1") or " of 1 (" in cell for cell in seeds["SAEs missing a goal"])
    assert tracing.seeds_table({"m": result}).index.tolist() == [("m", 0), ("m", 1)]
    for key, verdict in result.final_verdicts.items():
        outcomes = set(seeds[CLAIMS[key]])
        assert verdict.numbers["stable_across_seeds"] == (len(outcomes) == 1)
        if len(outcomes) > 1:
            assert verdict.verdict == "inconclusive" and "seeds disagree" in verdict.reason

    # every phase traced again at the text's positions, on the quick preset's few items per label
    positions = result.positions
    assert positions.index.tolist() == [
        (phase, kind) for phase in result.phases for kind in ("answer position", "text positions")
    ]
    assert (
        positions.xs("text positions", level="positions")["held-out items"].tolist()
        == [config.text_positions_per_label * len(TINY_LABELS)] * 2
    )
    assert positions.loc[("phase 2", "answer position"), CLAIMS["small_set"]] in {
        "holds", "partly", "does not hold", "inconclusive"
    }  # fmt: skip
    assert tracing.positions_table({"m": result}).index.nlevels == 3
    assert set(result.meta["seed_timings_seconds"]) == {"1"}
    assert "ablation_curves" in result.meta["text_positions_timings_seconds"]

    verdicts = result.verdicts()
    assert [v.claim for v in verdicts] == list(CLAIMS) and {v.model for v in verdicts} == {lm.info.name}
    assert all(v.rule.endswith("_verdict") for v in verdicts)
    text = findings_markdown(
        verdicts, CLAIMS, preset="quick", headings=tracing.findings_headings({"m": result})
    )
    assert "Preset `quick`" in text and CLAIMS["small_set"] in text
    row = result.readme_row()
    assert row["final phase"] == "L1-1" and row["k50 per emotion"].startswith("anger ")
    assert set(CLAIMS.values()) <= set(row)

    results = {lm.info.name: result}
    assert tracing.phase_table(results).shape[0] == 2
    assert tracing.facts_table(results).shape[1] == 1
    counts = tracing.regularities(results)
    assert counts["cells"] == 2 * len(TINY_LABELS) and counts["k_max"] == 16
    for view in ("k50_summary", "k50_by_measure", "excess_table", "concentration_table", "verdicts_by_phase"):
        assert len(combined(results, view, by_model=True))
    assert len(tracing.specificity_table(results)) == len(tracing.verification_table(results)) == 1
    assert len(tracing.settings_table(config))

    # the chapter's figures draw, one panel per model
    two = {"a": result, "b": result}
    figures = [
        plots.effect_curves({m: r.effects for m, r in two.items()}),
        plots.k50_intervals({m: r.k50_view() for m, r in two.items()}, result.ks, small_k=2),
        plots.matrix_heatmap({m: r.gold_drop for m, r in two.items()}, "target", "source", "drop"),
        plots.matrix_heatmap({m: r.confusion for m, r in two.items()}, "label", "target", "shift"),
        plots.predicted_vs_measured({m: r.verification for m, r in two.items()}),
    ]
    for figure in figures:
        figure.canvas.draw()
        plt.close(figure)

    # a second run reads the cached result; other phases are another result
    def refuse(*args, **kwargs):
        raise AssertionError("the cached result was rebuilt")

    monkeypatch.setattr(tracing, "cached_study", refuse)
    assert_same_result(run_tracing(lm, config, flow), result)
    with pytest.raises(AssertionError, match="rebuilt"):
        run_tracing(lm, config, {"both": [0, 1]})


def test_an_unreliable_ranking_turns_negative_verdicts_inconclusive():
    """Where attribution does not predict single-feature ablation, "does not hold" may be the ranking's failure."""
    agree = pd.DataFrame({"phase": "p", "predicted": np.arange(8.0), "measured": np.arange(8.0) ** 2})
    disagree = agree.assign(measured=agree["measured"].to_numpy()[::-1])
    negative = Verdict("does not hold", "no emotion has a small set", {"n_small": 0}, "small_set_verdict")
    positive = Verdict("holds", "all emotions do", {"n_small": 3}, "small_set_verdict")
    rho, p_value, n = tracing.ranking_agreement(agree, "p")
    assert rho == pytest.approx(1.0) and p_value < 0.05 and n == 8
    kept = tracing.gated(negative, rho, p_value, n, RULE)
    assert kept.verdict == "does not hold" and kept.numbers["ranking_spearman"] == pytest.approx(1.0)
    unreliable = tracing.ranking_agreement(disagree, "p")
    assert unreliable[0] == pytest.approx(-1.0)
    downgraded = tracing.gated(negative, *unreliable, RULE)
    assert downgraded.verdict == "inconclusive" and "ranking is unreliable" in downgraded.reason
    stands = tracing.gated(positive, *unreliable, RULE)
    assert stands.verdict == "holds" and "ranking is unreliable" in stands.reason
    # too few features to judge the ranking: not reliable either
    assert (
        tracing.gated(negative, *tracing.ranking_agreement(agree.iloc[:2], "p"), RULE).verdict
        == "inconclusive"
    )


def test_the_shuffled_label_ranking_is_a_control_the_planted_feature_does_not_beat(study):
    """The planted feature pushes every item towards joy, whatever its emotion: a ranking built on shuffled labels
    finds it too, so it is a joy-answer feature, not joy-specific knowledge, and with the shuffled-label control
    the small-set rule does not count it."""
    _, result = study
    shuffled_rows = result.curves[result.curves["condition"] == "shuffled"]
    assert set(shuffled_rows["ablation"]) == {"zero"} and len(shuffled_rows)
    versus = top_vs_random(result.curves, n_boot=50)
    against_shuffled = top_vs_random(result.curves, n_boot=50, control="shuffled")
    joy = against_shuffled.set_index(["emotion", "phase", "ablation", "k"]).loc[("joy", "late", "zero", 1)]
    assert abs(joy["excess"]) < 0.05 and not joy["excess_low"] > 0
    with_control = small_set_verdict(result.k50, versus, "late", RULE, against_shuffled)
    assert with_control.verdict == "does not hold" and "shuffled-label" in with_control.reason
    assert small_set_verdict(result.k50, versus, "late", RULE).verdict == "partly"


def test_verdicts_read_mostly_through_failing_saes_are_inconclusive():
    from emolib.verdicts import capped_by_sae

    holds = Verdict("holds", "3 of 5 emotions", {"n_small": 3}, "small_set_verdict")
    assert capped_by_sae(holds, {4: "", 5: ""}) is holds
    assert goals_missed({4: "", 5: ""}) == "0 of 2"
    assert goals_missed({5: "fve", 4: "fve, l0", 6: ""}) == "2 of 3 (L4: fve, l0; L5: fve)"
    some = capped_by_sae(holds, {4: "fve", 5: "", 6: ""})
    assert some.verdict == "holds" and "1 of the 3 layers" in some.reason and "L4: fve" in some.reason
    most = capped_by_sae(holds, {4: "fve", 5: "fve, dead", 6: ""})
    assert most.verdict == "inconclusive" and "uncapped, the rule says holds" in most.reason
    assert most.numbers["layers_missing_sae_goals"] == 2 and most.numbers["n_small"] == 3


def test_a_verdict_that_changes_across_the_cut_range_is_fragile():
    holds = Verdict("holds", "3 of 4 emotions", {"n_small": 3}, "small_set_verdict")
    steady = tracing.fragile_across_cuts(holds, {"final phase from layer 18": holds})
    assert steady.verdict == "holds" and steady.numbers["fragile"] is False
    assert tracing.fragile_across_cuts(holds, {}) is holds  # no interval: nothing to survive
    partly = Verdict("partly", "1 of 4", {"n_small": 1}, "small_set_verdict")
    shaky = tracing.fragile_across_cuts(holds, {"final phase from layer 18": partly, "from 21": holds})
    assert shaky.verdict == "partly" and shaky.numbers["fragile"] is True
    assert "fragile" in shaky.reason and "final phase from layer 18: partly" in shaky.reason
    assert "from 21" not in shaky.reason
    # a negative verdict stays what it is, and says that another cut disagrees
    negative = tracing.fragile_across_cuts(partly, {"final phase from layer 18": holds})
    assert negative.verdict == "partly" and "layer 18: holds" in negative.reason


def test_seeds_and_the_cut_range_both_read_the_rules_own_outcome():
    """A fragile "holds" (read as "partly") on which every seed agrees stays "partly"; a "does not hold" that every
    cut repeats but a seed does not is inconclusive, and not fragile. Comparing each check with what the other
    made of the verdict would get both wrong."""
    holds = Verdict("holds", "3 of 4 emotions", {"n_small": 3}, "small_set_verdict")
    partly = Verdict("partly", "1 of 4", {"n_small": 1}, "small_set_verdict")
    negative = Verdict("does not hold", "0 of 4", {"n_small": 0}, "small_set_verdict")

    def both(verdict: Verdict, spans: dict, seeds: dict) -> Verdict:
        fragile = tracing.fragile_across_cuts(verdict, spans)
        return stable_across_seeds(fragile, seeds, 0, book=verdict.verdict)

    agreed = both(holds, {"from 18": partly}, {1: holds, 2: holds})
    assert agreed.verdict == "partly" and agreed.numbers["stable_across_seeds"] and agreed.numbers["fragile"]
    assert "seed 0: holds" in agreed.numbers["seed_verdicts"]
    wrong_order = tracing.fragile_across_cuts(
        stable_across_seeds(negative, {1: partly}), {"from 18": negative}
    )
    assert wrong_order.numbers["fragile"]  # what reading the moved verdict would have said
    right = both(negative, {"from 18": negative}, {1: partly})
    assert right.verdict == "inconclusive" and not right.numbers["fragile"]
    assert "fragile" not in right.reason and "seeds disagree" in right.reason


def test_cut_range_spans_start_the_final_phase_at_each_other_end_of_its_interval():
    final = FinalPhase(20, 23, "test", first_range=(18, 21))
    assert tracing.cut_range_spans(final) == {
        "final phase from layer 18": (18, 19, 20, 21, 22, 23),
        "final phase from layer 21": (21, 22, 23),
    }
    assert tracing.cut_range_spans(FinalPhase(20, 23, "test", first_range=(20, 20))) == {}
    assert tracing.cut_range_spans(FinalPhase(20, 23, "test")) == {}


def test_run_tracing_traces_the_cut_range(tiny_study):
    """The final phase (layer 1) also traced from layer 0: the spans get ablation curves and verification from the
    same rankings, their verdicts by the same rules sit in a table, and the final verdicts say whether they agree."""
    lm, config, flow = tiny_study
    result = run_tracing(lm, config, flow, cut_range={"final phase from layer 0": [0, 1]})
    table = result.cut_range
    assert table.index.tolist() == ["phase 2", "final phase from layer 0"]
    assert table["chosen"].tolist() == [True, False] and table["layers"].tolist() == ["1-1", "0-1"]
    assert list(table.columns[2:]) == list(CLAIMS.values())
    assert {"cut_range_curves", "cut_range_verify"} <= set(result.meta["timings_seconds"])
    assert result.meta["cut_range"] == {"final phase from layer 0": [0, 1]}
    for key, verdict in result.final_verdicts.items():
        assert "fragile" in verdict.numbers
        differs = table.loc["final phase from layer 0", CLAIMS[key]] != table.loc["phase 2", CLAIMS[key]]
        assert verdict.numbers["fragile"] == differs
    assert set(result.phases) == {"phase 1", "phase 2"}  # the spans are not phases of the chapter's views
    again = TracingResult.from_json(json.loads(json.dumps(result.to_json())))
    pd.testing.assert_frame_equal(again.cut_range, table)
    off = run_tracing(lm, dataclasses.replace(config, cut_range=False), flow, cut_range={"x": [0, 1]})
    assert off.cut_range is None
    assert tracing.cut_range_table({"m": result, "n": off}).index.tolist() == [
        ("m", "phase 2"),
        ("m", "final phase from layer 0"),
    ]
    assert tracing.cut_range_table({"n": off}).empty

"""Tests for chapter 5's study (emolib.studies.generalisation): the label mapping and mapped offsets, the macro-F1
over shared labels, the cell and claim verdicts (with cases where they must fail), and both regimes end to end on a
tiny model, the built-in items as the source and a Crowd-enVENT file the test writes as the target."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_loaded
from matplotlib import pyplot as plt
from test_data import crowd_rows, write_crowd_envent
from test_sae_suite import TINY_SUITE

from emolib import plots
from emolib.lm import baselines
from emolib.methods.steering import draw_bootstrap
from emolib.stats import Estimate
from emolib.studies import generalisation as G
from emolib.studies.flow import DatasetPhases, PhaseCut
from emolib.studies.presets import PRESETS
from emolib.studies.summary import summarise
from emolib.verdicts import Verdict

matplotlib.use("Agg")

SOURCE_LABELS = ("anger", "fear", "joy")
TARGET_LABELS = ("anger", "joy", "sadness")


def test_labels_map_by_name_and_unshared_ones_are_listed():
    mapping = G.label_mapping(SOURCE_LABELS, TARGET_LABELS)
    assert mapping == {"anger": "anger", "joy": "joy", "sadness": None}


def test_mapped_offsets_keep_the_shared_labels_differences():
    offsets = {"anger": 1.0, "fear": -2.0, "joy": 3.0}
    bias = G.mapped_bias(offsets, TARGET_LABELS)
    np.testing.assert_allclose(bias, [1.0, 3.0, 2.0])  # sadness: the mean of the mapped offsets


def test_macro_f1_over_shared_labels_counts_other_answers_as_errors():
    gold = ["a", "a", "b", "b"] * 10
    space = ["a", "b", "(other)"]
    perfect = np.array([[0, 0, 1, 1] * 10])
    half_other = np.array(
        [[0, 2, 1, 2] * 10]
    )  # half of each label's items answered outside the shared labels
    out = draw_bootstrap(gold, {"p": perfect, "h": half_other}, space, averaged=[0, 1], n_boot=50)
    np.testing.assert_allclose(out["p"], 1.0)
    assert out["h"].mean() < 0.8
    # every label in the average: the never-gold "other" would pull a perfect answer below 1
    assert draw_bootstrap(gold, {"p": perfect}, space, n_boot=50)["p"].mean() < 0.7


def test_overlap_counts_shared_features_against_a_hypergeometric_null():
    def result(causal: dict, random: dict, active: dict, labels=("anger", "joy")):
        features = [{e: {"causal": causal[e], "random": random[e], "active": active[e]} for e in labels}]
        return SimpleNamespace(labels=labels, transfer_features=lambda: features)

    same = {"anger": {5: [1, 2, 3, 4]}, "joy": {5: [10, 11, 12, 13]}}
    other = {"anger": {5: [50, 51, 52, 53]}, "joy": {5: [60, 61, 62, 63]}}
    active = {e: {5: list(range(200))} for e in ("anger", "joy")}
    table_ = G.feature_overlap(result(same, other, active), result(same, other, active))
    assert (table_["jaccard"] == 1.0).all() and (table_["jaccard_matched_random"] == 0.0).all()
    assert (table_["overlap_first_draw"] == 4).all() and (table_["p_value"] < 1e-6).all()
    assert table_["overlap_null_expected"].iloc[0] == pytest.approx(4 * 4 / 200)
    disjoint = G.feature_overlap(result(same, other, active), result(other, same, active))
    assert (disjoint["jaccard"] == 0.0).all() and (disjoint["p_value"] == 1.0).all()


def cell(verdict: str) -> Verdict:
    return Verdict(verdict, "test", {"gain_over_zero_shot": 0.1, "baselines_beaten": 1, "baselines": 2})


def claims_for(cells: dict, models=("m1", "m2"), datasets=("meld", "carer_emotion")):
    default = G.GeneralisationConfig()
    source = dataclasses.replace(
        default.source, items=dataclasses.replace(default.source.items, dataset="isear")
    )
    config = dataclasses.replace(default, source=source, datasets=datasets)
    results = {m: None for m in models}
    return G.claim_verdicts(results, cells, config)


def test_across_datasets_needs_most_cells_and_counts_missing_ones_against():
    held = {
        (m, d, "in-domain"): cell("holds") for m in ("m1", "m2") for d in ("isear", "meld", "carer_emotion")
    }
    out = claims_for(held)
    assert out["across_datasets/m1"].verdict == "holds" and out["across_models/m2"].verdict == "holds"
    # m2 holds on one of three datasets and beats zero-shot on another: partly; across models fails with it
    mixed = dict(held)
    mixed[("m2", "meld", "in-domain")] = cell("partly")
    mixed[("m2", "carer_emotion", "in-domain")] = cell("does not hold")
    out = claims_for(mixed)
    assert out["across_datasets/m2"].verdict == "partly"
    assert out["across_models/m1"].verdict == "partly" and out["across_models/m2"].verdict == "partly"
    # a dataset not run counts as not holding: two of three is still most, one of three is not
    missing = {k: v for k, v in held.items() if k[1] != "carer_emotion"}
    assert claims_for(missing)["across_datasets/m1"].verdict == "holds"
    only_source = {k: v for k, v in held.items() if k[1] == "isear"}
    out = claims_for(only_source)
    assert out["across_datasets/m1"].verdict == "partly" and "not run" in out["across_datasets/m1"].reason
    nothing = {k: cell("does not hold") for k in held}
    assert claims_for(nothing)["across_models/m1"].verdict == "does not hold"
    # cells that could not be read (SAE cap) or were not run: the claim can neither hold nor be refuted
    unread = {k: cell("inconclusive") for k in held if k[1] != "meld"}
    out = claims_for(unread)
    assert (
        out["across_datasets/m1"].verdict == "inconclusive"
        and out["across_models/m1"].verdict == "inconclusive"
    )


def test_a_cell_holds_only_when_every_baseline_is_beaten_within_the_tolerance():
    versus = pd.DataFrame({"versus": ["zero-shot", "bias"], "difference": [0.1, 0.05]})
    beat = {"zero-shot": 0.01, "bias": 0.01}
    args = ("m", "meld", "cross", versus)
    assert G._cell_verdict(*args, beat, 0.0, 0.02, 0.05, {}).verdict == "holds"
    assert G._cell_verdict(*args, beat, 0.05, 0.02, 0.05, {}).verdict == "partly"  # over the tolerance
    assert G._cell_verdict(*args, {**beat, "bias": 0.2}, 0.0, 0.02, 0.05, {}).verdict == "partly"
    assert G._cell_verdict(*args, {**beat, "bias": None}, 0.0, 0.02, 0.05, {}).verdict == "partly"  # not run
    assert G._cell_verdict(*args, {**beat, "zero-shot": 0.5}, 0.0, 0.02, 0.05, {}).verdict == "does not hold"
    flags = {1: "FVE", 2: "FVE"}
    assert G._cell_verdict(*args, beat, 0.0, 0.02, 0.05, flags).verdict == "inconclusive"


@pytest.fixture
def tiny_generalisation(tiny_model, tiny_tokenizer, tmp_cache, tmp_path, monkeypatch):
    """(model, config): the quick preset's chapter 5 on the tiny model, built-in items (three labels) as the
    source and a written Crowd-enVENT file (three labels, one without a counterpart) as the target."""
    monkeypatch.setenv(
        "EMOLIB_DATA_DIR", str(write_crowd_envent(tmp_path / "data", crowd_rows(per_label=60)))
    )
    labels = {"builtin": SOURCE_LABELS, "crowd_envent": TARGET_LABELS}
    monkeypatch.setattr(baselines, "run_labels", lambda dataset, label_set: labels[dataset])
    lm = tiny_loaded(tiny_model, tiny_tokenizer, name="tiny-transfer", chat=True)
    quick = PRESETS["quick"].generalisation
    source = dataclasses.replace(
        quick.source,
        preset="test",
        items=dataclasses.replace(quick.source.items, dataset="builtin"),
        saes=TINY_SUITE,
        n_phases=2,
        progress=False,
    )
    steering = dataclasses.replace(quick.steering, saes=TINY_SUITE, n_phases=2, progress=False)
    config = dataclasses.replace(
        quick,
        preset="test",
        source=source,
        steering=steering,
        datasets=("crowd_envent", "goemotions"),
        phase_datasets=("crowd_envent", "goemotions"),
    )
    return lm, config


def planted_phases(dataset: str, boundaries: tuple[tuple[int, int, int], ...] = ((4, 3, 5), (9, 8, 10))):
    """A `DatasetPhases` of twelve layers with the given three-phase boundaries (value, low, high)."""
    (a, *_), (b, *_) = boundaries
    cut = PhaseCut(
        phases=((0, a - 1), (a, b - 1), (b, 11)), intervals=tuple(Estimate(*e) for e in boundaries)
    )
    test = pd.DataFrame({"cost": [3.0, 1.0], "r2": [0.0, 0.6]}, index=pd.Index([1, 3], name="n_phases"))
    return DatasetPhases("m", dataset, 60, ("anger", "joy"), 0.5, test, 3, 0.4, cut, 1.0)


def test_both_regimes_run_and_the_verdicts_reach_the_summary(tiny_generalisation, tmp_path, monkeypatch):
    lm, config = tiny_generalisation
    # chapter 1's phase analysis needs six layers or more (the tiny model has two): its own test covers it
    # (test_flow_study), here a planted one shows what the chapter does with it
    asked = []
    monkeypatch.setattr(
        G, "dataset_phases", lambda lm, dataset, flow: asked.append(flow) or planted_phases(dataset)
    )
    result = G.run_generalisation(lm, config, {"early": [0], "late": [1]})
    assert set(result.phases) == {"crowd_envent"} and asked == [config.flow]  # goemotions is absent here
    phases = G.phase_verdicts({"tiny-transfer": result}, {}, config)
    assert [v.verdict for v in phases.values()] == ["inconclusive", "inconclusive"]
    assert {k[1]: v.reason for k, v in phases.items()} == {
        "crowd_envent": "crowd_envent: not measured (chapter 1 has no cut)",
        "goemotions": "goemotions: not measured (goemotions is not available here)",
    }
    assert set(result.in_domain) == {"builtin", "crowd_envent"} and set(result.cross) == {"crowd_envent"}
    assert result.meta["datasets_missing"] == ["goemotions"]  # asked for, absent here
    transfer = result.cross["crowd_envent"]
    assert transfer.shared == ("anger", "joy") and transfer.mapping["sadness"] is None
    assert set(transfer.summary["method"]) == set(G.CROSS_METHODS)
    assert set(transfer.recall["emotion"]) == set(TARGET_LABELS)  # the unshared label's recall is reported
    assert transfer.n_shared_items == 2 * config.steering.test_per_label
    assert transfer.n_items == 3 * config.steering.test_per_label
    # the in-domain target run excludes nothing (chapters 1-3 never read it) and answers among its own labels
    assert result.in_domain["crowd_envent"].facts["items of chapters 1-3 excluded"] == 0
    assert result.in_domain["crowd_envent"].labels == TARGET_LABELS
    again = G.GeneralisationResult.from_json(json.loads(json.dumps(result.to_json())))
    pd.testing.assert_frame_equal(again.cross["crowd_envent"].summary, transfer.summary)
    assert again.phases["crowd_envent"].cut == result.phases["crowd_envent"].cut
    headroom = result.headroom()
    assert list(headroom.index) == ["builtin", "crowd_envent"] and headroom["chance"].iloc[
        0
    ] == pytest.approx(1 / 3)

    results = {"tiny-transfer": result}
    cells = G.cell_verdicts(results, config)
    assert set(cells) == {
        ("tiny-transfer", "builtin", "in-domain"),
        ("tiny-transfer", "crowd_envent", "in-domain"),
        ("tiny-transfer", "crowd_envent", "cross"),
    }
    claims = G.claim_verdicts(results, cells, config)
    # no WikiText here: no perplexity, so no cell can hold; goemotions was not run and counts against
    assert claims["across_datasets/tiny-transfer"].verdict != "holds"
    assert "goemotions" in claims["across_datasets/tiny-transfer"].reason
    for view in (G.headroom_table, G.mapping_table, G.timings_table):
        assert len(view(results))
    assert len(G.regime_table(results, "in-domain")) == 2 and len(G.regime_table(results, "cross")) == 1
    assert len(G.verdict_table(cells)) == 3 and len(G.transfer_notes(cells)["tiny-transfer"]) == 1
    # the mechanisms: the source's causal and matched random features zeroed on every shared emotion's items,
    # and the overlap of the sets found on each dataset
    assert set(transfer.ablation["emotion"]) == {"anger", "joy"}
    assert set(transfer.ablation_pooled) == {"excess", "low", "high", "p_value"}
    overlap = result.overlap["crowd_envent"]
    assert set(overlap["emotion"]) == {"anger", "joy"} and overlap["jaccard"].between(0, 1).all()
    assert (overlap["overlap_first_draw"] <= overlap["k"]).all() and overlap["p_value"].between(0, 1).all()
    mechanisms = G.mechanism_verdicts(results, config)
    assert set(mechanisms) == {
        ("tiny-transfer", "crowd_envent", "mechanism"),
        ("tiny-transfer", "crowd_envent", "overlap"),
    }
    assert len(G.transfer_notes(mechanisms)["tiny-transfer"]) == 2
    assert len(G.ablation_table(results)) == 2 and len(G.overlap_table(results)) == 2
    for regime in ("in-domain", "cross"):
        figure = plots.transfer_panels(G.regime_summaries(results, regime), regime)
        figure.canvas.draw()
        plt.close(figure)

    # the summary page reads the claims from the chapter's results file
    from emolib.studies.base import write_study_results

    monkeypatch.setenv("EMOLIB_BUILD_DIR", str(tmp_path / "build"))
    write_study_results(
        "generalisation",
        results,
        preset="test",
        config=config,
        extra={"verdicts": {k: v.as_dict() for k, v in claims.items()}},
    )
    rows = summarise(["tiny-transfer"], "test", results_dir=tmp_path / "build" / "results").rows.set_index(
        "claim"
    )
    across = rows.loc["The gains hold across datasets"]
    assert across["verdict"] == claims["across_datasets/tiny-transfer"].verdict
    assert "datasets hold" in across["evidence"]


def test_mechanism_verdicts_fail_without_an_excess_over_random_features():
    def result(p_value: float, emotions_above: int):
        transfer = SimpleNamespace(
            ablation_pooled={"excess": 0.1, "low": 0.0, "high": 0.2, "p_value": p_value}
        )
        overlap = pd.DataFrame(
            {
                "emotion": ["anger", "joy", "fear"],
                "jaccard": [0.5, 0.1, 0.1],
                "jaccard_matched_random": [0.0, 0.0, 0.0],
                "p_value": [1e-4] * emotions_above + [0.9] * (3 - emotions_above),
            }
        )
        return SimpleNamespace(
            source="isear", in_domain={}, cross={"meld": transfer}, overlap={"meld": overlap}
        )

    config = G.GeneralisationConfig()
    strong = G.mechanism_verdicts({"m": result(0.001, 3)}, config)
    assert strong[("m", "meld", "mechanism")].verdict == "holds"
    assert strong[("m", "meld", "overlap")].verdict == "holds"
    weak = G.mechanism_verdicts({"m": result(0.3, 1)}, config)
    assert weak[("m", "meld", "mechanism")].verdict == "does not hold"
    assert weak[("m", "meld", "overlap")].verdict == "partly"
    # Holm across cells: two cells at p = 0.03 each pass alone, not after correction
    pair = G.mechanism_verdicts({"a": result(0.03, 0), "b": result(0.03, 0)}, config)
    assert {v.verdict for k, v in pair.items() if k[2] == "mechanism"} == {"does not hold"}
    assert {v.verdict for k, v in pair.items() if k[2] == "overlap"} == {"does not hold"}


def test_phase_verdicts_compare_chapter_1s_cut_with_each_datasets():
    """The source's boundaries against each phase dataset's, with the phase-count test's choices in the reason;
    a table row per dataset with chapter 1's first."""
    source = planted_phases("isear")
    chapter1 = SimpleNamespace(
        n_items=280, chosen=2, trend_r2=0.9, test=source.test, cut=lambda n: source.cut
    )
    flows = {"m": SimpleNamespace(subset=lambda name: chapter1, facts={"model accuracy": 0.4})}
    config = dataclasses.replace(G.GeneralisationConfig(), phase_datasets=("meld", "carer_emotion"))
    results = {
        "m": SimpleNamespace(
            source="isear",
            phases={
                "meld": planted_phases("meld", ((5, 4, 6), (9, 9, 10))),
                "carer_emotion": planted_phases("carer_emotion", ((7, 6, 8), (11, 11, 11))),
            },
        )
    }
    verdicts = G.phase_verdicts(results, flows, config)
    assert verdicts[("m", "meld", "phases")].verdict == "holds"
    moved = verdicts[("m", "carer_emotion", "phases")]
    assert moved.verdict == "does not hold" and moved.numbers["differ"] == 2
    assert "picks 2 phases on isear and 3 phases on carer_emotion" in moved.reason
    assert moved.claim == "phases" and moved.scope == "carer_emotion"
    assert len(G.transfer_notes(verdicts)["m"]) == 2
    rows = G.phases_table(results, flows)
    assert list(rows.index.get_level_values("dataset")) == ["isear", "meld", "carer_emotion"]
    assert rows.loc[("m", "carer_emotion"), "three-phase boundaries [95% CI]"] == "7 [6, 8], 11 [11, 11]"

"""The features study (emolib.studies.features) end to end on a tiny model in the quick preset, its JSON round trip
and cache, and known values of what it computes and shows (the overlap with general emotional features, the top
features, the table views, the verdict rules' middle cases)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_loaded
from test_features import D_SAE, DEAD, EMOTIONS, EXPECTED, GENERAL, planted

from emolib.methods import selectivity
from emolib.studies import features
from emolib.studies.features import (
    CLAIMS,
    Coactivation,
    FeaturesResult,
    diffuse_verdict,
    mix_verdict,
    run_features,
)
from emolib.studies.presets import PRESETS
from emolib.verdicts import Verdict, findings_markdown, stable_across_seeds

CONFIG = PRESETS["quick"].features
PHASE = (1, 1)  # the tiny model's last layer (it has two)


@pytest.fixture(scope="module")
def study(tiny_model, tiny_tokenizer, tmp_path_factory):
    """The quick study on the tiny model with the built-in dataset, in a fresh cache: (model, cache, result)."""
    cache = tmp_path_factory.mktemp("features-cache")
    lm = tiny_loaded(tiny_model, tiny_tokenizer, name="tiny-features", chat=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMOLIB_CACHE_DIR", str(cache))
        patch.delenv("EMOLIB_DATA_DIR", raising=False)
        yield lm, cache, run_features(lm, CONFIG, PHASE)


@pytest.fixture
def same_cache(study, monkeypatch):
    _, cache, _ = study
    monkeypatch.setenv("EMOLIB_CACHE_DIR", str(cache))
    monkeypatch.delenv("EMOLIB_DATA_DIR", raising=False)


def assert_same(a: FeaturesResult, b: FeaturesResult) -> None:
    """Every table, verdict and number of two results equal."""
    for f in dataclasses.fields(FeaturesResult):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, pd.DataFrame):
            pd.testing.assert_frame_equal(x, y, check_dtype=False)
            assert x.attrs == y.attrs, f.name
        elif f.name == "versus":
            assert list(x) == list(y)
            for m in x:
                pd.testing.assert_frame_equal(x[m], y[m], check_dtype=False)
        elif f.name == "coactivation":
            assert list(x) == list(y)
            for kind in x:
                pd.testing.assert_frame_equal(x[kind].matrix, y[kind].matrix, check_dtype=False)
                pd.testing.assert_frame_equal(x[kind].table, y[kind].table, check_dtype=False)
        elif f.name == "general_emotional":
            pd.testing.assert_frame_equal(x, y, check_dtype=False)
        else:
            assert x == y, f.name


def test_the_study_runs_on_the_tiny_model(study):
    lm, _, result = study
    assert (
        result.model == "tiny-features" and result.dataset == "builtin" and result.second_dataset == "builtin"
    )
    assert result.labels == list(EMOTIONS) and result.n_items == 2 * 6 * len(EMOTIONS)
    assert (result.final_phase.first, result.final_phase.last) == PHASE
    assert result.final_phase.source == features.PARAMETER_SOURCE
    assert result.per_layer["layer"].tolist() == list(range(lm.info.n_layers))
    assert result.n_features_pooled == lm.info.d_model * CONFIG.saes.training.expansion_factor
    assert list(result.verdicts_by_claim) == list(CLAIMS)
    rules = [v.rule for v in result.verdicts()]
    assert rules == ["mix_verdict", "diffuse_verdict", "coactivation_verdict"]
    assert all(v.model == result.model for v in result.verdicts())
    assert set(result.coactivation) == {"all", "specific"}
    assert list(result.coactivation["all"].matrix.index) == [e for e in EMOTIONS if e != "neutral"]
    assert list(result.versus) == list(CONFIG.measures)
    assert len(result.feature_cards) == 2 * len(EMOTIONS)
    replication = result.replication_table()
    assert list(replication.index) == [*EMOTIONS, "all"]
    assert set(replication.columns) == {"selected", "replicated", "rate", "chance_rate"}
    assert (replication["replicated"] <= replication["selected"]).all()
    # the mix verdict reads the emotion-set rule's totals, and the set sizes add up to them
    sets, mix = result.counts_sets, result.verdicts_by_claim["shared_and_specific"]
    assert mix.numbers["n_shared"] == sets.loc["any", ("n_shared", "observed")]
    assert mix.numbers["n_specific"] == sets.loc["any", ("n_specific", "observed")]
    sizes = result.set_size_table()
    assert sizes["observed"].sum() == sets.loc["any", ("n_selective", "observed")]
    assert sizes.loc[("tiny-features", 1), "observed"] == mix.numbers["n_specific"]
    assert not result.bootstrap_table("sets").empty
    # quick preset: 19 shuffles, the fewest that can give p <= 0.05, so the mix rule decides
    assert "cannot give" not in result.verdicts_by_claim["shared_and_specific"].reason


def test_one_layer_pooled_is_that_layer_on_its_own(study):
    """Pooling drops only untested features, so the final phase of one layer counts what that layer counts."""
    _, _, result = study
    layer = result.per_layer.set_index("layer").loc[PHASE[0]]
    full = result.counts_full.loc["any"]
    assert full[("n_selective", "observed")] == layer["any"]
    assert full[("n_specific", "observed")] == layer["specific"]
    assert full[("n_shared", "observed")] == layer["shared"]


def test_the_general_overlap_is_computed_from_the_counts(study):
    _, _, result = study
    overlap = result.general_overlap
    full = result.counts_full.loc["any"]
    assert overlap["n_shared"] == full[("n_shared", "observed")]
    assert overlap["n_specific"] == full[("n_specific", "observed")]
    assert overlap["n_emotional"] == result.general_emotional.loc["emotional", "observed"]
    assert overlap["tested_both"] <= result.n_features_tested
    expected = overlap["n_shared"] * overlap["n_emotional"] / max(overlap["tested_both"], 1)
    assert overlap["shared_expected"] == pytest.approx(expected)


def test_json_round_trip(study):
    _, _, result = study
    again = FeaturesResult.from_json(json.loads(json.dumps(result.to_json())))
    assert_same(result, again)
    assert json.dumps(again.to_json()) == json.dumps(result.to_json())


def test_the_results_entry_keeps_the_old_keys(study):
    _, _, result = study
    entry = result.to_json()
    old = [
        "dataset",
        "labels",
        "n_items",
        "final_phase",
        "sae_flags",
        "n_features_pooled",
        "n_features_tested",
        "per_layer",
        "counts_full_rule",
        "counts_bootstrap",
        "counts_bootstrap_null",
        "diffuseness",
        "disgust_versus_others",
        "second_dataset",
        "general_emotional",
        "coactivation",
        "feature_cards",
        "verdicts",
    ]
    assert list(entry)[: len(old)] == old
    assert set(entry["final_phase"]) == {"first", "last", "source", "n_phases", "chosen", "first_range"}
    assert set(entry["per_layer"][0]) == {
        "index",
        "layer",
        "any",
        "specific",
        "shared",
        "null_mean",
        "null_q95",
    }
    assert "n_specific.null_q95" in entry["counts_full_rule"][0]
    assert set(entry["coactivation"]["all"]) == {"matrix", "table"}
    assert list(entry["verdicts"]) == list(CLAIMS)
    config = features.results_config(CONFIG)
    for key in ("n_shuffles", "n_boot", "layer_shuffles", "card_texts", "card_tokens", "seed"):
        assert config[key] == getattr(CONFIG, key)
    assert config["held_out_selectivity"]["min_items"] == 5 and config["bootstrap"]["n_boot"] == 50
    assert config["final_phase_layers"] is None and config["definition"] == features.DEFINITION


def test_a_second_run_reuses_the_cache(study, same_cache, monkeypatch):
    lm, cache, result = study

    def refuse(*args, **kwargs):
        raise AssertionError("the cached study was recomputed")

    monkeypatch.setattr(features, "_features", refuse)
    assert_same(run_features(lm, CONFIG, PHASE), result)
    assert len(list((cache / "studies" / "features").iterdir())) == 1
    with pytest.raises(AssertionError, match="recomputed"):
        run_features(lm, dataclasses.replace(CONFIG, n_shuffles=20), PHASE)
    with pytest.raises(AssertionError, match="recomputed"):
        run_features(lm, CONFIG, (0, 1))


def test_views_and_findings(study):
    _, _, result = study
    overview = result.overview()
    assert overview.loc["tiny-features", "final phase (layers)"] == "1-1"
    assert overview.loc["tiny-features", "phases in the cut / preferred by the flow test"] == "None / None"
    for view in (
        result.layer_summary,
        result.counts_table,
        result.bootstrap_table,
        result.general_table,
        result.diffuseness_table,
        result.versus_table,
        result.coactivation_table,
        result.cards_table,
    ):
        assert not view().empty, view.__name__
    text = findings_markdown(
        result.verdicts(), CLAIMS, preset="quick", headings={result.model: result.heading()}
    )
    assert text.startswith("**tiny-features** (final phase: layers 1-1; ")
    assert "These verdicts are not evidence" in text
    row = result.readme_row()
    assert list(row) == [
        "Features (ch. 2)",
        "final phase",
        "specific (null q95)",
        "shared (null q95)",
        *CLAIMS.values(),
    ]
    assert row["final phase"] == "L1-1"


# ------------------------------------------------------------------------- known values of the moved analysis


def known_result(study) -> FeaturesResult:
    """The tiny result with hand-made tables in place of the computed ones."""
    _, _, result = study
    per_layer = pd.DataFrame(
        {
            "layer": [0, 1, 2, 3],
            "any": [1, 4, 9, 7],
            "specific": [1, 2, 5, 4],
            "shared": [0, 2, 4, 3],
            "null_mean": [0.5, 1.0, 2.0, 2.0],
            "null_q95": [2.0, 3.0, 3.0, 8.0],
        }
    )
    columns = pd.MultiIndex.from_product(
        [("n_selective", "n_specific", "n_shared"), ("observed", "null_mean", "null_q95", "p_value")],
        names=["measure", "statistic"],
    )
    full = pd.DataFrame(
        [[12, 3.25, 7.6, 0.05, 8, 2.0, 4.4, 0.1, 4, 1.0, 2.5, 0.5]],
        index=pd.Index(["any"], name="emotion"),
        columns=columns,
    )
    sets = full.copy()
    sets[("n_shared", "observed")] = 9
    return dataclasses.replace(
        result,
        per_layer=per_layer,
        counts_full=full,
        counts_sets=sets,
        final_phase=features.FinalPhase(2, 3, "test", 3, 2),
    )


def test_layer_summary_and_readme_row_on_known_tables(study):
    result = known_result(study)
    summary = result.layer_summary().iloc[0]
    assert summary["selective per layer, final phase (mean)"] == 8.0
    assert summary["selective per layer, earlier layers (mean)"] == 2.5
    assert summary["layers above the null's 95th pct, final phase"] == "1 of 2"
    assert summary["layers above the null's 95th pct, earlier"] == "1 of 2"
    assert summary["layer with most selective features"] == 2
    row = result.readme_row()  # the totals the verdict reads: the emotion-set rule's
    assert (row["final phase"], row["specific (null q95)"], row["shared (null q95)"]) == (
        "L2-3",
        "8 (4)",
        "9 (2)",
    )
    older = dataclasses.replace(result, counts_sets=None).readme_row()  # a results file from before it
    assert older["shared (null q95)"] == "4 (2)"
    assert dataclasses.replace(result, counts_sets=None).counts_table("sets").empty
    counts = result.counts_table().loc[("tiny-features", "any")]
    assert counts["selective"] == "12 (null 3.2, q95 8; p = 0.050)"
    assert result.counts_table("sets").loc[("tiny-features", "any"), "shared"].startswith("9 (null 1.0")
    assert result.overview().iloc[0]["phases in the cut / preferred by the flow test"] == "3 / 2"


@pytest.fixture(scope="module")
def planted_sel():
    codes, labels = planted()
    pooled = selectivity.pool_layers({3: codes[:, :100], 4: codes[:, 100:]})
    return pooled, selectivity.selectivity(pooled.codes, labels, EMOTIONS), labels


def test_general_overlap_on_planted_features(planted_sel):
    pooled, sel, labels = planted_sel
    general = selectivity.emotional_vs_neutral(pooled.codes, labels)
    assert general.sets()["emotional"] == set(GENERAL)  # columns = features of layer 3 (kept in order)
    overlap = features._general_overlap(general, pooled, sel, pooled)
    n_shared = len({f for e in EXPECTED for f in EXPECTED[e] if sum(f in s for s in EXPECTED.values()) > 1})
    n_specific = len(set().union(*EXPECTED.values())) - n_shared
    tested = D_SAE - len(DEAD)
    assert overlap == {
        "n_emotional": len(GENERAL),
        "tested_both": tested,
        "shared_among": 0,
        "n_shared": n_shared,
        "shared_expected": pytest.approx(n_shared * len(GENERAL) / tested),
        "specific_among": 0,
        "n_specific": n_specific,
        "specific_expected": pytest.approx(n_specific * len(GENERAL) / tested),
    }
    # a second set that tested only layer 3's features
    layer3 = selectivity.pool_layers({3: planted()[0][:, :100]})
    general3 = selectivity.emotional_vs_neutral(layer3.codes, labels)
    assert features._general_overlap(general3, layer3, sel, pooled)["tested_both"] == 100


def test_top_features_on_planted_features(planted_sel):
    pooled, sel, _ = planted_sel
    top = features._top_features(sel, pooled, 2)
    assert top["emotion"].tolist() == [e for e in EMOTIONS for _ in range(2)]
    assert top["feature"].str.match(r"L[34]/\d+").all()
    anger = top[top["emotion"] == "anger"]
    assert (anger["auroc"].diff().dropna() <= 0).all()
    shared = {f"L3/{f}" for f in range(24, 30)}
    assert all(n == (2 if f in shared else 1) for f, n in zip(top["feature"], top["emotions"], strict=True))
    nothing = dataclasses.replace(sel, selective=np.zeros_like(sel.selective))
    assert features._top_features(nothing, pooled, 2).empty


def test_selective_counts_of_one_layer(planted_sel):
    pooled, sel, labels = planted_sel
    counts = features._selective_counts(pooled.codes, np.array(labels), list(EMOTIONS), sel.config, 3, 0)
    assert (counts["any"], counts["specific"], counts["shared"]) == (
        sel.counts()["any"],
        sel.counts()["specific"],
        sel.counts()["shared"],
    )
    assert counts["null_q95"] < 3 and counts["null_mean"] <= counts["null_q95"]


# ------------------------------------------------------------------------------- verdict rules: middle cases


def mix_tables(p_specific: float, p_shared: float, both: int) -> tuple[pd.DataFrame, ...]:
    """Full-rule totals with their p-values; four emotions, the first `both` with both kinds beyond the null."""
    emotions = ["a", "b", "c", "d"]
    full = pd.DataFrame(
        {
            ("n_specific", "observed"): [9],
            ("n_specific", "p_value"): [p_specific],
            ("n_shared", "observed"): [5],
            ("n_shared", "p_value"): [p_shared],
        },
        index=["any"],
    )
    low = [3.0 if i < both else 0.0 for i in range(len(emotions))]
    boot = pd.DataFrame({"n_specific_low": low + [0], "n_shared_low": low + [0]}, index=[*emotions, "any"])
    null = pd.DataFrame(
        {("n_specific", "null_q95"): [1.0] * 5, ("n_shared", "null_q95"): [1.0] * 5}, index=[*emotions, "any"]
    )
    return full, boot, null


def test_mix_verdict_middle_cases():
    assert mix_verdict(*mix_tables(0.05, 0.05, 2), 19).verdict == "holds"
    fewer = mix_verdict(*mix_tables(0.05, 0.05, 1), 19)
    assert fewer.verdict == "partly" and "1 of 4 emotions have both beyond the null (a)" in fewer.reason
    one_total = mix_verdict(*mix_tables(0.05, 0.5, 4), 19)
    assert one_total.verdict == "partly" and one_total.numbers["p_shared"] == 0.5
    neither = mix_verdict(*mix_tables(0.1, 0.5, 4), 19)
    assert neither.verdict == "does not hold" and "neither total beats shuffled labels" in neither.reason
    # the README's case before this rule: specific features beyond the null, none shared -> not "partly"
    full, boot, null = mix_tables(0.05, 0.5, 0)
    full.loc["any", ("n_shared", "observed")] = 0
    none_shared = mix_verdict(full, boot, null, 19)
    assert none_shared.verdict == "does not hold" and "no shared feature at all" in none_shared.reason
    few = mix_verdict(*mix_tables(0.05, 0.05, 4), 18)
    assert few.verdict == "inconclusive" and few.numbers["smallest_p"] == pytest.approx(1 / 19)


def comparison(low: float, high: float) -> pd.DataFrame:
    return pd.DataFrame(
        {"difference": [(low + high) / 2], "low": [low], "high": [high], "share_more": [0.5]},
        index=["others (mean)"],
    )


def test_diffuse_verdict_middle_cases():
    some = diffuse_verdict({"k50": comparison(0.5, 2.0), "k80": comparison(-1.0, 1.0)}, 5)
    assert some.verdict == "partly" and some.reason == (
        "disgust minus the others' mean: k50 +1.25 [+0.5, +2]; k80 +0 [-1, +1]"
    )
    assert diffuse_verdict({"k50": comparison(-1.0, 1.0)}, 5).verdict == "inconclusive"
    below = diffuse_verdict({"k50": comparison(-2.0, -1.0), "k80": comparison(-1.0, 1.0)}, 5)
    assert below.verdict == "does not hold" and below.numbers["k50_high"] == -1.0


def test_findings_name_a_disagreement(study):
    _, _, result = study
    no = Verdict("does not hold", "reason", rule="mix_verdict")
    changed = dataclasses.replace(
        result, verdicts_by_claim={**result.verdicts_by_claim, "shared_and_specific": no}
    )
    text = findings_markdown(changed.verdicts(), CLAIMS, preset="full")
    assert "Where the data disagree with the paper: Shared and specific features" in text
    assert isinstance(result.coactivation["all"], Coactivation)


def test_the_final_phase_is_rerun_at_the_ends_of_its_cut_range(study, same_cache):
    """A final phase from chapter 1 carries its first layer's bootstrap interval; the study recounts the totals
    with the phase starting at each end, and the mix verdict says so when that changes the finding."""
    lm, _, _ = study
    phase = features.FinalPhase(1, 1, "test", first_range=(0, 1))
    assert phase.alternatives() == [0]
    assert features.FinalPhase.from_json(json.loads(json.dumps(phase.to_json()))) == phase
    result = run_features(lm, CONFIG, phase)
    table = result.cut_range_table()
    assert table.index.tolist() == [0, 1] and table["chosen"].tolist() == [False, True]
    assert {"n_specific", "p_specific", "n_shared", "p_shared"} <= set(table.columns)
    assert {"one-vs-rest n_specific", "one-vs-rest p_shared"} <= set(table.columns)
    again = FeaturesResult.from_json(json.loads(json.dumps(result.to_json())))
    pd.testing.assert_frame_equal(again.cut_range_table(), table, check_dtype=False)


def test_a_mix_that_holds_for_one_cut_only_is_fragile():
    holds = Verdict("holds", "both totals beat the null", {"n_specific": 5}, "mix_verdict")
    steady = pd.DataFrame(
        {"chosen": [False, True], "p_specific": [0.01, 0.02], "p_shared": [0.03, 0.01]},
        index=pd.Index([20, 23], name="first layer"),
    )
    assert features.fragile_if_cut_matters(holds, steady).verdict == "holds"
    assert features.fragile_if_cut_matters(holds, steady).numbers["fragile"] is False
    shaky = steady.assign(p_shared=[0.40, 0.01])
    fragile = features.fragile_if_cut_matters(holds, shaky)
    assert (
        fragile.verdict == "partly" and "fragile" in fragile.reason and "layer 20: not both" in fragile.reason
    )
    assert features.fragile_if_cut_matters(holds, None) is holds


# ------------------------------------------------------------------------------------------------ SAE seeds


def test_a_verdict_the_seeds_disagree_on_is_inconclusive():
    holds = Verdict("holds", "both kinds beat the null", {"n_shared": 4}, "mix_verdict")
    assert stable_across_seeds(holds, {}) is holds
    steady = stable_across_seeds(holds, {1: holds, 2: holds})
    assert steady.verdict == "holds" and steady.numbers["stable_across_seeds"] is True
    assert steady.numbers["seed_verdicts"] == "seed 0: holds; seed 1: holds; seed 2: holds"
    partly = Verdict("partly", "one total", {}, "mix_verdict")
    shaky = stable_across_seeds(holds, {1: holds, 2: partly})
    assert shaky.verdict == "inconclusive" and shaky.numbers["stable_across_seeds"] is False
    assert shaky.reason.startswith(
        "SAE training seeds disagree (seed 0: holds; seed 1: holds; seed 2: partly)"
    )
    assert shaky.reason.endswith("both kinds beat the null") and shaky.numbers["n_shared"] == 4
    # a negative verdict the seeds disagree on is no firmer
    assert stable_across_seeds(partly, {1: holds}).verdict == "inconclusive"


class Decoder:
    """Stands for an SAE where only its decoder is read."""

    def __init__(self, w_dec: np.ndarray) -> None:
        self.W_dec = torch.from_numpy(w_dec)


def analysed(codes: np.ndarray, labels: list[str]) -> features._PhaseAnalysis:
    """A `_PhaseAnalysis` holding only what `_seed_row` reads: the pooled codes of one layer (3), selectivity."""
    pooled = selectivity.pool_layers({3: codes})
    sel = selectivity.selectivity(pooled.codes, labels, EMOTIONS)
    return features._PhaseAnalysis(pooled, sel, *([None] * 11))


def test_the_seed_row_finds_features_again_by_decoder_direction():
    """A 'retrained' SAE whose features are the book SAE's in another order (directions slightly perturbed) finds
    every emotion-set feature again with its role; one with fresh random directions finds none."""
    codes, labels = planted()
    rng = np.random.default_rng(0)
    w_dec = rng.normal(size=(D_SAE, 16)).astype(np.float32)
    order = rng.permutation(D_SAE)  # seed feature j is book feature order[j]
    perturbed = w_dec[order] + 0.01 * rng.normal(size=w_dec.shape).astype(np.float32)
    main, other = analysed(codes, labels), analysed(codes[:, order], labels)
    verdicts = {"shared_and_specific": Verdict("holds", "r", rule="mix_verdict")}
    row = features._seed_row(
        1, main, other, {3: Decoder(w_dec)}, {3: Decoder(perturbed)}, verdicts, 0.9, "0 of 1"
    )
    n = int(main.sel.matrix("sets").any(axis=1).sum())
    assert n == 53 and row["emotion-set features"] == n
    assert row["book SAEs' features found again"] == f"{n} of {n}"
    assert row["found again, same emotion set"] == f"{n} of {n}"
    assert row["median best cosine"] > 0.99 > 0.9 > row["median best cosine, random dictionary"]
    assert row[CLAIMS["shared_and_specific"]] == "holds" and row["SAEs missing a goal"] == "0 of 1"
    fresh = rng.normal(size=w_dec.shape).astype(np.float32)
    row = features._seed_row(
        1, main, other, {3: Decoder(w_dec)}, {3: Decoder(fresh)}, verdicts, 0.9, "1 of 1 (L3: fve)"
    )
    assert row["book SAEs' features found again"] == f"0 of {n}"
    assert row["median best cosine"] < 0.9
    assert row["median best cosine"] == pytest.approx(row["median best cosine, random dictionary"], abs=0.15)


def test_the_study_reads_its_verdicts_on_every_seed(study):
    _, _, result = study
    table = result.seeds_table()
    assert table.index.get_level_values("seed").tolist() == [0, *CONFIG.sae_seeds]
    assert set(CLAIMS.values()) <= set(table.columns)
    assert all(" of " in cell for cell in table["SAEs missing a goal"])
    for key, verdict in result.verdicts_by_claim.items():
        assert "seed 0: " in verdict.numbers["seed_verdicts"]
        per_seed = table[CLAIMS[key]].tolist()
        assert verdict.numbers["stable_across_seeds"] == (len(set(per_seed)) == 1)

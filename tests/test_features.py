"""Tests for the features chapter's methods and verdict rules on synthetic codes with planted features whose selective sets, overlaps, diffuseness
and co-activation are known, on pure noise (the false-discovery control), on hand-computed sets and mass vectors,
and on the tiny model for promoted tokens."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import mannwhitneyu, rankdata
from sklearn.metrics import roc_auc_score

from emolib import plots, verdicts
from emolib.methods import cards, coactivation, common, diffuseness, feature_sets, roles, selectivity
from emolib.studies import features

EMOTIONS = ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")
N_PER_CLASS = 100
D_SAE = 200
NOISE = range(54, 190)
DEAD = range(190, 200)

# Planted features: id ranges with their firing probability on each emotion's items (else BASE).
BASE = 0.02
STRONG = {"anger": range(0, 4), "fear": range(4, 8), "joy": range(8, 12), "sadness": range(12, 16)}
STRONG |= {"surprise": range(16, 20), "neutral": range(20, 24)}
SHARED = {("anger", "disgust"): range(24, 27), ("joy", "surprise"): range(27, 30)}
DISGUST_WEAK = range(30, 50)  # the diffuse emotion: many weaker features
GENERAL = range(50, 53)  # every emotion, not neutral
TRAP = 53  # fires on every fear item, but weakly; strongly on a fifth of the others: AUROC 0.8, lower mean

EXPECTED = {
    "anger": {*STRONG["anger"], *SHARED["anger", "disgust"]},
    "disgust": {*SHARED["anger", "disgust"], *DISGUST_WEAK},
    "fear": set(STRONG["fear"]),
    "joy": {*STRONG["joy"], *SHARED["joy", "surprise"]},
    "sadness": set(STRONG["sadness"]),
    "surprise": {*STRONG["surprise"], *SHARED["joy", "surprise"]},
    "neutral": set(STRONG["neutral"]),
}


def planted(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Codes `[700, 200]`: activations exponential + 0.1 where a feature fires, zero elsewhere."""
    rng = np.random.default_rng(seed)
    labels = [e for e in EMOTIONS for _ in range(N_PER_CLASS)]
    y = np.array([EMOTIONS.index(e) for e in labels])
    prob = np.full((len(EMOTIONS), D_SAE), BASE)
    prob[:, NOISE.start : NOISE.stop] = 0.1
    prob[:, DEAD.start : DEAD.stop] = 0.0
    for emotion, ids in STRONG.items():
        prob[EMOTIONS.index(emotion), ids.start : ids.stop] = 0.95
    prob[:, STRONG["surprise"].start : STRONG["surprise"].stop] = (
        0.3  # surprise features co-activate everywhere
    )
    prob[EMOTIONS.index("surprise"), STRONG["surprise"].start : STRONG["surprise"].stop] = 0.95
    for pair, ids in SHARED.items():
        for emotion in pair:
            prob[EMOTIONS.index(emotion), ids.start : ids.stop] = 0.9
    prob[:, DISGUST_WEAK.start : DISGUST_WEAK.stop] = 0.03
    prob[EMOTIONS.index("disgust"), DISGUST_WEAK.start : DISGUST_WEAK.stop] = 0.7
    prob[:, GENERAL.start : GENERAL.stop] = 0.8
    prob[EMOTIONS.index("neutral"), GENERAL.start : GENERAL.stop] = 0.03
    fires = rng.random((len(y), D_SAE)) < prob[y]
    codes = np.where(fires, rng.exponential(1.0, fires.shape) + 0.1, 0.0)
    strong_elsewhere = rng.random(len(y)) < 0.2
    codes[:, TRAP] = np.where(y == EMOTIONS.index("fear"), 0.1, np.where(strong_elsewhere, 10.0, 0.0))
    return codes, labels


def noise(seed: int = 1) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    labels = [e for e in EMOTIONS for _ in range(60)]
    fires = rng.random((len(labels), 300)) < rng.uniform(0.02, 0.5, size=300)
    return np.where(fires, rng.exponential(1.0, fires.shape), 0.0), labels


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def sel(data):
    return selectivity.selectivity(*data, EMOTIONS)


@pytest.fixture(scope="module")
def draws(data):
    return selectivity.bootstrap_selectivity(
        *data, EMOTIONS, boot=selectivity.BootstrapConfig(n_boot=60, seed=3)
    )


# ------------------------------------------------------------------------------------------------ selectivity


def test_selectivity_recovers_the_planted_sets_exactly(sel):
    assert {e: set(s) for e, s in sel.sets().items()} == EXPECTED
    assert sel.n_never_active == len(DEAD) and sel.n_untested == len(DEAD)
    assert not sel.tested[list(DEAD)].any() and np.isnan(sel.auroc[list(DEAD)]).all()
    assert sel.class_sizes == (N_PER_CLASS,) * len(EMOTIONS)


def test_auroc_matches_scikit_learn_with_ties(data, sel):
    codes, labels = data
    for feature in (0, 25, 31, 60, TRAP):
        for j, emotion in enumerate(EMOTIONS):
            target = [label == emotion for label in labels]
            assert sel.auroc[feature, j] == pytest.approx(roc_auc_score(target, codes[:, feature]))


def test_one_ranking_gives_scipys_mann_whitney_for_every_class(data, sel):
    for codes, labels in (data, noise(), (np.round(data[0], 1), data[1])):  # rounding adds ties off zero
        emotions = tuple(dict.fromkeys(labels))
        y = np.array([emotions.index(v) for v in labels])
        onehot = np.eye(len(emotions))[y]
        keep = codes.max(axis=0) > codes.min(axis=0)
        ranked = selectivity.RankedCodes.of(codes, selectivity.SelectivityConfig(), keep)
        u1, p = selectivity._one_vs_rest_tests(ranked, onehot, onehot.sum(axis=0))
        for e in range(len(emotions)):
            expected = mannwhitneyu(
                codes[y == e][:, keep], codes[y != e][:, keep], axis=0, method="asymptotic"
            )
            np.testing.assert_allclose(u1[:, e], expected.statistic, rtol=1e-12)
            np.testing.assert_allclose(p[:, e], expected.pvalue, rtol=1e-9, atol=1e-300)


def test_a_feature_more_often_but_more_weakly_active_is_not_selective(sel):
    fear = EMOTIONS.index("fear")
    assert sel.auroc[TRAP, fear] == pytest.approx(0.8, abs=0.05)
    assert sel.q_value[TRAP, fear] < 0.05
    assert sel.mean_in[TRAP, fear] < sel.mean_out[TRAP, fear]
    assert not sel.selective[TRAP, fear] and TRAP not in sel.sets("auroc")["fear"]


def test_statistics_and_table(data, sel):
    codes, labels = data
    joy = EMOTIONS.index("joy")
    inside = np.array(labels) == "joy"
    assert sel.mean_in[8, joy] == pytest.approx(codes[inside, 8].mean())
    assert sel.mean_out[8, joy] == pytest.approx(codes[~inside, 8].mean())
    assert sel.rate_in[8, joy] == pytest.approx((codes[inside, 8] > 0).mean())
    assert sel.frequency[8] == pytest.approx((codes[:, 8] > 0).mean())
    table = sel.table("joy")
    assert set(table["feature"]) == EXPECTED["joy"] and table["auroc"].is_monotonic_decreasing
    assert table["selective"].all() and (table["q_value"] < 0.05).all()
    assert sel.counts() == {
        **{e: len(s) for e, s in EXPECTED.items()},
        "any": 50,
        "specific": 44,
        "shared": 6,
    }


def test_torch_codes_give_the_same_result(data, sel):
    codes, labels = data
    again = selectivity.selectivity(torch.tensor(codes, dtype=torch.float32), labels, EMOTIONS)
    np.testing.assert_array_equal(again.selective, sel.selective)


def test_general_emotional_features_against_neutral(data):
    contrast = selectivity.emotional_vs_neutral(*data)
    assert contrast.emotions == (selectivity.EMOTIONAL, "neutral")
    assert contrast.sets() == {
        selectivity.EMOTIONAL: frozenset(GENERAL),
        "neutral": frozenset(STRONG["neutral"]),
    }


# ------------------------------------------------------------------------------- controls and FDR on noise


def test_shuffled_labels_find_no_selective_features(data, sel):
    null = selectivity.shuffled_control(*data, EMOTIONS, n_shuffles=8, seed=5)
    assert list(null.counts.columns) == [*EMOTIONS, *selectivity.TOTALS] and len(null.counts) == 8
    assert null.counts["any"].max() <= 1
    summary = null.summary(sel)
    assert summary.loc["any", "observed"] == 50
    assert summary.loc["any", "p_value"] == pytest.approx(1 / 9)
    again = selectivity.shuffled_control(*data, EMOTIONS, n_shuffles=8, seed=5)
    assert again.counts.equals(null.counts)


def test_pure_noise_yields_no_selective_features():
    codes, labels = noise()
    assert selectivity.selectivity(codes, labels, EMOTIONS).counts()["any"] == 0
    # Without the effect-size threshold only BH decides: under the complete null, discoveries are rare.
    loose = selectivity.SelectivityConfig(auroc_threshold=0.5, alpha=0.05)
    null = selectivity.shuffled_control(codes, labels, EMOTIONS, loose, n_shuffles=20, seed=0)
    assert null.counts["any"].mean() <= 0.5 and (null.counts["any"] > 0).mean() <= 0.2


def test_false_discovery_proportion_is_bounded_among_real_effects(data):
    # BH controls the FDR over all rejected feature x emotion tests (both directions): expected <= alpha m0 / m.
    loose = selectivity.selectivity(
        *data, EMOTIONS, selectivity.SelectivityConfig(auroc_threshold=0.5, alpha=0.05)
    )
    rejected = loose.q_value < 0.05
    assert rejected.sum() >= 300
    assert rejected[list(NOISE)].sum() / rejected.sum() <= 0.05
    assert loose.selective.any(axis=1).sum() >= 50


# ------------------------------------------------------------------------------------------------- bootstrap


def test_shared_and_specific_counts_with_intervals(sel, draws):
    plain = feature_sets.shared_specific(sel)
    assert plain.loc["anger"].to_dict() == {"n_selective": 7, "n_specific": 4, "n_shared": 3}
    assert plain.loc["disgust"].to_dict() == {"n_selective": 23, "n_specific": 20, "n_shared": 3}
    assert plain.loc["fear"].to_dict() == {"n_selective": 4, "n_specific": 4, "n_shared": 0}
    assert plain.loc["any"].to_dict() == {"n_selective": 50, "n_specific": 44, "n_shared": 6}
    boot = feature_sets.shared_specific(sel, draws)
    for column in ("n_selective", "n_specific", "n_shared"):
        assert (boot[f"{column}_low"] <= boot[column]).all() and (
            boot[column] <= boot[f"{column}_high"]
        ).all()
    assert boot.loc["disgust", "n_selective_low"] >= 15 and boot.loc["fear", "n_shared_high"] == 0
    # Without neutral the same counts (no feature is shared with neutral).
    without = feature_sets.shared_specific(sel, among=EMOTIONS[:-1])
    assert list(without.index) == [*EMOTIONS[:-1], "any"] and without.loc["any", "n_selective"] == 46


def test_bootstrap_is_stratified_seeded_and_its_auroc_matches_the_full_criterion(data):
    codes, labels = data
    quick = selectivity.bootstrap_selectivity(
        codes, labels, EMOTIONS, boot=selectivity.BootstrapConfig(n_boot=3, seed=1)
    )
    again = selectivity.bootstrap_selectivity(
        codes, labels, EMOTIONS, boot=selectivity.BootstrapConfig(n_boot=3, seed=1)
    )
    full = selectivity.bootstrap_selectivity(
        codes, labels, EMOTIONS, boot=selectivity.BootstrapConfig(n_boot=3, seed=1, criterion="full")
    )
    np.testing.assert_array_equal(quick.auroc, again.auroc)
    finite = np.isfinite(full.auroc)
    np.testing.assert_allclose(quick.auroc[finite], full.auroc[finite], atol=1e-6)
    np.testing.assert_allclose(quick.mean_diff[finite], full.mean_diff[finite], rtol=1e-5, atol=1e-6)
    assert (full.selective <= quick.selective).all()  # the full rule adds a condition


def test_draws_must_match_the_selectivity(data, sel):
    codes, labels = data
    other = selectivity.bootstrap_selectivity(
        codes[:, :50], labels, EMOTIONS, boot=selectivity.BootstrapConfig(n_boot=2)
    )
    with pytest.raises(common.FeatureError, match="do not match"):
        feature_sets.shared_specific(sel, other)


# ------------------------------------------------------------------------------------------------ emotion sets


def test_one_vs_rest_misses_features_shared_by_many_emotions_and_emotion_sets_find_them(sel):
    """The planted general features fire on all six emotions but not on neutral: one-vs-rest AUROC about
    (2E - 1 - m) / (2E - 2) = 7/12 for each, so no emotion claims them; the set rule gives them all six."""
    general = list(GENERAL)
    assert not sel.matrix("full")[general].any()
    assert np.nanmax(sel.auroc[general, :6]) < 0.7
    members = sel.matrix("sets")
    for feature in general:
        assert [EMOTIONS[j] for j in np.flatnonzero(members[feature])] == list(EMOTIONS[:6])
    for emotion, ids in SHARED.items():
        for feature in ids:
            assert {EMOTIONS[j] for j in np.flatnonzero(members[feature])} == set(emotion)
    for emotion, ids in STRONG.items():
        assert all(np.flatnonzero(members[f]).tolist() == [EMOTIONS.index(emotion)] for f in ids)
    assert not members[
        [TRAP, *NOISE, *DEAD]
    ].any()  # the weak-but-often trap, noise and dead features get none
    counts = feature_sets.shared_specific(sel, criterion="sets")
    assert counts.loc["any"].to_dict() == {"n_selective": 53, "n_specific": 44, "n_shared": 9}
    assert counts.loc["fear", "n_shared"] == 3  # the general features


def test_a_perfect_feature_of_m_emotions_has_the_stated_one_vs_rest_auroc():
    labels = [e for e in EMOTIONS for _ in range(20)]
    for m in range(1, 7):
        fires = np.isin(labels, EMOTIONS[:m]).astype(float)[:, None]
        result = selectivity.selectivity(fires, labels, EMOTIONS)
        assert result.auroc[0, 0] == pytest.approx((2 * 7 - 1 - m) / (2 * 7 - 2))
        assert np.flatnonzero(result.matrix("sets")[0]).tolist() == list(range(m))


def set_by_brute_force(
    codes: np.ndarray,
    labels: list[str],
    emotions: tuple[str, ...],
    threshold: float,
    every_subset: bool = False,
):
    """The emotion-set rule feature by feature, with scikit-learn's AUROC of each prefix of the emotions ordered
    by the mean rank of their items (stable order on ties), or of every subset (`every_subset`)."""
    labels = np.asarray(labels)
    out = np.zeros((codes.shape[1], len(emotions)), dtype=bool)
    for f in range(codes.shape[1]):
        x = codes[:, f]
        if x.max() == x.min():
            continue
        ranks = rankdata(x)
        mean_rank = [ranks[labels == e].mean() for e in emotions]
        order = sorted(range(len(emotions)), key=lambda j: -mean_rank[j])
        candidates = (
            [
                list(c)
                for m in range(1, len(emotions))
                for c in itertools.combinations(range(len(emotions)), m)
            ]
            if every_subset
            else [order[:m] for m in range(1, len(emotions))]
        )
        best, best_auroc = None, -1.0
        for chosen in sorted(candidates, key=len):
            inside = np.isin(labels, [emotions[j] for j in chosen])
            auroc = roc_auc_score(inside, x)
            if auroc > best_auroc + 1e-12:
                best, best_auroc = chosen, auroc
                higher = x[inside].mean() > x[~inside].mean()
        if best_auroc >= threshold and higher:
            out[f, best] = True
    return out


def test_emotion_sets_match_the_brute_force_rule_on_unbalanced_classes():
    rng = np.random.default_rng(7)
    sizes = [30, 45, 25, 60, 35]
    emotions = tuple(EMOTIONS[:5])
    labels = [e for e, n in zip(emotions, sizes, strict=True) for _ in range(n)]
    y = np.array([emotions.index(e) for e in labels])
    prob = rng.uniform(0.02, 0.95, size=(5, 80))
    fires = rng.random((len(y), 80)) < prob[y]
    codes = np.where(fires, rng.exponential(1.0, fires.shape), 0.0)
    result = selectivity.selectivity(
        codes, labels, emotions, selectivity.SelectivityConfig(auroc_threshold=0.6)
    )
    expected = set_by_brute_force(codes, labels, emotions, 0.6)
    assert expected.any(axis=1).sum() > 20 and (expected.sum(axis=1) >= 2).sum() > 5
    np.testing.assert_array_equal(result.matrix("sets"), expected)


def test_on_balanced_classes_the_best_prefix_is_the_best_of_every_subset():
    rng = np.random.default_rng(8)
    emotions = tuple(EMOTIONS[:5])
    labels = [e for e in emotions for _ in range(40)]
    y = np.array([emotions.index(e) for e in labels])
    fires = rng.random((len(y), 40)) < rng.uniform(0.02, 0.95, size=(5, 40))[y]
    codes = np.where(fires, rng.exponential(1.0, fires.shape), 0.0)
    result = selectivity.selectivity(
        codes, labels, emotions, selectivity.SelectivityConfig(auroc_threshold=0.6)
    )
    expected = set_by_brute_force(codes, labels, emotions, 0.6, every_subset=True)
    assert (expected.sum(axis=1) >= 2).sum() > 3
    np.testing.assert_array_equal(result.matrix("sets"), expected)


def test_emotion_sets_of_draws_and_their_errors(data, sel, draws):
    codes, labels = data
    sets = draws.matrix("sets")
    assert sets.shape == draws.selective.shape and draws.matrix() is draws.selective
    # every draw keeps the planted general features' six-emotion set
    assert sets[:, list(GENERAL), :6].all() and not sets[:, list(GENERAL), 6].any()
    boot = feature_sets.shared_specific(sel, draws, criterion="sets")
    assert boot.loc["any", "n_shared"] == 9 and boot.loc["any", "n_shared_low"] >= 8
    with pytest.raises(common.FeatureError, match="'auroc' criterion"):
        draws.matrix("full")
    with pytest.raises(common.FeatureError, match="criterion must be one of"):
        feature_sets.shared_specific(sel, criterion="pairs")
    with pytest.raises(common.FeatureError, match="one column per class"):
        selectivity.emotion_sets(np.ones((3, 4)), np.ones((3, 4)), [10, 10, 10], 0.7)


def test_set_sizes_beside_their_null(sel, null):
    summary = null.set_size_summary(sel)
    assert summary.index.tolist() == [1, 2, 3, 4, 5, 6]  # a set never holds all seven emotions
    assert summary["observed"].tolist() == [44, 6, 0, 0, 0, 3]
    assert summary.loc[6, "most common set"] == "all but neutral (3)"
    assert summary.loc[2, "most common set"] in {"anger, disgust (3)", "joy, surprise (3)"}
    assert summary.loc[3, "most common set"] == "-"
    assert summary.loc[6, "p_value"] == pytest.approx(1 / 20) and summary.loc[3, "p_value"] == 1.0
    codes, labels = noise()
    noisy_null = feature_sets.shuffled_shared_specific(codes, labels, EMOTIONS, n_shuffles=9)
    assert (
        noisy_null.set_size_summary(selectivity.selectivity(codes, labels, EMOTIONS))["observed"].sum() == 0
    )


def test_the_mix_verdict_on_emotion_sets_sees_what_one_vs_rest_cannot():
    """Specific features plus features shared by five emotions each: one-vs-rest finds nothing shared, so its
    mix 'does not hold'; the emotion-set rule finds both kinds and the mix holds."""
    rng = np.random.default_rng(11)
    labels = [e for e in EMOTIONS for _ in range(80)]
    y = np.array([EMOTIONS.index(e) for e in labels])
    prob = np.full((7, 60), 0.02)
    for j in range(7):
        prob[j, 2 * j : 2 * j + 2] = 0.9  # two specific features per emotion
    for k, group in enumerate([(0, 1, 2, 3, 4), (2, 3, 4, 5, 6), (0, 1, 5, 6, 3)]):
        prob[list(group), 14 + 3 * k : 17 + 3 * k] = 0.9  # three features shared by five emotions, per group
    prob[:, 23:] = 0.1  # noise
    fires = rng.random((len(y), 60)) < prob[y]
    codes = np.where(fires, rng.exponential(1.0, fires.shape) + 0.1, 0.0)
    result = selectivity.selectivity(codes, labels, EMOTIONS)
    null = feature_sets.shuffled_shared_specific(codes, labels, EMOTIONS, n_shuffles=19, seed=2)
    draws = selectivity.bootstrap_selectivity(codes, labels, EMOTIONS, boot=selectivity.BootstrapConfig(40))
    verdicts_by_rule = {}
    for rule, boot_rule in (("full", "auroc"), ("sets", "sets")):
        boot = feature_sets.shared_specific(result, draws, criterion=boot_rule)
        verdicts_by_rule[rule] = features.mix_verdict(
            null.summary(feature_sets.shared_specific(result, criterion=rule), rule),
            boot,
            null.summary(boot, boot_rule),
            null.n_shuffles,
        )
    assert verdicts_by_rule["full"].verdict == "does not hold"
    assert "no shared feature at all" in verdicts_by_rule["full"].reason
    assert verdicts_by_rule["sets"].verdict == "holds"
    assert verdicts_by_rule["sets"].numbers["n_shared"] == 9


# --------------------------------------------------------------------------------------------------- overlap

SETS = {"a": {1, 2, 3}, "b": {2, 3, 4}, "c": {5}, "d": set()}


def test_jaccard_on_known_sets():
    matrix = feature_sets.jaccard(SETS)
    assert matrix.loc["a", "b"] == pytest.approx(0.5) and matrix.loc["b", "a"] == pytest.approx(0.5)
    assert matrix.loc["a", "a"] == 1 and matrix.loc["a", "c"] == 0 and matrix.loc["c", "d"] == 0
    assert np.isnan(matrix.loc["d", "d"])


def test_intersections_on_known_sets():
    table = feature_sets.intersections(SETS)
    assert list(table["combination"]) == ["a & b", "a", "b", "c"]
    assert list(table["n_features"]) == [2, 1, 1, 1] and list(table["degree"]) == [2, 1, 1, 1]
    assert table.loc[0, "features"] == [2, 3] and table.loc[0, "emotions"] == ("a", "b")
    assert table.attrs["set_sizes"] == {"a": 3, "b": 3, "c": 1, "d": 0}


def test_intersections_of_the_planted_sets(sel):
    table = feature_sets.intersections(sel.sets()).set_index("combination")
    assert table["n_features"].sum() == 50
    assert table.loc["anger & disgust", "features"] == list(SHARED["anger", "disgust"])
    assert table.loc["joy & surprise", "n_features"] == 3 and table.loc["disgust", "n_features"] == 20


def test_upset_figure_is_labelled_and_sorted():
    fig = plots.upset_figure(feature_sets.intersections(SETS), top_n=2, title="Toy")
    bars, dots = fig.axes
    assert [p.get_height() for p in bars.patches] == [2, 1]
    assert "top 2 of 4" in bars.get_title()
    assert [t.get_text() for t in dots.get_yticklabels()] == ["a (3)", "b (3)", "c (1)", "d (0)"]
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- diffuseness


def test_concentration_on_known_mass_vectors():
    assert diffuseness.concentration([4, 3, 2, 1]) | {"entropy": 0, "effective_n": 0} == {
        "k50": 2,
        "k80": 3,
        "entropy": 0,
        "effective_n": 0,
    }
    uniform = diffuseness.concentration(np.ones(10))
    assert uniform == pytest.approx({"k50": 5, "k80": 8, "entropy": 1.0, "effective_n": 10.0})
    assert diffuseness.concentration(np.ones(10), n_reference=100)["entropy"] == pytest.approx(0.5)
    single = diffuseness.concentration([0, 5, 0, 0])
    assert single == pytest.approx({"k50": 1, "k80": 1, "entropy": 0.0, "effective_n": 1.0})
    two = diffuseness.concentration([1, 1, -3, np.nan])  # negatives and NaN count as no mass
    assert two["k50"] == 1 and two["k80"] == 2 and two["entropy"] == pytest.approx(np.log(2) / np.log(4))
    empty = diffuseness.concentration([0, 0, 0])
    assert empty["k50"] == 0 and np.isnan(empty["entropy"])
    p = np.array([4, 3, 2, 1]) / 10
    assert diffuseness.concentration([4, 3, 2, 1])["entropy"] == pytest.approx(
        -(p * np.log(p)).sum() / np.log(4)
    )


def test_the_diffuse_emotion_is_found_more_diffuse(sel, draws):
    table = diffuseness.diffuseness(sel, draws)
    assert table.loc["disgust", "n_support"] == 23 and table.loc["fear", "n_support"] == 4
    assert table["k80"].idxmax() == "disgust" and table["entropy"].idxmax() == "disgust"
    assert table.loc["fear", "k80"] == 4 and table.loc["disgust", "k80"] >= 17
    assert (table["k80_low"] <= table["k80"]).all() and (table["k80"] <= table["k80_high"]).all()
    others = [e for e in EMOTIONS if e not in ("disgust", "neutral")]
    versus = diffuseness.compare_diffuseness(sel, draws, "disgust", "k80", others=others)
    assert list(versus.index) == [*others, "others (mean)"]
    assert (versus["low"] > 0).all() and (versus["share_more"] == 1).all()
    reverse = diffuseness.compare_diffuseness(sel, draws, "fear", "entropy", others=["disgust"])
    assert reverse.loc["disgust", "high"] < 0
    by_activation = diffuseness.diffuseness(sel, config=diffuseness.DiffusenessConfig(mass="mean_diff"))
    assert by_activation["k80"].idxmax() == "disgust"


def test_diffuseness_over_all_features_counts_noise_mass(sel):
    everywhere = diffuseness.diffuseness(sel, config=diffuseness.DiffusenessConfig(support="all"))
    assert (everywhere["n_support"] > diffuseness.diffuseness(sel)["n_support"]).all()


# ---------------------------------------------------------------------------------------------- coactivation


# ------------------------------------------------------------------------------------------------ token roles


def role_tokens(n_prompts: int = 40):
    """Prompts of 10 tokens: 0-5 template, 6-8 text, 9 template (the last token)."""
    mask = np.array([True] * 6 + [False] * 3 + [True])
    chunks = []
    for p in range(n_prompts):
        codes = np.zeros((10, 9))
        codes[mask, 0] = 1.0  # template only
        codes[~mask, 1] = 1.0  # text only
        codes[:, 3] = 1.0  # both alike
        codes[9, 4] = 2.0 if p % 2 else 0.0  # the last token, half the prompts (the emotion feature)
        codes[mask, 6], codes[~mask, 6] = 1.0, 0.3  # template share 0.77: below 0.8
        codes[mask, 7], codes[~mask, 7] = 1.0, 0.2  # template share 0.83
        codes[:, 8] = 0.5 if p == 0 else 0.0  # active on every token of one prompt: 2.5% of tokens
        chunks.append(codes)
    chunks[3][7, 5] = 1.0  # one token of 400
    return chunks, [mask] * n_prompts


def test_feature_roles_follow_the_documented_rules():
    chunks, masks = role_tokens()
    emotion = np.zeros(9, dtype=bool)
    emotion[4] = True
    assigned = roles.feature_roles(chunks, masks, emotion, roles.RoleConfig(min_rate=0.01))
    assert list(assigned["role"]) == [
        "template", "content", "inactive", "content", "emotion", "inactive", "content", "template", "content",
    ]  # fmt: skip
    assert assigned.loc[6, "template_share"] == pytest.approx(1 / 1.3)
    assert assigned.loc[0, "rate_template"] == 1 and assigned.loc[0, "rate_content"] == 0
    assert assigned.attrs == {"n_template_tokens": 280, "n_content_tokens": 120}
    stacked = roles.feature_roles(
        np.concatenate(chunks), np.concatenate(masks), emotion[:, None], roles.RoleConfig(min_rate=0.01)
    )
    pd.testing.assert_frame_equal(stacked, assigned)


def test_feature_roles_take_emotion_features_from_a_selectivity(sel):
    codes = np.zeros((4, D_SAE))
    codes[:, 0] = 1.0
    assigned = roles.feature_roles(codes, np.array([True, True, False, True]), sel)
    assert set(assigned.index[assigned["role"] == "emotion"]) == set().union(*EXPECTED.values())


def test_feature_roles_reject_bad_masks():
    codes = np.ones((5, 3))
    with pytest.raises(common.FeatureError, match="boolean"):
        roles.feature_roles(codes, np.ones(5), np.zeros(3, dtype=bool))
    with pytest.raises(common.FeatureError, match=r"shape \(4,\), expected \(5,\)"):
        roles.feature_roles(codes, np.ones(4, dtype=bool), np.zeros(3, dtype=bool))
    with pytest.raises(common.FeatureError, match="both template and content"):
        roles.feature_roles(codes, np.ones(5, dtype=bool), np.zeros(3, dtype=bool))
    with pytest.raises(common.FeatureError, match="covers 4 features"):
        roles.feature_roles(codes, np.array([True, False] * 2 + [True]), np.zeros(4, dtype=bool))


# ---------------------------------------------------------------------------------------------- feature cards


def test_top_activating_lists_active_items_in_order():
    texts = [f"text {i}" for i in range(6)]
    labels = ["joy", "fear", "joy", "anger", "fear", "joy"]
    top = cards.top_activating(np.array([0, 3, 1, 3, 0, 2]), texts, k=3, labels=labels)
    assert list(top["item"]) == [1, 3, 5] and list(top["rank"]) == [1, 2, 3]
    assert list(top["text"]) == ["text 1", "text 3", "text 5"] and list(top["label"]) == [
        "fear",
        "anger",
        "joy",
    ]
    assert len(cards.top_activating(np.array([0, 3, 1, 3, 0, 2]), texts, k=10)) == 4
    with pytest.raises(common.FeatureError, match="6 activations but 5 texts"):
        cards.top_activating(np.zeros(6), texts[:5])


def test_promoted_tokens_through_the_unembedding(tiny_model, tiny_tokenizer):
    row = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scaled = (row * tiny_model.ln_final.w) @ tiny_model.W_U
        raw = row @ tiny_model.W_U
    top = cards.promoted_tokens(row, tiny_model, tiny_tokenizer, k=5)
    assert list(top["token_id"]) == torch.topk(scaled, 5).indices.tolist()
    np.testing.assert_allclose(top["score"], torch.topk(scaled, 5).values.numpy(), rtol=1e-5)
    assert list(top["token"]) == [tiny_tokenizer.decode([i]) for i in top["token_id"]]
    bottom = cards.promoted_tokens(row.numpy(), tiny_model, tiny_tokenizer, k=5, suppressed=True)
    assert (
        list(bottom["token_id"]) == torch.topk(-scaled, 5).indices.tolist()
        and bottom["score"].is_monotonic_increasing
    )
    unscaled = cards.promoted_tokens(row, tiny_model, k=5, ln_scale=False)
    assert list(unscaled["token_id"]) == torch.topk(raw, 5).indices.tolist()
    with pytest.raises(common.FeatureError, match="decoder row has 7 dimensions"):
        cards.promoted_tokens(torch.zeros(7), tiny_model, tiny_tokenizer)


# ------------------------------------------------------------------------------------------------ bad inputs


def small(n_fear: int = 12):
    labels = ["anger"] * 12 + ["fear"] * n_fear
    return np.random.default_rng(0).random((len(labels), 5)), labels


def test_a_label_outside_the_emotions_is_named():
    codes, labels = small()
    with pytest.raises(common.FeatureError, match=r"labels \['angry'\] are not in emotions"):
        selectivity.selectivity(codes, ["angry", *labels[1:]], ("anger", "fear"))


def test_a_shape_mismatch_is_named():
    codes, labels = small()
    with pytest.raises(common.FeatureError, match="24 rows .* 23 labels"):
        selectivity.selectivity(codes, labels[:-1], ("anger", "fear"))
    with pytest.raises(common.FeatureError, match="2-D"):
        selectivity.selectivity(codes[:, 0], labels, ("anger", "fear"))


def test_a_class_with_too_few_items_is_named():
    codes, labels = small(n_fear=3)
    with pytest.raises(common.FeatureError, match=r"too few items for emotions \{'fear': 3\}"):
        selectivity.selectivity(codes, labels, ("anger", "fear"))
    with pytest.raises(common.FeatureError, match=r"'joy': 0"):
        selectivity.selectivity(*small(), ("anger", "fear", "joy"))
    with pytest.raises(common.FeatureError, match="too few items"):
        selectivity.bootstrap_selectivity(codes, labels, ("anger", "fear"))


def test_other_bad_inputs_raise_clear_errors(sel):
    codes, labels = small()
    bad = codes.copy()
    bad[0, 0] = np.nan
    with pytest.raises(common.FeatureError, match="NaN"):
        selectivity.selectivity(bad, labels, ("anger", "fear"))
    with pytest.raises(common.FeatureError, match="repeated"):
        selectivity.selectivity(codes, labels, ("anger", "fear", "anger"))
    with pytest.raises(common.FeatureError, match="at least two emotions"):
        selectivity.selectivity(codes, ["anger"] * 24, ("anger",))
    with pytest.raises(common.FeatureError, match="no item is labelled 'neutral'"):
        selectivity.emotional_vs_neutral(codes, labels)
    with pytest.raises(common.FeatureError, match=r"\['calm'\] are not among"):
        sel.matrix("full", among=["anger", "calm"])
    with pytest.raises(common.FeatureError, match="measure must be one of"):
        diffuseness.compare_diffuseness(sel, None, "disgust", measure="k90")
    with pytest.raises(common.FeatureError, match="criterion must be one of"):
        selectivity.BootstrapConfig(criterion="q")
    with pytest.raises(common.FeatureError, match="auroc_threshold"):
        selectivity.SelectivityConfig(auroc_threshold=0.3)


# ---------------------------------------------------------------------------- chapter: null of shared / specific


@pytest.fixture(scope="module")
def null(data):
    return feature_sets.shuffled_shared_specific(*data, EMOTIONS, n_shuffles=19, seed=4)


def test_shared_specific_null_uses_the_shuffled_control_permutations(data, null):
    control = selectivity.shuffled_control(*data, EMOTIONS, n_shuffles=19, seed=4)
    full = null.counts.xs("full", level="criterion")
    assert list(full[("n_selective", "any")]) == list(control.counts["any"])
    assert list(full[("n_specific", "any")]) == list(control.counts["specific"])
    rules = set(null.counts.index.get_level_values("criterion"))
    assert null.n_shuffles == 19 and rules == {"full", "auroc", "sets"}


def test_shared_specific_null_summary_sets_counts_beside_chance(sel, draws, null):
    summary = null.summary(feature_sets.shared_specific(sel), "full")
    assert list(summary.index) == [*EMOTIONS, "any"]
    assert summary.loc["any", ("n_shared", "observed")] == 6
    assert summary.loc["any", ("n_shared", "p_value")] == pytest.approx(1 / 20)
    assert (summary[("n_specific", "null_mean")] < 2).all()
    boot = null.summary(feature_sets.shared_specific(sel, draws), "auroc")
    assert boot.loc["disgust", ("n_specific", "observed")] == 20
    restricted = feature_sets.shuffled_shared_specific(*planted(), EMOTIONS, n_shuffles=2, among=EMOTIONS[:6])
    assert restricted.emotions == EMOTIONS[:6]
    with pytest.raises(common.FeatureError, match="not among the null"):
        restricted.summary(feature_sets.shared_specific(sel), "full")


def test_specific_sets():
    assert feature_sets.specific_sets(SETS) == {"a": {1}, "b": {4}, "c": {5}, "d": set()}


# --------------------------------------------------------------------------------- chapter: final phase, pooling


class Flow:
    """The flow study's accessors (`FlowResult.phases`, `final_phase`, `chosen_phase_count`) over cuts of 12 layers
    into 2 and 3 phases, the test preferring `chosen`."""

    CUTS = {2: [(0, 5), (6, 11)], 3: [(0, 3), (4, 8), (9, 11)]}

    def __init__(self, chosen: int = 2) -> None:
        self.chosen = chosen

    def phases(self, n_phases: int = 3, subset: str = "all") -> dict[str, tuple[int, ...]]:
        if n_phases not in self.CUTS:
            raise common.FlowError(f"no {n_phases}-phase cut")
        return {f"phase {i}": tuple(range(a, b + 1)) for i, (a, b) in enumerate(self.CUTS[n_phases], 1)}

    def final_phase(self, n_phases: int = 3, subset: str = "all") -> tuple[int, ...]:
        return list(self.phases(n_phases, subset).values())[-1]

    def chosen_phase_count(self, subset: str = "all") -> int:
        return self.chosen


def test_final_phase_comes_from_the_Flow():
    phase = features.final_phase_of(Flow(), "m", 12)
    assert (phase.first, phase.last, phase.layers) == (9, 11, [9, 10, 11])
    assert phase.source == "models.m.subsets.all.boundaries.3.phases[-1]"
    assert (phase.n_phases, phase.chosen) == (3, 2)
    two = features.FinalPhase.from_flow(Flow(), "m", n_phases=2)
    assert (two.first, two.last, two.n_phases) == (6, 11, 2)
    assert features.FinalPhase.from_json(phase.to_json()) == phase


def test_final_phase_from_the_parameter_and_its_errors():
    phase = features.final_phase_of([7, 11], "m", 12)
    assert (phase.first, phase.last) == (7, 11) and phase.source == features.PARAMETER_SOURCE
    assert phase.n_phases is None and phase.chosen is None
    with pytest.raises(common.FeatureError, match=r"\[10, 12\] .* not a range of layers 0..11"):
        features.final_phase_of((10, 12), "m", 12)
    with pytest.raises(common.FeatureError, match=r"\[9, 11\] .* not a range of layers 0..7"):
        features.final_phase_of(Flow(), "m", 8)
    with pytest.raises(common.FlowError):
        features.FinalPhase.from_flow(Flow(), "m", n_phases=4)


def test_pooling_keeps_testable_features_and_leaves_selectivity_unchanged(data, sel):
    codes, labels = data
    pooled = selectivity.pool_layers({3: codes[:, :100], 4: codes[:, 100:]})
    assert pooled.n_features == D_SAE and pooled.codes.shape[1] == D_SAE - len(DEAD)
    column = int(np.flatnonzero((pooled.layer == 4) & (pooled.feature == 20))[0])
    assert pooled.name(column) == "L4/20" and int((pooled.layer == 4).sum()) == 100 - len(DEAD)
    again = selectivity.selectivity(pooled.codes, labels, EMOTIONS)
    original = np.where(pooled.layer == 3, pooled.feature, pooled.feature + 100)
    assert np.array_equal(again.selective, sel.selective[original])
    assert np.allclose(again.q_value, sel.q_value[original])
    with pytest.raises(common.FeatureError, match="items"):
        selectivity.pool_layers({0: codes, 1: codes[:10]})


# ------------------------------------------------------------------------------ chapter: held-out co-activation


def test_heldout_coactivation_finds_the_surprise_features(sel):
    held_codes, held_labels = planted(seed=5)
    emotions = [e for e in EMOTIONS if e != "neutral"]
    keep = [i for i, label in enumerate(held_labels) if label != "neutral"]
    result = coactivation.heldout_coactivation(
        feature_sets.specific_sets(sel.sets(among=emotions)),
        held_codes[keep],
        [held_labels[i] for i in keep],
        emotions,
        n_boot=40,
    )
    assert np.allclose(np.diag(result.matrix), 1.0) and result.draws.shape == (40, 6, 6)
    assert result.n_features["surprise"] == 4 and result.n_measured["surprise"] == 4
    surprise = result.excess("surprise")
    assert surprise.low > 0.15 and surprise.low <= surprise.value <= surprise.high
    assert result.excess("fear").high < 0
    table = result.table()
    assert table["off_diagonal"].idxmax() == "surprise"
    verdict = features.coactivation_verdict(result)
    assert verdict.verdict == "holds" and "ranks 1 of 6" in verdict.reason
    assert verdict.rule == "coactivation_verdict" and verdict.numbers["rank"] == 1
    assert verdict.numbers["excess_low"] == surprise.low
    assert features.coactivation_verdict(result, "fear").verdict == "does not hold"
    assert features.coactivation_verdict(None).verdict == "inconclusive"


def test_heldout_coactivation_without_features_or_with_silent_features():
    codes = np.zeros((6, 3))
    codes[:3, 0] = 1.0
    labels = ["a"] * 3 + ["b"] * 3
    result = coactivation.heldout_coactivation({"a": {0}, "b": {1}}, codes, labels, n_boot=5)
    assert result.matrix.loc["a", "b"] == 0 and result.n_measured == {"a": 1, "b": 0}
    assert result.matrix.loc["b"].isna().all()
    assert features.coactivation_verdict(result, "b").verdict == "inconclusive"
    with pytest.raises(common.FeatureError, match="no feature set"):
        coactivation.heldout_coactivation({"a": {0}}, codes, labels, ["a", "b"])


# ------------------------------------------------------------------------------------ chapter: verdicts, figures


def test_mix_verdict_on_planted_noise_and_too_few_shuffles(data, sel, draws, null):
    full = null.summary(feature_sets.shared_specific(sel), "full")
    boot = feature_sets.shared_specific(sel, draws)
    verdict = features.mix_verdict(full, boot, null.summary(boot, "auroc"), null.n_shuffles)
    assert verdict.verdict == "holds" and "4 of 7 emotions" in verdict.reason
    assert verdict.rule == "mix_verdict" and verdict.numbers["emotions_with_both"] == 4
    assert verdict.numbers["p_specific"] <= 0.05 and verdict.numbers["p_shared"] <= 0.05
    assert features.mix_verdict(full, boot, null.summary(boot, "auroc"), 5).verdict == "inconclusive"
    codes, labels = noise()
    noisy = selectivity.selectivity(codes, labels, EMOTIONS)
    noisy_null = feature_sets.shuffled_shared_specific(codes, labels, EMOTIONS, n_shuffles=19)
    noisy_boot = feature_sets.shared_specific(
        noisy,
        selectivity.bootstrap_selectivity(codes, labels, EMOTIONS, boot=selectivity.BootstrapConfig(20)),
    )
    verdict = features.mix_verdict(
        noisy_null.summary(feature_sets.shared_specific(noisy), "full"),
        noisy_boot,
        noisy_null.summary(noisy_boot, "auroc"),
        19,
    )
    assert verdict.verdict == "does not hold"
    with pytest.raises(verdicts.VerdictError, match="verdict must be one of"):
        verdicts.Verdict("maybe", "")


def test_diffuse_verdict(sel, draws):
    others = [e for e in EMOTIONS if e not in ("disgust", "neutral")]
    comparisons = {
        m: diffuseness.compare_diffuseness(sel, draws, "disgust", m, others=others) for m in ("k50", "k80")
    }
    holds = features.diffuse_verdict(comparisons, 23)
    assert holds.verdict == "holds" and holds.rule == "diffuse_verdict"
    assert holds.numbers["k80_low"] > 0 and holds.numbers["n_support"] == 23
    assert features.diffuse_verdict(None, None).reason == "no disgust label"
    assert features.diffuse_verdict(comparisons, 0).verdict == "inconclusive"
    fear = {
        m: diffuseness.compare_diffuseness(sel, draws, "fear", m, others=["disgust"])
        for m in ("k80", "entropy")
    }
    assert features.diffuse_verdict(fear, 4, "fear").verdict == "does not hold"


def test_chapter_figures_draw(sel, draws, null):
    boot = feature_sets.shared_specific(sel, draws)
    figures = [
        plots.upset_grid(
            {"m1": feature_sets.intersections(sel.sets()), "m2": feature_sets.intersections(SETS)}, top_n=5
        ),
        plots.jaccard_figure({"m1": feature_sets.jaccard(sel.sets()), "m2": feature_sets.jaccard(SETS)}),
        plots.counts_figure({"m1": boot}, {"m1": null.summary(boot, "auroc")}),
        plots.layer_counts_figure(
            {
                "m1": pd.DataFrame(
                    {
                        "layer": [0, 1, 2],
                        "any": [1, 5, 9],
                        "specific": [1, 3, 5],
                        "shared": [0, 2, 4],
                        "null_mean": [0.5] * 3,
                        "null_q95": [2] * 3,
                    }
                )
            },
            {"m1": (1, 2)},
        ),
        plots.diffuseness_figure(
            {"m1": diffuseness.diffuseness(sel, draws), "m2": diffuseness.diffuseness(sel, draws)}
        ),
    ]
    codes, labels = planted(seed=5)
    figures.append(
        plots.coactivation_figure(
            {"m1": coactivation.heldout_coactivation(sel.sets(), codes, labels, n_boot=5).matrix}
        )
    )
    upset = figures[0]
    assert len(upset.subfigs) == 2 and len(upset.axes) == 4
    assert [a.get_title() for a in figures[1].axes[:2:1]][0] == "m1"
    assert len(figures[4].axes) == 6
    empty = plots.coactivation_figure({}, missing="no surprise label")
    assert empty.axes[0].texts[0].get_text() == "no surprise label"
    figures.append(empty)
    for fig in figures:
        plt.close(fig)


def test_split_half_replication_keeps_planted_features_and_not_chance_ones():
    """Planted selective features are found on either half and hold on the other; on pure noise the few chance
    selections rarely hold; the halves split every label evenly."""
    codes, labels = planted()
    first, second = selectivity.split_halves(labels, seed=3)
    assert not set(first) & set(second) and len(first) + len(second) == len(labels)
    for label in set(labels):
        assert (
            abs((np.asarray(labels)[first] == label).sum() - (np.asarray(labels)[second] == label).sum()) <= 1
        )
    table = selectivity.split_half_replication(codes, labels, EMOTIONS, seed=3)
    assert list(table.index) == [*EMOTIONS, "all"]
    assert table.loc["all", "selected"] > 0 and table.loc["all", "rate"] > 0.8
    noise_codes, noise_labels = noise()
    chance = selectivity.split_half_replication(
        noise_codes,
        noise_labels,
        EMOTIONS,
        selectivity.SelectivityConfig(alpha=0.5, auroc_threshold=0.6),
        seed=3,
    )
    assert np.isnan(chance.loc["all", "rate"]) or chance.loc["all", "rate"] < table.loc["all", "rate"]

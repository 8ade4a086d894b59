"""Tests for emolib.stats: metrics on hand-computed examples, the vectorised bootstrap against scikit-learn, and
the paired difference and agreement intervals."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score

from emolib import stats

LABELS = ("a", "b", "c")
#             correct: yes  yes  no   yes  no   yes
GOLD = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", "c", "c"]
# class a: tp 2, gold 3, predicted 2 -> F1 = 2*2/(3+2) = 0.8
# class b: tp 1, gold 2, predicted 2 -> F1 = 2*1/(2+2) = 0.5
# class c: tp 1, gold 1, predicted 2 -> F1 = 2*1/(1+2) = 2/3
F1 = {"a": 0.8, "b": 0.5, "c": 2 / 3}


def test_accuracy_and_f1_hand_computed():
    assert stats.accuracy(GOLD, PRED) == pytest.approx(4 / 6)
    assert stats.per_class_f1(GOLD, PRED, LABELS) == pytest.approx(F1)
    assert stats.macro_f1(GOLD, PRED, LABELS) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_a_label_never_seen_nor_predicted_scores_zero_in_macro_f1():
    labels = (*LABELS, "d")
    assert stats.per_class_f1(GOLD, PRED, labels)["d"] == 0.0
    assert stats.macro_f1(GOLD, PRED, labels) == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)


def test_confusion_frame():
    frame = stats.confusion(GOLD, PRED, LABELS)
    assert frame.index.name == "gold" and frame.columns.name == "predicted"
    np.testing.assert_array_equal(frame.to_numpy(), [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    recall = stats.confusion(GOLD, PRED, LABELS, normalize="true")
    np.testing.assert_allclose(recall.loc["a"].to_numpy(), [2 / 3, 1 / 3, 0])


def test_chance_levels():
    assert stats.chance_levels(GOLD, LABELS) == {"uniform": pytest.approx(1 / 3), "majority": 0.5}
    assert stats.chance_levels(["b"] * 3 + ["c"], (*LABELS, "d")) == {"uniform": 0.25, "majority": 0.75}


# ------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_counts_are_seeded_and_resample_n_items():
    counts = stats.bootstrap_counts(GOLD, PRED, LABELS, n_boot=500, seed=3)
    assert counts.shape == (500, 3, 3)
    assert (counts.sum(axis=(1, 2)) == len(GOLD)).all()
    np.testing.assert_array_equal(counts, stats.bootstrap_counts(GOLD, PRED, LABELS, n_boot=500, seed=3))
    assert not np.array_equal(counts, stats.bootstrap_counts(GOLD, PRED, LABELS, n_boot=500, seed=4))
    # resamples only contain (gold, predicted) pairs that occur in the data: the other cells stay empty
    observed = confusion_matrix(GOLD, PRED, labels=list(LABELS)) > 0
    assert (counts[:, ~observed] == 0).all()
    assert (counts[:, observed] > 0).any(axis=0).all()
    # and on average they reproduce the data's confusion counts
    np.testing.assert_allclose(
        counts.mean(axis=0), confusion_matrix(GOLD, PRED, labels=list(LABELS)), atol=0.25
    )


def test_bootstrap_of_all_correct_items_is_diagonal():
    counts = stats.bootstrap_counts(GOLD, GOLD, LABELS, n_boot=200)
    off_diagonal = counts * (1 - np.eye(3, dtype=int))
    assert off_diagonal.sum() == 0


@pytest.mark.parametrize(
    "indices",
    [
        [0, 1, 2, 3, 4, 5],  # the data itself
        [0, 0, 0, 0, 0, 0],  # one item six times: classes b, c absent
        [2, 2, 4, 4, 5, 1],
        [3, 4, 3, 4, 3, 4],  # no gold "a", no gold "c"
        [5, 5, 2, 0, 4, 4],
    ],
)
def test_vectorised_f1_equals_sklearn_on_explicit_resamples(indices):
    gold = [GOLD[i] for i in indices]
    pred = [PRED[i] for i in indices]
    counts = confusion_matrix(gold, pred, labels=list(LABELS))
    expected = f1_score(gold, pred, labels=list(LABELS), average=None, zero_division=0)
    np.testing.assert_allclose(stats._f1_from_counts(counts), expected)
    # batched: the same resample stacked with the original data
    stacked = np.stack([counts, confusion_matrix(GOLD, PRED, labels=list(LABELS))])
    np.testing.assert_allclose(stats._f1_from_counts(stacked)[0], expected)
    np.testing.assert_allclose(stats._f1_from_counts(stacked)[1], list(F1.values()))


def test_bootstrap_f1_equals_sklearn_on_the_resamples_themselves():
    """Rebuild each resample's items from its confusion counts and score them with scikit-learn."""
    counts = stats.bootstrap_counts(GOLD, PRED, LABELS, n_boot=20, seed=1)
    vectorised = stats._f1_from_counts(counts)
    for b in range(20):
        gold, pred = [], []
        for i, g in enumerate(LABELS):
            for j, p in enumerate(LABELS):
                gold += [g] * counts[b, i, j]
                pred += [p] * counts[b, i, j]
        expected = f1_score(gold, pred, labels=list(LABELS), average=None, zero_division=0)
        np.testing.assert_allclose(vectorised[b], expected)


def test_empty_input_cannot_be_bootstrapped():
    with pytest.raises(ValueError, match="empty"):
        stats.bootstrap_counts([], [], LABELS)


@pytest.mark.parametrize(
    ("gold", "pred", "what"),
    [
        (["a", "x"], ["a", "a"], "y_true"),
        (["a", "b"], ["a", "z"], "y_pred"),
        (["A", "b"], ["a", "b"], "y_true"),
    ],
)
def test_labels_outside_the_label_set_raise(gold, pred, what):
    with pytest.raises(ValueError, match=f"{what} contains labels outside"):
        stats.bootstrap_counts(gold, pred, LABELS)
    with pytest.raises(ValueError, match="outside"):
        stats.summarize(gold, pred, LABELS, n_boot=10)
    with pytest.raises(ValueError, match="outside"):
        stats.paired_difference(gold, pred, pred, LABELS, n_boot=10)


def test_chance_levels_reject_unknown_gold_labels():
    with pytest.raises(ValueError, match="outside"):
        stats.chance_levels(["a", "q"], LABELS)


# ------------------------------------------------------------------------------------------ summaries


def big_example(repeat: int) -> tuple[list[str], list[str]]:
    return GOLD * repeat, PRED * repeat


def test_summary_point_estimates_chance_and_shares():
    summary = stats.summarize(GOLD, PRED, LABELS, n_boot=300)
    assert summary.n == 6 and summary.labels == LABELS
    assert summary.accuracy.value == pytest.approx(4 / 6)
    assert summary.macro_f1.value == pytest.approx(sum(F1.values()) / 3)
    assert {k: v.value for k, v in summary.per_class_f1.items()} == pytest.approx(F1)
    assert summary.chance_uniform == pytest.approx(1 / 3) and summary.chance_majority == 0.5
    assert summary.prediction_shares == pytest.approx({"a": 2 / 6, "b": 2 / 6, "c": 2 / 6})
    record = summary.as_dict()
    assert record["accuracy"]["value"] == pytest.approx(4 / 6) and record["labels"] == list(LABELS)
    assert set(record["per_class_f1"]) == set(LABELS)


@pytest.mark.parametrize("repeat", [1, 5, 40])
def test_intervals_contain_the_estimate_and_stay_in_range(repeat):
    gold, pred = big_example(repeat)
    summary = stats.summarize(gold, pred, LABELS, n_boot=1000, seed=2)
    for estimate in [summary.accuracy, summary.macro_f1, *summary.per_class_f1.values()]:
        assert 0 <= estimate.low <= estimate.value <= estimate.high <= 1
        assert estimate.level == 0.95


def test_intervals_narrow_with_more_data():
    widths = []
    for repeat in (2, 8, 32):
        summary = stats.summarize(*big_example(repeat), LABELS, n_boot=2000, seed=0)
        widths.append(summary.accuracy.high - summary.accuracy.low)
    assert widths[0] > widths[1] > widths[2] > 0
    # a percentile interval of a proportion shrinks like 1/sqrt(n): 4x the data, about half the width
    assert widths[1] / widths[0] == pytest.approx(0.5, abs=0.15)


def test_summary_is_deterministic_per_seed():
    a = stats.summarize(*big_example(3), LABELS, n_boot=500, seed=7)
    b = stats.summarize(*big_example(3), LABELS, n_boot=500, seed=7)
    c = stats.summarize(*big_example(3), LABELS, n_boot=500, seed=8)
    assert a.accuracy == b.accuracy and a.macro_f1 == b.macro_f1
    assert (a.accuracy.low, a.accuracy.high, a.macro_f1.low) != (
        c.accuracy.low,
        c.accuracy.high,
        c.macro_f1.low,
    )


def test_other_predictions_count_as_wrong_but_are_not_classes():
    """An unparsable answer lowers accuracy and the F1 of the gold class, but macro-F1 and chance stay over the
    scored labels."""
    pred = ["a", "<unparsed>", "b", "b", "<unparsed>", "c"]
    summary = stats.summarize(GOLD, pred, LABELS, n_boot=300, other_predictions=("<unparsed>",))
    assert summary.labels == LABELS
    assert summary.accuracy.value == pytest.approx(3 / 6)
    expected = f1_score(GOLD, pred, labels=list(LABELS), average=None, zero_division=0)
    # a: tp 1, gold 3, predicted 1 -> 0.5; b: tp 1, gold 2, predicted 2 -> 0.5; c: tp 1, gold 1, predicted 1 -> 1
    np.testing.assert_allclose(expected, [0.5, 0.5, 1.0])
    assert summary.macro_f1.value == pytest.approx(2 / 3)
    assert set(summary.per_class_f1) == set(LABELS)
    assert summary.chance_uniform == pytest.approx(1 / 3)
    assert summary.prediction_shares == pytest.approx(
        {"a": 1 / 6, "b": 2 / 6, "c": 1 / 6, "<unparsed>": 2 / 6}
    )
    assert summary.macro_f1.low <= summary.macro_f1.value <= summary.macro_f1.high
    # the bootstrap of macro-F1 agrees with scoring the original data when every resample is the data
    single = stats.summarize(["a"], ["<unparsed>"], LABELS, n_boot=50, other_predictions=("<unparsed>",))
    assert single.macro_f1.value == single.macro_f1.low == single.macro_f1.high == 0.0
    assert single.accuracy.value == 0.0


def test_gold_labels_may_not_be_other_predictions():
    with pytest.raises(ValueError, match="outside"):
        stats.summarize(["<unparsed>"], ["a"], LABELS, n_boot=10, other_predictions=("<unparsed>",))


def test_estimate_formatting():
    estimate = stats.Estimate(0.5, 0.25, 0.75)
    assert str(estimate) == "0.500 [0.250, 0.750]"
    assert estimate.as_dict() == {"value": 0.5, "low": 0.25, "high": 0.75, "level": 0.95}


# --------------------------------------------------------------------------------- paired differences


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_paired_difference_of_identical_predictions_is_exactly_zero(metric):
    gold, pred = big_example(4)
    delta = stats.paired_difference(gold, pred, list(pred), LABELS, metric=metric, n_boot=500)
    assert delta.value == 0.0 and delta.low == 0.0 and delta.high == 0.0


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_paired_difference_is_b_minus_a(metric):
    gold, worse = big_example(10)
    better = list(gold)  # b is always right
    delta = stats.paired_difference(gold, worse, better, LABELS, metric=metric, n_boot=1000)
    expected = {"accuracy": 1 - 4 / 6, "macro_f1": 1 - sum(F1.values()) / 3}[metric]
    assert delta.value == pytest.approx(expected)
    assert 0 < delta.low <= delta.value <= delta.high
    reverse = stats.paired_difference(gold, better, worse, LABELS, metric=metric, n_boot=1000)
    assert reverse.value == pytest.approx(-expected)
    assert reverse.low == pytest.approx(-delta.high) and reverse.high == pytest.approx(-delta.low)


def test_paired_difference_is_tighter_than_unpaired_intervals():
    """Pairing cancels the item-to-item variation both predictors share."""
    gold, pred = big_example(10)
    almost = list(pred)
    almost[2] = "a"  # fix one mistake
    delta = stats.paired_difference(gold, pred, almost, LABELS, n_boot=2000)
    single = stats.summarize(gold, pred, LABELS, n_boot=2000).accuracy
    assert delta.value == pytest.approx(1 / 60)
    assert delta.high - delta.low < (single.high - single.low) / 3


def test_paired_difference_input_errors():
    with pytest.raises(ValueError, match="same items"):
        stats.paired_difference(GOLD, PRED, PRED[:-1], LABELS)
    with pytest.raises(ValueError, match="metric must be"):
        stats.paired_difference(GOLD, PRED, PRED, LABELS, metric="recall", n_boot=10)


# --------------------------------------------------------------------------------------------- agreement


def test_agreement_rate():
    a = ["a", "b", None, "c", "a", "b", "c", "a"]
    b = ["a", "b", "c", "c", "b", "b", "a", "a"]  # agree on 5 of 8 (None never equals a label)
    estimate = stats.agreement_rate(a, b, n_boot=1000)
    assert estimate.value == pytest.approx(5 / 8)
    assert 0 <= estimate.low <= 5 / 8 <= estimate.high <= 1
    assert stats.agreement_rate(a, b, n_boot=1000) == estimate
    same = stats.agreement_rate(a, list(a), n_boot=100)
    assert (same.value, same.low, same.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        stats.agreement_rate(a, b[:-1])


def test_mean_interval_covers_the_mean_and_shrinks_with_more_items():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    a, b = stats.mean_interval(small, n_boot=500), stats.mean_interval(large, n_boot=500)
    assert a.low <= a.value <= a.high and a.value == pytest.approx(small.mean())
    assert (b.high - b.low) < (a.high - a.low) / 5
    with pytest.raises(ValueError, match="non-empty"):
        stats.mean_interval([])

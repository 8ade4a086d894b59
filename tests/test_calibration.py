"""Contextual and batch calibration remove a planted label prior; recognition tells a prior from recall."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from emolib.lm.calibration import (
    CalibrationError,
    answers,
    batch_calibrated,
    content_free_prior,
    contextual_calibrated,
)
from emolib.stats import recognition

LABELS = ("anger", "joy", "sadness")


def _biased(n_per_label: int = 60, bias: float = 3.0, seed: int = 0):
    """Items whose evidence names their gold label, scored by a model that adds `bias` to "joy"'s logit."""
    rng = np.random.default_rng(seed)
    gold = np.repeat(np.arange(3), n_per_label)
    evidence = rng.normal(0, 0.5, size=(len(gold), 3))
    evidence[np.arange(len(gold)), gold] += 1.5
    prior_logits = np.array([0.0, bias, 0.0])
    return gold, evidence, softmax(evidence + prior_logits, axis=1), softmax(prior_logits)[None, :]


def test_contextual_calibration_removes_an_additive_logit_bias_exactly():
    gold, evidence, probs, content_free = _biased()
    assert (probs.argmax(1) == 1).mean() > 0.8, "the planted prior dominates zero-shot answers"
    calibrated = contextual_calibrated(probs, np.repeat(content_free, 3, axis=0))
    np.testing.assert_allclose(calibrated, softmax(evidence, axis=1), atol=1e-12)
    assert np.allclose(calibrated.sum(1), 1)


def test_batch_calibration_recovers_most_answers_without_labels():
    gold, evidence, probs, _ = _biased()
    zero_shot = (probs.argmax(1) == gold).mean()
    calibrated = batch_calibrated(probs)
    assert np.allclose(calibrated.sum(1), 0)
    assert (calibrated.argmax(1) == gold).mean() > zero_shot + 0.3
    assert answers(calibrated, LABELS)[:2] == [LABELS[j] for j in calibrated.argmax(1)[:2]]


def test_calibration_cannot_help_a_model_without_evidence():
    """Where answers carry no information about gold, calibration only moves label shares: accuracy stays at chance."""
    rng = np.random.default_rng(1)
    gold = np.repeat(np.arange(3), 200)
    probs = softmax(rng.normal(0, 1, size=(600, 3)) + np.array([0, 2.0, 0]), axis=1)
    for scores in (
        batch_calibrated(probs),
        contextual_calibrated(probs, softmax(np.array([[0, 2.0, 0]]), axis=1)),
    ):
        assert abs((scores.argmax(1) == gold).mean() - 1 / 3) < 0.07


@pytest.mark.parametrize(
    "bad",
    [
        np.ones((2, 3)),
        np.zeros((0, 3)),
        np.array([[0.5, 0.5, np.nan]]),
        np.array([[1.2, -0.2, 0.0]]),
        np.ones(3),
    ],
)
def test_bad_probabilities_are_refused(bad):
    with pytest.raises(CalibrationError):
        batch_calibrated(bad)


def test_content_free_labels_must_match():
    with pytest.raises(CalibrationError, match="2 content-free labels for 3"):
        contextual_calibrated(np.full((4, 3), 1 / 3), np.full((1, 2), 0.5))
    np.testing.assert_allclose(content_free_prior(np.array([[0.2, 0.8], [0.4, 0.6]])), [0.3, 0.7])


def test_recognition_known_values():
    gold = ["anger"] * 4 + ["joy"] * 4 + ["sadness"] * 2
    pred = ["anger", "anger", "anger", "joy"] + ["joy"] * 4 + ["joy", "joy"]
    table = recognition(gold, pred, LABELS, n_boot=200).set_index("label")
    assert table.loc["anger", "recall"] == 0.75 and table.loc["anger", "false_rate"] == 0
    assert table.loc["joy", "recall"] == 1 and table.loc["joy", "false_rate"] == pytest.approx(3 / 6)
    assert table.loc["sadness", "recall"] == 0 and table.loc["sadness", "share"] == 0
    assert table.loc["joy", "share"] == pytest.approx(0.7)


def test_a_label_answered_for_every_item_is_not_recognised():
    """Recall 1 from answering "joy" always is a prior, not recognition (the rule must be able to fail)."""
    gold = list(np.repeat(LABELS, 50))
    table = recognition(gold, ["joy"] * 150, LABELS).set_index("label")
    assert table.loc["joy", "recall"] == 1 and table.loc["joy", "excess"] == 0
    assert not table["recognised"].any()
    perfect = recognition(gold, gold, LABELS)
    assert perfect["recognised"].all() and (perfect["excess_low"] > 0.9).all()


def test_recognition_of_a_label_without_gold_items_is_not_judged():
    table = recognition(["anger", "joy"] * 5, ["anger", "joy"] * 5, LABELS).set_index("label")
    assert np.isnan(table.loc["sadness", "recall"]) and not table.loc["sadness", "recognised"]

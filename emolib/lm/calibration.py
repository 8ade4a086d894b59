"""Label-prior corrections of zero-shot answers that use no gold label: contextual and batch calibration.

A small model answers partly from a prior over the label words. Both corrections estimate that prior without labels
and remove it, so a recognition number reported beside them shows how much of it the prior explains:

- contextual calibration (Zhao et al., 2021): the prior is the mean label distribution of content-free inputs
  ("N/A", "", "[MASK]") in the same prompt; answers are re-weighted by its inverse, `q(y|x) ~ p(y|x) / p_cf(y)`.
- batch calibration (Zhou et al., 2024): the prior is the mean label distribution over the evaluated batch; it is
  subtracted, `s(y|x) = p(y|x) - mean_batch p(y|.)` (the paper's linear form).

Both act on label probabilities renormalised over the label set (`Predictions.label_probs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Content-free inputs of contextual calibration (Zhao et al., 2021): their label distributions are averaged.
CONTENT_FREE_TEXTS: tuple[str, ...] = ("N/A", "", "[MASK]")

#: The calibrations the setup chapter reports, in its column order.
CALIBRATIONS: tuple[str, ...] = ("contextual", "batch")


class CalibrationError(ValueError):
    """Label probabilities that cannot be calibrated (wrong shape, not a distribution)."""


def _distributions(probs: np.ndarray, what: str) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise CalibrationError(
            f"{what} must be [n_items >= 1, n_labels >= 2] probabilities, got {probs.shape}"
        )
    if not np.isfinite(probs).all() or (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1, atol=1e-4):
        raise CalibrationError(f"{what} must hold finite non-negative rows that sum to 1 over the label set")
    return probs


def content_free_prior(content_free_probs: np.ndarray) -> np.ndarray:
    """The mean label distribution of the content-free inputs `[n_inputs, n_labels]`, renormalised."""
    prior = _distributions(content_free_probs, "content-free probabilities").mean(axis=0)
    return prior / prior.sum()


def contextual_calibrated(label_probs: np.ndarray, content_free_probs: np.ndarray) -> np.ndarray:
    """`p(y|x) / p_cf(y)`, renormalised per item (Zhao et al., 2021, with W = diag(p_cf)^-1 and b = 0)."""
    probs = _distributions(label_probs, "label probabilities")
    prior = content_free_prior(content_free_probs)
    if prior.shape[0] != probs.shape[1]:
        raise CalibrationError(f"{prior.shape[0]} content-free labels for {probs.shape[1]} scored labels")
    weighted = probs / np.maximum(prior, np.finfo(np.float64).tiny)
    return weighted / weighted.sum(axis=1, keepdims=True)


def batch_calibrated(label_probs: np.ndarray) -> np.ndarray:
    """`p(y|x) - mean over the batch of p(y|.)` (Zhou et al., 2024): scores whose argmax is the calibrated answer
    (not probabilities: every row sums to 0). The batch is every item evaluated together; no label is read."""
    probs = _distributions(label_probs, "label probabilities")
    return probs - probs.mean(axis=0, keepdims=True)


def answers(scores: np.ndarray, labels: Sequence[str]) -> list[str]:
    """The label with the highest score for every item."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(labels):
        raise CalibrationError(f"scores of shape {scores.shape} do not match {len(labels)} labels")
    return [labels[j] for j in scores.argmax(axis=1)]

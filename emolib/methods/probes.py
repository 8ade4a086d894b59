"""Cross-validated linear probes that read labels from representations, beside a shuffled-label control."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from emolib.methods.common import FlowError, as_matrix, one_blas_thread
from emolib.stats import Estimate, summarize


@dataclass(frozen=True)
class ProbeConfig:
    """A cross-validated multinomial logistic-regression probe (standardised features, L2 penalty `C`).

    `folds` is an upper bound: it drops to the smallest class's size (at least 2) so every fold holds every
    class. `control` also fits the same pipeline on permuted labels, the accuracy a probe reaches by memorising
    noise in these features. Intervals are percentile bootstraps over items (`n_boot`, `level`).
    """

    folds: int = 5
    C: float = 1.0
    max_iter: int = 2000
    control: bool = True
    n_boot: int = 2000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise FlowError(f"folds must be at least 2, not {self.folds}")
        if self.C <= 0:
            raise FlowError(f"C must be positive, not {self.C}")
        if not 0 < self.level < 1:
            raise FlowError(f"level must be in (0, 1), not {self.level}")


@dataclass
class ProbeResult:
    """Out-of-fold predictions of one probe, its accuracy and macro-F1, and the shuffled-label control."""

    labels: tuple[str, ...]
    predicted: np.ndarray
    correct: np.ndarray
    accuracy: Estimate
    macro_f1: Estimate
    control: Estimate | None
    chance_majority: float
    folds: int

    def as_row(self) -> dict[str, float]:
        """Flat numbers for a per-layer table."""
        row = {"accuracy": self.accuracy.value, "accuracy_low": self.accuracy.low}
        row |= {"accuracy_high": self.accuracy.high, "macro_f1": self.macro_f1.value}
        if self.control is not None:
            row |= {"control": self.control.value, "control_low": self.control.low}
            row["control_high"] = self.control.high
        return row | {"chance_majority": self.chance_majority, "folds": self.folds}


def _fold_count(y: np.ndarray, folds: int) -> int:
    labels, counts = np.unique(y, return_counts=True)
    if len(labels) < 2:
        raise FlowError(f"a probe needs at least 2 classes, got {labels.tolist()}")
    smallest = int(counts.min())
    if smallest < 2:
        rare = labels[counts < 2].tolist()
        raise FlowError(
            f"classes {rare} have a single item: cross-validation cannot both train and test on them; "
            "drop or merge them"
        )
    if smallest < folds:
        rare = labels[counts == smallest].tolist()
        warnings.warn(
            f"probe folds reduced from {folds} to {smallest}: class {rare[0]!r} has only {smallest} items",
            UserWarning,
            stacklevel=3,
        )
        return smallest
    return folds


def _oof_predictions(X: np.ndarray, y: np.ndarray, folds: int, config: ProbeConfig) -> np.ndarray:
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=config.C, max_iter=config.max_iter))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed)
    with one_blas_thread():
        return cross_val_predict(probe, X, y, cv=cv)


def probe_accuracy(
    X: Float[np.ndarray, "items features"], y, config: ProbeConfig | None = None
) -> ProbeResult:
    """How well a linear probe reads the labels `y` [n] from features `X` [n, d], out of fold, beside its control.

    Each item is predicted by a probe that never saw it, so `correct` is a per-item outcome that later
    bootstraps can average without refitting. The control uses the same folds' pipeline on permuted labels:
    with many features and few items a probe can exceed chance on noise, and the control shows how far.
    """
    config = config or ProbeConfig()
    X = as_matrix(X)
    y = np.asarray(y).astype(str)
    if y.ndim != 1 or len(y) != len(X):
        raise FlowError(f"y must be 1-D with one label per row of X ({len(X)}), got shape {y.shape}")
    folds = _fold_count(y, config.folds)
    labels = tuple(np.unique(y).tolist())
    predicted = _oof_predictions(X, y, folds, config)
    summary = summarize(y, predicted, labels, n_boot=config.n_boot, seed=config.seed, level=config.level)
    control = None
    if config.control:
        shuffled = np.random.default_rng(config.seed).permutation(y)
        control_predicted = _oof_predictions(X, shuffled, folds, config)
        control = summarize(
            shuffled, control_predicted, labels, n_boot=config.n_boot, seed=config.seed, level=config.level
        ).accuracy
    return ProbeResult(
        labels=labels,
        predicted=predicted,
        correct=predicted == y,
        accuracy=summary.accuracy,
        macro_f1=summary.macro_f1,
        control=control,
        chance_majority=summary.chance_majority,
        folds=folds,
    )

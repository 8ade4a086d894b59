"""Classification metrics with bootstrap confidence intervals and chance levels.

Point estimates come from scikit-learn; the bootstrap resamples items and recomputes every metric from the
resampled confusion counts, vectorised, so thousands of resamples cost milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile-bootstrap interval (`level` coverage)."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def __str__(self) -> str:
        return format_interval(self.value, self.low, self.high)

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level}


def format_interval(value: float, low: float, high: float, digits: int = 3, *, signed: bool = False) -> str:
    """`value [low, high]`, every number with `digits` decimals (and a sign with `signed`): how the book writes an
    estimate with its interval."""
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"{value:{spec}} [{low:{spec}}, {high:{spec}}]"


def _indices(y: Sequence[str], labels: Sequence[str], what: str) -> np.ndarray:
    position = {label: i for i, label in enumerate(labels)}
    unknown = sorted({v for v in y if v not in position})
    if unknown:
        raise ValueError(f"{what} contains labels outside {list(labels)}: {unknown}")
    return np.fromiter((position[v] for v in y), dtype=np.int64, count=len(y))


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    return float(accuracy_score(y_true, y_pred))


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over `labels` (a class never predicted nor present scores 0)."""
    return float(f1_score(y_true, y_pred, labels=list(labels), average="macro", zero_division=0))


def per_class_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    scores = f1_score(y_true, y_pred, labels=list(labels), average=None, zero_division=0)
    return {label: float(s) for label, s in zip(labels, scores, strict=True)}


def confusion(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str], normalize: str | None = None
) -> pd.DataFrame:
    """Confusion matrix as a labelled frame (rows: gold, columns: predicted); `normalize="true"` gives recall rows."""
    matrix = confusion_matrix(y_true, y_pred, labels=list(labels), normalize=normalize)
    return pd.DataFrame(
        matrix, index=pd.Index(labels, name="gold"), columns=pd.Index(labels, name="predicted")
    )


def _f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """Per-class F1 from confusion counts `[..., n_labels, n_labels]` (gold x predicted) -> `[..., n_labels]`."""
    tp = np.diagonal(counts, axis1=-2, axis2=-1)
    gold = counts.sum(axis=-1)
    predicted = counts.sum(axis=-2)
    denominator = gold + predicted
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def bootstrap_counts(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> np.ndarray:
    """Confusion counts of `n_boot` item resamples, `[n_boot, n_labels, n_labels]` (seeded, deterministic)."""
    gold = _indices(y_true, labels, "y_true")
    pred = _indices(y_pred, labels, "y_pred")
    n, k = len(gold), len(labels)
    if n == 0:
        raise ValueError("cannot bootstrap an empty set of items")
    samples = resample_indices(n, n_boot, np.random.default_rng(seed))
    cell = gold[samples] * k + pred[samples]  # [n_boot, n]
    offsets = (np.arange(n_boot) * k * k)[:, None]
    counts = np.bincount((cell + offsets).ravel(), minlength=n_boot * k * k)
    return counts.reshape(n_boot, k, k)


def interval_from_draws(value: float, resampled: np.ndarray, level: float) -> Estimate:
    """`value` with the percentile interval of its bootstrap draws `resampled`."""
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return Estimate(float(value), float(low), float(high), level)


def resample_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """`[n_boot, n]` item indices drawn with replacement: one bootstrap resample of `n` items per row."""
    return rng.integers(0, n, size=(n_boot, n))


def mean_estimate(values: np.ndarray, samples: np.ndarray, level: float = 0.95) -> Estimate:
    """Mean of per-item `values` `[n]` with the percentile interval of its means over resamples `samples`
    `[n_boot, n]` (share one `samples` across quantities to pair their intervals)."""
    values = np.asarray(values)
    return interval_from_draws(values.mean(), values[samples].mean(axis=1), level)


def mean_interval(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of per-item `values` with a percentile-bootstrap interval over items (seeded)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0 or not np.isfinite(values).all():
        raise ValueError(f"values must be a non-empty finite 1-D array, got shape {values.shape}")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    samples = resample_indices(len(values), n_boot, np.random.default_rng(seed))
    return mean_estimate(values, samples, level)


@dataclass
class Summary:
    """Everything the baseline tables show for one model, dataset and label set."""

    n: int
    labels: tuple[str, ...]
    accuracy: Estimate
    macro_f1: Estimate
    per_class_f1: dict[str, Estimate]
    chance_uniform: float
    chance_majority: float
    prediction_shares: dict[str, float]

    def as_dict(self) -> dict:
        return {
            "n": self.n,
            "labels": list(self.labels),
            "accuracy": self.accuracy.as_dict(),
            "macro_f1": self.macro_f1.as_dict(),
            "per_class_f1": {k: v.as_dict() for k, v in self.per_class_f1.items()},
            "chance_uniform": self.chance_uniform,
            "chance_majority": self.chance_majority,
            "prediction_shares": self.prediction_shares,
        }


def chance_levels(y_true: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy of a uniform random guess (1/L) and of always answering the most frequent gold label."""
    gold = _indices(y_true, labels, "y_true")
    shares = np.bincount(gold, minlength=len(labels)) / len(gold)
    return {"uniform": 1.0 / len(labels), "majority": float(shares.max())}


def summarize(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    other_predictions: Sequence[str] = (),
) -> Summary:
    """Accuracy, macro-F1 and per-class F1 with bootstrap intervals, chance levels and prediction shares.

    `other_predictions` are answers outside `labels` (e.g. an unparsable generation): they count as wrong and get a
    prediction share, but are not classes of macro-F1 or the chance levels.
    """
    labels = tuple(labels)
    answers = (*labels, *other_predictions)
    counts = bootstrap_counts(y_true, y_pred, answers, n_boot, seed)
    n = len(y_true)
    boot_accuracy = np.trace(counts, axis1=1, axis2=2) / n
    boot_f1 = _f1_from_counts(counts)[:, : len(labels)]  # [n_boot, n_labels]
    point_f1 = per_class_f1(y_true, y_pred, labels)
    chance = chance_levels(y_true, labels)
    pred = _indices(y_pred, answers, "y_pred")
    shares = np.bincount(pred, minlength=len(answers)) / n
    return Summary(
        n=n,
        labels=labels,
        accuracy=interval_from_draws(accuracy(y_true, y_pred), boot_accuracy, level),
        macro_f1=interval_from_draws(macro_f1(y_true, y_pred, labels), boot_f1.mean(axis=1), level),
        per_class_f1={
            label: interval_from_draws(point_f1[label], boot_f1[:, j], level)
            for j, label in enumerate(labels)
        },
        chance_uniform=chance["uniform"],
        chance_majority=chance["majority"],
        prediction_shares={label: float(s) for label, s in zip(answers, shares, strict=True)},
    )


def paired_difference(
    y_true: Sequence[str],
    pred_a: Sequence[str],
    pred_b: Sequence[str],
    labels: Sequence[str],
    metric: str = "accuracy",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """Metric(b) - metric(a) on the same items, with a paired bootstrap interval (same resamples for both)."""
    if not (len(y_true) == len(pred_a) == len(pred_b)):
        raise ValueError("paired_difference needs predictions for the same items")
    if metric not in ("accuracy", "macro_f1"):
        raise ValueError(f"metric must be 'accuracy' or 'macro_f1', not {metric!r}")
    counts_a = bootstrap_counts(y_true, pred_a, labels, n_boot, seed)
    counts_b = bootstrap_counts(y_true, pred_b, labels, n_boot, seed)  # same seed: same resamples

    def value(counts: np.ndarray) -> np.ndarray:
        if metric == "accuracy":
            return np.trace(counts, axis1=-2, axis2=-1) / len(y_true)
        return _f1_from_counts(counts).mean(axis=-1)

    point = {
        "accuracy": lambda p: accuracy(y_true, p),
        "macro_f1": lambda p: macro_f1(y_true, p, labels),
    }[metric]
    return interval_from_draws(point(pred_b) - point(pred_a), value(counts_b) - value(counts_a), level)


def recognition(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Per label: recall with its interval, the prediction share, and whether the label is *recognised*.

    A label prior alone gives a label the same answer rate whatever the gold label is, so recall is compared with
    the rate at which the label is answered for items of the other labels (`false_rate`): the label is recognised
    when the interval of `excess = recall - false_rate` lies above 0. Comparing recall with 1/L instead would call
    a label recognised by a model that answers it for every item. A label with no gold items, or no items of the
    other labels, cannot be judged (`recognised` is False and `excess` NaN).
    """
    labels = tuple(labels)
    gold = _indices(y_true, labels, "y_true")
    pred = _indices(y_pred, labels, "y_pred")
    k = len(labels)
    point = np.zeros((k, k))
    np.add.at(point, (gold, pred), 1)
    counts = np.concatenate([point[None], bootstrap_counts(y_true, y_pred, labels, n_boot, seed)])

    with np.errstate(invalid="ignore", divide="ignore"):
        hits = np.diagonal(counts, axis1=-2, axis2=-1)
        n_gold = counts.sum(axis=-1)
        recall = hits / n_gold
        false_rate = (counts.sum(axis=-2) - hits) / (counts.sum(axis=(-2, -1))[..., None] - n_gold)
    excess = recall - false_rate
    tail = (1 - level) / 2
    rows = []
    for j, label in enumerate(labels):
        judged = n_gold[0, j] > 0 and n_gold[0, j] < len(gold)
        recall_ci = np.nanquantile(recall[1:, j], [tail, 1 - tail]) if judged else (np.nan, np.nan)
        excess_ci = np.nanquantile(excess[1:, j], [tail, 1 - tail]) if judged else (np.nan, np.nan)
        rows.append(
            {
                "label": label,
                "n": int(n_gold[0, j]),
                "recall": float(recall[0, j]) if judged else float("nan"),
                "recall_low": float(recall_ci[0]),
                "recall_high": float(recall_ci[1]),
                "false_rate": float(false_rate[0, j]) if judged else float("nan"),
                "excess": float(excess[0, j]) if judged else float("nan"),
                "excess_low": float(excess_ci[0]),
                "excess_high": float(excess_ci[1]),
                "share": float((pred == j).mean()),
                "recognised": bool(judged and excess_ci[0] > 0),
            }
        )
    return pd.DataFrame(rows)


def agreement_rate(a: Sequence[object], b: Sequence[object], n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Share of items on which two label sequences agree, with a bootstrap interval."""
    same = np.array([x == y for x, y in zip(a, b, strict=True)], dtype=float)
    return mean_interval(same, n_boot=n_boot, seed=seed)

"""Zero-shot baselines: which items to classify, how to run a model on them, and the numbers to report.

The setup chapter calls these per model and dataset; later chapters reuse `evaluation_items` so that every
analysis reads the same items the baselines were measured on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pandas as pd

from emolib import data
from emolib.data.splits import column, first_by_key
from emolib.lm.calibration import (
    CONTENT_FREE_TEXTS,
    answers,
    batch_calibrated,
    content_free_prior,
    contextual_calibrated,
)
from emolib.lm.classify import ClassifierConfig, EmotionClassifier, Predictions, cached_predict
from emolib.lm.models import LoadedModel
from emolib.lm.prompts import PromptTemplate, build_prompt, shuffled_order, template_for
from emolib.stats import Estimate, Summary, agreement_rate, paired_difference, recognition, summarize


@dataclass(frozen=True)
class BaselineConfig:
    """One baseline run. `n_per_label=None` classifies the whole split; otherwise a seeded stratified sample.

    `label_set` is "native" (every label of the dataset, as the paper did for ISEAR) or "ekman" (the six Ekman
    emotions plus neutral, where the dataset has them); other labels are excluded and counted.

    `check_per_label` sizes the label-order and scoring checks (each a further pass per order or mode): the first
    that many items per label of the sample (`check_subset`), or every item when None. Accuracy, macro-F1 and
    generation use the whole sample.
    """

    split: str = "test"
    n_per_label: int | None = 100
    sample_seed: int = 0
    label_set: str = "native"
    n_boot: int = 2000
    order_seeds: tuple[int, ...] = (1, 2, 3)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    check_per_label: int | None = 40

    def __post_init__(self) -> None:
        if self.n_per_label is not None and self.n_per_label < 1:
            raise ValueError(
                f"n_per_label must be at least 1 (or None for the whole split), not {self.n_per_label}"
            )
        if self.check_per_label is not None and self.check_per_label < 1:
            raise ValueError(
                f"check_per_label must be at least 1 (or None for every item), not {self.check_per_label}"
            )


@dataclass
class EvalItems:
    """The items of one dataset a run classifies, with the bookkeeping the chapter reports."""

    dataset: str
    labels: tuple[str, ...]
    ids: list[str]
    texts: list[str]
    gold: list[str]
    excluded: pd.DataFrame
    sampled: pd.DataFrame
    report: data.LoadReport


def run_labels(dataset: str, label_set: str) -> tuple[str, ...]:
    """The labels a run scores for `dataset`, in the dataset's native order."""
    native = data.get_spec(dataset).labels
    if label_set == "native":
        return native
    if label_set == "ekman":
        return tuple(label for label in native if label in data.EKMAN7)
    raise ValueError(f"label_set must be 'native' or 'ekman', not {label_set!r}")


def evaluation_items(dataset: str, config: BaselineConfig) -> EvalItems:
    """Load `dataset`, keep the run's labels (counting exclusions) and `config.split`, then sample per label."""
    loaded, report = data.load_with_report(dataset)
    labels = run_labels(dataset, config.label_set)
    kept, excluded = data.restrict_labels(loaded, labels)
    split = data.select_split(kept, config.split)
    if config.n_per_label is not None:
        split, sampled = data.stratified_subsample(split, config.n_per_label, seed=config.sample_seed)
    else:
        counts = split.to_pandas().groupby("label").size()
        sampled = pd.DataFrame({"split": config.split, "label": counts.index, "taken": counts.to_numpy()})
    return EvalItems(
        dataset=dataset,
        labels=labels,
        ids=column(split, "id"),
        texts=column(split, "text"),
        gold=column(split, "label"),
        excluded=excluded,
        sampled=sampled,
        report=report,
    )


def check_subset(items: EvalItems, per_label: int | None, seed: int = 0) -> EvalItems:
    """The first `per_label` items of each label of `items`, ranked by sha256(seed:id) as `stratified_subsample`
    ranks them, so with the sample's seed they are the items a smaller sample would have drawn (nested samples).
    `items` itself when `per_label` is None or no label has more items than that."""
    if per_label is None or all(items.gold.count(label) <= per_label for label in items.labels):
        return items
    kept: list[int] = []
    for label in items.labels:
        positions = [k for k, g in enumerate(items.gold) if g == label]
        kept.extend(first_by_key(items.ids, positions, per_label, seed))
    kept.sort()
    return dataclasses.replace(
        items,
        ids=[items.ids[k] for k in kept],
        texts=[items.texts[k] for k in kept],
        gold=[items.gold[k] for k in kept],
    )


def _subset_predictions(predictions: Predictions, ids: list[str], kept_ids: list[str]) -> Predictions:
    """`predictions` (made for `ids`) restricted to `kept_ids`, in their order."""
    index = {i: k for k, i in enumerate(ids)}
    rows = [index[i] for i in kept_ids]
    return dataclasses.replace(
        predictions,
        label_logprobs=predictions.label_logprobs[rows],
        generations=None if predictions.generations is None else [predictions.generations[k] for k in rows],
        generated_labels=None
        if predictions.generated_labels is None
        else [predictions.generated_labels[k] for k in rows],
    )


@dataclass
class BaselineResult:
    model: str
    dataset: str
    predictions: Predictions
    summary: Summary
    generated_summary: Summary | None
    agreement: Estimate | None
    parsed_share: float | None

    def row(self) -> dict:
        """One flat row for tables and the README."""
        row = {
            "model": self.model,
            "dataset": self.dataset,
            "n": self.summary.n,
            "labels": len(self.summary.labels),
            "accuracy": self.summary.accuracy.value,
            "accuracy_low": self.summary.accuracy.low,
            "accuracy_high": self.summary.accuracy.high,
            "macro_f1": self.summary.macro_f1.value,
            "macro_f1_low": self.summary.macro_f1.low,
            "macro_f1_high": self.summary.macro_f1.high,
            "chance": self.summary.chance_uniform,
            "top_prediction_share": max(self.summary.prediction_shares.values()),
        }
        if self.agreement is not None:
            row["generated_accuracy"] = (
                self.generated_summary.accuracy.value if self.generated_summary else None
            )
            row["agreement"] = self.agreement.value
            row["parsed"] = self.parsed_share
        return row


def make_classifier(
    lm: LoadedModel,
    labels: tuple[str, ...],
    dataset: str,
    config: ClassifierConfig,
    label_order: tuple[str, ...] | None = None,
    template: PromptTemplate | None = None,
) -> EmotionClassifier:
    parts = build_prompt(
        lm.tokenizer,
        labels,
        chat=lm.info.chat,
        template=template or template_for(dataset),
        label_order=label_order,
    )
    return EmotionClassifier(lm.model, lm.tokenizer, parts, config)


def run_baseline(
    lm: LoadedModel, items: EvalItems, config: BaselineConfig, label_order: tuple[str, ...] | None = None
) -> BaselineResult:
    """Classify `items` (cached on disk) and summarise restricted scoring, generation and their agreement.

    Generation runs on every item, in the same pass: it adds about a quarter to the cost of scoring (measured on
    SmolLM2), less than a second pass over a subset would.
    """
    classifier = make_classifier(lm, items.labels, items.dataset, config.classifier, label_order)
    predictions = cached_predict(classifier, lm.info.name, items.ids, items.texts)
    summary = summarize(items.gold, predictions.predicted, items.labels, n_boot=config.n_boot)
    generated_summary = agreement = parsed = None
    if predictions.generated_labels is not None:
        # Unparsed generations count as wrong: an answer outside the scored set, not a class of macro-F1.
        generated = [g if g is not None else "<unparsed>" for g in predictions.generated_labels]
        generated_summary = summarize(
            items.gold, generated, items.labels, n_boot=config.n_boot, other_predictions=("<unparsed>",)
        )
        agreement = agreement_rate(predictions.generated_labels, predictions.predicted, n_boot=config.n_boot)
        parsed = predictions.agreement()["parsed"]
    return BaselineResult(
        lm.info.name, items.dataset, predictions, summary, generated_summary, agreement, parsed
    )


def label_order_check(
    lm: LoadedModel, items: EvalItems, config: BaselineConfig, reference: BaselineResult
) -> pd.DataFrame:
    """Re-run with the label list shuffled (one row per seed) on `check_subset(items, config.check_per_label)`:
    accuracy change with a paired bootstrap interval, how many predictions flip, and the share of predictions going
    to the label listed first."""
    no_generation = dataclasses.replace(config.classifier, generate=False)
    reference, items = _checked_items(items, config, reference)
    rows = []
    orders = [(None, items.labels)] + [(s, shuffled_order(items.labels, s)) for s in config.order_seeds]
    for seed, order in orders:
        if seed is None:
            predicted = reference.predictions.predicted
        else:
            classifier = make_classifier(lm, items.labels, items.dataset, no_generation, order)
            predicted = cached_predict(classifier, lm.info.name, items.ids, items.texts).predicted
        delta = paired_difference(
            items.gold, reference.predictions.predicted, predicted, items.labels, n_boot=config.n_boot
        )
        rows.append(
            {
                "model": lm.info.name,
                "dataset": items.dataset,
                "order_seed": "listed order" if seed is None else seed,
                "order": ", ".join(order),
                "accuracy": delta.value + reference.summary.accuracy.value,
                "delta_accuracy": delta.value,
                "delta_low": delta.low,
                "delta_high": delta.high,
                "flipped": sum(
                    a != b for a, b in zip(predicted, reference.predictions.predicted, strict=True)
                )
                / len(predicted),
                "first_listed_share": sum(p == order[0] for p in predicted) / len(predicted),
            }
        )
    return pd.DataFrame(rows)


def _checked_items(
    items: EvalItems, config: BaselineConfig, reference: BaselineResult
) -> tuple[BaselineResult, EvalItems]:
    """The checks' items and the reference run restricted to them (its summary is recomputed on them)."""
    subset = check_subset(items, config.check_per_label, config.sample_seed)
    if subset is items:
        return reference, items
    predictions = _subset_predictions(reference.predictions, items.ids, subset.ids)
    summary = summarize(subset.gold, predictions.predicted, items.labels, n_boot=config.n_boot)
    return dataclasses.replace(reference, predictions=predictions, summary=summary), subset


def scoring_check(
    lm: LoadedModel, items: EvalItems, config: BaselineConfig, reference: BaselineResult
) -> dict:
    """Compare the reference run's scoring mode with exact whole-sequence scoring on the same items.

    First-token scoring credits a label with every answer that starts like it; this measures how often that
    shortcut changes the prediction, and the accuracy change with a paired bootstrap interval.
    """
    exact = dataclasses.replace(config.classifier, generate=False, scoring="sequence")
    reference, items = _checked_items(items, config, reference)
    classifier = make_classifier(lm, items.labels, items.dataset, exact)
    sequence = cached_predict(classifier, lm.info.name, items.ids, items.texts).predicted
    delta = paired_difference(
        items.gold, reference.predictions.predicted, sequence, items.labels, n_boot=config.n_boot
    )
    return {
        "model": lm.info.name,
        "dataset": items.dataset,
        "default mode": reference.predictions.scoring_mode,
        "agreement with sequence scoring": agreement_rate(reference.predictions.predicted, sequence).value,
        "accuracy, sequence scoring": delta.value + reference.summary.accuracy.value,
        "accuracy change [95% CI]": str(delta),
    }


@dataclass
class CalibratedBaseline:
    """Zero-shot answers of one model and dataset after a label-prior correction (`method`): the summary, the paired
    change of accuracy and macro-F1 against zero-shot on the same items, per-label recognition
    (`emolib.stats.recognition`) and the prior the method removed (label -> probability; None for zero-shot)."""

    method: str
    summary: Summary
    delta_accuracy: Estimate | None
    delta_macro_f1: Estimate | None
    recognition: pd.DataFrame
    prior: dict[str, float] | None

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "summary": self.summary.as_dict(),
            "delta_accuracy": None if self.delta_accuracy is None else self.delta_accuracy.as_dict(),
            "delta_macro_f1": None if self.delta_macro_f1 is None else self.delta_macro_f1.as_dict(),
            "recognition": self.recognition.to_dict(orient="records"),
            "prior": self.prior,
        }


def calibrate(
    lm: LoadedModel, items: EvalItems, config: BaselineConfig, reference: BaselineResult
) -> dict[str, CalibratedBaseline]:
    """The reference run's answers as they are ("zero-shot") and under contextual and batch calibration
    (`emolib.lm.calibration`), on the same items; no gold label enters a correction.

    Contextual calibration scores the content-free inputs with the reference's prompt (three extra prompts, cached);
    batch calibration estimates the prior from the evaluated items themselves, once, outside the bootstrap.
    """
    labels, gold = items.labels, items.gold
    no_generation = dataclasses.replace(config.classifier, generate=False)
    classifier = make_classifier(lm, labels, items.dataset, no_generation)
    free_ids = [f"content-free:{i}" for i in range(len(CONTENT_FREE_TEXTS))]
    free = cached_predict(
        classifier, lm.info.name, free_ids, list(CONTENT_FREE_TEXTS), allow_empty=True
    ).label_probs
    probs = reference.predictions.label_probs
    zero_shot = reference.predictions.predicted
    boot = {"n_boot": config.n_boot}
    out = {
        "zero-shot": CalibratedBaseline(
            "zero-shot", reference.summary, None, None, recognition(gold, zero_shot, labels, **boot), None
        )
    }
    corrected = {
        "contextual": (contextual_calibrated(probs, free), content_free_prior(free)),
        "batch": (batch_calibrated(probs), probs.mean(axis=0)),
    }
    for method, (scores, prior) in corrected.items():
        predicted = answers(scores, labels)
        out[method] = CalibratedBaseline(
            method=method,
            summary=summarize(gold, predicted, labels, **boot),
            delta_accuracy=paired_difference(gold, zero_shot, predicted, labels, "accuracy", **boot),
            delta_macro_f1=paired_difference(gold, zero_shot, predicted, labels, "macro_f1", **boot),
            recognition=recognition(gold, predicted, labels, **boot),
            prior={label: float(p) for label, p in zip(labels, prior, strict=True)},
        )
    return out

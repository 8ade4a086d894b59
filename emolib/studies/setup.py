"""Chapter 0: each model's zero-shot emotion recognition on every dataset, how much of it a label prior explains
(contextual and batch calibration, per-label recognition), how it reads the answer, and whether the order of the
label list moves it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from emolib import data
from emolib.cache import pairs_digest
from emolib.lm.baselines import (
    BaselineConfig,
    EvalItems,
    calibrate,
    evaluation_items,
    label_order_check,
    make_classifier,
    run_baseline,
    scoring_check,
)
from emolib.lm.calibration import CALIBRATIONS
from emolib.lm.models import LoadedModel, load_model
from emolib.pipeline.results import ResultsMissingError, ResultsPresetError
from emolib.stats import Estimate, confusion, format_interval
from emolib.studies.base import cached_result, read_study_results, records, table
from emolib.verdicts import preset_note

#: Bump when the setup study's numbers change meaning, so cached results are recomputed.
SETUP_VERSION = "2"


@dataclass(frozen=True)
class SetupConfig:
    """Which datasets each model is evaluated on and how. `datasets=None`: every available emotion dataset;
    `order_dataset=None`: ISEAR when available, else the first dataset (the label-order and scoring checks run on
    it). `preset` names the run (it keys nothing here: predictions are cached by their own keys)."""

    preset: str = "full"
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    datasets: tuple[str, ...] | None = None
    #: False skips the label-order and scoring checks (the scale reference: each pass of a large model costs
    #: minutes).
    checks: bool = True

    def dataset_names(self) -> list[str]:
        if self.datasets is not None:
            return list(self.datasets)
        return [d for d in data.available_datasets() if data.get_spec(d).kind == "emotion"]

    def order_dataset(self) -> str:
        names = self.dataset_names()
        return "isear" if "isear" in names else names[0]


def model_facts(lm: LoadedModel) -> dict[str, Any]:
    """The row of the models table: kind, family, size, where the weights come from."""
    info = lm.info
    return {
        "model": info.name,
        "kind": "chat" if info.chat else "base",
        "family": info.family,
        "layers": info.n_layers,
        "width (d_model)": info.d_model,
        "vocabulary": info.d_vocab,
        "parameters (M)": round(info.n_params / 1e6, 1),
        "weights": info.source,
        "compute": info.precision,
    }


def dataset_items(config: SetupConfig) -> dict[str, EvalItems]:
    """The evaluated items of every dataset of the run (the same for every model)."""
    return {d: evaluation_items(d, config.baseline) for d in config.dataset_names()}


def dataset_overview(items: Mapping[str, EvalItems], config: SetupConfig) -> pd.DataFrame:
    """Per dataset: labels scored, rows kept per split, rows skipped and excluded (with reasons), items evaluated."""
    rows = []
    for name, it in items.items():
        counts = it.report.label_counts
        rows.append(
            {
                "dataset": name,
                "labels scored": ", ".join(it.labels),
                "rows kept": it.report.rows_kept,
                **{s: sum(counts.get(s, {}).values()) for s in data.SPLITS},
                "skipped (reason: rows)": "; ".join(f"{k}: {v}" for k, v in it.report.skips.items())
                or "none",
                "excluded (label: rows)": "; ".join(
                    f"{label}: {int(n)}" for label, n in it.excluded.sum(axis=1).items()
                )
                or "none",
                f"evaluated ({config.baseline.split} sample)": len(it.ids),
            }
        )
    return pd.DataFrame(rows).set_index("dataset")


@dataclass
class SetupResult:
    """One model's baselines: a row per dataset (`BaselineResult.row`), each dataset's summary (per-class F1 with
    intervals, prediction shares), its row-normalised confusion matrix and the generation agreement interval; the
    label-order check (a row per order) and the scoring check on the order dataset; the model's facts and the
    rendered prompt of the order dataset's first item. `calibration[dataset][method]` holds the zero-shot answers
    and their contextual and batch calibrations (`CalibratedBaseline.as_dict`: summary, paired changes,
    per-label recognition, the prior removed)."""

    study: ClassVar[str] = "setup"

    model: str
    facts: dict[str, Any]
    baselines: pd.DataFrame
    summaries: dict[str, dict[str, Any]]
    confusions: dict[str, pd.DataFrame]
    agreements: dict[str, Estimate | None]
    label_order: pd.DataFrame
    scoring: dict[str, Any]
    example_prompt: str
    calibration: dict[str, dict[str, dict[str, Any]]]

    def to_json(self) -> dict[str, Any]:
        rows = records(self.baselines, index=False)
        return {
            "facts": self.facts,
            "baselines": [{**row, **self.summaries[row["dataset"]]} for row in rows],
            "confusion": {d: records(m) for d, m in self.confusions.items()},
            "agreement": {d: None if e is None else e.as_dict() for d, e in self.agreements.items()},
            "label_order": records(self.label_order, index=False),
            "scoring_check": self.scoring,
            "example_prompt": self.example_prompt,
            "calibration": self.calibration,
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> SetupResult:
        extra = ("summary", "scoring_mode", "truncated")
        rows = [{k: v for k, v in row.items() if k not in extra} for row in payload["baselines"]]
        return cls(
            model=payload["facts"]["model"],
            facts=dict(payload["facts"]),
            baselines=table(rows),
            summaries={row["dataset"]: {k: row[k] for k in extra} for row in payload["baselines"]},
            confusions={
                d: table(rows, "gold").rename_axis(columns="predicted")
                for d, rows in payload["confusion"].items()
            },
            agreements={
                d: None if e is None else Estimate(e["value"], e["low"], e["high"], e["level"])
                for d, e in payload["agreement"].items()
            },
            label_order=table(payload["label_order"]),
            scoring=dict(payload["scoring_check"]),
            example_prompt=payload["example_prompt"],
            calibration=dict(payload["calibration"]),
        )

    # ------------------------------------------------------------------------------------------- views

    def per_class_f1(self) -> pd.DataFrame:
        """F1 per emotion and dataset with its interval (columns model, dataset, label, f1, low, high)."""
        return pd.DataFrame(
            [
                {
                    "model": self.model,
                    "dataset": d,
                    "label": label,
                    "f1": e["value"],
                    "low": e["low"],
                    "high": e["high"],
                }
                for d, s in self.summaries.items()
                for label, e in s["summary"]["per_class_f1"].items()
            ]
        )

    def agreement_rows(self) -> pd.DataFrame:
        """Restricted scoring against generation per dataset: parse rate, agreement interval, both accuracies."""
        b = self.baselines.set_index("dataset")
        return pd.DataFrame(
            [
                {
                    "model": self.model,
                    "dataset": d,
                    "generation names a label": b.loc[d, "parsed"],
                    "agreement [95% CI]": str(e),
                    "accuracy, restricted": b.loc[d, "accuracy"],
                    "accuracy, generated": b.loc[d, "generated_accuracy"],
                }
                for d, e in self.agreements.items()
                if e is not None
            ]
        )

    def calibration_rows(self) -> pd.DataFrame:
        """Per dataset and method (zero-shot, contextual, batch): accuracy and macro-F1 with intervals, the paired
        change of macro-F1 against zero-shot, the top label's share and how many labels are recognised."""
        rows = []
        for d, methods in self.calibration.items():
            for method, c in methods.items():
                summary, delta = c["summary"], c["delta_macro_f1"]
                rows.append(
                    {
                        "model": self.model,
                        "dataset": d,
                        "method": method,
                        "accuracy [95% CI]": _estimate_text(summary["accuracy"]),
                        "macro-F1 [95% CI]": _estimate_text(summary["macro_f1"]),
                        "macro-F1 change [paired 95% CI]": ""
                        if delta is None
                        else _estimate_text(delta, True),
                        "delta_macro_f1": None if delta is None else delta["value"],
                        "delta_low": None if delta is None else delta["low"],
                        "delta_high": None if delta is None else delta["high"],
                        "top label share": max(summary["prediction_shares"].values()),
                        "recognised": f"{len(self.recognised(d, method))} of {len(c['recognition'])}",
                    }
                )
        return pd.DataFrame(rows)

    def recognition_rows(self) -> pd.DataFrame:
        """Per dataset, method and label: recall with its interval, the rate the label is answered for items of
        other labels, their difference with its interval, the label's answer share, and whether it is recognised."""
        return pd.DataFrame(
            [
                {"model": self.model, "dataset": d, "method": method, **row}
                for d, methods in self.calibration.items()
                for method, c in methods.items()
                for row in c["recognition"]
            ]
        )

    def _calibration_lines(self, order_dataset: str) -> list[str]:
        """How much calibration moves macro-F1 across datasets, and which emotions the order dataset's answers
        recognise with and without it."""
        parts = []
        for method in CALIBRATIONS:
            deltas = [c[method]["delta_macro_f1"] for c in self.calibration.values()]
            up = sum(e["low"] > 0 for e in deltas)
            down = sum(e["high"] < 0 for e in deltas)
            mean = sum(e["value"] for e in deltas) / len(deltas)
            parts.append(
                f"{method} calibration changes macro-F1 by {mean:+.3f} on average, above zero (paired 95% interval) "
                f"on {up} and below zero on {down} of {len(deltas)} datasets"
            )
        labels = [r["label"] for r in self.calibration[order_dataset]["zero-shot"]["recognition"]]
        recognised = {m: self.recognised(order_dataset, m) for m in ("zero-shot", *CALIBRATIONS)}
        listed = "; ".join(f"{m}: {len(v)} ({', '.join(v) or 'none'})" for m, v in recognised.items())
        return [
            "  Removing the label prior without gold labels: " + "; ".join(parts) + ".",
            f"  Emotions recognised on {order_dataset} (recall above the rate the label is given to other emotions' "
            f"items), of {len(labels)}: {listed}.",
        ]

    def recognised(self, dataset: str, method: str = "zero-shot") -> list[str]:
        """The labels `method`'s answers recognise on `dataset` (recall above the label's false-answer rate)."""
        return [r["label"] for r in self.calibration[dataset][method]["recognition"] if r["recognised"]]

    def readme_rows(self, chapter: str = "00 baselines") -> list[dict[str, Any]]:
        """The README rows: accuracy and macro-F1 with intervals per dataset."""
        return [
            {
                "chapter": chapter,
                "model": self.model,
                "dataset": d,
                "n": s["summary"]["n"],
                "accuracy [95% CI]": _estimate_text(s["summary"]["accuracy"]),
                "macro-F1 [95% CI]": _estimate_text(s["summary"]["macro_f1"]),
                "chance": f"{s['summary']['chance_uniform']:.3f}",
                **{
                    f"macro-F1, {method} calibration": _estimate_text(
                        self.calibration[d][method]["summary"]["macro_f1"]
                    )
                    for method in CALIBRATIONS
                },
                "recognised (zero-shot)": f"{len(self.recognised(d))} of {len(s['summary']['labels'])}",
            }
            for d, s in self.summaries.items()
        ]

    def findings(self, order_dataset: str) -> list[str]:
        """The chapter's summary lines for this model: above chance where, its best dataset, how concentrated its
        answers are, how generation agrees, and what shuffling the label list does."""
        sub = self.baselines
        above = sub[sub["accuracy_low"] > sub["chance"]]
        best = sub.loc[sub["accuracy"].idxmax()]
        lines = [
            f"- **{self.model}** is above chance (lower 95% bound above 1/L) on {len(above)} of {len(sub)} datasets; "
            f"its best is {best['dataset']} with accuracy "
            f"{format_interval(best['accuracy'], best['accuracy_low'], best['accuracy_high'])} "
            f"(chance {best['chance']:.3f}). On average {sub['top_prediction_share'].mean():.0%} of its predictions "
            f"go to its most frequent answer."
        ]
        lines += self._calibration_lines(order_dataset)
        if "parsed" in sub:  # generated
            agreed = sum(
                e.value * self.summaries[d]["summary"]["n"]
                for d, e in self.agreements.items()
                if e is not None
            )
            lines.append(
                f"  Generation names a label in {sub['parsed'].mean():.0%} of items and agrees with restricted "
                f"scoring on {agreed / sub['n'].sum():.0%}."
            )
        if len(self.label_order):  # checked
            shuffled = self.label_order[self.label_order["order_seed"] != "listed order"]
            moved = shuffled[(shuffled["delta_low"] > 0) | (shuffled["delta_high"] < 0)]
            lines.append(
                f"  Shuffling the label list flips {shuffled['flipped'].mean():.0%} of predictions on "
                f"{order_dataset}; the accuracy change is distinguishable from zero in {len(moved)} of "
                f"{len(shuffled)} orders."
            )
        return lines


def _estimate_text(estimate: Mapping[str, float], signed: bool = False) -> str:
    return format_interval(estimate["value"], estimate["low"], estimate["high"], signed=signed)


def setup_findings(results: Mapping[str, SetupResult], config: SetupConfig) -> str:
    """The "What we found" block of the baselines chapter (with the quick preset's note)."""
    lines = [line for result in results.values() for line in result.findings(config.order_dataset())]
    if note := preset_note(config.preset):
        lines.append("\n" + note)
    return "\n".join(lines)


def _run(lm: LoadedModel, config: SetupConfig, items: Mapping[str, EvalItems]) -> SetupResult:
    baseline = config.baseline
    order_dataset = config.order_dataset()
    results = {d: run_baseline(lm, it, baseline) for d, it in items.items()}
    order, scoring = pd.DataFrame(), {}
    if config.checks:
        order = label_order_check(lm, items[order_dataset], baseline, results[order_dataset])
        scoring = scoring_check(lm, items[order_dataset], baseline, results[order_dataset])
    example = items[order_dataset]
    parts = make_classifier(lm, example.labels, order_dataset, baseline.classifier).parts
    return SetupResult(
        model=lm.info.name,
        facts=model_facts(lm),
        baselines=pd.DataFrame([r.row() for r in results.values()]),
        summaries={
            d: {
                "summary": r.summary.as_dict(),
                "scoring_mode": r.predictions.scoring_mode,
                "truncated": r.predictions.n_truncated,
            }
            for d, r in results.items()
        },
        confusions={
            d: confusion(items[d].gold, r.predictions.predicted, items[d].labels, normalize="true")
            for d, r in results.items()
        },
        agreements={d: r.agreement for d, r in results.items()},
        label_order=order,
        scoring=scoring,
        example_prompt=parts.render(example.texts[0]),
        calibration={
            d: {method: c.as_dict() for method, c in calibrate(lm, items[d], baseline, r).items()}
            for d, r in results.items()
        },
    )


def run_setup(
    model: str | LoadedModel, config: SetupConfig, items: Mapping[str, EvalItems] | None = None
) -> SetupResult:
    """Zero-shot baselines of one model on every dataset of `config` (`items`: the datasets' items, when the
    caller has them already), cached under the config and the exact items evaluated."""
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    items = dict(items) if items is not None else dataset_items(config)
    digests = {d: pairs_digest(it.ids, it.texts) for d, it in items.items()}
    return cached_result(
        SetupResult,
        lm.info.cache_name,
        (SETUP_VERSION, config, digests),
        lambda: _run(lm, config, items),
        meta={"datasets": list(items)},
    )


def scale_reference_table(results: Mapping[str, SetupResult]) -> pd.DataFrame:
    """Models side by side on the scale reference's items: size, accuracy and macro-F1 with intervals, chance and
    the share of the most predicted label (rows: model, dataset)."""
    rows = []
    for result in results.values():
        for _, row in result.baselines.iterrows():
            rows.append(
                {
                    "model": result.model,
                    "dataset": row["dataset"],
                    "parameters (M)": result.facts["parameters (M)"],
                    "n": row["n"],
                    "accuracy [95% CI]": format_interval(
                        row["accuracy"], row["accuracy_low"], row["accuracy_high"]
                    ),
                    "macro-F1 [95% CI]": format_interval(
                        row["macro_f1"], row["macro_f1_low"], row["macro_f1_high"]
                    ),
                    "chance": row["chance"],
                    "top label share": row["top_prediction_share"],
                }
            )
    return pd.DataFrame(rows).set_index(["model", "dataset"])


def scale_reference_findings(results: Mapping[str, SetupResult], references: list[str]) -> list[str]:
    """One summary line per reference model: its macro-F1 on the reference items against the best book model's
    on the same items, and whether their intervals overlap."""
    lines = []
    for name in references:
        for _, row in results[name].baselines.iterrows():
            dataset = row["dataset"]
            others = [
                r.baselines.set_index("dataset").loc[dataset]
                for m, r in results.items()
                if m not in references and dataset in set(r.baselines["dataset"])
            ]
            if not others:
                continue
            best = max(others, key=lambda r: r["macro_f1"])
            apart = row["macro_f1_low"] > best["macro_f1_high"] or row["macro_f1_high"] < best["macro_f1_low"]
            lines.append(
                f"- The scale reference **{name}** reaches macro-F1 "
                f"{format_interval(row['macro_f1'], row['macro_f1_low'], row['macro_f1_high'])} on {row['n']} "
                f"{dataset} items, against {format_interval(best['macro_f1'], best['macro_f1_low'], best['macro_f1_high'])}"
                f" for the best book model ({best['model']}) on the same items; the intervals "
                f"{'do not overlap' if apart else 'overlap'}."
            )
    return lines


def confusion_matrices(results: Mapping[str, SetupResult]) -> dict[tuple[str, str], pd.DataFrame]:
    """`{(model, dataset): confusion matrix}` for the confusion grid."""
    return {(m, d): matrix for m, r in results.items() for d, matrix in r.confusions.items()}


def recognition_note(result: SetupResult | None, dataset: str, method: str = "zero-shot") -> str:
    """The line every later chapter's verdicts carry for one model: how many of the emotions they cover (those of
    `dataset`) the model recognises by chapter 0's rule, and which. A model chapter 0 has not evaluated on
    `dataset` gets a line that says so: its verdicts then rest on emotions not known to be recognised."""
    if result is None or dataset not in result.calibration:
        return (
            f"Chapter 0 has no {method} result for this model on {dataset}: whether it recognises the emotions "
            "these verdicts cover is unknown."
        )
    rows = result.calibration[dataset][method]["recognition"]
    recognised = [r["label"] for r in rows if r["recognised"]]
    others = [r["label"] for r in rows if not r["recognised"]]
    text = (
        f"These verdicts cover {len(rows)} emotions of {dataset}; the model recognises {len(recognised)} of them "
        f"{method} (chapter 0: recall above the label's false-answer rate)"
    )
    text += f": {', '.join(recognised)}" if recognised else ""
    if others:
        text += f". Findings about {', '.join(others)} describe a model that does not recognise them"
    return text + "."


def recognition_notes(
    models: Sequence[str], dataset: str, preset: str | None = None, method: str = "zero-shot"
) -> dict[str, list[str]]:
    """`recognition_note` per model from chapter 0's results file (every model gets a line; a missing file or model
    is said, not skipped)."""
    try:
        results = read_study_results("00_setup", SetupResult, preset=preset)
    except (ResultsMissingError, ResultsPresetError):  # said in each model's line, not an error
        results = {}
    return {model: [recognition_note(results.get(model), dataset, method)] for model in models}

"""Chapter 5: do the steering gains carry across datasets and models?

`run_generalisation(model, config)` reads, per book model, two regimes on every dataset of `config.datasets`:

- *In-domain*: chapter 4's protocol (`emolib.studies.steering`) on the dataset's own train / dev / test, with the
  steering protocol `config.steering` (chapter 4's, smaller where the chapter budget asks for it) and chapter 1's
  phases (found on ISEAR: a model's layers, not a dataset's). On the source dataset it is chapter 4's own run
  (`config.source`, the same cache entry).
- *Cross-dataset*: chapter 4's plans on the source dataset (ISEAR), frozen, applied to the target's test items
  (the same items as in-domain) on the labels the two share: every intervention's plan of every draw at the verdict's
  n, the bias correction's offsets mapped by label name, and calibration on the target (it needs no labels). The
  model answers among the target's own labels with the target's prompt; macro-F1 averages over the shared labels
  on the items whose gold label is shared, an answer outside them counts as an error, and every target label's
  recall is reported (labels without a counterpart are listed, not dropped).

Mechanisms (beside the regimes, from the same runs): on each target, the gold-gap drop when the source's top-k
causal features of a shared emotion are zeroed, against its matched random features (`TransferResult.ablation`),
and the overlap of the top-k sets ranked independently on each dataset, against matched random features and a
hypergeometric null (`feature_overlap`). And whether chapter 1's phases are the model's or the source dataset's:
chapter 1's profile and three-phase cut on the items of each of `config.phase_datasets`, through the same SAEs
(`emolib.studies.flow.dataset_phases`), boundary by boundary against the source's (`phase_verdicts`).

Verdicts (fixed before the run, `TransferRule`): per (model, dataset, regime) cell, causal steering "holds" when
it beats zero-shot and every equal-data baseline of its regime (one-sided paired bootstrap, Holm across the
regime's cells) within the perplexity tolerance; "partly" when it beats zero-shot only. "Across datasets" holds
for a model when most of its in-domain cells hold (a cell not run or inconclusive counts as not holding; when no
cell could be measured at all the claim is inconclusive, not refuted); "across models" holds when "across datasets"
holds for every book model. The mechanism verdicts
(`mechanism_verdicts`) and the phases' (`phase_verdicts`) are reported beside them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from sae_lens import SAE
from scipy.stats import hypergeom

from emolib import data
from emolib.lm.baselines import make_classifier
from emolib.lm.calibration import CONTENT_FREE_TEXTS, batch_calibrated, contextual_calibrated
from emolib.lm.classify import ClassifierConfig
from emolib.lm.models import LoadedModel, load_model
from emolib.methods.steering import SteeredScorer, SteeringPlan, bootstrap_p, holm
from emolib.methods.tracing import gold_gaps
from emolib.sae.suite import SAESuite, sae_suite
from emolib.stats import format_interval
from emolib.studies.base import cached_result, records, table
from emolib.studies.flow import (
    DatasetPhases,
    FlowConfig,
    FlowResult,
    PhaseCut,
    SubsetFlow,
    dataset_phases,
    phases_reappear_verdict,
)
from emolib.studies.steering import (
    INTERVENTIONS,
    REQUIRED_BASELINES,
    SteeringConfig,
    SteeringResult,
    baseline_rule,
    paired_summaries,
    run_steering,
    study_items,
)
from emolib.verdicts import Verdict, capped_by_sae

#: Bump when `GeneralisationResult` or its computation changes, so cached results are rebuilt.
GENERALISATION_VERSION = "2"  # 2: chapter 1's phases on other datasets

CLAIMS = {
    "across_datasets": "The gains hold across datasets",
    "across_models": "The gains hold across models",
}
#: The cross-dataset regime's verdict (reported beside the claims, not one of the paper's).
TRANSFER_CLAIM = "transfer"

#: The cross-dataset regime's methods: calibration needs no labels (run on the target), the bias offsets and the
#: interventions come frozen from the source; n-shot prompting and the probe have no frozen form.
CROSS_READOUTS = ("zero-shot", "contextual", "batch", "bias")
CROSS_METHODS = (*CROSS_READOUTS, *INTERVENTIONS)
CROSS_REQUIRED = ("contextual", "batch", "bias", "diffmean", "random", "selective")
OTHER = "(other)"


class GeneralisationError(ValueError):
    """A generalisation study that cannot run as configured (names the dataset and the fix)."""


@dataclass(frozen=True)
class TransferRule:
    """The chapter's verdicts, fixed before the run (module docstring)."""

    alpha: float = 0.05
    in_domain: tuple[str, ...] = REQUIRED_BASELINES
    cross: tuple[str, ...] = CROSS_REQUIRED


@dataclass(frozen=True)
class GeneralisationConfig:
    """Chapter 5's datasets and protocols; defaults are the full preset.

    `source` is chapter 4's config (its dataset is the source of the frozen plans and one in-domain cell, read from
    chapter 4's cache); `steering` is the protocol on every other dataset in `datasets` (its `items` name no
    dataset: each cell sets its own, and nothing is excluded there, chapters 1-3 never read those datasets).
    `phase_datasets` are the datasets on which chapter 1's phase analysis (`flow`, chapter 1's config) runs again;
    it chooses nothing the steering reads, so its items may be the steering cells' too.
    """

    preset: str = "full"
    source: SteeringConfig = field(default_factory=SteeringConfig)
    steering: SteeringConfig = field(
        default_factory=lambda: SteeringConfig(
            n_examples=(5,), n_draws=3, exclude_analysed=False, generation_per_label=0
        )
    )
    datasets: tuple[str, ...] = ("meld", "goemotions", "carer_emotion")
    flow: FlowConfig = field(default_factory=FlowConfig)
    phase_datasets: tuple[str, ...] = ("goemotions",)
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    rule: TransferRule = field(default_factory=TransferRule)

    def __post_init__(self) -> None:
        if self.steering.rule.n != self.source.rule.n:
            raise GeneralisationError(
                f"the in-domain verdict's n ({self.steering.rule.n}) must be chapter 4's ({self.source.rule.n}): "
                "the frozen plans are chapter 4's at its n"
            )

    def source_dataset(self) -> str:
        return self.source.items.dataset_name()

    def target_datasets(self) -> list[str]:
        """The datasets of `datasets` that are available here, the source left out (it is chapter 4's cell)."""
        available = data.available_datasets()
        return [d for d in self.datasets if d in available and d != self.source_dataset()]

    def phase_targets(self) -> list[str]:
        """The datasets of `phase_datasets` that are available here, the source left out (it is chapter 1's)."""
        available = data.available_datasets()
        return [d for d in self.phase_datasets if d in available and d != self.source_dataset()]

    def in_domain(self, dataset: str) -> SteeringConfig:
        """The steering protocol on `dataset` (the source: chapter 4's own config)."""
        if dataset == self.source_dataset():
            return self.source
        items = dataclasses.replace(self.steering.items, dataset=dataset)
        return dataclasses.replace(self.steering, preset=self.preset, items=items, saes=self.source.saes)


# ------------------------------------------------------------------------------------------------ transfer


@dataclass
class TransferResult:
    """Chapter 4's frozen source plans on one target dataset (module docstring).

    `summary`: per method, macro-F1 over the shared labels and accuracy on the shared-gold items (mean over the
    source's draws, intervals resampling draws and items). `versus`: causal minus each method, paired, one-sided
    p. `recall`: every target label's recall per method (all test items). `mapping`: each target label and its
    source counterpart (None: no counterpart). `ablation`: per shared emotion, the drop of the gold gap (gold
    score minus the mean of the other labels', which an additive label bias cannot move) on the target's items of
    that emotion when the source's top-k causal features of the emotion (first draw) are zeroed where they fire,
    beside the same for its matched random features; `ablation_pooled` is the excess (causal minus random drop)
    over every shared-gold item with its item-bootstrap interval and one-sided p.
    """

    source: str
    target: str
    labels: tuple[str, ...]
    shared: tuple[str, ...]
    mapping: dict[str, str | None]
    n_items: int
    n_shared_items: int
    summary: pd.DataFrame
    versus: pd.DataFrame
    recall: pd.DataFrame
    ppl_change: float
    ablation: pd.DataFrame
    ablation_pooled: dict[str, float]

    _TABLES: ClassVar[tuple[str, ...]] = ("summary", "versus", "recall", "ablation")

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "labels": list(self.labels),
            "shared": list(self.shared),
            "mapping": self.mapping,
            "n_items": self.n_items,
            "n_shared_items": self.n_shared_items,
            **{name: records(getattr(self, name), index=False) for name in self._TABLES},
            "ppl_change": self.ppl_change,
            "ablation_pooled": self.ablation_pooled,
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> TransferResult:
        return cls(
            source=payload["source"],
            target=payload["target"],
            labels=tuple(payload["labels"]),
            shared=tuple(payload["shared"]),
            mapping=dict(payload["mapping"]),
            n_items=int(payload["n_items"]),
            n_shared_items=int(payload["n_shared_items"]),
            **{name: table(payload[name]) for name in cls._TABLES},
            ppl_change=_float(payload["ppl_change"]),
            ablation_pooled={k: _float(v) for k, v in payload["ablation_pooled"].items()},
        )


def _float(value: Any) -> float:
    """A JSON number back to float (NaN is stored as null)."""
    return float("nan") if value is None else float(value)


def label_mapping(source: Sequence[str], target: Sequence[str]) -> dict[str, str | None]:
    """Each target label's source counterpart: the same canonical label, else None (datasets share the canonical
    spelling, `emolib.data.labels`)."""
    return {label: (label if label in source else None) for label in target}


def mapped_bias(offsets: Mapping[str, float], target: Sequence[str]) -> np.ndarray:
    """Source label offsets on the target's labels; a label without a counterpart gets the mean of the mapped
    offsets (an additive constant changes no answer, so only the shared labels' differences act)."""
    mapped = [offsets[label] for label in target if label in offsets]
    fill = float(np.mean(mapped)) if mapped else 0.0
    return np.array([offsets.get(label, fill) for label in target])


def transfer_study(
    lm: LoadedModel,
    source: SteeringResult,
    target: SteeringConfig,
    final: Sequence[int],
    saes: Mapping[int, SAE],
    config: GeneralisationConfig,
) -> TransferResult:
    """Apply `source`'s frozen plans and offsets to `target`'s test items (module docstring); `saes` by layer."""
    items = study_items(target)
    labels = items.labels
    mapping = label_mapping(source.labels, labels)
    shared = tuple(label for label in labels if mapping[label] is not None)
    if not shared:
        raise GeneralisationError(
            f"{items.test.dataset} shares no label with {source.facts.get('dataset')}: nothing to transfer"
        )
    classifier = make_classifier(
        lm, labels, items.test.dataset, ClassifierConfig(generate=False, progress=False)
    )
    scorer = SteeredScorer(classifier, items.test.texts, from_block=min(final), batch_size=target.batch_size)
    clean = scorer.clean()
    probs = np.exp(clean - clean.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    free = classifier.predict(list(CONTENT_FREE_TEXTS), allow_empty=True).label_probs
    scores: dict[str, list[np.ndarray]] = {
        "zero-shot": [clean],
        "contextual": [contextual_calibrated(probs, free)],
        "batch": [batch_calibrated(probs)],
        "bias": [clean + mapped_bias(b, labels) for b in source.transfer_biases()],
    }
    for method in INTERVENTIONS:
        scores[method] = [
            clean if plan is None else scorer.plan_scores(plan, saes)
            for plan in source.transfer_plans(method)
        ]
    answers = {m: np.stack([s.argmax(axis=1) for s in values]) for m, values in scores.items()}
    summary, versus = _transfer_summaries(answers, items.test.gold, labels, shared, config)
    recall = pd.DataFrame(
        [
            {
                "method": method,
                "emotion": label,
                "recall": float((stack[:, [g == label for g in items.test.gold]] == j).mean()),
            }
            for method, stack in answers.items()
            for j, label in enumerate(labels)
        ]
    )
    ablation, pooled = _ablation(lm.info.name, source, scorer, saes, items.test.gold, labels, shared, config)
    causal = source.runs[(source.runs["method"] == "causal") & (source.runs["n"] == source.rule.n)]
    return TransferResult(
        source=str(source.facts.get("dataset")),
        target=items.test.dataset,
        labels=labels,
        shared=shared,
        mapping=mapping,
        n_items=len(items.test.ids),
        n_shared_items=sum(g in shared for g in items.test.gold),
        summary=summary,
        versus=versus,
        recall=recall,
        ppl_change=float(causal["test_ppl_change"].mean()) if len(causal) else float("nan"),
        ablation=ablation,
        ablation_pooled=pooled,
    )


def _ablation(
    model: str,
    source: SteeringResult,
    scorer: SteeredScorer,
    saes: Mapping[int, SAE],
    gold: Sequence[str],
    labels: Sequence[str],
    shared: Sequence[str],
    config: GeneralisationConfig,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Gold-gap drops on the target when the source's causal (or matched random) features of each shared emotion
    are zeroed where they fire (gain -1, every position but attention sinks, as steering edits)."""
    features = source.transfer_features()[0]
    gold_index = np.array([labels.index(g) for g in gold])
    clean_gap = gold_gaps(scorer.clean(), gold_index)
    rows, excess = [], np.full(len(gold), np.nan)
    for emotion in shared:
        mine = np.flatnonzero(np.asarray(gold) == emotion)
        if emotion not in features or not len(mine):
            continue
        drops = {}
        for kind in ("causal", "random"):
            chosen = {layer: tuple(fs) for layer, fs in features[emotion][kind].items() if fs}
            plan = SteeringPlan(
                model=model,
                method=kind,
                variant="gain",
                strength=-1.0,
                sae_source=source.transfer["sae_source"],
                features=chosen,
                typical={layer: (0.0,) * len(fs) for layer, fs in chosen.items()},
            )
            drops[kind] = clean_gap[mine] - gold_gaps(scorer.plan_scores(plan, saes), gold_index)[mine]
        excess[mine] = drops["causal"] - drops["random"]
        rows.append(
            {
                "emotion": emotion,
                "items": len(mine),
                "clean_gap": float(clean_gap[mine].mean()),
                "causal_drop": float(drops["causal"].mean()),
                "random_drop": float(drops["random"].mean()),
                "excess": float(excess[mine].mean()),
            }
        )
    values = excess[np.isfinite(excess)]
    if not len(values):
        return pd.DataFrame(rows), {"excess": np.nan, "low": np.nan, "high": np.nan, "p_value": np.nan}
    rng = np.random.default_rng(config.seed)
    boot = values[rng.integers(0, len(values), size=(config.n_boot, len(values)))].mean(axis=1)
    tail = (1 - config.level) / 2
    pooled = {
        "excess": float(values.mean()),
        "low": float(np.quantile(boot, tail)),
        "high": float(np.quantile(boot, 1 - tail)),
        "p_value": bootstrap_p(boot),
    }
    return pd.DataFrame(rows), pooled


def feature_overlap(source: SteeringResult, target: SteeringResult, k: int | None = None) -> pd.DataFrame:
    """Per emotion the two datasets share: the Jaccard overlap of the top-k causal features found on each (mean
    over the draws both have), beside the overlap of the source's set with the target's matched random features
    (the control), and on the first draw the overlap count against a null that draws the target's k features at
    random among those active on its examples of the emotion (hypergeometric, one-sided p)."""
    source_sets, target_sets = source.transfer_features(), target.transfer_features()
    rows = []
    for emotion in [e for e in target.labels if e in source.labels]:
        jaccard, control = [], []
        for s_draw, t_draw in zip(source_sets, target_sets, strict=False):
            if emotion not in s_draw or emotion not in t_draw:
                continue
            a = _keys(s_draw[emotion]["causal"])
            jaccard.append(_jaccard(a, _keys(t_draw[emotion]["causal"])))
            control.append(_jaccard(a, _keys(t_draw[emotion]["random"])))
        if not jaccard:
            continue
        first_a = _keys(source_sets[0][emotion]["causal"])
        first_b = _keys(target_sets[0][emotion]["causal"])
        active = _keys(target_sets[0][emotion].get("active", {}))
        size = len(first_b)
        overlap = len(first_a & first_b)
        eligible = len(first_a & active)
        expected = size * eligible / len(active) if active else float("nan")
        rows.append(
            {
                "emotion": emotion,
                "k": size,
                "jaccard": float(np.mean(jaccard)),
                "jaccard_matched_random": float(np.mean(control)),
                "overlap_first_draw": overlap,
                "overlap_null_expected": expected,
                "p_value": float(hypergeom.sf(overlap - 1, len(active), eligible, size))
                if active
                else np.nan,
            }
        )
    return pd.DataFrame(rows)


def _keys(grouped: Mapping[int, Sequence[int]]) -> set[tuple[int, int]]:
    return {(int(layer), int(f)) for layer, fs in grouped.items() for f in fs}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else float("nan")


def _transfer_summaries(
    answers: Mapping[str, np.ndarray],
    gold: Sequence[str],
    labels: Sequence[str],
    shared: Sequence[str],
    config: GeneralisationConfig,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Macro-F1 over the shared labels on shared-gold items, answers outside them mapped to one "other" label."""
    keep = np.array([g in shared for g in gold])
    space = [*shared, OTHER]
    to_space = np.array([space.index(label) if label in shared else len(shared) for label in labels])
    predicted = {m: to_space[a[:, keep]] for m, a in answers.items()}
    y_index = np.array([space.index(g) for g, k in zip(gold, keep, strict=True) if k])
    summary, versus = paired_summaries(
        y_index,
        predicted,
        len(space),
        n_boot=config.n_boot,
        seed=config.seed,
        level=config.level,
        averaged=range(len(shared)),
    )
    return pd.DataFrame(summary), pd.DataFrame(versus)


# ------------------------------------------------------------------------------------------------ result


@dataclass
class GeneralisationResult:
    """One model's chapter 5: the in-domain steering result per dataset (the source's is chapter 4's), the
    frozen source plans per target dataset and chapter 1's phase analysis per phase dataset; `meta` holds the
    timings."""

    study: ClassVar[str] = "generalisation"

    model: str
    source: str
    in_domain: dict[str, SteeringResult]
    cross: dict[str, TransferResult]
    overlap: dict[str, pd.DataFrame]
    meta: dict[str, Any]
    phases: dict[str, DatasetPhases] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source": self.source,
            "in_domain": {d: r.to_json() for d, r in self.in_domain.items()},
            "cross": {d: r.to_json() for d, r in self.cross.items()},
            "overlap": {d: records(t, index=False) for d, t in self.overlap.items()},
            "phases": {d: p.to_json() for d, p in self.phases.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> GeneralisationResult:
        return cls(
            model=payload["model"],
            source=payload["source"],
            in_domain={d: SteeringResult.from_json(r) for d, r in payload["in_domain"].items()},
            cross={d: TransferResult.from_json(r) for d, r in payload["cross"].items()},
            overlap={d: table(t) for d, t in payload["overlap"].items()},
            meta=dict(payload["meta"]),
            phases={d: DatasetPhases.from_json(p) for d, p in payload.get("phases", {}).items()},
        )

    def headroom(self) -> pd.DataFrame:
        """Per dataset: chance (one over the labels), zero-shot, the calibrations and the probe ceiling (the most
        examples) with intervals, and whether zero-shot's interval reaches chance."""
        rows = []
        for dataset, result in self.in_domain.items():
            at = result.summary.set_index(["method", "n"])
            n_max = int(result.summary["n"].max())
            chance = 1 / len(result.labels)
            n = result.rule.n  # methods without examples are summarised at every n, the same rows
            zero = at.loc[("zero-shot", n)]
            rows.append(
                {
                    "dataset": dataset,
                    "labels": len(result.labels),
                    "chance": chance,
                    "zero-shot": _f1_cell(at, "zero-shot", n),
                    "contextual": _f1_cell(at, "contextual", n),
                    "batch": _f1_cell(at, "batch", n),
                    f"probe (n = {n_max})": _f1_cell(at, "probe", n_max),
                    "zero-shot at chance": bool(zero["macro_f1_low"] <= chance),
                }
            )
        return pd.DataFrame(rows).set_index("dataset")


def _f1_cell(at: pd.DataFrame, method: str, n: int) -> str:
    """Macro-F1 [95% CI] of `method` at `n` from a summary indexed by (method, n); "-" where it did not run."""
    if (method, n) not in at.index:
        return "-"
    row = at.loc[(method, n)]
    return format_interval(row["macro_f1"], row["macro_f1_low"], row["macro_f1_high"])


# ------------------------------------------------------------------------------------------------ running


def generalisation_study(
    lm: LoadedModel, config: GeneralisationConfig, final: Sequence[int], suite: SAESuite
) -> GeneralisationResult:
    """Both regimes for one model with its SAE `suite` (uncached; see `run_generalisation`)."""
    saes = {int(hook.split(".")[1]): sae for hook, sae in suite.saes.items()}
    timings: dict[str, float] = {}
    phases = {"final": list(final)}
    source_name = config.source_dataset()
    began = time.perf_counter()
    source = run_steering(lm, config.source, phases)
    timings[f"in-domain {source_name}"] = time.perf_counter() - began
    in_domain = {source_name: source}
    cross, overlap = {}, {}
    for dataset in config.target_datasets():
        began = time.perf_counter()
        in_domain[dataset] = run_steering(lm, config.in_domain(dataset), phases)
        timings[f"in-domain {dataset}"] = time.perf_counter() - began
        began = time.perf_counter()
        cross[dataset] = transfer_study(lm, source, config.in_domain(dataset), final, saes, config)
        timings[f"cross {dataset}"] = time.perf_counter() - began
        overlap[dataset] = feature_overlap(source, in_domain[dataset])
    phases_on = {}
    for dataset in config.phase_targets():
        began = time.perf_counter()
        phases_on[dataset] = dataset_phases(lm, dataset, config.flow)
        timings[f"phases {dataset}"] = time.perf_counter() - began
    return GeneralisationResult(
        model=lm.info.name,
        source=source_name,
        in_domain=in_domain,
        cross=cross,
        overlap=overlap,
        meta={"timings_seconds": timings, "datasets_missing": sorted(set(config.datasets) - set(in_domain))},
        phases=phases_on,
    )


def run_generalisation(
    model: str | LoadedModel, config: GeneralisationConfig | None = None, phases=None
) -> GeneralisationResult:
    """One model's chapter 5 (cached): the final phase from chapter 1's results (`phases` None) or given as a flow
    result or `{name: layers}` (the last phase is the final one)."""
    from emolib.studies.base import read_study_results, result_for
    from emolib.studies.flow import FlowResult
    from emolib.studies.steering import STEERING_VERSION
    from emolib.studies.tracing import study_phases

    config = config or GeneralisationConfig()
    lm = load_model(model) if isinstance(model, str) else model
    if phases is None:
        phases = result_for(
            read_study_results("flow", FlowResult, preset=config.preset), lm.info.name, "01_flow"
        )
    layers, _ = study_phases(phases, config.source.n_phases)
    final = list(layers.values())[-1]
    suite = sae_suite(lm, config.preset, config.source.saes)
    key_parts = (
        GENERALISATION_VERSION,
        STEERING_VERSION,
        config,
        suite.key,
        list(final),
        data.available_datasets(),
    )
    return cached_result(
        GeneralisationResult,
        lm.info.cache_name,
        key_parts,
        lambda: generalisation_study(lm, config, final, suite),
    )


# ------------------------------------------------------------------------------------------------ verdicts


def _cell_verdict(
    model: str,
    dataset: str,
    regime: str,
    versus: pd.DataFrame,
    adjusted: Mapping[str, float | None],
    ppl: float,
    tolerance: float,
    alpha: float,
    flags: Mapping[int, str],
) -> Verdict:
    """A cell's verdict by chapter 4's rule (`baseline_rule`) from Holm-adjusted p-values per comparison (None: not
    run, counts as not beaten)."""
    verdict, numbers, words = baseline_rule(adjusted, ppl, tolerance, alpha)
    numbers["gain_over_zero_shot"] = (
        versus.set_index("versus")["difference"].to_dict().get("zero-shot", np.nan)
    )
    reason = (
        f"{dataset} ({regime}): causal steering {'beats' if numbers['beats_zero_shot'] else 'does not beat'} "
        f"zero-shot and {words}; perplexity change {ppl:+.2%} (tolerance {tolerance:.0%})"
    )
    capped = capped_by_sae(Verdict(verdict, reason, numbers, "transfer_cell"), dict(flags))
    return capped.about(TRANSFER_CLAIM if regime == "cross" else "in_domain", model, f"{dataset}, {regime}")


def _source_flags(result: GeneralisationResult) -> dict[int, str]:
    """The quality goals each final-phase SAE misses, as chapter 4's run on the source recorded them."""
    source = result.in_domain.get(result.source)
    return dict(source.sae_flags) if source is not None else {}


def _p_values(versus: pd.DataFrame, comparisons: Sequence[str]) -> dict[str, float | None]:
    found = versus.set_index("versus")["p_value"].to_dict()
    return {v: (float(found[v]) if v in found else None) for v in comparisons}


def cell_verdicts(
    results: Mapping[str, GeneralisationResult], config: GeneralisationConfig
) -> dict[tuple[str, str, str], Verdict]:
    """Every (model, dataset, regime) cell's verdict, each comparison Holm-adjusted across its regime's cells."""
    rule = config.rule
    raw: dict[tuple[str, str, str], tuple[pd.DataFrame, dict[str, float | None], float, dict]] = {}
    for model, result in results.items():
        for dataset, steering in result.in_domain.items():
            versus = steering.versus[steering.versus["n"] == steering.rule.n]
            causal = steering.runs[
                (steering.runs["method"] == "causal") & (steering.runs["n"] == steering.rule.n)
            ]
            ppl = float(causal["test_ppl_change"].mean()) if len(causal) else float("nan")
            comparisons = ("zero-shot", *rule.in_domain)
            raw[(model, dataset, "in-domain")] = (
                versus,
                _p_values(versus, comparisons),
                ppl,
                steering.sae_flags,
            )
        flags = result.in_domain[result.source].sae_flags if result.source in result.in_domain else {}
        for dataset, transfer in result.cross.items():
            comparisons = ("zero-shot", *rule.cross)
            raw[(model, dataset, "cross")] = (
                transfer.versus,
                _p_values(transfer.versus, comparisons),
                transfer.ppl_change,
                flags,
            )
    adjusted: dict[tuple[str, str, str], dict[str, float | None]] = {key: {} for key in raw}
    for regime in ("in-domain", "cross"):
        keys = [k for k in raw if k[2] == regime]
        comparisons = {v for k in keys for v in raw[k][1]}
        for versus in comparisons:
            family = {k: raw[k][1][versus] for k in keys if raw[k][1].get(versus) is not None}
            corrected = holm({"|".join(k): p for k, p in family.items()})
            for k in keys:
                if versus in raw[k][1]:
                    adjusted[k][versus] = corrected.get("|".join(k))
    tolerance = config.source.ppl_tolerance
    return {
        key: _cell_verdict(*key, raw[key][0], adjusted[key], raw[key][2], tolerance, rule.alpha, raw[key][3])
        for key in raw
    }


def mechanism_verdicts(
    results: Mapping[str, GeneralisationResult], config: GeneralisationConfig
) -> dict[tuple[str, str, str], Verdict]:
    """Per (model, target dataset): "mechanism" (the source's causal features, zeroed, move the target's gold gap more
    than matched random features: pooled excess, one-sided bootstrap p Holm-adjusted across the cells) and
    "overlap" (how many shared emotions' top-k sets found on each dataset overlap beyond the null, Holm across a
    model's emotions and datasets: holds for most of them, partly for some). Both read SAE features, so both are
    capped by the quality of the source's final-phase SAEs (`capped_by_sae`); a cell without a measurable emotion is
    inconclusive."""
    alpha = config.rule.alpha
    pooled = {(m, d): t.ablation_pooled for m, r in results.items() for d, t in r.cross.items()}
    adjusted = holm({"|".join(k): v["p_value"] for k, v in pooled.items() if np.isfinite(v["p_value"])})
    out = {}
    for (model, dataset), v in pooled.items():
        p = adjusted.get(f"{model}|{dataset}")
        numbers = {"excess_drop": v["excess"], "low": v["low"], "high": v["high"]}
        numbers["p_holm"] = np.nan if p is None else p
        if p is None:
            verdict = Verdict(
                "inconclusive", f"{dataset}: no shared emotion could be ablated", numbers, "mechanism"
            )
        else:
            interval = format_interval(v["excess"], v["low"], v["high"], signed=True)
            verdict = Verdict(
                "holds" if p < alpha else "does not hold",
                f"{dataset}: zeroing the source's causal features lowers the gold gap by {interval} more than "
                f"matched random features (Holm-adjusted p = {p:.3g})",
                numbers,
                "mechanism",
            )
        flags = _source_flags(results[model])
        out[(model, dataset, "mechanism")] = capped_by_sae(verdict, flags).about("mechanism", model, dataset)
    for model, result in results.items():
        frames = {d: t for d, t in result.overlap.items() if len(t)}
        raw = {f"{d}|{row.emotion}": row.p_value for d, t in frames.items() for row in t.itertuples()}
        adjusted = holm({k: p for k, p in raw.items() if np.isfinite(p)})
        for dataset in result.cross:
            found = frames.get(dataset)
            if found is None:
                empty = Verdict("inconclusive", f"{dataset}: no shared emotion to compare", {}, "overlap")
                out[(model, dataset, "overlap")] = empty.about("overlap", model, dataset)
                continue
            above = [e for e in found["emotion"] if adjusted.get(f"{dataset}|{e}", 1.0) < alpha]
            numbers = {
                "emotions": len(found),
                "emotions_above_null": len(above),
                "jaccard": float(found["jaccard"].mean()),
                "jaccard_matched_random": float(found["jaccard_matched_random"].mean()),
            }
            reason = (
                f"{dataset}: the top-k causal sets found on each dataset overlap beyond the null for {len(above)} "
                f"of {len(found)} shared emotions ({', '.join(above) or 'none'}); mean Jaccard "
                f"{numbers['jaccard']:.3f}, {numbers['jaccard_matched_random']:.3f} with matched random features"
            )
            verdict = "holds" if len(above) > len(found) / 2 else ("partly" if above else "does not hold")
            capped = capped_by_sae(Verdict(verdict, reason, numbers, "overlap"), _source_flags(result))
            out[(model, dataset, "overlap")] = capped.about("overlap", model, dataset)
    return out


def phase_verdicts(
    results: Mapping[str, GeneralisationResult], flows: Mapping[str, FlowResult], config: GeneralisationConfig
) -> dict[tuple[str, str, str], Verdict]:
    """Per (model, phase dataset): do chapter 1's three-phase boundaries (`flows`, found on the source) reappear on
    the dataset (`phases_reappear_verdict`)? A dataset not run here, or a model without chapter 1's cut, is
    inconclusive (counted, not dropped). The phase-count test's choice on both is in the numbers and the reason."""
    out = {}
    for model, result in results.items():
        flow, source_name = flows.get(model), result.source
        for dataset in [d for d in config.phase_datasets if d != source_name]:
            target = result.phases.get(dataset)
            if target is None or flow is None:
                missing = f"{dataset} is not available here" if target is None else "chapter 1 has no cut"
                verdict = Verdict(
                    "inconclusive", f"{dataset}: not measured ({missing})", {}, "phases_reappear_verdict"
                )
            else:
                source = flow.subset("all")
                verdict = phases_reappear_verdict(source.cut(3), target.cut, source_name, dataset)
                counts = {
                    f"phases chosen on {source_name}": source.chosen,
                    f"phases chosen on {dataset}": target.chosen,
                }
                verdict = dataclasses.replace(
                    verdict,
                    reason=f"{dataset}: {verdict.reason}; the phase-count test picks {_phases(source.chosen)} "
                    f"on {source_name} and {_phases(target.chosen)} on {dataset}",
                    numbers={**verdict.numbers, **counts},
                )
            out[(model, dataset, "phases")] = verdict.about("phases", model, dataset)
    return out


def claim_verdicts(
    results: Mapping[str, GeneralisationResult],
    cells: Mapping[tuple[str, str, str], Verdict],
    config: GeneralisationConfig,
) -> dict[str, Verdict]:
    """Per model, "across datasets" and "across models" (module docstring), keyed "<claim>/<model>".

    Every dataset of `config.datasets` and the source is a cell of every model: one not run (the data absent) or
    inconclusive counts as not holding."""
    datasets = list(dict.fromkeys([config.source_dataset(), *config.datasets]))
    per_model: dict[str, Verdict] = {}
    for model in results:
        verdicts = {d: cells.get((model, d, "in-domain")) for d in datasets}
        held = [d for d, v in verdicts.items() if v is not None and v.verdict == "holds"]
        partly = [d for d, v in verdicts.items() if v is not None and v.verdict in ("holds", "partly")]
        missing = [d for d, v in verdicts.items() if v is None]
        numbers = {"cells": len(datasets), "cells_holding": len(held), "cells_beating_zero_shot": len(partly)}
        reason = (
            f"causal steering beats zero-shot and every equal-data baseline on {len(held)} of {len(datasets)} "
            f"datasets ({', '.join(held) or 'none'}) and zero-shot alone on {len(partly)}"
            + (f"; not run, counted as not holding: {', '.join(missing)}" if missing else "")
        )
        measured = [d for d, v in verdicts.items() if v is not None and v.verdict != "inconclusive"]
        if len(held) > len(datasets) / 2:
            verdict = "holds"
        elif partly:
            verdict = "partly"
        elif measured:
            verdict = "does not hold"
        else:  # every cell inconclusive or not run: the claim cannot hold, nor be refuted
            verdict = "inconclusive"
        per_model[model] = Verdict(verdict, reason, numbers, "most in-domain cells").about(
            "across_datasets", model
        )
    out = {f"across_datasets/{m}": v for m, v in per_model.items()}
    holding = [m for m, v in per_model.items() if v.verdict == "holds"]
    some = [m for m, v in per_model.items() if v.verdict in ("holds", "partly")]
    for model in results:
        reason = (
            f"'across datasets' holds for {len(holding)} of {len(per_model)} book models "
            f"({', '.join(holding) or 'none'}); a verdict of the whole book, the same in every model's column"
        )
        refuted = [m for m, v in per_model.items() if v.verdict == "does not hold"]
        if per_model and len(holding) == len(per_model):
            verdict = "holds"
        elif some:
            verdict = "partly"
        else:
            verdict = "does not hold" if refuted else "inconclusive"
        numbers = {"models": len(per_model), "models_holding": len(holding)}
        out[f"across_models/{model}"] = Verdict(verdict, reason, numbers, "every book model").about(
            "across_models", model
        )
    return out


# ------------------------------------------------------------------------------------------------ the chapter


def headroom_table(results: Mapping[str, GeneralisationResult]) -> pd.DataFrame:
    return pd.concat({name: r.headroom() for name, r in results.items()}, names=["model"])


def regime_table(results: Mapping[str, GeneralisationResult], regime: str) -> pd.DataFrame:
    """Test macro-F1 [95% CI] per (model, dataset) and method at the verdict's n, in one regime."""
    rows = []
    for name, result in results.items():
        if regime == "in-domain":
            parts = {d: r.summary[r.summary["n"] == r.rule.n] for d, r in result.in_domain.items()}
        else:
            parts = {d: r.summary for d, r in result.cross.items()}
        for dataset, summary in parts.items():
            row = {"model": name, "dataset": dataset}
            for r in summary.itertuples():
                row[r.method] = format_interval(r.macro_f1, r.macro_f1_low, r.macro_f1_high)
            rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "dataset"])


def regime_summaries(
    results: Mapping[str, GeneralisationResult], regime: str
) -> dict[str, dict[str, pd.DataFrame]]:
    """Per model and dataset, the summary rows of one regime at the verdict's n (for `plots.transfer_panels`)."""
    if regime == "in-domain":
        return {
            name: {d: r.summary[r.summary["n"] == r.rule.n] for d, r in result.in_domain.items()}
            for name, result in results.items()
        }
    return {name: {d: t.summary for d, t in result.cross.items()} for name, result in results.items()}


def verdict_table(cells: Mapping[tuple[str, str, str], Verdict]) -> pd.DataFrame:
    """Every cell's verdict and the gain over zero-shot, rows (model, dataset), a column pair per regime."""
    rows = [
        {
            "model": model,
            "dataset": dataset,
            "regime": regime,
            "verdict": v.verdict,
            "causal minus zero-shot": v.numbers.get("gain_over_zero_shot", np.nan),
            "baselines beaten": f"{v.numbers.get('baselines_beaten', 0)} of {v.numbers.get('baselines', 0)}",
        }
        for (model, dataset, regime), v in cells.items()
        if regime in ("in-domain", "cross")
    ]
    return pd.DataFrame(rows).set_index(["model", "dataset", "regime"]).sort_index()


def mapping_table(results: Mapping[str, GeneralisationResult]) -> pd.DataFrame:
    """Per target dataset, each label's source counterpart ("-": none: its items are left out of the shared-label
    macro-F1, its recall is in the recall table)."""
    seen: dict[str, dict[str, str]] = {}
    for result in results.values():
        for dataset, transfer in result.cross.items():
            seen[dataset] = {label: (m or "-") for label, m in transfer.mapping.items()}
    return pd.DataFrame(
        [{"target": d, "label": label, "counterpart": m} for d, ms in seen.items() for label, m in ms.items()]
    )


def timings_table(results: Mapping[str, GeneralisationResult]) -> pd.DataFrame:
    return pd.DataFrame({name: r.meta["timings_seconds"] for name, r in results.items()}).fillna(0.0)


#: How the findings word each verdict that is not one of the paper's claims.
_NOTE_WORDING = {
    "cross": "Chapter 4's frozen plans on {dataset}",
    "mechanism": "Chapter 4's causal features drive predictions on {dataset}",
    "overlap": "The causal features found on {dataset} are those found on the source",
    "phases": "Chapter 1's phases reappear on {dataset}",
}


def transfer_notes(cells: Mapping[tuple[str, str, str], Verdict]) -> dict[str, list[str]]:
    """Per model, one findings line per cross-dataset, mechanism and overlap cell (not the paper's claims)."""
    notes: dict[str, list[str]] = {}
    for (model, dataset, regime), v in cells.items():
        if regime in _NOTE_WORDING:
            what = _NOTE_WORDING[regime].format(dataset=dataset)
            notes.setdefault(model, []).append(f"{what}: **{v.verdict}** ({v.reason}).")
    return notes


def _phases(n: int) -> str:
    return f"{n} phase" if n == 1 else f"{n} phases"


def phases_table(
    results: Mapping[str, GeneralisationResult], flows: Mapping[str, FlowResult]
) -> pd.DataFrame:
    """Per (model, dataset): items, the model's accuracy, the phase-count test's choice, the R^2 of three phases
    and of the smooth trend, and the three-phase boundaries with their bootstrap intervals; the source's row from
    chapter 1 first."""
    rows = []
    for model, result in results.items():
        flow = flows.get(model)
        if flow is not None:
            source = flow.subset("all")
            rows.append(
                _phases_row(
                    model, result.source, source, accuracy=flow.facts.get("model accuracy"), cut=source.cut(3)
                )
            )
        for dataset, p in result.phases.items():
            rows.append(_phases_row(model, dataset, p, accuracy=p.accuracy, cut=p.cut))
    return pd.DataFrame(rows).set_index(["model", "dataset"]) if rows else pd.DataFrame()


def _phases_row(
    model: str, dataset: str, phases: SubsetFlow | DatasetPhases, *, accuracy: float | None, cut: PhaseCut
) -> dict[str, Any]:
    """One row of `phases_table`: chapter 1's subset and another dataset's analysis carry the same phase-count
    fields (`n_items`, `test`, `chosen`, `trend_r2`); their accuracy and three-phase cut are read differently."""
    test = phases.test
    return {
        "model": model,
        "dataset": dataset,
        "items": phases.n_items,
        "accuracy": accuracy,
        "phases chosen": phases.chosen,
        "R2 three phases": float(test.loc[3, "r2"]) if 3 in test.index else np.nan,
        "R2 smooth trend": phases.trend_r2,
        "three-phase boundaries [95% CI]": cut.boundaries_text(),
    }


def ablation_table(results: Mapping[str, GeneralisationResult]) -> pd.DataFrame:
    """Per (model, target, emotion): gold-gap drops from zeroing the source's causal and matched random features."""
    frames = {
        (name, dataset): t.ablation.set_index("emotion")
        for name, r in results.items()
        for dataset, t in r.cross.items()
        if len(t.ablation)
    }
    return pd.concat(frames, names=["model", "target"]) if frames else pd.DataFrame()


def overlap_table(results: Mapping[str, GeneralisationResult]) -> pd.DataFrame:
    """Per (model, target, emotion): `GeneralisationResult.overlap`."""
    frames = {
        (name, dataset): t.set_index("emotion")
        for name, r in results.items()
        for dataset, t in r.overlap.items()
        if len(t)
    }
    return pd.concat(frames, names=["model", "target"]) if frames else pd.DataFrame()


def readme_row(model: str, verdicts: Mapping[str, Verdict]) -> dict[str, Any]:
    return {
        "Generalisation (ch. 5)": model,
        **{wording: verdicts[f"{key}/{model}"].verdict for key, wording in CLAIMS.items()},
    }

"""Chapter 2: shared and specific emotion features in the final phase, Disgust's diffuseness, Surprise's co-activation.

`run_features(model, config, final_phase_layers)` finds, in the final phase of the layer flow (read from chapter 1's
results), the SAE features selective for each emotion, counts the shared and specific ones beside shuffled labels
and bootstrap intervals, measures how diffuse each emotion's features are, which of them carry general emotional
content, and whether Surprise's features fire on the other emotions' items. It returns a `FeaturesResult` whose
table views and verdicts are what the chapter shows.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from sae_lens import SAE

from emolib import data
from emolib.lm.models import LoadedModel, load_model
from emolib.methods.cards import promoted_tokens, top_activating
from emolib.methods.coactivation import HeldOutCoactivation, heldout_coactivation
from emolib.methods.common import FeatureError
from emolib.methods.diffuseness import compare_diffuseness, diffuseness
from emolib.methods.feature_sets import (
    NullSharedSpecific,
    intersections,
    jaccard,
    shared_specific,
    shuffled_shared_specific,
    specific_sets,
)
from emolib.methods.selectivity import (
    EMOTIONAL,
    SETS,
    BootstrapConfig,
    PooledCodes,
    Selectivity,
    SelectivityConfig,
    bootstrap_selectivity,
    contrast_labels,
    emotional_vs_neutral,
    pool_layers,
    selectivity,
    shuffled_control,
    split_half_replication,
)
from emolib.sae.matching import match_features
from emolib.sae.suite import SAESuite, SuiteConfig, sae_suite, seed_flags, seed_saes
from emolib.stats import format_interval
from emolib.studies.base import cached_result, plain, read_study_results, records, result_for, table
from emolib.studies.flow import FlowResult
from emolib.studies.items import AnalysisConfig, AnalysisSet, analysis_set
from emolib.verdicts import Verdict, capped_by_sae, goals_missed, stable_across_seeds

#: Bump when what `run_features` computes changes, so cached results are recomputed.
#: (2: split-half replication, the cut range; 3: the emotion-set rule the verdict reads; 4-5: SAE seeds; 6: the
#: seed SAEs' quality; 7: measured on their training's tokens)
FEATURES_VERSION = "7"

#: The chapter's claims, in the order "What we found" lists them.
CLAIMS = {
    "shared_and_specific": "Shared and specific features",
    "disgust_more_diffuse": "Disgust more diffuse",
    "surprise_coactivates": "Surprise co-activates",
}

#: How the results file states the chapter's definition of the final phase and its features.
DEFINITION = (
    "final phase = last phase of the flow chapter's three-phase cut (all items); features are "
    "(layer, feature) pairs of every layer in it, analysed together"
)

#: `FinalPhase.source` when the chapter's parameter sets the final phase.
PARAMETER_SOURCE = "parameter final_phase_layers (not the flow chapter)"


# ------------------------------------------------------------------------------------------------ verdict rules


def mix_verdict(
    full: pd.DataFrame, boot: pd.DataFrame, boot_null: pd.DataFrame, n_shuffles: int, alpha: float = 0.05
) -> Verdict:
    """Do an emotion's selective features mix shared and specific ones, beyond chance?

    `full`: `NullSharedSpecific.summary` of the counts; `boot`: `shared_specific(sel, draws, criterion=...)`; and
    `boot_null`: the summary of the draws by the same rule. The chapter passes the emotion-set rule's tables
    (`selectivity.emotion_sets`), which see features shared by many emotions that one-vs-rest misses. Holds when the totals of specific and of shared features
    both beat the shuffled labels (permutation p <= `alpha`) and at least half the emotions have both kinds, each
    with its bootstrap lower bound above the null's 95th percentile for that emotion; partly when both kinds are
    found and only one total beats the null, or fewer emotions have both; does not hold when neither total beats
    the null or one kind is not found at all (a mix with nothing shared is no mix). Inconclusive when
    `n_shuffles` cannot give p <= `alpha`.
    """
    rule = "mix_verdict"
    if 1 / (1 + n_shuffles) > alpha:
        return Verdict(
            "inconclusive",
            f"{n_shuffles} label shuffles cannot give a permutation p-value at or below {alpha}",
            numbers={"n_shuffles": n_shuffles, "smallest_p": 1 / (1 + n_shuffles), "alpha": alpha},
            rule=rule,
        )
    specific_p, shared_p = (
        full.loc["any", ("n_specific", "p_value")],
        full.loc["any", ("n_shared", "p_value")],
    )
    emotions = [e for e in boot.index if e != "any"]
    both = [
        e
        for e in emotions
        if boot.loc[e, "n_specific_low"] > boot_null.loc[e, ("n_specific", "null_q95")]
        and boot.loc[e, "n_shared_low"] > boot_null.loc[e, ("n_shared", "null_q95")]
    ]
    totals = (
        f"{int(full.loc['any', ('n_specific', 'observed')])} specific (p = {specific_p:.3f}) and "
        f"{int(full.loc['any', ('n_shared', 'observed')])} shared (p = {shared_p:.3f}) selective features"
    )
    per_emotion = f"{len(both)} of {len(emotions)} emotions have both beyond the null" + (
        f" ({', '.join(both)})" if both else ""
    )
    numbers = {
        "n_specific": int(full.loc["any", ("n_specific", "observed")]),
        "p_specific": float(specific_p),
        "n_shared": int(full.loc["any", ("n_shared", "observed")]),
        "p_shared": float(shared_p),
        "emotions_with_both": len(both),
        "n_emotions": len(emotions),
        "alpha": alpha,
    }
    if specific_p <= alpha and shared_p <= alpha and 2 * len(both) >= len(emotions):
        return Verdict("holds", f"{totals}; {per_emotion}", numbers, rule)
    missing = [kind for kind in ("specific", "shared") if numbers[f"n_{kind}"] == 0]
    if missing:  # a mix needs both kinds: many specific features and no shared one is not partly a mix
        return Verdict(
            "does not hold", f"{totals}: no {missing[0]} feature at all; {per_emotion}", numbers, rule
        )
    if specific_p <= alpha or shared_p <= alpha:
        return Verdict("partly", f"{totals}; {per_emotion}", numbers, rule)
    return Verdict(
        "does not hold", f"{totals}: neither total beats shuffled labels; {per_emotion}", numbers, rule
    )


def fragile_if_cut_matters(verdict: Verdict, cut_range: pd.DataFrame | None, alpha: float = 0.05) -> Verdict:
    """`verdict` of the chosen final phase, read against the cut range: when whether both totals (specific and
    shared, the emotion-set rule's `p_specific` and `p_shared`) beat the shuffled labels changes with where the final phase starts (within its bootstrap interval), the
    finding exists for some cuts only: it is fragile, and a "holds" becomes "partly"."""
    if cut_range is None or len(cut_range) < 2:
        return verdict
    both = (cut_range["p_specific"] <= alpha) & (cut_range["p_shared"] <= alpha)
    if both.nunique() == 1:
        return dataclasses.replace(verdict, numbers={**verdict.numbers, "fragile": False})
    starts = ", ".join(f"layer {first}: {'both' if ok else 'not both'}" for first, ok in both.items())
    note = f"; fragile: whether both totals beat shuffled labels depends on where the final phase starts ({starts})"
    outcome = "partly" if verdict.verdict == "holds" else verdict.verdict
    return dataclasses.replace(
        verdict, verdict=outcome, reason=verdict.reason + note, numbers={**verdict.numbers, "fragile": True}
    )


def diffuse_verdict(
    comparisons: Mapping[str, pd.DataFrame] | None, n_support: float | None, emotion: str = "disgust"
) -> Verdict:
    """Is `emotion` more diffuse than the others' mean? `comparisons[measure]` are `compare_diffuseness` tables
    (row `others (mean)`); `n_support` is the emotion's number of selective features. `comparisons` is None when
    the data have no `emotion` label.

    Holds when every measure's paired interval is above zero; partly when some are; does not hold when none is
    and some are below zero (more concentrated); inconclusive when all include zero, the emotion has no selective
    features or no label.
    """
    rule = "diffuse_verdict"
    if comparisons is None:
        return Verdict("inconclusive", f"no {emotion} label", rule=rule)
    if not n_support:
        return Verdict(
            "inconclusive",
            f"{emotion} has no selective features, so its diffuseness is undefined",
            numbers={"n_support": n_support},
            rule=rule,
        )
    rows = {m: c.loc["others (mean)"] for m, c in comparisons.items()}
    above = [m for m, r in rows.items() if r["low"] > 0]
    below = [m for m, r in rows.items() if r["high"] < 0]
    described = "; ".join(
        f"{m} {r['difference']:+.3g} [{r['low']:+.3g}, {r['high']:+.3g}]" for m, r in rows.items()
    )
    text = f"{emotion} minus the others' mean: {described}"
    numbers: dict[str, Any] = {"n_support": float(n_support)}
    for m, r in rows.items():
        numbers |= {f"{m}_difference": r["difference"], f"{m}_low": r["low"], f"{m}_high": r["high"]}
    if len(above) == len(rows):
        return Verdict("holds", text, numbers, rule)
    if above:
        return Verdict("partly", text, numbers, rule)
    if below:
        return Verdict("does not hold", text, numbers, rule)
    return Verdict("inconclusive", text, numbers, rule)


def coactivation_verdict(result: HeldOutCoactivation | None, emotion: str = "surprise") -> Verdict:
    """Do `emotion`'s features fire on the other emotions' items more than the other emotions' features do?
    Holds when its `excess` interval is above zero, does not hold when below; otherwise inconclusive (also when
    there is no such label or none of its features could be measured)."""
    rule = "coactivation_verdict"
    if result is None or emotion not in result.emotions:
        return Verdict("inconclusive", f"no {emotion} label in the data", rule=rule)
    if result.n_measured[emotion] == 0:
        return Verdict(
            "inconclusive",
            f"no {emotion} feature was chosen and measured on held-out items",
            numbers={"n_measured": 0},
            rule=rule,
        )
    ex = result.excess(emotion)
    table = result.table()
    rank = int(table["off_diagonal"].rank(ascending=False).loc[emotion])
    n_rows = int(table["off_diagonal"].notna().sum())
    text = (
        f"{emotion} excess co-activation {ex} ({result.n_measured[emotion]} features); its row ranks {rank} of "
        f"{n_rows}"
    )
    numbers = {
        "excess": ex.value,
        "excess_low": ex.low,
        "excess_high": ex.high,
        "n_measured": result.n_measured[emotion],
        "rank": rank,
        "n_rows": n_rows,
    }
    if not np.isfinite(ex.value) or not np.isfinite(ex.low):
        return Verdict("inconclusive", text, numbers, rule)
    if ex.low > 0:
        return Verdict("holds", text, numbers, rule)
    if ex.high < 0:
        return Verdict("does not hold", text, numbers, rule)
    return Verdict("inconclusive", text, numbers, rule)


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class FeaturesConfig:
    """Everything the features study's numbers depend on.

    Label shuffles for the pooled final phase (`n_shuffles`) and for each layer on its own (`layer_shuffles`),
    bootstrap resamples (`n_boot`, selectivity and co-activation), the size of the feature cards and of the
    top-feature table; the selectivity rule (`selectivity`) and the rule for choosing Surprise's features on the
    dev items alone (`held_out_selectivity`: the quick preset has 6 items a label there); the permutation p-value at
    which a count beats the shuffled labels (`verdict_alpha`); the dataset with surprise and neutral labels for the
    second analysis set (`surprise_dataset`, the built-in set when it is not available); the labels the claims
    name; the diffuseness measures the Disgust test uses. `sae_seeds` retrain the final phase's SAEs with other
    training seeds, on which every verdict is computed again (a verdict the seeds disagree on is inconclusive), and
    a feature is found again in another seed's SAE when a decoder direction there has cosine at least
    `match_cosine` with it. `preset` keys the items (`items`) and SAEs (`saes`) read.
    """

    n_shuffles: int = 39
    n_boot: int = 200
    layer_shuffles: int = 5
    card_texts: int = 3
    card_tokens: int = 8
    seed: int = 0
    selectivity: SelectivityConfig = SelectivityConfig()
    held_out_selectivity: SelectivityConfig = SelectivityConfig(min_items=5)
    verdict_alpha: float = 0.05
    surprise_dataset: str = "goemotions"
    diffuse: str = "disgust"
    surprise: str = "surprise"
    neutral: str = "neutral"
    measures: tuple[str, ...] = ("k50", "k80", "entropy")
    top_features: int = 5
    sae_seeds: tuple[int, ...] = (1, 2)
    match_cosine: float = 0.9
    preset: str = "full"
    items: AnalysisConfig = AnalysisConfig()
    saes: SuiteConfig = SuiteConfig()

    @property
    def bootstrap(self) -> BootstrapConfig:
        """The item resamples of the selectivity bootstrap (stratified by label, seeded)."""
        return BootstrapConfig(n_boot=self.n_boot, seed=self.seed)


def second_dataset(config: FeaturesConfig) -> str:
    """The dataset of the second analysis set: `config.surprise_dataset`, or the built-in set when it is not
    available."""
    return config.surprise_dataset if config.surprise_dataset in data.available_datasets() else "builtin"


def results_config(
    config: FeaturesConfig, final_phase_layers: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Any]:
    """The `config` block of the chapter's results file: the config, the bootstrap and dataset actually used, the
    final-phase override and the definition of a final-phase feature."""
    return {
        **plain(config),
        "bootstrap": plain(config.bootstrap),
        "surprise_dataset": second_dataset(config),
        "final_phase_layers": plain(final_phase_layers),
        "definition": DEFINITION,
    }


# ------------------------------------------------------------------------------------------------ final phase


@runtime_checkable
class PhaseSource(Protocol):
    """What the features study reads of the flow study (`FlowResult`): its cuts and the preferred phase count."""

    def phases(self, n_phases: int = 3, subset: str = "all") -> Mapping[str, Sequence[int]]: ...

    def final_phase(self, n_phases: int = 3, subset: str = "all") -> Sequence[int]: ...

    def chosen_phase_count(self, subset: str = "all") -> int: ...


@dataclass(frozen=True)
class FinalPhase:
    """The layers of a model's final phase and where they come from.

    `source` names the flow result read (or the parameter); `n_phases` is the number of phases of the cut it comes
    from and `chosen` the number the flow chapter's phase-count test preferred (None when set by parameter);
    `first_range` the item-bootstrap interval of its first layer (None when set by parameter): the cuts a finding
    must survive."""

    first: int
    last: int
    source: str
    n_phases: int | None = None
    chosen: int | None = None
    first_range: tuple[int, int] | None = None

    def alternatives(self) -> list[int]:
        """First layers to re-run the final phase from: the ends of `first_range` other than `first`."""
        if self.first_range is None:
            return []
        return sorted({int(b) for b in self.first_range if int(b) != self.first and int(b) <= self.last})

    @property
    def layers(self) -> list[int]:
        return list(range(self.first, self.last + 1))

    @classmethod
    def from_flow(cls, flow: PhaseSource, model: str, n_phases: int = 3, subset: str = "all") -> FinalPhase:
        """The last phase of the flow study's best `n_phases`-phase cut of `subset` (the paper's three phases)."""
        layers = flow.final_phase(n_phases=n_phases, subset=subset)
        first_range = None
        if isinstance(flow, FlowResult):  # the bootstrap interval of the final phase's first layer
            interval = flow.subset(subset).cut(n_phases).intervals[-1]
            first_range = (int(interval.low), int(interval.high))
        return cls(
            first=int(min(layers)),
            last=int(max(layers)),
            source=f"models.{model}.subsets.{subset}.boundaries.{n_phases}.phases[-1]",
            n_phases=len(flow.phases(n_phases=n_phases, subset=subset)),
            chosen=int(flow.chosen_phase_count(subset)),
            first_range=first_range,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "last": self.last,
            "source": self.source,
            "n_phases": self.n_phases,
            "chosen": self.chosen,
            "first_range": None if self.first_range is None else list(self.first_range),
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> FinalPhase:
        values = {f.name: payload.get(f.name) for f in dataclasses.fields(cls)}
        if values["first_range"] is not None:
            values["first_range"] = tuple(int(b) for b in values["first_range"])
        return cls(**values)


def final_phase_of(source: FlowResult | FinalPhase | Sequence[int], model: str, n_layers: int) -> FinalPhase:
    """A model's final phase from the flow study's result, or from `[first, last]` (the chapter's parameter), checked
    against the model's layers 0 .. `n_layers` - 1."""
    if isinstance(source, FinalPhase):
        phase = source
    elif isinstance(source, PhaseSource):
        phase = FinalPhase.from_flow(source, model)
    else:
        first, last = source
        phase = FinalPhase(int(first), int(last), PARAMETER_SOURCE)
    if not 0 <= phase.first <= phase.last < n_layers:
        raise FeatureError(
            f"final phase [{phase.first}, {phase.last}] from {phase.source} is not a range of layers "
            f"0..{n_layers - 1}"
        )
    return phase


# ------------------------------------------------------------------------------------------------ result


def _optional_table(rows: Sequence[Mapping[str, Any]] | None, index: str) -> pd.DataFrame | None:
    return None if rows is None else table(rows, index)


def _optional_records(frame: pd.DataFrame | None) -> list[dict[str, Any]] | None:
    return None if frame is None else records(frame)


def _optional_unflat(rows: Sequence[Mapping[str, Any]] | None) -> pd.DataFrame | None:
    return None if rows is None else _unflat(rows)


def _flat(summary: pd.DataFrame) -> list[dict[str, Any]]:
    """A null summary with (measure, statistic) columns as flat `measure.statistic` keys, one record per row."""
    frame = summary.copy()
    frame.columns = [f"{m}.{s}" for m, s in frame.columns]
    return records(frame)


def _unflat(rows: Sequence[Mapping[str, Any]], index: str = "emotion") -> pd.DataFrame:
    """The inverse of `_flat`."""
    frame = table(rows, index)
    frame.columns = pd.MultiIndex.from_tuples(
        [tuple(c.split(".", 1)) for c in frame.columns], names=["measure", "statistic"]
    )
    return frame


def _unnamed(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """A table written with its unnamed index (records' `index` column)."""
    frame = table(rows, "index")
    frame.index.name = None
    return frame


@dataclass(frozen=True)
class Coactivation:
    """Held-out co-activation of one kind of features: the matrix (rows: features of, columns: items of) and the
    per-row table of `HeldOutCoactivation.table`."""

    matrix: pd.DataFrame
    table: pd.DataFrame

    def to_json(self) -> dict[str, Any]:
        return {"matrix": records(self.matrix), "table": records(self.table)}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> Coactivation:
        matrix = table(payload["matrix"], "features of")
        matrix.columns.name = "items of"
        return cls(matrix=matrix, table=table(payload["table"], "features of"))


@dataclass
class FeaturesResult:
    """One model's features study: the items and final phase it used, every count, table and verdict.

    `per_layer`: selective-feature counts of each layer's SAE on its own with their shuffled null; `counts_full`
    the full-rule shared / specific counts beside the null (`NullSharedSpecific.summary`), `counts_bootstrap` the
    effect-size counts with intervals and `counts_bootstrap_null` their null; `counts_sets*` the same three by the
    emotion-set rule (what the mix verdict reads) and `set_sizes` its features by set size beside the null;
    `diffuseness` per emotion and
    `versus[measure]` the paired comparison of the diffuse emotion with the others (empty without that label);
    `general_emotional` the emotional-vs-neutral count beside its null and `general_overlap` how many shared and
    specific features are among them (None without a neutral label); `coactivation[kind]` for "all" and
    "specific" features (empty without a surprise label); `feature_cards` one row per emotion and kind.
    """

    study: ClassVar[str] = "features"

    model: str
    dataset: str
    labels: list[str]
    n_items: int
    accuracy: float
    final_phase: FinalPhase
    sae_flags: dict[int, str]
    n_features_pooled: int
    n_features_tested: int
    per_layer: pd.DataFrame
    counts_full: pd.DataFrame
    counts_bootstrap: pd.DataFrame
    counts_bootstrap_null: pd.DataFrame
    diffuseness: pd.DataFrame
    versus: dict[str, pd.DataFrame]
    second_dataset: str
    second_items: int
    second_labels: list[str]
    general_emotional: pd.DataFrame | None
    general_overlap: dict[str, Any] | None
    coactivation: dict[str, Coactivation]
    feature_cards: list[dict[str, Any]]
    top_features: pd.DataFrame
    jaccard: pd.DataFrame
    intersections: pd.DataFrame
    verdicts_by_claim: dict[str, Verdict]
    seconds: float = 0.0
    replication: pd.DataFrame | None = None  # split-half replication of the final phase's selective features
    cut_range: pd.DataFrame | None = (
        None  # specific / shared totals with the final phase cut at each end of its range
    )
    # The emotion-set rule (None in results files written before it): counts beside the null, with intervals
    # beside theirs, and features by the size of their emotion set.
    counts_sets: pd.DataFrame | None = None
    counts_sets_bootstrap: pd.DataFrame | None = None
    counts_sets_bootstrap_null: pd.DataFrame | None = None
    set_sizes: pd.DataFrame | None = None
    # Per SAE training seed of the final phase's layers (the book's first): its uncapped verdicts and how many of the
    # book SAEs' emotion-set features it finds again (None without retrained seeds).
    seeds: pd.DataFrame | None = None

    # -------------------------------------------------------------------------------------------- JSON

    def to_json(self) -> dict[str, Any]:
        """The chapter's per-model results entry (the old keys first), plus the tables its figures need."""
        return {
            "dataset": self.dataset,
            "labels": list(self.labels),
            "n_items": self.n_items,
            "final_phase": self.final_phase.to_json(),
            "sae_flags": {str(k): v for k, v in self.sae_flags.items()},
            "n_features_pooled": self.n_features_pooled,
            "n_features_tested": self.n_features_tested,
            "per_layer": records(self.per_layer),
            "counts_full_rule": _flat(self.counts_full),
            "counts_bootstrap": records(self.counts_bootstrap),
            "counts_bootstrap_null": _flat(self.counts_bootstrap_null),
            "diffuseness": records(self.diffuseness),
            "disgust_versus_others": {m: records(f) for m, f in self.versus.items()},
            "second_dataset": self.second_dataset,
            "general_emotional": None if self.general_emotional is None else records(self.general_emotional),
            "coactivation": {kind: c.to_json() for kind, c in self.coactivation.items()},
            "feature_cards": plain(self.feature_cards),
            "verdicts": {k: v.as_dict() for k, v in self.verdicts_by_claim.items()},
            "model": self.model,
            "accuracy": self.accuracy,
            "second_items": self.second_items,
            "second_labels": list(self.second_labels),
            "general_overlap": plain(self.general_overlap),
            "top_features": records(self.top_features, index=False),
            "jaccard": records(self.jaccard),
            "intersections": {
                "rows": records(self.intersections, index=False),
                "emotions": list(self.intersections.attrs.get("emotions", ())),
                "set_sizes": dict(self.intersections.attrs.get("set_sizes", {})),
            },
            "seconds": self.seconds,
            "split_half_replication": None if self.replication is None else records(self.replication),
            "cut_range": None if self.cut_range is None else records(self.cut_range),
            "counts_sets": None if self.counts_sets is None else _flat(self.counts_sets),
            "counts_sets_bootstrap": _optional_records(self.counts_sets_bootstrap),
            "counts_sets_bootstrap_null": (
                None if self.counts_sets_bootstrap_null is None else _flat(self.counts_sets_bootstrap_null)
            ),
            "set_sizes": _optional_records(self.set_sizes),
            "sae_seeds": _optional_records(self.seeds),
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> FeaturesResult:
        general = payload.get("general_emotional")
        jac = table(payload["jaccard"], "emotion")
        jac.columns.name = "emotion"
        upset = payload["intersections"]
        combos = table(upset["rows"])
        if len(combos):
            combos["emotions"] = [tuple(e) for e in combos["emotions"]]
            combos["features"] = [list(f) for f in combos["features"]]
        else:
            combos = pd.DataFrame(columns=["combination", "emotions", "degree", "n_features", "features"])
        combos.attrs.update(emotions=tuple(upset["emotions"]), set_sizes=dict(upset["set_sizes"]))
        return cls(
            model=payload["model"],
            dataset=payload["dataset"],
            labels=list(payload["labels"]),
            n_items=int(payload["n_items"]),
            accuracy=float(payload["accuracy"]),
            final_phase=FinalPhase.from_json(payload["final_phase"]),
            sae_flags={int(k): v for k, v in payload["sae_flags"].items()},
            n_features_pooled=int(payload["n_features_pooled"]),
            n_features_tested=int(payload["n_features_tested"]),
            per_layer=_unnamed(payload["per_layer"]),
            counts_full=_unflat(payload["counts_full_rule"]),
            counts_bootstrap=table(payload["counts_bootstrap"], "emotion"),
            counts_bootstrap_null=_unflat(payload["counts_bootstrap_null"]),
            diffuseness=table(payload["diffuseness"], "emotion"),
            versus={m: table(rows, "versus") for m, rows in payload["disgust_versus_others"].items()},
            second_dataset=payload["second_dataset"],
            second_items=int(payload["second_items"]),
            second_labels=list(payload["second_labels"]),
            general_emotional=None if general is None else _unnamed(general),
            general_overlap=payload.get("general_overlap"),
            coactivation={k: Coactivation.from_json(v) for k, v in payload["coactivation"].items()},
            feature_cards=[dict(row) for row in payload["feature_cards"]],
            top_features=table(payload["top_features"]),
            jaccard=jac,
            intersections=combos,
            verdicts_by_claim={k: Verdict.from_dict(v) for k, v in payload["verdicts"].items()},
            seconds=float(payload.get("seconds", 0.0)),
            replication=_optional_table(payload.get("split_half_replication"), "emotion"),
            cut_range=_optional_table(payload.get("cut_range"), "first layer"),
            counts_sets=_optional_unflat(payload.get("counts_sets")),
            counts_sets_bootstrap=_optional_table(payload.get("counts_sets_bootstrap"), "emotion"),
            counts_sets_bootstrap_null=_optional_unflat(payload.get("counts_sets_bootstrap_null")),
            set_sizes=_optional_table(payload.get("set_sizes"), "emotions in the set"),
            seeds=_optional_table(payload.get("sae_seeds"), "seed"),
        )

    # -------------------------------------------------------------------------------------------- verdicts

    def verdicts(self) -> list[Verdict]:
        """The chapter's verdicts for this model, claim by claim (claim and model set)."""
        return [self.verdicts_by_claim[key].about(key, self.model) for key in CLAIMS]

    def flagged_layers(self) -> list[int]:
        """Final-phase layers whose SAE misses a quality goal."""
        return [layer for layer, flag in self.sae_flags.items() if flag]

    def heading(self) -> str:
        """This model's heading in "What we found": the final phase and how many of its SAEs miss a goal."""
        phase = self.final_phase
        return (
            f"**{self.model}** (final phase: layers {phase.first}-{phase.last}; "
            f"{len(self.flagged_layers())} of {len(phase.layers)} of their SAEs miss a quality goal):"
        )

    def readme_row(self) -> dict[str, Any]:
        """The model's row of the README's features table: the totals the verdict reads (the emotion-set rule; the
        one-vs-rest full rule for results files written before it)."""
        full = self.counts_full if self.counts_sets is None else self.counts_sets
        return {
            "Features (ch. 2)": self.model,
            "final phase": f"L{self.final_phase.first}-{self.final_phase.last}",
            "specific (null q95)": f"{int(full.loc['any', ('n_specific', 'observed')])} "
            f"({full.loc['any', ('n_specific', 'null_q95')]:.0f})",
            "shared (null q95)": f"{int(full.loc['any', ('n_shared', 'observed')])} "
            f"({full.loc['any', ('n_shared', 'null_q95')]:.0f})",
            **{claim: self.verdicts_by_claim[key].verdict for key, claim in CLAIMS.items()},
        }

    # -------------------------------------------------------------------------------------------- table views

    def overview(self) -> pd.DataFrame:
        """One row: the items, the final phase, the pooled features and the SAEs that miss a goal."""
        phase = self.final_phase
        flagged = {layer: flag for layer, flag in self.sae_flags.items() if flag}
        row = {
            "model": self.model,
            "dataset": self.dataset,
            "items": self.n_items,
            "labels": ", ".join(self.labels),
            "accuracy": self.accuracy,
            "final phase (layers)": f"{phase.first}-{phase.last}",
            "phases in the cut / preferred by the flow test": f"{phase.n_phases} / {phase.chosen}",
            "features pooled": self.n_features_pooled,
            "tested (fire on some item)": self.n_features_tested,
            "layers whose SAE misses a goal": "; ".join(f"L{k}: {v}" for k, v in flagged.items()) or "none",
            f"second set ({self.second_dataset})": f"{self.second_items} items, labels "
            f"{', '.join(self.second_labels)}",
        }
        return pd.DataFrame([row]).set_index("model")

    def layer_summary(self) -> pd.DataFrame:
        """One row: selective features per layer inside and before the final phase, and how many layers beat the
        shuffled labels' 95th percentile."""
        t, layers = self.per_layer, self.final_phase.layers
        inside = t["layer"].isin(layers)
        excess = t["any"] - t["null_q95"]
        row = {
            "model": self.model,
            "selective per layer, final phase (mean)": t.loc[inside, "any"].mean(),
            "selective per layer, earlier layers (mean)": t.loc[~inside, "any"].mean(),
            "layers above the null's 95th pct, final phase": f"{int((excess[inside] > 0).sum())} of "
            f"{int(inside.sum())}",
            "layers above the null's 95th pct, earlier": f"{int((excess[~inside] > 0).sum())} of "
            f"{int((~inside).sum())}",
            "layer with most selective features": int(t.loc[t["any"].idxmax(), "layer"]),
        }
        return pd.DataFrame([row]).set_index("model")

    def top_features_table(self) -> pd.DataFrame:
        """The most selective features of each emotion (strongest AUROC first), indexed by model and emotion."""
        frame = self.top_features.copy()
        if frame.empty:
            return frame
        frame.insert(0, "model", self.model)
        columns = [
            "model",
            "emotion",
            "feature",
            "auroc",
            "q_value",
            "mean_in",
            "mean_out",
            "rate_in",
            "emotions",
        ]
        return (
            frame[columns]
            .rename(columns={"emotions": "selective for (emotions)", "rate_in": "rate in"})
            .set_index(["model", "emotion"])
        )

    def counts_table(self, rule: str = "full") -> pd.DataFrame:
        """Selective, specific and shared features per emotion, each beside its shuffled-label null: by the
        one-vs-rest full rule ("full") or the emotion-set rule ("sets"; empty for results files without it)."""
        full = self.counts_full if rule == "full" else self.counts_sets
        if full is None:
            return pd.DataFrame()

        def beside_null(measure: str) -> list[str]:
            s = full[measure]
            return [
                f"{int(o)} (null {m:.1f}, q95 {q:.0f}; p = {p:.3f})"
                for o, m, q, p in zip(s["observed"], s["null_mean"], s["null_q95"], s["p_value"], strict=True)
            ]

        return pd.DataFrame(
            {
                "model": self.model,
                "emotion": full.index,
                "selective": beside_null("n_selective"),
                "specific": beside_null("n_specific"),
                "shared": beside_null("n_shared"),
            }
        ).set_index(["model", "emotion"])

    def bootstrap_table(self, rule: str = "auroc") -> pd.DataFrame:
        """Specific and shared features per emotion with intervals, beside the null's q95: by the one-vs-rest
        effect-size rule ("auroc") or the emotion-set rule ("sets"; empty for results files without it)."""
        boot, bnull = (
            (self.counts_bootstrap, self.counts_bootstrap_null)
            if rule == "auroc"
            else (self.counts_sets_bootstrap, self.counts_sets_bootstrap_null)
        )
        if boot is None or bnull is None:
            return pd.DataFrame()
        return pd.DataFrame(
            {
                "model": self.model,
                "emotion": boot.index,
                "specific [95% CI]": _intervals(boot, "n_specific", 0),
                "specific, null q95": bnull[("n_specific", "null_q95")].to_numpy(),
                "shared [95% CI]": _intervals(boot, "n_shared", 0),
                "shared, null q95": bnull[("n_shared", "null_q95")].to_numpy(),
            }
        ).set_index(["model", "emotion"])

    def seeds_table(self) -> pd.DataFrame:
        """Per SAE training seed of the final phase's layers: the rules' verdicts (before the SAE cap) and the book
        SAEs' emotion-set features found again (empty without retrained seeds)."""
        if self.seeds is None:
            return pd.DataFrame()
        frame = self.seeds.reset_index()
        frame.insert(0, "model", self.model)
        return frame.set_index(["model", "seed"])

    def set_size_table(self) -> pd.DataFrame:
        """Features whose emotion set has 1, 2, ... emotions, beside the shuffled labels (empty for results files
        without it)."""
        if self.set_sizes is None:
            return pd.DataFrame()
        frame = self.set_sizes.reset_index()
        frame.insert(0, "model", self.model)
        return frame.set_index(["model", "emotions in the set"])

    def general_table(self, neutral: str = "neutral") -> pd.DataFrame:
        """One row: features of general emotional content (emotional vs neutral) beside their null, and how many
        of the main set's shared and specific features are among them."""
        if self.general_emotional is None or self.general_overlap is None:
            row = {"model": self.model, "note": f"no {neutral} label in {self.second_dataset}: not measured"}
            return pd.DataFrame([row]).set_index("model")
        summary, overlap = self.general_emotional, self.general_overlap
        row = {
            "model": self.model,
            "dataset": self.second_dataset,
            "emotional vs neutral (features)": int(summary.loc[EMOTIONAL, "observed"]),
            "null mean": summary.loc[EMOTIONAL, "null_mean"],
            "null q95": summary.loc[EMOTIONAL, "null_q95"],
            "p": summary.loc[EMOTIONAL, "p_value"],
        }
        for kind in ("shared", "specific"):
            row[f"ISEAR {kind} among them"] = (
                f"{overlap[f'{kind}_among']} of {overlap[f'n_{kind}']} (expected {overlap[f'{kind}_expected']:.1f})"
            )
        return pd.DataFrame([row]).set_index("model")

    def diffuseness_table(self, measures: Sequence[str] = ("k50", "k80", "entropy")) -> pd.DataFrame:
        """Each emotion's selective features (`n_support`) and diffuseness measures with their intervals."""
        d = self.diffuseness
        frame = pd.DataFrame(
            {"model": self.model, "emotion": d.index, "n_support": _intervals(d, "n_support", 0)}
        )
        for m in measures:
            frame[f"{m} [95% CI]"] = _intervals(d, m, 3 if m == "entropy" else 0)
        return frame.set_index(["model", "emotion"])

    def versus_table(self) -> pd.DataFrame:
        """The diffuse emotion minus the others' mean, per measure (paired bootstrap); empty without its label."""
        rows = []
        for m, frame in self.versus.items():
            row = frame.loc[["others (mean)"]].copy()
            row.insert(0, "measure", m)
            row.insert(0, "model", self.model)
            rows.append(row.reset_index().set_index(["model", "measure"]))
        if not rows:
            return pd.DataFrame()
        return pd.concat(rows).rename(columns={"share_more": "share more"})

    def coactivation_table(self) -> pd.DataFrame:
        """Per kind of features and row emotion: features chosen and measured, off-diagonal co-activation and the
        excess over the other rows, with intervals; empty without a surprise label."""
        tables = []
        for kind, result in self.coactivation.items():
            t = result.table
            frame = pd.DataFrame(
                {
                    "model": self.model,
                    "features": kind,
                    "emotion": t.index,
                    "chosen (dev)": t["n_features"].to_numpy(),
                    "measured (test)": t["n_measured"].to_numpy(),
                    "off-diagonal [95% CI]": _intervals(t, "off_diagonal", 2),
                    "excess over other rows [95% CI]": _intervals(t, "excess", 2, signed=True),
                }
            )
            tables.append(frame.set_index(["model", "features", "emotion"]))
        return pd.concat(tables) if tables else pd.DataFrame()

    def cut_range_table(self) -> pd.DataFrame:
        """Specific and shared totals (full rule) with their permutation p-values when the final phase starts at
        each end of its first layer's bootstrap interval (empty when the phase was set by hand)."""
        return pd.DataFrame() if self.cut_range is None else self.cut_range

    def replication_table(self) -> pd.DataFrame:
        """Split-half replication of the final phase's selective features, per emotion (empty for results files
        written before it was measured)."""
        return pd.DataFrame() if self.replication is None else self.replication

    def cards_table(self) -> pd.DataFrame:
        """The feature cards: per emotion, its strongest specific and shared feature, top texts, promoted tokens."""
        return pd.DataFrame(self.feature_cards).set_index(["model", "emotion", "kind"])


def _intervals(frame: pd.DataFrame, measure: str, digits: int, *, signed: bool = False) -> list[str]:
    """`value [low, high]` of a measure with `<measure>_low` / `_high` columns, row by row."""
    return [
        format_interval(v, lo, hi, digits, signed=signed)
        for v, lo, hi in zip(frame[measure], frame[f"{measure}_low"], frame[f"{measure}_high"], strict=True)
    ]


# ------------------------------------------------------------------------------------------------ the study


def _hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def _selective_counts(
    codes: np.ndarray,
    gold: np.ndarray,
    labels: Sequence[str],
    rule: SelectivityConfig,
    n_shuffles: int,
    seed: int,
) -> dict[str, float]:
    """Any / specific / shared selective features of one code matrix, with the shuffled null of `any`."""
    sel = selectivity(codes, gold, labels, rule)
    null = shuffled_control(codes, gold, labels, rule, n_shuffles=n_shuffles, seed=seed)
    counts = sel.counts()
    return {
        "any": counts["any"],
        "specific": counts["specific"],
        "shared": counts["shared"],
        "null_mean": float(null.counts["any"].mean()),
        "null_q95": float(null.counts["any"].quantile(0.95)),
    }


def _cut_range_counts(
    codes_by_layer: Mapping[int, np.ndarray], aset: AnalysisSet, phase: FinalPhase, config: FeaturesConfig
) -> pd.DataFrame | None:
    """Specific and shared totals of the pooled final phase with their shuffled-label p-values, by the emotion-set
    rule (what the verdict reads) and by the one-vs-rest full rule, for the chosen first layer and each end of its
    bootstrap interval (None without an interval to try)."""
    if not phase.alternatives():
        return None
    rule, labels, rows = config.selectivity, list(aset.labels), []
    for first in sorted({phase.first, *phase.alternatives()}):
        pooled = pool_layers({layer: codes_by_layer[layer] for layer in range(first, phase.last + 1)}, rule)
        null = shuffled_shared_specific(
            pooled.codes, aset.gold, labels, rule, n_shuffles=config.n_shuffles, seed=config.seed
        )
        sel = selectivity(pooled.codes, aset.gold, labels, rule)
        row: dict[str, Any] = {"first layer": first, "chosen": first == phase.first}
        for criterion, prefix in ((SETS, ""), ("full", "one-vs-rest ")):
            summary = null.summary(shared_specific(sel, criterion=criterion), criterion)
            for kind in ("specific", "shared"):
                row[f"{prefix}n_{kind}"] = int(summary.loc["any", (f"n_{kind}", "observed")])
                row[f"{prefix}p_{kind}"] = float(summary.loc["any", (f"n_{kind}", "p_value")])
        rows.append(row)
    return pd.DataFrame(rows).set_index("first layer")


def _per_layer(
    aset: AnalysisSet, suite: SAESuite, phase: FinalPhase, config: FeaturesConfig
) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """Every layer's SAE on its own (where do selective features appear?), and the final phase's codes."""
    labels = list(aset.labels)
    rows, codes_by_layer = [], {}
    earliest = min([phase.first, *phase.alternatives()])  # the cut range's phases need their codes too
    for layer in aset.layers:
        codes = aset.codes(layer, suite.saes[_hook(layer)])
        if earliest <= layer <= phase.last:
            codes_by_layer[layer] = codes
        counts = _selective_counts(
            codes, aset.gold, labels, config.selectivity, config.layer_shuffles, config.seed
        )
        rows.append({"layer": layer, **counts})
    return pd.DataFrame(rows), codes_by_layer


def _top_features(sel: Selectivity, pooled: PooledCodes, n: int) -> pd.DataFrame:
    """The `n` most selective features of each emotion (emotions in label order, strongest AUROC first)."""
    frame = sel.table()
    chosen = sel.matrix("full")
    if frame.empty:
        return pd.DataFrame()
    frame["order"] = [sel.emotions.index(e) for e in frame["emotion"]]
    frame = frame.sort_values("order", kind="stable").groupby("emotion", sort=False).head(n).copy()
    frame["emotions"] = [int(chosen[f].sum()) for f in frame["feature"]]
    frame["feature"] = [pooled.name(f) for f in frame["feature"]]
    columns = ["emotion", "feature", "auroc", "q_value", "mean_in", "mean_out", "rate_in", "emotions"]
    return frame[columns].reset_index(drop=True)


def _card_rows(
    lm: LoadedModel,
    suite: SAESuite,
    aset: AnalysisSet,
    pooled: PooledCodes,
    sel: Selectivity,
    config: FeaturesConfig,
) -> list[dict[str, Any]]:
    """Feature cards: for each emotion, its strongest shared and strongest specific feature."""
    name = lm.info.name
    chosen = sel.matrix("full")
    per_feature = chosen.sum(axis=1)
    rows = []
    for j, emotion in enumerate(sel.emotions):
        for kind, mask in (("specific", per_feature == 1), ("shared", per_feature >= 2)):
            candidates = np.flatnonzero(chosen[:, j] & mask)
            if not candidates.size:
                rows.append({"model": name, "emotion": emotion, "kind": kind, "feature": "none"})
                continue
            column = int(candidates[np.argmax(sel.auroc[candidates, j])])
            layer, feature = int(pooled.layer[column]), int(pooled.feature[column])
            top = top_activating(pooled.codes[:, column], aset.texts, k=config.card_texts, labels=aset.gold)
            sae = suite.saes[_hook(layer)]
            tokens = promoted_tokens(sae.W_dec[feature], lm.model, lm.tokenizer, k=config.card_tokens)
            also = [e for i, e in enumerate(sel.emotions) if chosen[column, i] and i != j]
            texts = [
                f"{r.label}: {r.text[:70]}" + ("..." if len(r.text) > 70 else "") for r in top.itertuples()
            ]
            rows.append(
                {
                    "model": name,
                    "emotion": emotion,
                    "kind": kind,
                    "feature": pooled.name(column),
                    "auroc": float(sel.auroc[column, j]),
                    "also selective for": ", ".join(also) or "-",
                    "top texts (gold label: text)": " | ".join(texts),
                    "promoted tokens": " ".join(repr(t) for t in tokens["token"]),
                }
            )
    return rows


def _ids(pooled: PooledCodes, columns: Sequence[int] | np.ndarray) -> set[tuple[int, int]]:
    return {(int(pooled.layer[c]), int(pooled.feature[c])) for c in columns}


def _general_overlap(
    general: Selectivity, s_pooled: PooledCodes, sel: Selectivity, pooled: PooledCodes
) -> dict[str, Any]:
    """How many of the main set's shared and specific features carry general emotional content, against the overlap
    expected if the two sets were unrelated (product of their sizes over the features tested in both)."""
    emotional = _ids(s_pooled, general.sets()[EMOTIONAL])
    per_feature = sel.matrix("full").sum(axis=1)
    tested_both = len(_ids(pooled, range(pooled.codes.shape[1])) & _ids(s_pooled, range(len(s_pooled.layer))))
    out: dict[str, Any] = {"n_emotional": len(emotional), "tested_both": tested_both}
    for kind, mask in (("shared", per_feature >= 2), ("specific", per_feature == 1)):
        members = _ids(pooled, np.flatnonzero(mask))
        out[f"{kind}_among"] = len(members & emotional)
        out[f"n_{kind}"] = len(members)
        out[f"{kind}_expected"] = len(members) * len(emotional) / max(tested_both, 1)
    return out


def _coactivation(
    sset: AnalysisSet, s_pooled: PooledCodes, emotions: list[str], config: FeaturesConfig
) -> dict[str, HeldOutCoactivation]:
    """Features chosen on the dev items (among the emotions, without neutral), co-activation measured on test."""
    dev = (sset.splits == "dev") & np.isin(sset.gold, emotions)
    test = (sset.splits == "test") & np.isin(sset.gold, emotions)
    chosen = selectivity(s_pooled.codes[dev], sset.gold[dev], emotions, config.held_out_selectivity)
    return {
        kind: heldout_coactivation(
            sets, s_pooled.codes[test], sset.gold[test], emotions, n_boot=config.n_boot, seed=config.seed
        )
        for kind, sets in (
            ("all", chosen.sets()),
            ("specific", specific_sets(chosen.sets())),
        )
    }


@dataclass
class _PhaseAnalysis:
    """The final phase's pooled features on one set of SAEs: selectivity, its null and bootstrap tables, the
    diffuseness comparison, and the second set's pooled codes and co-activation (what the verdicts read)."""

    pooled: PooledCodes
    sel: Selectivity
    null: NullSharedSpecific
    full: pd.DataFrame
    boot_table: pd.DataFrame
    boot_null: pd.DataFrame
    sets_full: pd.DataFrame
    sets_boot: pd.DataFrame
    sets_boot_null: pd.DataFrame
    diffuse: pd.DataFrame
    versus: dict[str, pd.DataFrame] | None
    s_pooled: PooledCodes
    coact: dict[str, HeldOutCoactivation]


def _analyse_phase(
    codes_by_layer: Mapping[int, np.ndarray],
    s_codes: Mapping[int, np.ndarray],
    aset: AnalysisSet,
    sset: AnalysisSet,
    config: FeaturesConfig,
) -> _PhaseAnalysis:
    """Pool the final phase's codes (`codes_by_layer` on the analysis set, `s_codes` on the second set) and
    measure everything the claims' verdicts read."""
    rule, boot, labels = config.selectivity, config.bootstrap, list(aset.labels)
    pooled = pool_layers(codes_by_layer, rule)
    sel = selectivity(pooled.codes, aset.gold, labels, rule)
    null = shuffled_shared_specific(
        pooled.codes, aset.gold, labels, rule, n_shuffles=config.n_shuffles, seed=config.seed
    )
    draws = bootstrap_selectivity(pooled.codes, aset.gold, labels, rule, boot)
    boot_table = shared_specific(sel, draws)
    # Sharing tested directly: each feature counts for the emotion set it separates (what the verdict reads).
    sets_boot = shared_specific(sel, draws, criterion=SETS)
    versus = None
    if config.diffuse in labels:
        others = [e for e in labels if e not in (config.diffuse, config.neutral)]
        versus = {
            m: compare_diffuseness(sel, draws, config.diffuse, m, others=others) for m in config.measures
        }
    s_pooled = pool_layers(s_codes, rule)
    emotions = [e for e in sset.labels if e != config.neutral]
    return _PhaseAnalysis(
        pooled=pooled,
        sel=sel,
        null=null,
        full=null.summary(shared_specific(sel), "full"),
        boot_table=boot_table,
        boot_null=null.summary(boot_table, boot.criterion),
        sets_full=null.summary(shared_specific(sel, criterion=SETS), SETS),
        sets_boot=sets_boot,
        sets_boot_null=null.summary(sets_boot, SETS),
        diffuse=diffuseness(sel, draws),
        versus=versus,
        s_pooled=s_pooled,
        coact=_coactivation(sset, s_pooled, emotions, config) if config.surprise in emotions else {},
    )


def _claim_verdicts(analysis: _PhaseAnalysis, config: FeaturesConfig) -> dict[str, Verdict]:
    """The chapter's verdict rules on one analysis, before the cut range, the seeds and the SAE cap read them."""
    a = analysis
    n_support = a.diffuse.loc[config.diffuse, "n_support"] if a.versus is not None else None
    return {
        "shared_and_specific": mix_verdict(
            a.sets_full, a.sets_boot, a.sets_boot_null, a.null.n_shuffles, config.verdict_alpha
        ),
        "disgust_more_diffuse": diffuse_verdict(a.versus, n_support, config.diffuse),
        "surprise_coactivates": coactivation_verdict(a.coact.get("all"), config.surprise),
    }


def _seed_row(
    seed: int,
    main: _PhaseAnalysis,
    other: _PhaseAnalysis,
    main_saes: Mapping[int, SAE],
    seed_saes: Mapping[int, SAE],
    verdicts: Mapping[str, Verdict],
    match_cosine: float,
    missing: str,
) -> dict[str, Any]:
    """One seed's verdicts, and how many of the book SAEs' emotion-set features it finds again: a feature whose
    decoder direction has a partner of cosine at least `match_cosine` in the seed's SAE of the same layer is
    found; found with the same role when that partner is counted for the same emotion set. The median of each
    feature's best cosine says how near the others come, beside the same median against a random dictionary of
    the same shape (seeded): what a seed's SAE shares beyond chance. `missing` says which of the seed's SAEs miss
    a quality goal (`verdicts.goals_missed`)."""
    members = main.sel.matrix(SETS)
    chosen = np.flatnonzero(members.any(axis=1))
    other_members = other.sel.matrix(SETS)
    other_column = {
        (int(layer), int(feature)): j
        for j, (layer, feature) in enumerate(zip(other.pooled.layer, other.pooled.feature, strict=True))
    }
    found = same_role = 0
    best: list[np.ndarray] = []
    chance: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    for layer in sorted({int(main.pooled.layer[c]) for c in chosen}):
        columns = [c for c in chosen if main.pooled.layer[c] == layer]
        match = match_features(
            main_saes[layer].W_dec, seed_saes[layer].W_dec, main.pooled.feature[columns], rng, match_cosine
        )
        best.append(match.best_cosine)
        chance.append(match.chance_cosine)
        found += match.n_found
        for column, partner, is_found in zip(columns, match.partner, match.found, strict=True):
            j = other_column.get((layer, int(partner)))
            same_role += int(is_found and j is not None and np.array_equal(other_members[j], members[column]))
    n = len(chosen)
    return {
        "seed": seed,
        "emotion-set features": int(other_members.any(axis=1).sum()),
        "book SAEs' features found again": f"{found} of {n}",
        "found again, same emotion set": f"{same_role} of {n}",
        "median best cosine": float(np.median(np.concatenate(best).astype(np.float64))) if best else np.nan,
        "median best cosine, random dictionary": float(np.median(np.concatenate(chance).astype(np.float64)))
        if chance
        else np.nan,
        "SAEs missing a goal": missing,
        **{CLAIMS[key]: verdict.verdict for key, verdict in verdicts.items()},
    }


def _features(
    lm: LoadedModel,
    config: FeaturesConfig,
    phase: FinalPhase,
    suite: SAESuite,
    aset: AnalysisSet,
    sset: AnalysisSet,
) -> FeaturesResult:
    """The study on one model: every layer alone, the final phase pooled, the second set's contrasts, and the
    verdicts again on SAEs of the final phase retrained with other seeds."""
    started = time.time()
    name, rule = lm.info.name, config.selectivity
    labels = list(aset.labels)
    per_layer, codes_by_layer = _per_layer(aset, suite, phase, config)
    flags = {layer: suite.flag(layer) for layer in phase.layers}

    # The final phase under the ends of its first layer's bootstrap interval: do the totals survive the cut?
    cut_range = _cut_range_counts(codes_by_layer, aset, phase, config)
    codes_by_layer = {layer: codes for layer, codes in codes_by_layer.items() if layer in phase.layers}
    s_codes = {layer: sset.codes(layer, suite.saes[_hook(layer)]) for layer in phase.layers}
    analysis = _analyse_phase(codes_by_layer, s_codes, aset, sset, config)
    pooled, sel = analysis.pooled, analysis.sel
    replication = split_half_replication(pooled.codes, aset.gold, labels, rule, seed=config.seed)
    cards = _card_rows(lm, suite, aset, pooled, sel, config)

    # The second dataset: general emotional features (emotional vs neutral).
    general_summary, overlap = None, None
    if config.neutral in sset.labels:
        s_pooled = analysis.s_pooled
        contrast, two = contrast_labels(sset.gold, config.neutral)
        general = emotional_vs_neutral(s_pooled.codes, sset.gold, rule, config.neutral)
        general_null = shuffled_control(
            s_pooled.codes, contrast, two, rule, n_shuffles=config.n_shuffles, seed=config.seed
        )
        general_summary = general_null.summary(general)
        overlap = _general_overlap(general, s_pooled, sel, pooled)

    # The same verdicts on SAEs of the final phase's layers retrained with other seeds.
    verdicts = _claim_verdicts(analysis, config)
    main_saes = {layer: suite.saes[_hook(layer)] for layer in phase.layers}
    by_seed, seed_rows = {}, []
    for seed in config.sae_seeds:
        retrained = seed_saes(lm, config.preset, config.saes, phase.layers, seed)
        if not retrained:  # a pretrained release: one set of SAEs
            break
        by_layer = {layer: retrained[_hook(layer)] for layer in phase.layers}
        other = _analyse_phase(
            {layer: aset.codes(layer, sae) for layer, sae in by_layer.items()},
            {layer: sset.codes(layer, sae) for layer, sae in by_layer.items()},
            aset,
            sset,
            config,
        )
        by_seed[seed] = _claim_verdicts(other, config)
        seed_rows.append(
            _seed_row(
                seed,
                analysis,
                other,
                main_saes,
                by_layer,
                by_seed[seed],
                config.match_cosine,
                goals_missed(seed_flags(lm, suite, retrained, seed)),
            )
        )
    seeds = None
    if seed_rows:
        book = {
            "seed": config.saes.training.seed,
            "emotion-set features": int(sel.matrix(SETS).any(axis=1).sum()),
            "book SAEs' features found again": "(the book's SAEs)",
            "found again, same emotion set": "-",
            "median best cosine": 1.0,
            "median best cosine, random dictionary": np.nan,
            "SAEs missing a goal": goals_missed(flags),
            **{CLAIMS[key]: verdict.verdict for key, verdict in verdicts.items()},
        }
        seeds = pd.DataFrame([book, *seed_rows]).set_index("seed")
    verdicts = {
        key: stable_across_seeds(verdict, {s: v[key] for s, v in by_seed.items()}, config.saes.training.seed)
        for key, verdict in verdicts.items()
    }
    verdicts["shared_and_specific"] = fragile_if_cut_matters(
        verdicts["shared_and_specific"], cut_range, config.verdict_alpha
    )
    verdicts = {key: capped_by_sae(verdict, flags) for key, verdict in verdicts.items()}
    return FeaturesResult(
        model=name,
        dataset=aset.dataset,
        labels=labels,
        n_items=aset.n,
        accuracy=float(aset.correct.mean()),
        final_phase=phase,
        sae_flags=flags,
        n_features_pooled=pooled.n_features,
        n_features_tested=int(sel.n_tested),
        per_layer=per_layer,
        counts_full=analysis.full,
        counts_bootstrap=analysis.boot_table,
        counts_bootstrap_null=analysis.boot_null,
        diffuseness=analysis.diffuse,
        versus=analysis.versus or {},
        second_dataset=sset.dataset,
        second_items=sset.n,
        second_labels=list(sset.labels),
        general_emotional=general_summary,
        general_overlap=overlap,
        coactivation={k: Coactivation(matrix=r.matrix, table=r.table()) for k, r in analysis.coact.items()},
        feature_cards=cards,
        top_features=_top_features(sel, pooled, config.top_features),
        jaccard=jaccard(sel.sets()),
        intersections=intersections(sel.sets()),
        verdicts_by_claim={k: v.about(k, name) for k, v in verdicts.items()},
        seconds=time.time() - started,
        replication=replication,
        cut_range=cut_range,
        counts_sets=analysis.sets_full,
        counts_sets_bootstrap=analysis.sets_boot,
        counts_sets_bootstrap_null=analysis.sets_boot_null,
        set_sizes=analysis.null.set_size_summary(sel),
        seeds=seeds,
    )


def run_features(
    model: str | LoadedModel,
    config: FeaturesConfig = FeaturesConfig(),
    final_phase_layers: PhaseSource | FinalPhase | Sequence[int] | None = None,
) -> FeaturesResult:
    """The features study of one model (cached): its final phase from the flow study's result (or `[first, last]`,
    the chapter's override; None reads the flow chapter's results file of `config.preset`), its items and SAEs
    from `config.items` and `config.saes`."""
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    name = lm.info.name
    if final_phase_layers is None:
        final_phase_layers = result_for(
            read_study_results("flow", FlowResult, preset=config.preset), name, "01_flow"
        )
    phase = final_phase_of(final_phase_layers, name, lm.info.n_layers)
    suite = sae_suite(lm, config.preset, config.saes)
    aset = analysis_set(lm, config.preset, config.items)
    sset = analysis_set(lm, config.preset, dataclasses.replace(config.items, dataset=second_dataset(config)))
    key_parts = [FEATURES_VERSION, config, phase.to_json(), aset.store.key, sset.store.key, suite.key]
    return cached_result(
        FeaturesResult, lm.info.cache_name, key_parts, lambda: _features(lm, config, phase, suite, aset, sset)
    )

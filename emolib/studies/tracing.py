"""Chapter 3: phase-stratified causal tracing of the features that drive each emotion's prediction.

`run_tracing(model, config, phases)` ranks every SAE feature of each phase by attribution on training items, ablates
the top k on held-out items beside random features and the whole phase (`emolib.methods.tracing`), summarises the
effects (`emolib.methods.ablation`) and judges the paper's three claims in every phase. The per-item curves stay in
their own cache (`cached_study`); the `TracingResult` holds the small tables the chapter shows and its verdicts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from scipy.stats import kruskal, mannwhitneyu, spearmanr

from emolib.cache import cache_dir, cached_entry, config_key, pairs_digest
from emolib.lm.classify import prompt_fingerprint
from emolib.lm.models import LoadedModel, load_model
from emolib.lm.precision import model_key
from emolib.methods.ablation import (
    confusion_shift,
    gold_drop_matrix,
    k50_table,
    per_label_sample,
    summarize_effects,
    top_vs_random,
)
from emolib.methods.tracing import (
    ABLATIONS,
    METRICS,
    FeatureTracer,
    TracerConfig,
    TracingError,
    check_phases,
)
from emolib.sae.suite import SuiteConfig, sae_suite, seed_flags, seed_saes
from emolib.stats import format_interval
from emolib.studies.base import cached_result, combined, read_study_results, records, result_for, table
from emolib.studies.features import FinalPhase
from emolib.studies.flow import FlowResult
from emolib.studies.items import AnalysisConfig, analysis_set
from emolib.verdicts import Verdict, capped_by_sae, goals_missed, stable_across_seeds

#: Bump when the per-item study's computation changes, so cached studies are rebuilt (2: gap metric, gap
#: attributions, k50 against the clean value; 3: the final phase's cut range).
STUDY_VERSION = "3"

#: Bump when `TracingResult` (its tables or verdicts) changes, so cached results are rebuilt (2: shuffled-label
#: control, gated and SAE-capped verdicts; 3: fragile across the cut range; 4: stable across SAE seeds; 5: the
#: text-position run; 6: the seed SAEs' quality; 7: the text-position run with the shuffled-label control; 8: the seed SAEs' quality on their training's tokens).
TRACING_VERSION = "8"

#: The paper's claims this chapter judges: key -> wording (the README columns and the findings' lines).
CLAIMS = {
    "small_set": "A small set drives predictions",
    "varies_by_emotion": "Number and impact vary by emotion",
    "disgust_weaker_diffuse": "Disgust weaker and more diffuse",
}

_STUDY_TABLES = (
    "curves",
    "effects",
    "k50",
    "cross",
    "verification",
    "verification_summary",
    "top_features",
    "concentration",
    "cut_range_curves",
    "cut_range_verification",
)


@dataclass(frozen=True)
class TracingRule:
    """How the chapter's verdicts read the study: effects in `metric` units under `ablation`; a set of features is
    "small" when its k50 is at most `small_k`; tests at level `alpha`. The default metric, the gold gap, is the
    one a label prior cannot move (`emolib.methods.tracing`)."""

    metric: str = "gap"
    ablation: str = "zero"
    small_k: int = 16
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.metric not in METRICS or self.ablation not in ABLATIONS:
            raise TracingError(f"metric must be in {list(METRICS)} and ablation in {ABLATIONS}")


@dataclass(frozen=True)
class TracingConfig:
    """Everything one model's tracing study depends on. Defaults are the full preset.

    `preset` keys the items and SAEs read: the held-out `items` (chapter 1's analysis set) and the SAE suite
    `saes`. Phases are the best `n_phases`-phase cut of chapter 1's profile. `rank_per_label` TRAIN items per label
    (the held-out items' settings otherwise) rank the features and give the mean-ablation reference; a seeded
    sample of `held_out_per_label` held-out items per label (None: all) is ablated. Single-token ablations cost
    about the same per item from batch 32 up, so batches are large. `cross_k` top features of each source emotion
    are ablated in the cross-emotion run. k50 is half of `k50_reference` ("clean": the emotion's mean clean value,
    "whole": the whole-phase drop); `min_effect` is the reference (per metric) at or below which k50 is undefined:
    a model with no clean preference for the gold label has nothing to explain. `shuffled_control` also ablates the
    top features of a ranking made for permuted labels. `top` features per emotion and phase are ranked in the
    study's table. Intervals use `n_boot` item resamples at `level`. `rule` reads the verdicts; `disgust`
    names the emotion of the "weaker and more diffuse" claim. `cut_range` also traces the final phase from each
    end of its first layer's bootstrap interval (ablation curves and verification only), so that a verdict that
    holds for one cut only is reported as fragile. `sae_seeds` retrain the final phase's SAEs with other training
    seeds and trace the final phase through each (a verdict the seeds disagree on is inconclusive). `text_positions`
    traces every phase again at the text's positions (`positions="suffix"`: the text and the answer cue, not the
    shared instruction) on `text_positions_per_label` of the held-out items per label, with its own (smaller)
    tracer settings; None leaves it out (`text_positions_config`).
    """

    preset: str = "full"
    items: AnalysisConfig = field(default_factory=AnalysisConfig)
    saes: SuiteConfig = field(default_factory=SuiteConfig)
    n_phases: int = 3
    rank_per_label: int = 40
    held_out_per_label: int | None = 40
    tracing: TracerConfig = field(
        # one seed of matched random features: the shuffled-label control takes the second seed's place
        default_factory=lambda: TracerConfig(random_seeds=(0,), n_verify=8, batch_size=40, progress=True)
    )
    cross_k: int = 16
    n_boot: int = 1000
    level: float = 0.95
    k50_reference: str = "clean"
    shuffled_control: bool = True
    min_effect: tuple[tuple[str, float], ...] = (
        ("gap", 0.0),
        ("prob", 0.0),
        ("margin", 0.0),
        ("accuracy", 0.0),
    )
    top: int = 20
    seed: int = 0
    rule: TracingRule = field(default_factory=TracingRule)
    disgust: str = "disgust"
    cut_range: bool = True
    sae_seeds: tuple[int, ...] = (1, 2)
    # every traced position costs a forward of the text, not of one token: fewer k, one ablation, fewer items
    text_positions: TracerConfig | None = field(
        default_factory=lambda: TracerConfig(
            positions="suffix",
            ks=(1, 4, 16, 64),
            ablations=("zero",),
            random_seeds=(0,),
            n_verify=4,
            batch_size=8,
            progress=True,
        )
    )
    text_positions_per_label: int = 10


def text_positions_config(config: TracingConfig) -> TracingConfig:
    """The study config of the text-position run: `config.text_positions` as tracer on a sample of
    `text_positions_per_label` held-out items per label, with the same controls (matched random features and,
    when the config has it, the shuffled-label ranking: the same rules must read both runs), no cut range and
    no seeds. Raises when `config` has no text-position tracer."""
    if config.text_positions is None:
        raise TracingError("this config has no text-position tracer (text_positions=None)")
    if config.text_positions.positions != "suffix":
        raise TracingError(
            f"text_positions must trace positions='suffix', not {config.text_positions.positions!r}"
        )
    if config.rule.ablation not in config.text_positions.ablations:
        raise TracingError(
            f"the rule reads {config.rule.ablation!r} ablation; text_positions.ablations must include it"
        )
    return dataclasses.replace(
        config,
        tracing=config.text_positions,
        held_out_per_label=config.text_positions_per_label,
        cut_range=False,
        sae_seeds=(),
        text_positions=None,
    )


def ranking_items(config: TracingConfig) -> AnalysisConfig:
    """The ranking items: `rank_per_label` per label of the TRAIN split, otherwise as the held-out items."""
    return dataclasses.replace(config.items, splits=("train",), n_per_label=config.rank_per_label)


# ------------------------------------------------------------------------------------------ per-item study


@dataclass
class Study:
    """The tables of one model's tracing study (columns as documented by the functions that make them).

    `curves` per item (`FeatureTracer.ablation_curves`), `effects` their means with intervals (`summarize_effects`),
    `k50` (`k50_table`), `cross` (`FeatureTracer.cross_emotion`), `verification` and `verification_summary`
    (`FeatureTracer.verify`), `top_features` (`Attributions.table`), `concentration`
    (`Attributions.concentration`); `meta` has item counts, phases and stage timings in seconds.
    """

    curves: pd.DataFrame
    effects: pd.DataFrame
    k50: pd.DataFrame
    cross: pd.DataFrame
    verification: pd.DataFrame
    verification_summary: pd.DataFrame
    top_features: pd.DataFrame
    concentration: pd.DataFrame
    meta: dict
    cut_range_curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    cut_range_verification: pd.DataFrame = field(default_factory=pd.DataFrame)


def run_study(
    tracer: FeatureTracer,
    ranking: tuple[Sequence[str], Sequence[str]],
    held_out: tuple[Sequence[str], Sequence[str]],
    phases: Mapping[str, Iterable[int]],
    config: TracingConfig,
    cut_range: Mapping[str, Iterable[int]] | None = None,
    cross_emotion: bool = True,
) -> Study:
    """Attribute on the ranking items (texts, gold), ablate on the held-out items, summarise, verify.

    Features are ranked, and mean-ablation references taken, on the ranking items only, so the held-out effects
    are not selected on the items they are measured on. `cut_range` names other spans of the final phase (its
    first layer at the ends of chapter 1's bootstrap interval): they get the ablation curves and the
    verification the verdicts read, from the same rankings, in `cut_range_curves` and `cut_range_verification`.
    `cross_emotion=False` leaves out the cross-emotion run (`cross` empty), which no verdict reads: a study traced
    only for its verdicts (through another seed's SAEs) does not pay for it.
    """
    phases = check_phases(phases, tracer.layers)
    cut_range = check_phases(cut_range, tracer.layers) if cut_range else {}
    timings: dict[str, float] = {}

    def timed(stage: str, fn, *args, **kwargs):
        began = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[stage] = time.perf_counter() - began
        return out

    rank_texts, rank_gold = list(ranking[0]), list(ranking[1])
    keep = per_label_sample(held_out[1], config.held_out_per_label, config.seed)
    texts, gold = [held_out[0][i] for i in keep], [held_out[1][i] for i in keep]
    ranked = timed("attribute_ranking", tracer.attribute, rank_texts, rank_gold)
    shuffled = None
    if config.shuffled_control:  # the same items ranked for permuted labels: a ranking that knows no emotion
        permuted = list(np.random.default_rng(config.seed).permutation(rank_gold))
        shuffled = timed("attribute_shuffled", tracer.attribute, rank_texts, permuted)
    means = timed("feature_means", tracer.feature_means, rank_texts)
    held = timed("attribute_held_out", tracer.attribute, texts, gold)
    curves = timed(
        "ablation_curves", tracer.ablation_curves, ranked, texts, gold, phases, means=means, shuffled=shuffled
    )
    cross = pd.DataFrame()
    if cross_emotion:
        cross = timed(
            "cross_emotion", tracer.cross_emotion, ranked, texts, gold, phases, config.cross_k, means=means
        )
    verification, summary = timed("verify", tracer.verify, ranked, held, phases)
    cut_curves, cut_verification = pd.DataFrame(), pd.DataFrame()
    if cut_range:
        cut_curves = timed(
            "cut_range_curves",
            tracer.ablation_curves,
            ranked,
            texts,
            gold,
            cut_range,
            means=means,
            shuffled=shuffled,
        )
        cut_verification = timed("cut_range_verify", tracer.verify, ranked, held, cut_range)[0]
    boot = {"n_boot": config.n_boot, "level": config.level, "seed": config.seed}
    return Study(
        curves=curves,
        effects=summarize_effects(curves, **boot),
        k50=k50_table(curves, reference=config.k50_reference, min_effect=dict(config.min_effect), **boot),
        cross=cross,
        verification=verification,
        verification_summary=summary,
        top_features=ranked.table(phases, top=config.top),
        concentration=ranked.concentration(phases, tracer.config.ks),
        cut_range_curves=cut_curves,
        cut_range_verification=cut_verification,
        meta={
            "phases": {name: list(layers) for name, layers in phases.items()},
            "cut_range": {name: list(layers) for name, layers in cut_range.items()},
            "n_ranking": len(rank_texts),
            "n_held_out": len(texts),
            "ranking_per_label": pd.Series(rank_gold).value_counts().to_dict(),
            "held_out_per_label": pd.Series(gold).value_counts().to_dict(),
            "n_truncated": {"ranking": ranked.meta["n_truncated"], "held_out": held.meta["n_truncated"]},
            "timings_seconds": timings,
        },
    )


def cached_study(
    tracer: FeatureTracer,
    model_name: str,
    sae_id: str,
    ranking: tuple[Sequence[str], Sequence[str]],
    held_out: tuple[Sequence[str], Sequence[str]],
    phases: Mapping[str, Iterable[int]],
    config: TracingConfig,
    cut_range: Mapping[str, Iterable[int]] | None = None,
    cross_emotion: bool = True,
) -> Study:
    """`run_study`, cached on disk (CSV tables and a JSON meta, checksummed) under a key made of the model, its
    prompt and verbalisers, the SAEs (`sae_id`, e.g. their cache folder), the items, the phases, the cut range,
    whether the cross-emotion run is made, and the config."""
    model_name = model_key(model_name, tracer.model)
    key = config_key(
        STUDY_VERSION,
        model_name,
        sae_id,
        *prompt_fingerprint(tracer.classifier),
        tracer.classifier.config.max_text_tokens,
        pairs_digest(ranking[1], ranking[0]),
        pairs_digest(held_out[1], held_out[0]),
        {name: list(layers) for name, layers in phases.items()},
        {name: list(layers) for name, layers in (cut_range or {}).items()},
        config,
        *(() if cross_emotion else ("no cross-emotion run",)),
    )
    folder = cache_dir("tracing") / f"{model_name}-{key}"

    def build(tmp) -> None:
        study = run_study(tracer, ranking, held_out, phases, config, cut_range, cross_emotion)
        for name in _STUDY_TABLES:
            getattr(study, name).to_csv(tmp / f"{name}.csv", index=False)
        (tmp / "meta.json").write_text(json.dumps(study.meta, indent=2, default=str))

    entry = cached_entry(folder, build, meta={"model": model_name, "sae_id": sae_id})
    tables = {name: _read_table(entry / f"{name}.csv") for name in _STUDY_TABLES}
    return Study(**tables, meta=json.loads((entry / "meta.json").read_text()))


def _read_table(path: Path) -> pd.DataFrame:
    """A study table from its CSV; a table without rows or columns (no cut range) was written as an empty file."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


# ------------------------------------------------------------------------------------------------ verdicts


def _rows(frame: pd.DataFrame, phase: str, rule: TracingRule, **extra) -> pd.DataFrame:
    mask = (frame["phase"] == phase) & (frame["ablation"] == rule.ablation)
    for name, value in extra.items():
        mask &= frame[name] == value
    return frame[mask]


def small_set_verdict(
    k50: pd.DataFrame,
    versus: pd.DataFrame,
    phase: str,
    rule: TracingRule,
    shuffled: pd.DataFrame | None = None,
) -> Verdict:
    """Does a small set of features drive each emotion's prediction in `phase`?

    An emotion is driven by a small set when its k50 is at most `rule.small_k` and, at that k, the top features'
    drop beats matched random features' (paired interval above zero) and, when `shuffled` (`top_vs_random` against
    the shuffled-label ranking) is given, the top k of a ranking built on shuffled labels (a missing row there
    counts as not beaten). Every traced emotion is in the denominator: one whose
    k50 is undefined (the model does not prefer its gold label) or not reached counts against the claim. Holds for
    at least half of the emotions, partly for at least one, does not hold for none; inconclusive only when no
    emotion was traced.
    """
    name = "small_set_verdict"
    table = _rows(k50, phase, rule, metric=rule.metric)
    if table.empty:
        return Verdict("inconclusive", f"no emotion was traced in {phase}", {"n_emotions": 0}, name)
    small = []
    for row in table.itertuples():
        if not np.isfinite(row.k50) or row.k50 > rule.small_k:
            continue
        beat = _rows(versus, phase, rule, emotion=row.emotion, k=int(row.k50))
        if beat.empty or not beat["excess_low"].iloc[0] > 0:
            continue
        if shuffled is not None:
            specific = _rows(shuffled, phase, rule, emotion=row.emotion, k=int(row.k50))
            if specific.empty or not specific["excess_low"].iloc[0] > 0:
                continue
        small.append(f"{row.emotion} (k50 {int(row.k50)})")
    n, m = len(small), len(table)
    undefined = int(table["k50"].isna().sum())
    reason = (
        f"in {phase}, {n} of {m} emotions lose half of their clean {rule.metric} with at most {rule.small_k} "
        f"features that beat matched random ones"
        + (" and a shuffled-label ranking's" if shuffled is not None else "")
        + (f": {', '.join(small)}" if small else "")
        + (f"; {undefined} with no clean preference for the gold label count against" if undefined else "")
    )
    verdict = "holds" if n >= math.ceil(m / 2) else "partly" if n else "does not hold"
    numbers = {"n_small": n, "n_emotions": m, "n_undefined": undefined, "small_k": rule.small_k}
    return Verdict(verdict, reason, numbers, name)


def _final_excess(curves: pd.DataFrame, phase: str, rule: TracingRule) -> dict[str, np.ndarray]:
    """Per emotion, the per-item excess drop at the largest k: its top features' drop minus the same item's drop
    under as many random features (mean over seeds), so that what any k features would do is not counted."""
    rows = _rows(curves, phase, rule)
    k_max = rows.loc[rows["condition"] == "top", "k"].max()
    rows = rows[rows["k"] == k_max]
    column = METRICS[rule.metric]
    out = {}
    for emotion, group in rows.groupby("emotion", sort=False):
        top = group[group["condition"] == "top"].groupby("item")[column].mean()
        rand = group[group["condition"] == "random"].groupby("item")[column].mean()
        out[emotion] = (top - rand.reindex(top.index)).dropna().to_numpy()
    return out


def _overlap_free_pairs(table: pd.DataFrame) -> list[tuple[str, str]]:
    """Pairs of emotions whose k50 intervals do not overlap (an unreached k50, inf, counts as large)."""
    rows = list(table.itertuples())
    return [
        (a.emotion, b.emotion)
        for a in rows
        for b in rows
        if a.emotion != b.emotion and a.k50_high < b.k50_low
    ]


def varies_verdict(curves: pd.DataFrame, k50: pd.DataFrame, phase: str, rule: TracingRule) -> Verdict:
    """Do the number (k50) and impact (drop at the largest k) of the driving features vary by emotion?

    Impact varies when a Kruskal-Wallis test of the per-item excess drops at the largest k (top minus random
    features on the same item) across emotions gives p < alpha; number varies when some pair of emotions has non-overlapping k50 intervals. Holds when both,
    partly when one, does not hold when neither; inconclusive with fewer than two emotions.
    """
    name = "varies_verdict"
    drops = _final_excess(curves, phase, rule)
    drops = {e: d for e, d in drops.items() if len(d) > 0}
    if len(drops) < 2:
        return Verdict(
            "inconclusive", f"fewer than two emotions with items in {phase}", {"n_emotions": len(drops)}, name
        )
    values = list(drops.values())
    p_value = float(kruskal(*values).pvalue) if len({v for d in values for v in d}) > 1 else 1.0
    table = _rows(k50, phase, rule, metric=rule.metric).dropna(subset=["k50"])
    pairs = _overlap_free_pairs(table)
    impact, number = p_value < rule.alpha, bool(pairs)
    reason = (
        f"in {phase}, excess drops over random features at the largest k differ across emotions with "
        f"Kruskal-Wallis p = {p_value:.3g}; "
        f"{len(pairs)} ordered pairs of emotions have non-overlapping k50 intervals"
    )
    verdict = "holds" if impact and number else "partly" if impact or number else "does not hold"
    numbers = {"kruskal_p": p_value, "alpha": rule.alpha, "n_separated_pairs": len(pairs)}
    return Verdict(verdict, reason, numbers, name)


def weaker_diffuse_verdict(
    curves: pd.DataFrame, k50: pd.DataFrame, phase: str, rule: TracingRule, emotion: str = "disgust"
) -> Verdict:
    """Is `emotion` weaker (smaller excess drop over random features at the largest k than the other emotions'
    items, one-sided Mann-Whitney p < alpha) and more diffuse (k50 lower bound above the median k50 of the others;
    inf counts as large)?

    Holds when both, partly when one, does not hold when neither; inconclusive without items of `emotion`.
    """
    name = "weaker_diffuse_verdict"
    drops = _final_excess(curves, phase, rule)
    if emotion not in drops or len(drops) < 2:
        return Verdict(
            "inconclusive",
            f"no {emotion} items, or no other emotion, in {phase}",
            {"n_emotions": len(drops)},
            name,
        )
    others = np.concatenate([d for e, d in drops.items() if e != emotion])
    p_value = float(mannwhitneyu(drops[emotion], others, alternative="less").pvalue)
    weaker = p_value < rule.alpha
    table = _rows(k50, phase, rule, metric=rule.metric).set_index("emotion")
    own = table["k50_low"].get(emotion, float("nan"))
    rest = table.drop(index=emotion, errors="ignore")["k50"].dropna()
    numbers: dict[str, Any] = {
        "drop": float(drops[emotion].mean()),
        "others_drop": float(others.mean()),
        "mannwhitney_p": p_value,
        "alpha": rule.alpha,
        "k50_low": float(own),
    }
    if np.isnan(own) or rest.empty:
        diffuse, diffuse_text = (
            False,
            f"{emotion}'s k50 is undefined (no clean preference for it) or no other k50 is",
        )
    else:
        median = float(np.median(rest))
        numbers["others_median_k50"] = median
        diffuse = own > median
        diffuse_text = f"{emotion}'s k50 lower bound {own:g} vs the others' median k50 {median:g}"
    reason = (
        f"in {phase}: {emotion}'s excess drop at the largest k ({drops[emotion].mean():.3f}) vs the others' "
        f"({others.mean():.3f}), one-sided p = {p_value:.3g}; {diffuse_text}"
    )
    verdict = "holds" if weaker and diffuse else "partly" if weaker or diffuse else "does not hold"
    return Verdict(verdict, reason, numbers, name)


def ranking_agreement(verification: pd.DataFrame, phase: str) -> tuple[float, float, int]:
    """Pooled Spearman correlation (rho, p, n) between attribution-predicted and measured single-feature drops
    in `phase` (NaN with fewer than three features or no spread)."""
    rows = verification[verification["phase"] == phase]
    if len(rows) < 3 or rows["predicted"].nunique() < 2 or rows["measured"].nunique() < 2:
        return float("nan"), float("nan"), len(rows)
    result = spearmanr(rows["predicted"], rows["measured"])
    return float(result.statistic), float(result.pvalue), len(rows)


def gated(verdict: Verdict, rho: float, p_value: float, n: int, rule: TracingRule) -> Verdict:
    """`verdict` read through the ranking's reliability: where attribution does not predict single-feature
    ablation (pooled rho not positive at level alpha), a negative finding ("does not hold", "partly") may be the
    ranking's failure rather than the claim's, so it becomes "inconclusive"; a positive one stands, since top
    features were measured against random ones directly. Either way the reason says so."""
    reliable = bool(np.isfinite(rho) and rho > 0 and p_value < rule.alpha)
    numbers = {**verdict.numbers, "ranking_spearman": rho, "ranking_p": p_value}
    if reliable:
        return dataclasses.replace(verdict, numbers=numbers)
    note = (
        f"; the ranking is unreliable here: attribution does not predict single-feature ablation "
        f"(Spearman {rho:.2f}, p = {p_value:.2g}, {n} features)"
    )
    outcome = "inconclusive" if verdict.verdict in ("does not hold", "partly") else verdict.verdict
    return dataclasses.replace(verdict, verdict=outcome, reason=verdict.reason + note, numbers=numbers)


def phase_verdicts(
    study: Study,
    versus: pd.DataFrame,
    phase: str,
    rule: TracingRule,
    disgust: str,
    shuffled: pd.DataFrame | None = None,
) -> dict[str, Verdict]:
    """The three claims' verdicts in one phase, by claim key (`CLAIMS`), each gated by the ranking's reliability
    in that phase (`gated`)."""
    agreement = ranking_agreement(study.verification, phase)
    verdicts = {
        "small_set": small_set_verdict(study.k50, versus, phase, rule, shuffled),
        "varies_by_emotion": varies_verdict(study.curves, study.k50, phase, rule),
        "disgust_weaker_diffuse": weaker_diffuse_verdict(study.curves, study.k50, phase, rule, disgust),
    }
    return {key: gated(verdict, *agreement, rule) for key, verdict in verdicts.items()}


def fragile_across_cuts(verdict: Verdict, others: Mapping[str, Verdict]) -> Verdict:
    """The final phase's `verdict` read against the same claim's verdicts when the phase starts elsewhere in
    chapter 1's bootstrap interval (`others`, by span): where one differs, the finding exists for some cuts only,
    so it is fragile and a "holds" becomes "partly"; the reason names every span's verdict."""
    if not others:
        return verdict
    differing = {span: v.verdict for span, v in others.items() if v.verdict != verdict.verdict}
    numbers = {**verdict.numbers, "fragile": bool(differing)}
    if not differing:
        return dataclasses.replace(verdict, numbers=numbers)
    spans = ", ".join(f"{span}: {outcome}" for span, outcome in differing.items())
    outcome = "partly" if verdict.verdict == "holds" else verdict.verdict
    note = f"; fragile: where the final phase starts elsewhere in its bootstrap interval the rule says otherwise ({spans})"
    return dataclasses.replace(verdict, verdict=outcome, reason=verdict.reason + note, numbers=numbers)


def cut_range_spans(final: FinalPhase) -> dict[str, tuple[int, ...]]:
    """The final phase with its first layer at each end of chapter 1's bootstrap interval other than the chosen
    one (`FinalPhase.alternatives`): the spans a tracing verdict must survive (none without an interval)."""
    return {
        f"final phase from layer {first}": tuple(range(first, final.last + 1))
        for first in final.alternatives()
    }


# ------------------------------------------------------------------------------------------------ result


def format_k(value: float) -> str:
    """A k50 in words: "not reached" (inf), "undefined" (NaN) or the whole number."""
    return "not reached" if value == np.inf else "undefined" if np.isnan(value) else f"{int(value)}"


def _matrix_json(matrix: pd.DataFrame) -> dict[str, dict[str, float]]:
    """`{column: {row: value}}` (pandas' `to_dict()`, how the results file has always stored the matrices)."""
    return matrix.to_dict()


def _matrix(payload: Mapping[str, Mapping[str, float]], index: str, columns: str) -> pd.DataFrame:
    """The inverse of `_matrix_json`, rows and columns in their stored order and named."""
    rows = list(dict.fromkeys(row for column in payload.values() for row in column))
    frame = pd.DataFrame({c: [payload[c].get(r, np.nan) for r in rows] for c in payload}, index=rows)
    frame.index.name, frame.columns.name = index, columns
    return frame.astype(float)


def _cut_range_verdicts(
    study: Study, config: TracingConfig, spans: Mapping[str, tuple[int, ...]]
) -> dict[str, dict[str, Verdict]]:
    """Every claim's verdict in each cut-range span by the same rules and gate as the phases' (before the SAE
    cap, as the final phase's verdict they are compared with)."""
    if not spans:
        return {}
    curves = study.cut_range_curves
    boot = {"n_boot": config.n_boot, "level": config.level, "seed": config.seed}
    k50 = k50_table(curves, reference=config.k50_reference, min_effect=dict(config.min_effect), **boot)
    spanned = dataclasses.replace(study, curves=curves, k50=k50, verification=study.cut_range_verification)
    return {
        span: phase_verdicts(
            *_versus(spanned, config), span, config.rule, config.disgust, _shuffled(spanned, config)
        )
        for span in spans
    }


def _cut_range_table(
    phases: Mapping[str, tuple[int, ...]],
    final: str,
    final_verdicts: Mapping[str, Verdict],
    spans: Mapping[str, tuple[int, ...]],
    by_span: Mapping[str, Mapping[str, Verdict]],
) -> pd.DataFrame:
    """One row per start of the final phase (the chosen one first): its layers and every claim's verdict by the
    rules at that cut, before the SAE cap (and before `fragile_across_cuts` reads them together)."""
    rows = [
        {
            "span": final,
            "layers": _span(phases[final]),
            "chosen": True,
            **{CLAIMS[key]: v.verdict for key, v in final_verdicts.items()},
        }
    ]
    for span, layers in spans.items():
        rows.append(
            {
                "span": span,
                "layers": _span(layers),
                "chosen": False,
                **{CLAIMS[key]: v.verdict for key, v in by_span[span].items()},
            }
        )
    return pd.DataFrame(rows).set_index("span")


def _versus(study: Study, config: TracingConfig) -> tuple[Study, pd.DataFrame]:
    """The study with its paired top-vs-random table (what `phase_verdicts` reads beside it)."""
    paired = {"metric": config.rule.metric, "n_boot": config.n_boot, "seed": config.seed}
    return study, top_vs_random(study.curves, **paired)


def _shuffled(study: Study, config: TracingConfig) -> pd.DataFrame | None:
    if not (study.curves["condition"] == "shuffled").any():
        return None
    paired = {"metric": config.rule.metric, "n_boot": config.n_boot, "seed": config.seed}
    return top_vs_random(study.curves, control="shuffled", **paired)


def _seed_table(
    final: str,
    book: Mapping[str, Verdict],
    by_seed: Mapping[int, Mapping[str, Verdict]],
    studies: Mapping[int, Study],
    config: TracingConfig,
    flags: Mapping[int, Mapping[int, str]],
) -> pd.DataFrame:
    """One row per SAE training seed (the book's first): every claim's verdict in the final phase by the rules,
    gate included, before the SAE cap; each seed's k50 per emotion and its SAEs' missed quality goals (`flags`
    by seed, then layer) beside them."""

    def k50s(study: Study | None) -> str:
        if study is None:
            return "(the book's SAEs: see above)"
        rows = study.k50[
            (study.k50["phase"] == final)
            & (study.k50["metric"] == config.rule.metric)
            & (study.k50["ablation"] == config.rule.ablation)
        ]
        return ", ".join(f"{r.emotion} {format_k(r.k50)}" for r in rows.itertuples())

    rows = [
        {
            "seed": seed,
            "k50 per emotion": k50s(studies.get(seed)),
            "SAEs missing a goal": goals_missed(flags[seed]) if seed in flags else "not measured",
            **{CLAIMS[k]: v.verdict for k, v in verdicts.items()},
        }
        for seed, verdicts in {config.saes.training.seed: book, **by_seed}.items()
    ]
    return pd.DataFrame(rows).set_index("seed")


#: The two runs of the positions table, in words.
POSITION_RUNS = {"last": "answer position", "suffix": "text positions"}


def compared_k(config: TracingConfig) -> int:
    """The k at which the answer-position and text-position runs are compared: the largest both trace."""
    ks = set(config.tracing.ks)
    if config.text_positions is not None:
        ks &= set(config.text_positions.ks)
    if not ks:
        raise TracingError("the answer-position and text-position tracers share no k to compare at")
    return max(ks)


def _positions_rows(
    study: Study,
    verdicts: Mapping[str, Mapping[str, Verdict]],
    config: TracingConfig,
    k: int,
    positions: str,
) -> list[dict[str, Any]]:
    """One row per phase of one run (`study.curves` traced at one kind of position): items, the emotions whose
    top-k features beat as many matched random ones (paired interval above zero), the mean excess and the
    whole-phase drop over emotions (the rule's metric and ablation), and every claim's verdict before the caps.
    `positions` is the run's tracer setting ("last" or "suffix")."""
    rule = config.rule
    versus = top_vs_random(study.curves, metric=rule.metric, n_boot=config.n_boot, seed=config.seed)
    versus = versus[(versus["ablation"] == rule.ablation) & (versus["k"] == k)]
    effects = study.effects[(study.effects["ablation"] == rule.ablation)]
    rows = []
    for phase, by_claim in verdicts.items():
        cells = versus[versus["phase"] == phase]
        whole = effects[(effects["phase"] == phase) & (effects["condition"] == "whole")]
        rows.append(
            {
                "phase": phase,
                "positions": POSITION_RUNS[positions],
                "held-out items": int(study.meta["n_held_out"]),
                f"emotions whose top {k} beat random": f"{int((cells['excess_low'] > 0).sum())} of {len(cells)}",
                f"mean excess at k = {k}": float(cells["excess"].mean()),
                "mean whole-phase drop": float(whole[f"drop_{rule.metric}"].mean()),
                **{CLAIMS[key]: v.verdict for key, v in by_claim.items()},
            }
        )
    return rows


def _positions_table(
    study: Study,
    verdicts: Mapping[str, Mapping[str, Verdict]],
    text_study: Study,
    config: TracingConfig,
) -> pd.DataFrame:
    """Every phase traced at the answer position (`study`, its verdicts before the caps) and at the text's
    positions (`text_study`, verdicts by the same rules), compared at `compared_k`; rows (phase, positions)."""
    text_config = text_positions_config(config)
    text_verdicts = {
        phase: phase_verdicts(
            *_versus(text_study, text_config),
            phase,
            config.rule,
            config.disgust,
            _shuffled(text_study, text_config),
        )
        for phase in verdicts
    }
    k = compared_k(config)
    rows = _positions_rows(study, verdicts, config, k, config.tracing.positions)
    rows += _positions_rows(text_study, text_verdicts, text_config, k, text_config.tracing.positions)
    order = {phase: i for i, phase in enumerate(verdicts)}
    frame = pd.DataFrame(rows).sort_values("phase", key=lambda c: c.map(order), kind="stable")
    return frame.set_index(["phase", "positions"])


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}"


@dataclass
class TracingResult:
    """One model's tracing study: the small tables the chapter shows and the verdicts in every phase.

    `phases` are the traced phases (`{name: layers}`, the last is the final phase) and `chosen_phase_count` the
    count chapter 1's test preferred (None: phases set by hand). `effects`, `k50`, `top_vs_random`, `verification`,
    `verification_summary`, `concentration` and `top_features` (the top five per emotion and phase) are the study's
    tables (`emolib.methods.ablation`, `emolib.methods.tracing`); `gold_drop` (source x target) and `confusion`
    (target x label, `confusion_source` ablated) are the final phase's cross-emotion matrices; `clean_prob` the
    clean gold probability per emotion; `facts` what the chapter prints about the items, SAEs and phases;
    `phase_verdicts[phase][claim]` the verdicts. `meta` is the study's (counts, stage timings).
    """

    study: ClassVar[str] = "tracing"

    model: str
    phases: dict[str, tuple[int, ...]]
    chosen_phase_count: int | None
    rule: TracingRule
    ks: tuple[int, ...]
    disgust: str
    meta: dict[str, Any]
    facts: dict[str, Any]
    effects: pd.DataFrame
    k50: pd.DataFrame
    top_vs_random: pd.DataFrame
    top_vs_shuffled: pd.DataFrame | None
    verification: pd.DataFrame
    verification_summary: pd.DataFrame
    concentration: pd.DataFrame
    top_features: pd.DataFrame
    clean_prob: dict[str, float]
    gold_drop: pd.DataFrame
    confusion: pd.DataFrame
    confusion_source: str
    phase_verdicts: dict[str, dict[str, Verdict]]
    cut_range: pd.DataFrame | None = None  # verdicts with the final phase starting across its interval
    seeds: pd.DataFrame | None = (
        None  # the final phase's verdicts and k50 through SAEs of other training seeds
    )
    positions: pd.DataFrame | None = None  # every phase at the answer position and at the text's positions

    # ---------------------------------------------------------------------------------------- building

    @classmethod
    def from_study(
        cls,
        model: str,
        study: Study,
        config: TracingConfig,
        chosen_phase_count: int | None,
        facts: Mapping[str, Any],
        sae_flags: Mapping[str, Mapping[int, str]] | None = None,
        seed_studies: Mapping[int, Study] | None = None,
        text_study: Study | None = None,
        seed_sae_flags: Mapping[int, Mapping[int, str]] | None = None,
    ) -> TracingResult:
        """Summarise a per-item study: paired top-vs-random excess, final-phase matrices, verdicts per phase, each
        capped where most of the phase's SAEs miss their goals (`sae_flags[phase][layer]`: the goals missed). The
        final phase's verdicts are also read against the cut range's spans (`fragile_across_cuts`) and against
        `seed_studies` (the final phase traced through SAEs retrained with other seeds, `stable_across_seeds`;
        `seed_sae_flags[seed][layer]` the goals their SAEs miss, shown beside them).
        `text_study` (every phase traced at the text's positions) is set beside the answer position's run in
        `positions`, by the same rules; it reports where features act and moves no verdict."""
        sae_flags = sae_flags or {}
        rule = config.rule
        phases = {name: tuple(layers) for name, layers in study.meta["phases"].items()}
        final = list(phases)[-1]
        boot = {"metric": rule.metric, "n_boot": config.n_boot, "seed": config.seed}
        versus = top_vs_random(study.curves, **boot)
        has_shuffled = (study.curves["condition"] == "shuffled").any()
        shuffled = top_vs_random(study.curves, control="shuffled", **boot) if has_shuffled else None
        sources = set(study.cross["source"])
        source = config.disgust if config.disgust in sources else study.cross["source"].iloc[0]
        uncapped = {
            phase: phase_verdicts(study, versus, phase, rule, config.disgust, shuffled) for phase in phases
        }
        spans = {name: tuple(layers) for name, layers in study.meta.get("cut_range", {}).items()}
        by_span = _cut_range_verdicts(study, config, spans)
        positions = None if text_study is None else _positions_table(study, uncapped, text_study, config)
        cut_table = _cut_range_table(phases, final, uncapped[final], spans, by_span) if spans else None
        by_seed = {
            seed: phase_verdicts(
                *_versus(seeded, config), final, rule, config.disgust, _shuffled(seeded, config)
            )
            for seed, seeded in (seed_studies or {}).items()
        }
        seed_table = (
            _seed_table(
                final,
                uncapped[final],
                by_seed,
                seed_studies or {},
                config,
                {config.saes.training.seed: sae_flags.get(final, {}), **(seed_sae_flags or {})},
            )
            if by_seed
            else None
        )
        # both checks compare the rule's own outcome at the chosen cut on the book's SAEs
        uncapped[final] = {
            key: stable_across_seeds(
                fragile_across_cuts(verdict, {span: v[key] for span, v in by_span.items()}),
                {s: v[key] for s, v in by_seed.items()},
                config.saes.training.seed,
                book=verdict.verdict,
            )
            for key, verdict in uncapped[final].items()
        }
        verdicts = {
            phase: {
                key: capped_by_sae(verdict, sae_flags.get(phase, {})).about(key, model, phase)
                for key, verdict in by_claim.items()
            }
            for phase, by_claim in uncapped.items()
        }
        return cls(
            model=model,
            phases=phases,
            chosen_phase_count=chosen_phase_count,
            rule=rule,
            ks=tuple(config.tracing.ks),
            disgust=config.disgust,
            meta={
                **study.meta,
                # what the runs beside the main one cost (stage seconds), for the build's budget
                "seed_timings_seconds": {
                    str(seed): seeded.meta["timings_seconds"] for seed, seeded in (seed_studies or {}).items()
                },
                "text_positions_timings_seconds": None
                if text_study is None
                else text_study.meta["timings_seconds"],
            },
            facts=dict(facts),
            effects=study.effects,
            k50=study.k50,
            top_vs_random=versus,
            top_vs_shuffled=shuffled,
            verification=study.verification,
            verification_summary=study.verification_summary,
            concentration=study.concentration,
            top_features=study.top_features[study.top_features["rank"] <= 5].reset_index(drop=True),
            clean_prob={
                str(k): float(v) for k, v in study.curves.groupby("emotion")["clean_prob"].mean().items()
            },
            gold_drop=gold_drop_matrix(study.cross, phase=final, ablation=rule.ablation),
            confusion=confusion_shift(study.cross, phase=final, source=source, ablation=rule.ablation),
            confusion_source=str(source),
            phase_verdicts=verdicts,
            cut_range=cut_table,
            seeds=seed_table,
            positions=positions,
        )

    # ---------------------------------------------------------------------------------------- JSON

    def to_json(self) -> dict[str, Any]:
        """The results file's entry for this model (the chapter's keys since the first build, plus what the
        tables and figures need)."""
        return {
            "meta": self.meta,
            "final_phase": self.final_phase,
            "effects": records(self.effects, index=False),
            "top_vs_random": records(self.top_vs_random, index=False),
            "top_vs_shuffled": None
            if self.top_vs_shuffled is None
            else records(self.top_vs_shuffled, index=False),
            "k50": records(self.k50, index=False),
            "gold_drop_matrix": _matrix_json(self.gold_drop),
            "verification_summary": records(self.verification_summary, index=False),
            "top_features": records(self.top_features, index=False),
            "verdicts": {key: v.as_dict() for key, v in self.final_verdicts.items()},
            "verdicts_by_phase": self.verdicts_by_phase().to_dict(orient="index"),
            "model": self.model,
            "phases": {name: list(layers) for name, layers in self.phases.items()},
            "chosen_phase_count": self.chosen_phase_count,
            "rule": dataclasses.asdict(self.rule),
            "ks": list(self.ks),
            "disgust": self.disgust,
            "facts": self.facts,
            "verification": records(self.verification, index=False),
            "concentration": records(self.concentration, index=False),
            "clean_prob": self.clean_prob,
            "confusion_shift": {"source": self.confusion_source, "matrix": _matrix_json(self.confusion)},
            "phase_verdicts": {
                phase: {key: v.as_dict() for key, v in verdicts.items()}
                for phase, verdicts in self.phase_verdicts.items()
            },
            "cut_range": None if self.cut_range is None else records(self.cut_range),
            "sae_seeds": None if self.seeds is None else records(self.seeds),
            "positions": None if self.positions is None else records(self.positions),
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> TracingResult:
        chosen = payload["chosen_phase_count"]
        return cls(
            model=payload["model"],
            phases={name: tuple(int(x) for x in layers) for name, layers in payload["phases"].items()},
            chosen_phase_count=None if chosen is None else int(chosen),
            rule=TracingRule(**payload["rule"]),
            ks=tuple(int(k) for k in payload["ks"]),
            disgust=payload["disgust"],
            meta=dict(payload["meta"]),
            facts=dict(payload["facts"]),
            effects=table(payload["effects"]),
            k50=table(payload["k50"]),
            top_vs_random=table(payload["top_vs_random"]),
            top_vs_shuffled=None
            if payload.get("top_vs_shuffled") is None
            else table(payload["top_vs_shuffled"]),
            verification=table(payload["verification"]),
            verification_summary=table(payload["verification_summary"]),
            concentration=table(payload["concentration"]),
            top_features=table(payload["top_features"]),
            clean_prob={k: float(v) for k, v in payload["clean_prob"].items()},
            gold_drop=_matrix(payload["gold_drop_matrix"], "source", "target"),
            confusion=_matrix(payload["confusion_shift"]["matrix"], "target", "label"),
            confusion_source=payload["confusion_shift"]["source"],
            phase_verdicts={
                phase: {key: Verdict.from_dict(v) for key, v in verdicts.items()}
                for phase, verdicts in payload["phase_verdicts"].items()
            },
            cut_range=None if payload.get("cut_range") is None else table(payload["cut_range"], "span"),
            seeds=None if payload.get("sae_seeds") is None else table(payload["sae_seeds"], "seed"),
            positions=None
            if payload.get("positions") is None
            else table(payload["positions"], ["phase", "positions"]),
        )

    # ---------------------------------------------------------------------------------------- verdicts

    @property
    def final_phase(self) -> str:
        return list(self.phases)[-1]

    @property
    def final_verdicts(self) -> dict[str, Verdict]:
        """The verdicts in the final phase, where the paper places the driving features, by claim key."""
        return self.phase_verdicts[self.final_phase]

    def verdicts(self) -> list[Verdict]:
        """The final phase's verdicts, the chapter's findings (claim and model set, scope left out), in `CLAIMS`
        order."""
        return [self.final_verdicts[key].about(key, self.model) for key in CLAIMS]

    def verdicts_by_phase(self) -> pd.DataFrame:
        """The verdict of every claim (columns, in words) in every phase (rows)."""
        return pd.DataFrame(
            {
                phase: {CLAIMS[key]: verdicts[key].verdict for key in CLAIMS}
                for phase, verdicts in self.phase_verdicts.items()
            }
        ).T.rename_axis("phase")

    def span(self, phase: str | None = None) -> str:
        """`first-last` layers of a phase (default the final one)."""
        layers = self.phases[phase or self.final_phase]
        return f"{layers[0]}-{layers[-1]}"

    def readme_row(self) -> dict[str, str]:
        final = self.k50_view()
        final = final[final["phase"] == self.final_phase]

        def cell(emotion: str) -> str:
            row = final[final["emotion"] == emotion]
            return format_k(row["k50"].iloc[0]) if len(row) else "-"

        return {
            "Tracing (ch. 3)": self.model,
            "final phase": f"L{self.span()}",
            "k50 per emotion": ", ".join(f"{e} {cell(e)}" for e in final["emotion"]),
            **{claim: self.final_verdicts[key].verdict for key, claim in CLAIMS.items()},
        }

    # ---------------------------------------------------------------------------------------- views

    @property
    def k_max(self) -> int:
        return max(self.ks)

    def k50_view(self) -> pd.DataFrame:
        """k50 rows of the rule's metric and ablation."""
        rows = self.k50[
            (self.k50["metric"] == self.rule.metric) & (self.k50["ablation"] == self.rule.ablation)
        ]
        return rows.reset_index(drop=True)

    @property
    def drop_column(self) -> str:
        """The effects tables' column of the rule's metric (e.g. `drop_gap`)."""
        return f"drop_{self.rule.metric}"

    def k50_summary(self) -> pd.DataFrame:
        """Per phase and emotion: the clean value of the rule's metric (what k50 halves), k50, the whole-phase
        drop, the drop at the largest k and its share of the clean value, with intervals (the rule's ablation)."""
        view = self.k50_view()
        drop = self.drop_column
        effects = self.effects
        largest = effects[
            (effects["condition"] == "top")
            & (effects["k"] == self.k_max)
            & (effects["ablation"] == self.rule.ablation)
        ].set_index(["emotion", "phase"])
        return pd.DataFrame(
            {
                "emotion": view["emotion"],
                "phase": view["phase"],
                "clean p(gold)": view["emotion"].map(self.clean_prob),
                f"clean {self.rule.metric} [95% CI]": [
                    format_interval(r.reference_value, r.reference_value_low, r.reference_value_high)
                    for r in view.itertuples()
                ],
                "k50 [95% CI]": [
                    f"{format_k(r.k50)} [{format_k(r.k50_low)}, {format_k(r.k50_high)}]"
                    for r in view.itertuples()
                ],
                "whole-phase drop [95% CI]": [
                    format_interval(r.whole_effect, r.whole_effect_low, r.whole_effect_high)
                    for r in view.itertuples()
                ],
                f"drop at k={self.k_max} [95% CI]": [
                    format_interval(*largest.loc[(r.emotion, r.phase), [drop, f"{drop}_low", f"{drop}_high"]])
                    for r in view.itertuples()
                ],
                f"share of clean {self.rule.metric} at k={self.k_max}": [
                    largest.loc[(r.emotion, r.phase), drop] / r.reference_value
                    if r.reference_value > 0
                    else np.nan
                    for r in view.itertuples()
                ],
            }
        ).set_index(["phase", "emotion"])

    def k50_by_measure(self) -> pd.DataFrame:
        """The final phase's k50 per emotion under every ablation and metric (in words)."""
        rows = self.k50[self.k50["phase"] == self.final_phase]
        return rows.assign(cell=[format_k(v) for v in rows["k50"]]).pivot_table(
            index="emotion", columns=["ablation", "metric"], values="cell", aggfunc="first"
        )

    def excess_table(self, control: str = "random") -> pd.DataFrame:
        """The final phase's paired excess drop, top k minus `control` k ("random", or "shuffled": the top k of the
        shuffled-label ranking), per emotion (rows) and k (columns); empty when that control was not run."""
        table_ = self.top_vs_random if control == "random" else self.top_vs_shuffled
        if table_ is None or table_.empty:
            return pd.DataFrame()
        final = table_[(table_["phase"] == self.final_phase) & (table_["ablation"] == self.rule.ablation)]
        cells = [
            format_interval(v, lo, hi, signed=True)
            for v, lo, hi in final[["excess", "excess_low", "excess_high"]].itertuples(index=False)
        ]
        return final.assign(cell=cells).pivot(index="emotion", columns="k", values="cell")

    def phase_rows(self) -> list[dict[str, Any]]:
        """Per phase, averaged over emotions: whole-phase, top-k and random-k drops at the largest k, and k50s."""
        e = self.effects[self.effects["ablation"] == self.rule.ablation]
        k = self.k50_view()
        rows = []
        for phase in self.phases:
            top = e[(e["phase"] == phase) & (e["condition"] == "top") & (e["k"] == self.k_max)]
            rnd = e[(e["phase"] == phase) & (e["condition"] == "random") & (e["k"] == self.k_max)]
            whole = e[(e["phase"] == phase) & (e["condition"] == "whole")]
            kk = k[k["phase"] == phase]["k50"]
            rows.append(
                {
                    "model": self.model,
                    "phase": phase,
                    "whole-phase drop": whole[self.drop_column].mean(),
                    f"top-{self.k_max} drop": top[self.drop_column].mean(),
                    f"random-{self.k_max} drop": rnd[self.drop_column].mean(),
                    "emotions with k50 <= small": int((kk <= self.rule.small_k).sum()),
                    "emotions with k50 defined": int(kk.notna().sum()),
                    "median k50": float(np.median(kk.dropna())) if kk.notna().any() else np.nan,
                }
            )
        return rows

    def regularities(self) -> dict[str, int]:
        """Over (emotion, phase) cells: how often the top-k drop exceeds the whole-phase drop (`above`), and how
        often k random features raise the gold measure when ablated (`lowered`), at the largest k (the rule's
        metric)."""
        e = self.effects[self.effects["ablation"] == self.rule.ablation].set_index(
            ["emotion", "phase", "condition", "k"]
        )
        cells = above = lowered = 0
        for emotion, phase in e.index.droplevel([2, 3]).unique():
            top = e.loc[(emotion, phase, "top", self.k_max), self.drop_column]
            rnd = e.loc[(emotion, phase, "random", self.k_max), self.drop_column]
            whole = e.xs((emotion, phase, "whole"), level=[0, 1, 2])[self.drop_column].iloc[0]
            cells += 1
            above += bool(top > whole)
            lowered += bool(rnd < 0)
        return {"cells": cells, "above": above, "lowered": lowered}

    def specificity(self) -> dict[str, Any]:
        """How specific the final phase's features are: mean own and collateral gold-probability drops."""
        values = self.gold_drop.to_numpy()
        own, other = np.diag(values), values[~np.eye(len(values), dtype=bool)]
        exceeds = sum(values[i, i] > np.delete(values[:, i], i).max() for i in range(len(values)))
        return {
            "model": self.model,
            "mean own drop": own.mean(),
            "mean collateral drop": other.mean(),
            "emotions whose own drop exceeds every collateral one": int(exceeds),
        }

    def verification_row(self) -> dict[str, Any]:
        """How well attributions predict single-feature ablations: pooled and per emotion x phase."""
        v = self.verification
        pooled = spearmanr(v["predicted"], v["measured"]) if len(v) > 2 else None
        return {
            "model": self.model,
            "features ablated": len(v),
            "pooled Spearman": float(pooled.statistic) if pooled else np.nan,
            "pooled p": float(pooled.pvalue) if pooled else np.nan,
            "median per emotion x phase": self.verification_summary["spearman"].median(),
            "sign agreement": float((np.sign(v["predicted"]) == np.sign(v["measured"])).mean()),
        }

    def concentration_table(self) -> pd.DataFrame:
        """Share of each emotion's positive attribution in the final phase carried by its top k features."""
        c = self.concentration[self.concentration["phase"] == self.final_phase]
        return c.pivot(index="emotion", columns="k", values="share")


# ------------------------------------------------------------------------------------------------ running


@runtime_checkable
class PhaseSource(Protocol):
    """What tracing reads from chapter 1 (`FlowResult`): the phases of its best cut and the preferred count."""

    def phases(self, n_phases: int = 3, subset: str = "all") -> dict[str, tuple[int, ...]]: ...

    def chosen_phase_count(self, subset: str = "all") -> int: ...


def study_phases(
    phases: PhaseSource | Mapping[str, Iterable[int]], n_phases: int
) -> tuple[dict[str, tuple[int, ...]], int | None]:
    """The phases to trace and the phase count chapter 1's test chose: the best `n_phases`-phase cut of a flow
    result, or phases given by hand (`{name: layers}`, count None)."""
    if isinstance(phases, PhaseSource):
        return phases.phases(n_phases), phases.chosen_phase_count()
    return {str(name): tuple(int(layer) for layer in layers) for name, layers in phases.items()}, None


def run_tracing(
    model: str | LoadedModel,
    config: TracingConfig | None = None,
    phases: PhaseSource | Mapping[str, Iterable[int]] | None = None,
    cut_range: Mapping[str, Iterable[int]] | None = None,
) -> TracingResult:
    """One model's tracing study (cached): `phases` from chapter 1's result for the model (None: read from the
    flow chapter's results of `config.preset`) or given by hand. With `config.cut_range`, the final phase is also
    traced from the other end of its first layer's bootstrap interval (`cut_range_spans` of chapter 1's result),
    or over the spans `cut_range` gives by hand (`{name: layers}`); with `config.sae_seeds`, through the final
    phase's SAEs retrained with each of those seeds (`sae.suite.seed_saes`)."""
    config = config or TracingConfig()
    lm = load_model(model) if isinstance(model, str) else model
    name = lm.info.name
    if phases is None:
        flow = read_study_results("flow", FlowResult, preset=config.preset)
        phases = result_for(flow, name, "01_flow")
    layers, chosen = study_phases(phases, config.n_phases)
    spans: dict[str, tuple[int, ...]] = {}
    if config.cut_range and cut_range is not None:
        spans = {str(span): tuple(int(layer) for layer in members) for span, members in cut_range.items()}
    elif config.cut_range and isinstance(phases, FlowResult):
        spans = cut_range_spans(FinalPhase.from_flow(phases, name, config.n_phases))
    held = analysis_set(lm, config.preset, config.items)
    ranking = analysis_set(lm, config.preset, ranking_items(config))
    suite = sae_suite(lm, config.preset, config.saes)
    key_parts = (
        TRACING_VERSION,
        config,
        held.store.key,
        ranking.store.key,
        suite.key,
        {phase: list(members) for phase, members in layers.items()},
        chosen,
        {span: list(members) for span, members in spans.items()},
    )

    def build() -> TracingResult:
        tracer = FeatureTracer(held.classifier, suite.saes, config.tracing)
        study = cached_study(
            tracer,
            name,
            suite.key,
            (ranking.texts, list(ranking.gold)),
            (held.texts, list(held.gold)),
            layers,
            config,
            spans,
        )
        flagged = {p: [layer for layer in members if suite.flag(layer)] for p, members in layers.items()}
        facts = {
            "model": name,
            "ranking items (train)": ranking.n,
            "held-out items ablated (dev+test)": study.meta["n_held_out"],
            "accuracy on chapter 1's items": float(held.correct.mean()),
            "phases chosen by ch. 1's test": "(phases set by parameter)" if chosen is None else chosen,
            **{
                f"{p} layers": f"{members[0]}-{members[-1]} ({len(flagged[p])} SAEs miss a goal)"
                for p, members in layers.items()
            },
            "features per phase": ", ".join(str(tracer.n_features(members)) for members in layers.values()),
        }
        flags = {
            p: {layer: suite.flag(layer) for layer in members} for p, members in {**layers, **spans}.items()
        }
        final = {p: members for p, members in layers.items() if p == list(layers)[-1]}
        seed_studies, seed_sae_flags = {}, {}
        for seed in config.sae_seeds:
            retrained = seed_saes(lm, config.preset, config.saes, list(next(iter(final.values()))), seed)
            if not retrained:  # a pretrained release: one set of SAEs
                break
            seed_sae_flags[seed] = seed_flags(lm, suite, retrained, seed)
            seed_studies[seed] = cached_study(
                FeatureTracer(held.classifier, retrained, config.tracing),
                name,
                f"{suite.key}-seed{seed}",
                (ranking.texts, list(ranking.gold)),
                (held.texts, list(held.gold)),
                final,
                config,
                cross_emotion=False,
            )
        text_study = None
        if config.text_positions is not None:
            text_study = cached_study(
                FeatureTracer(held.classifier, suite.saes, config.text_positions),
                name,
                suite.key,
                (ranking.texts, list(ranking.gold)),
                (held.texts, list(held.gold)),
                layers,
                text_positions_config(config),
                cross_emotion=False,
            )
        return TracingResult.from_study(
            name, study, config, chosen, facts, flags, seed_studies, text_study, seed_sae_flags
        )

    return cached_result(TracingResult, lm.info.cache_name, key_parts, build)


# ------------------------------------------------------------------------------------------------ the chapter


def settings_table(config: TracingConfig) -> pd.DataFrame:
    """The study's settings in words."""
    return pd.Series(
        {
            "k values": ", ".join(map(str, config.tracing.ks)),
            "random seeds per k": len(config.tracing.random_seeds),
            "ablations": ", ".join(config.tracing.ablations),
            "ranking items per label": config.rank_per_label,
            "held-out items per label": config.held_out_per_label or "all of chapter 1's",
            "k50 is half of": {"clean": "the clean value", "whole": "the whole-phase drop"}[
                config.k50_reference
            ],
            "k50 undefined when that is at most": ", ".join(f"{m} {v:g}" for m, v in config.min_effect),
            "features ablated in the cross-emotion run": config.cross_k,
            "single features verified per emotion and phase": config.tracing.n_verify,
            "bootstrap resamples": config.n_boot,
            "text positions: k values": "not traced"
            if config.text_positions is None
            else ", ".join(map(str, config.text_positions.ks)),
            "text positions: held-out items per label": config.text_positions_per_label
            if config.text_positions is not None
            else "-",
        },
        name="setting",
    ).to_frame()


def facts_table(results: Mapping[str, TracingResult]) -> pd.DataFrame:
    """Items, accuracy, phases and features per model (columns)."""
    return pd.DataFrame([r.facts for r in results.values()]).set_index("model").T


def phase_table(results: Mapping[str, TracingResult]) -> pd.DataFrame:
    """Per model and phase, averaged over emotions: whole-phase, top-k and random-k drops and k50 counts."""
    return pd.DataFrame([row for r in results.values() for row in r.phase_rows()]).set_index(
        ["model", "phase"]
    )


def regularities(results: Mapping[str, TracingResult]) -> dict[str, int]:
    """`TracingResult.regularities` summed over models, with the largest k."""
    total = {"cells": 0, "above": 0, "lowered": 0}
    for r in results.values():
        for key, value in r.regularities().items():
            total[key] += value
    return {**total, "k_max": max(r.k_max for r in results.values())}


def specificity_table(results: Mapping[str, TracingResult]) -> pd.DataFrame:
    return pd.DataFrame([r.specificity() for r in results.values()]).set_index("model")


def verification_table(results: Mapping[str, TracingResult]) -> pd.DataFrame:
    return pd.DataFrame([r.verification_row() for r in results.values()]).set_index("model")


def verdicts_by_phase(results: Mapping[str, TracingResult]) -> pd.DataFrame:
    """Every model's verdicts in every phase (rows: model, phase; columns: claims in words)."""
    return combined(results, "verdicts_by_phase", by_model=True)


def seeds_table(results: Mapping[str, TracingResult]) -> pd.DataFrame:
    """Every model's final-phase verdicts and k50 per SAE training seed (rows: model, seed); empty when no model
    was traced through retrained SAEs."""
    tables = {name: r.seeds for name, r in results.items() if r.seeds is not None}
    return pd.concat(tables, names=["model"]) if tables else pd.DataFrame()


def positions_table(results: Mapping[str, TracingResult]) -> pd.DataFrame:
    """Every model's phases traced at the answer position and at the text's positions (rows: model, phase,
    positions); empty when no model was traced at the text's positions."""
    tables = {name: r.positions for name, r in results.items() if r.positions is not None}
    return pd.concat(tables, names=["model"]) if tables else pd.DataFrame()


def cut_range_table(results: Mapping[str, TracingResult]) -> pd.DataFrame:
    """Every model's verdicts with the final phase at its chosen start and at the other ends of its bootstrap
    interval (rows: model, span); empty when no model has an interval to try."""
    tables = {name: r.cut_range for name, r in results.items() if r.cut_range is not None}
    return pd.concat(tables, names=["model"]) if tables else pd.DataFrame()


def findings_headings(results: Mapping[str, TracingResult]) -> dict[str, str]:
    """Each model's heading in "What we found": its name and the final phase's layers."""
    return {name: f"**{name}** (final phase: layers {r.span()}):" for name, r in results.items()}

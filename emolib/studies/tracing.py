"""Chapter 3: phase-stratified causal tracing of the features that drive each emotion's prediction."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import kruskal, mannwhitneyu

from emolib.cache import cache_dir, cached_entry, config_key, pairs_digest
from emolib.lm.classify import prompt_fingerprint
from emolib.methods.ablation import k50_table, per_label_sample, summarize_effects
from emolib.methods.tracing import (
    ABLATIONS,
    METRICS,
    FeatureTracer,
    TracingConfig,
    TracingError,
    check_phases,
)
from emolib.verdicts import Verdict

#: Bump when the study's computation changes, so cached studies are rebuilt.
STUDY_VERSION = "1"


_STUDY_TABLES = (
    "curves",
    "effects",
    "k50",
    "cross",
    "verification",
    "verification_summary",
    "top_features",
    "concentration",
)


@dataclass(frozen=True)
class StudyConfig:
    """One model's tracing study (see `trace_study`).

    `rank_per_label` TRAIN items per label rank the features and give the mean-ablation reference; a seeded sample
    of `held_out_per_label` held-out items per label (None: all) is ablated. Single-token ablations cost about the
    same per item from batch 32 up, so batches are large. `cross_k` top features of each source emotion are ablated in the cross-emotion run. `min_effect`
    is the whole-phase drop (per metric) below which k50 is undefined: half of a negligible effect is reached by
    chance. `top` features per emotion and phase are kept in the ranking table. Intervals use `n_boot` item
    resamples at `level`.
    """

    rank_per_label: int = 40
    held_out_per_label: int | None = 40
    tracing: TracingConfig = field(default_factory=lambda: TracingConfig(batch_size=40))
    cross_k: int = 16
    n_boot: int = 1000
    level: float = 0.95
    min_effect: tuple[tuple[str, float], ...] = (("prob", 0.01), ("margin", 0.05), ("accuracy", 0.0))
    top: int = 20
    seed: int = 0


STUDY_PRESETS: dict[str, StudyConfig] = {
    # quick: a smoke run of the whole pipeline (few items, one random seed; not evidence)
    "quick": StudyConfig(
        rank_per_label=6,
        held_out_per_label=None,
        tracing=TracingConfig(ks=(1, 2, 4, 8, 16), random_seeds=(0,), n_verify=4, batch_size=32),
        cross_k=4,
        n_boot=200,
    ),
    "full": StudyConfig(
        tracing=TracingConfig(random_seeds=(0, 1), n_verify=8, batch_size=40),
    ),
}


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


def run_study(
    tracer: FeatureTracer,
    ranking: tuple[Sequence[str], Sequence[str]],
    held_out: tuple[Sequence[str], Sequence[str]],
    phases: Mapping[str, Iterable[int]],
    config: StudyConfig,
) -> Study:
    """Attribute on the ranking items (texts, gold), ablate on the held-out items, summarise, verify.

    Features are ranked, and mean-ablation references taken, on the ranking items only, so the held-out effects
    are not selected on the items they are measured on.
    """
    phases = check_phases(phases, tracer.layers)
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
    means = timed("feature_means", tracer.feature_means, rank_texts)
    held = timed("attribute_held_out", tracer.attribute, texts, gold)
    curves = timed("ablation_curves", tracer.ablation_curves, ranked, texts, gold, phases, means=means)
    cross = timed(
        "cross_emotion", tracer.cross_emotion, ranked, texts, gold, phases, config.cross_k, means=means
    )
    verification, summary = timed("verify", tracer.verify, ranked, held, phases)
    boot = {"n_boot": config.n_boot, "level": config.level, "seed": config.seed}
    return Study(
        curves=curves,
        effects=summarize_effects(curves, **boot),
        k50=k50_table(curves, min_effect=dict(config.min_effect), **boot),
        cross=cross,
        verification=verification,
        verification_summary=summary,
        top_features=ranked.table(phases, top=config.top),
        concentration=ranked.concentration(phases, tracer.config.ks),
        meta={
            "phases": {name: list(layers) for name, layers in phases.items()},
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
    config: StudyConfig,
) -> Study:
    """`run_study`, cached on disk (CSV tables and a JSON meta, checksummed) under a key made of the model, its
    prompt and verbalisers, the SAEs (`sae_id`, e.g. their cache folder), the items, the phases and the config."""
    key = config_key(
        STUDY_VERSION,
        model_name,
        sae_id,
        *prompt_fingerprint(tracer.classifier),
        tracer.classifier.config.max_text_tokens,
        pairs_digest(ranking[1], ranking[0]),
        pairs_digest(held_out[1], held_out[0]),
        {name: list(layers) for name, layers in phases.items()},
        config,
    )
    folder = cache_dir("tracing") / f"{model_name}-{key}"

    def build(tmp) -> None:
        study = run_study(tracer, ranking, held_out, phases, config)
        for name in _STUDY_TABLES:
            getattr(study, name).to_csv(tmp / f"{name}.csv", index=False)
        (tmp / "meta.json").write_text(json.dumps(study.meta, indent=2, default=str))

    entry = cached_entry(folder, build, meta={"model": model_name, "sae_id": sae_id})
    tables = {name: pd.read_csv(entry / f"{name}.csv") for name in _STUDY_TABLES}
    return Study(**tables, meta=json.loads((entry / "meta.json").read_text()))


@dataclass(frozen=True)
class TracingRule:
    """How the chapter's verdicts read the study: effects in `metric` units under `ablation`; a set of features is
    "small" when its k50 is at most `small_k`; tests at level `alpha`."""

    metric: str = "prob"
    ablation: str = "zero"
    small_k: int = 16
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.metric not in METRICS or self.ablation not in ABLATIONS:
            raise TracingError(f"metric must be in {list(METRICS)} and ablation in {ABLATIONS}")


def _rows(frame: pd.DataFrame, phase: str, rule: TracingRule, **extra) -> pd.DataFrame:
    mask = (frame["phase"] == phase) & (frame["ablation"] == rule.ablation)
    for name, value in extra.items():
        mask &= frame[name] == value
    return frame[mask]


def small_set_verdict(k50: pd.DataFrame, versus: pd.DataFrame, phase: str, rule: TracingRule) -> Verdict:
    """Does a small set of features drive each emotion's prediction in `phase`?

    An emotion is driven by a small set when its k50 is at most `rule.small_k` and, at that k, the top features'
    drop beats random features' (paired interval above zero). Holds for at least half of the emotions whose
    whole-phase ablation has an effect (k50 defined), partly for at least one, does not hold for none;
    inconclusive when no emotion's whole-phase ablation has an effect.
    """
    table = _rows(k50, phase, rule, metric=rule.metric)
    defined = table[table["k50"].notna()]
    if defined.empty:
        return Verdict("inconclusive", f"no emotion's whole-{phase} ablation has an effect to explain")
    small = []
    for row in defined.itertuples():
        if not np.isfinite(row.k50) or row.k50 > rule.small_k:
            continue
        beat = _rows(versus, phase, rule, emotion=row.emotion, k=int(row.k50))
        if not beat.empty and beat["excess_low"].iloc[0] > 0:
            small.append(f"{row.emotion} (k50 {int(row.k50)})")
    n, m = len(small), len(defined)
    reason = (
        f"in {phase}, {n} of {m} emotions with a whole-phase effect reach half of it with at most "
        f"{rule.small_k} features that beat random ones" + (f": {', '.join(small)}" if small else "")
    )
    verdict = "holds" if n >= math.ceil(m / 2) else "partly" if n else "does not hold"
    return Verdict(verdict, reason)


def _final_drops(curves: pd.DataFrame, phase: str, rule: TracingRule) -> dict[str, np.ndarray]:
    """Per emotion, the per-item drop when its top-max(k) features of `phase` are ablated."""
    top = _rows(curves, phase, rule, condition="top")
    k_max = top["k"].max()
    top = top[top["k"] == k_max]
    column = METRICS[rule.metric]
    return {emotion: group[column].to_numpy() for emotion, group in top.groupby("emotion", sort=False)}


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

    Impact varies when a Kruskal-Wallis test of the per-item drops at the largest k across emotions gives
    p < alpha; number varies when some pair of emotions has non-overlapping k50 intervals. Holds when both,
    partly when one, does not hold when neither; inconclusive with fewer than two emotions.
    """
    drops = _final_drops(curves, phase, rule)
    drops = {e: d for e, d in drops.items() if len(d) > 0}
    if len(drops) < 2:
        return Verdict("inconclusive", f"fewer than two emotions with items in {phase}")
    values = list(drops.values())
    p_value = float(kruskal(*values).pvalue) if len({v for d in values for v in d}) > 1 else 1.0
    table = _rows(k50, phase, rule, metric=rule.metric).dropna(subset=["k50"])
    pairs = _overlap_free_pairs(table)
    impact, number = p_value < rule.alpha, bool(pairs)
    reason = (
        f"in {phase}, drops at the largest k differ across emotions with Kruskal-Wallis p = {p_value:.3g}; "
        f"{len(pairs)} ordered pairs of emotions have non-overlapping k50 intervals"
    )
    verdict = "holds" if impact and number else "partly" if impact or number else "does not hold"
    return Verdict(verdict, reason)


def weaker_diffuse_verdict(
    curves: pd.DataFrame, k50: pd.DataFrame, phase: str, rule: TracingRule, emotion: str = "disgust"
) -> Verdict:
    """Is `emotion` weaker (smaller drop at the largest k than the other emotions' items, one-sided Mann-Whitney
    p < alpha) and more diffuse (k50 lower bound above the median k50 of the others; inf counts as large)?

    Holds when both, partly when one, does not hold when neither; inconclusive without items of `emotion`.
    """
    drops = _final_drops(curves, phase, rule)
    if emotion not in drops or len(drops) < 2:
        return Verdict("inconclusive", f"no {emotion} items, or no other emotion, in {phase}")
    others = np.concatenate([d for e, d in drops.items() if e != emotion])
    p_value = float(mannwhitneyu(drops[emotion], others, alternative="less").pvalue)
    weaker = p_value < rule.alpha
    table = _rows(k50, phase, rule, metric=rule.metric).set_index("emotion")
    own = table["k50_low"].get(emotion, float("nan"))
    rest = table.drop(index=emotion, errors="ignore")["k50"].dropna()
    if np.isnan(own) or rest.empty:
        diffuse, diffuse_text = (
            False,
            f"{emotion}'s k50 is undefined (no whole-phase effect) or no other k50 is",
        )
    else:
        median = float(np.median(rest))
        diffuse = own > median
        diffuse_text = f"{emotion}'s k50 lower bound {own:g} vs the others' median k50 {median:g}"
    reason = (
        f"in {phase}: {emotion}'s drop at the largest k ({drops[emotion].mean():.3f}) vs the others' "
        f"({others.mean():.3f}), one-sided p = {p_value:.3g}; {diffuse_text}"
    )
    verdict = "holds" if weaker and diffuse else "partly" if weaker or diffuse else "does not hold"
    return Verdict(verdict, reason)

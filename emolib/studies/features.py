"""Chapter 2: shared and specific emotion features in the final phase, Disgust's diffuseness, Surprise's co-activation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from emolib.methods.coactivation import HeldOutCoactivation
from emolib.methods.common import FeatureError
from emolib.verdicts import Verdict


@dataclass(frozen=True)
class FinalPhase:
    """The layers of a model's final phase, as read from the flow chapter's results.

    `source` names the keys read; `n_phases` is the number of phases of the cut it comes from and `chosen` the
    number the flow chapter's phase-count test preferred (None where the results do not say)."""

    first: int
    last: int
    source: str
    n_phases: int | None = None
    chosen: int | None = None

    @property
    def layers(self) -> list[int]:
        return list(range(self.first, self.last + 1))


def _phase_bounds(value, where: str) -> tuple[int, int]:
    """[first, last], {"first", "last"} / {"start", "end"}, or {"layers": [...]} -> (first, last)."""
    if isinstance(value, Mapping):
        for a, b in (("first", "last"), ("start", "end")):
            if a in value and b in value:
                return int(value[a]), int(value[b])
        if "layers" in value and len(value["layers"]):
            return int(min(value["layers"])), int(max(value["layers"]))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise FeatureError(f"{where} is not a phase ([first, last] or {{'first', 'last'}}): {value!r}")


def _model_entry(record: Mapping, model: str) -> tuple[Mapping, str]:
    models = record.get("models")
    if isinstance(models, Mapping) and isinstance(models.get(model), Mapping):
        return models[model], f"models.{model}"
    if isinstance(models, Sequence) and not isinstance(models, str):
        matches = [m for m in models if isinstance(m, Mapping) and m.get("model") == model]
        if matches:
            return matches[0], f"models[model={model}]"
    if isinstance(record.get(model), Mapping):
        return record[model], model
    raise FeatureError(
        f"the flow results hold no entry for model {model!r} (top-level keys: {sorted(record)}); expected "
        f"record['models'][{model!r}] with 'phases'"
    )


def final_phase(
    record: Mapping, model: str, n_layers: int, *, subset: str = "all", n_phases: int = 3
) -> FinalPhase:
    """The final phase of `model` from a flow results record (`read_results("flow")`), read defensively.

    The model's entry is `record["models"][model]` (or `record[model]`, or an item of a list `record["models"]`
    whose `"model"` is `model`). The flow chapter's layout is read first: the last of
    `subsets[subset].boundaries[str(n_phases)].phases` (the best cut into `n_phases` phases, by default the
    paper's three, of the items `subset`), with `subsets[subset].phase_count_test.chosen`. Else, in the entry
    itself: `"final_phase"` ([first, last]); the last of `"phases"` (a list of [first, last]); or `"boundaries"`
    (first layers of phases 2..n; the final phase runs to the last layer). Layers are the residual stream after
    each block, 0 .. `n_layers` - 1; anything else raises, naming the keys found.
    """
    entry, path = _model_entry(record, model)
    chosen = None
    subsets = entry.get("subsets")
    if isinstance(subsets, Mapping):
        if subset not in subsets:
            raise FeatureError(
                f"the flow results for {model!r} have no subset {subset!r} (have {sorted(subsets)})"
            )
        part = subsets[subset]
        cuts = part.get("boundaries") if isinstance(part, Mapping) else None
        if not isinstance(cuts, Mapping) or str(n_phases) not in cuts:
            found = (
                sorted(cuts)
                if isinstance(cuts, Mapping)
                else sorted(part)
                if isinstance(part, Mapping)
                else part
            )
            raise FeatureError(
                f"the flow results for {model!r} ({path}.subsets.{subset}) have no {n_phases}-phase cut under "
                f"'boundaries' (found: {found})"
            )
        chosen = (part.get("phase_count_test") or {}).get("chosen")
        entry, path = cuts[str(n_phases)], f"{path}.subsets.{subset}.boundaries.{n_phases}"
    if "final_phase" in entry:
        first, last = _phase_bounds(entry["final_phase"], f"{path}.final_phase")
        source, count = f"{path}.final_phase", entry.get("n_phases")
    elif "phases" in entry:
        phases = entry["phases"]
        if not isinstance(phases, Sequence) or isinstance(phases, str) or not phases:
            raise FeatureError(f"{path}.phases must be a non-empty list of phases, not {phases!r}")
        bounds = [_phase_bounds(p, f"{path}.phases[{i}]") for i, p in enumerate(phases)]
        first, last = max(bounds)
        source, count = f"{path}.phases[-1]", len(bounds)
    elif "boundaries" in entry:
        starts = [int(b) for b in entry["boundaries"]]
        first, last = (max(starts) if starts else 0), n_layers - 1
        source, count = f"{path}.boundaries", len(starts) + 1
    else:
        raise FeatureError(
            f"the flow results for {model!r} have none of 'final_phase', 'phases', 'boundaries' "
            f"(keys: {sorted(entry)})"
        )
    if not 0 <= first <= last < n_layers:
        raise FeatureError(
            f"final phase [{first}, {last}] from {source} is not a range of layers 0..{n_layers - 1}"
        )
    chosen = chosen if chosen is None else int(chosen)
    return FinalPhase(first=first, last=last, source=source, n_phases=count, chosen=chosen)


def mix_verdict(
    full: pd.DataFrame, boot: pd.DataFrame, boot_null: pd.DataFrame, n_shuffles: int, alpha: float = 0.05
) -> Verdict:
    """Do an emotion's selective features mix shared and specific ones, beyond chance?

    `full`: `NullSharedSpecific.summary` of the full-rule counts; `boot`: `shared_specific(sel, draws)`; and
    `boot_null`: the summary of the draws' criterion. Holds when the totals of specific and of shared features
    both beat the shuffled labels (permutation p <= `alpha`) and at least half the emotions have both kinds, each
    with its bootstrap lower bound above the null's 95th percentile for that emotion; partly when only one total
    beats the null, or fewer emotions have both; does not hold when neither total does. Inconclusive when
    `n_shuffles` cannot give p <= `alpha`.
    """
    if 1 / (1 + n_shuffles) > alpha:
        return Verdict(
            "inconclusive",
            f"{n_shuffles} label shuffles cannot give a permutation p-value at or below {alpha}",
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
    if specific_p <= alpha and shared_p <= alpha and 2 * len(both) >= len(emotions):
        return Verdict("holds", f"{totals}; {per_emotion}")
    if specific_p <= alpha or shared_p <= alpha:
        return Verdict("partly", f"{totals}; {per_emotion}")
    return Verdict("does not hold", f"{totals}: neither total beats shuffled labels; {per_emotion}")


def diffuse_verdict(
    comparisons: Mapping[str, pd.DataFrame], n_support: float, emotion: str = "disgust"
) -> Verdict:
    """Is `emotion` more diffuse than the others' mean? `comparisons[measure]` are `compare_diffuseness` tables
    (row `others (mean)`); `n_support` is the emotion's number of selective features.

    Holds when every measure's paired interval is above zero; partly when some are; does not hold when none is
    and some are below zero (more concentrated); inconclusive when all include zero or the emotion has no
    selective features.
    """
    if not n_support:
        return Verdict(
            "inconclusive", f"{emotion} has no selective features, so its diffuseness is undefined"
        )
    rows = {m: c.loc["others (mean)"] for m, c in comparisons.items()}
    above = [m for m, r in rows.items() if r["low"] > 0]
    below = [m for m, r in rows.items() if r["high"] < 0]
    described = "; ".join(
        f"{m} {r['difference']:+.3g} [{r['low']:+.3g}, {r['high']:+.3g}]" for m, r in rows.items()
    )
    text = f"{emotion} minus the others' mean: {described}"
    if len(above) == len(rows):
        return Verdict("holds", text)
    if above:
        return Verdict("partly", text)
    if below:
        return Verdict("does not hold", text)
    return Verdict("inconclusive", text)


def coactivation_verdict(result: HeldOutCoactivation | None, emotion: str = "surprise") -> Verdict:
    """Do `emotion`'s features fire on the other emotions' items more than the other emotions' features do?
    Holds when its `excess` interval is above zero, does not hold when below; otherwise inconclusive (also when
    there is no such label or none of its features could be measured)."""
    if result is None or emotion not in result.emotions:
        return Verdict("inconclusive", f"no {emotion} label in the data")
    if result.n_measured[emotion] == 0:
        return Verdict("inconclusive", f"no {emotion} feature was chosen and measured on held-out items")
    ex = result.excess(emotion)
    table = result.table()
    rank = int(table["off_diagonal"].rank(ascending=False).loc[emotion])
    text = (
        f"{emotion} excess co-activation {ex} ({result.n_measured[emotion]} features); its row ranks {rank} of "
        f"{int(table['off_diagonal'].notna().sum())}"
    )
    if not np.isfinite(ex.value) or not np.isfinite(ex.low):
        return Verdict("inconclusive", text)
    if ex.low > 0:
        return Verdict("holds", text)
    if ex.high < 0:
        return Verdict("does not hold", text)
    return Verdict("inconclusive", text)


@dataclass(frozen=True)
class FeaturesConfig:
    """What the features chapter computes: label shuffles for the pooled final phase (`n_shuffles`) and for each
    layer on its own (`layer_shuffles`), bootstrap resamples (`n_boot`, selectivity and co-activation), and the
    size of the feature cards."""

    n_shuffles: int
    n_boot: int
    layer_shuffles: int
    card_texts: int = 3
    card_tokens: int = 8
    seed: int = 0


#: `quick` checks that the chapter runs (19 shuffles is the fewest that can give p <= 0.05); `full` is sized to
#: about ten minutes per model on 2 CPU cores.
FEATURES_PRESETS: dict[str, FeaturesConfig] = {
    "quick": FeaturesConfig(n_shuffles=19, n_boot=50, layer_shuffles=3),
    "full": FeaturesConfig(n_shuffles=39, n_boot=200, layer_shuffles=5),
}

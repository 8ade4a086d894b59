"""Which SAE features carry emotion: selectivity with its controls, shared and specific sets, overlap,
diffuseness, co-activation, feature roles over the prompt, and feature cards.

The paper claims that emotion representations mix shared and emotion-specific features, that Disgust is more
diffuse, and that Surprise co-activates across emotions. Each function turns SAE codes (`[n_items, d_sae]`
feature activations, non-negative and mostly zero) and gold labels into the numbers behind one of those claims,
together with the control or interval needed to believe them:

- `selectivity`: one-vs-rest AUROC, Mann-Whitney p-values and Benjamini-Hochberg q-values per feature x emotion;
  `shuffled_control` runs the same procedure on permuted labels, so every count stands beside its null.
- `bootstrap_selectivity` resamples items within each label; `shared_specific`, `diffuseness` and
  `compare_diffuseness` turn the draws into intervals and paired differences.
- `jaccard`, `intersections` and `upset_figure`: how the emotions' selective sets overlap.
- `coactivation`: how strongly one emotion's features fire on the items of the others.
- `feature_roles`: template / emotion / content / inactive features over all tokens of the prompts.
- `top_activating` and `promoted_tokens`: the two halves of a feature card.

For the chapter on shared and specific features (`book/02_features.md`):

- `final_phase` reads a model's final phase from the flow chapter's results; `pool_layers` puts the SAE codes of
  its layers side by side, features named (layer, feature).
- `shuffled_shared_specific`: the shuffled-label null of every specific and shared count, by both criteria.
- `heldout_coactivation`: co-activation with features chosen on some items and measured, with bootstrap
  intervals, on others.
- `upset_grid`, `jaccard_figure`, `counts_figure`, `layer_counts_figure`, `diffuseness_figure`,
  `coactivation_figure`: the chapter's figures.
- `mix_verdict`, `diffuse_verdict`, `coactivation_verdict`: the verdict rules, from results.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure, SubFigure
from scipy.special import entr, ndtr
from scipy.stats import false_discovery_control, rankdata

from emolib.stats import Estimate, interval_from_draws

#: Label of the pooled emotional items in `contrast_labels` (any emotion vs neutral).
EMOTIONAL = "emotional"

#: Rows added to per-emotion counts: features selective for any emotion, for exactly one, for two or more.
TOTALS = ("any", "specific", "shared")

CRITERIA = ("full", "auroc")
MASSES = ("auroc", "mean_diff")
SUPPORTS = ("selective", "all")
MEASURES = ("k50", "k80", "entropy", "effective_n")
ROLES = ("emotion", "template", "content", "inactive")

#: A set of feature ids per emotion (what `Selectivity.sets` returns).
EmotionSets = Mapping[str, Collection[int]]


class FeatureError(ValueError):
    """Inputs that do not fit: unknown labels, mismatched shapes, classes too small to test, bad options."""


def _array(values, name: str, ndim: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise FeatureError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise FeatureError(f"{name} contains NaN or infinite values")
    return array


def _choice(value: str, allowed: Sequence[str], name: str) -> None:
    if value not in allowed:
        raise FeatureError(f"{name} must be one of {list(allowed)}, not {value!r}")


# ------------------------------------------------------------------------------------------------ selectivity


@dataclass(frozen=True)
class SelectivityConfig:
    """When a feature counts as selective for an emotion (one emotion's items against all other items).

    Selective means all three of: AUROC >= `auroc_threshold` (an effect size: at 0.7 a random item of the
    emotion out-activates a random other item 70% of the time, ties counting half); Benjamini-Hochberg q < `alpha`
    over every feature x emotion test (two-sided Mann-Whitney p-values, so a count of selective features is a
    discovery count with controlled false-discovery rate); and a higher mean activation on the emotion's items
    than on the others (AUROC alone ranks high a feature that fires weakly but often on the emotion while firing
    rarely but strongly elsewhere). BH bounds the false share among all rejected tests, in either direction;
    among the features kept as more active it can be higher, which is one reason for the AUROC threshold (and for
    `shuffled_control`, which measures what the whole rule finds by chance).

    A feature is active on an item when its code exceeds `active_threshold`. Features active on fewer than
    `min_active_items` items, or constant, are not tested (a label-blind filter, so BH stays valid) and are
    counted. An emotion with fewer than `min_items` items raises.
    """

    auroc_threshold: float = 0.7
    alpha: float = 0.05
    active_threshold: float = 0.0
    min_active_items: int = 1
    min_items: int = 10

    def __post_init__(self) -> None:
        if not 0.5 <= self.auroc_threshold <= 1:
            raise FeatureError(f"auroc_threshold must be in [0.5, 1], not {self.auroc_threshold}")
        if not 0 < self.alpha < 1:
            raise FeatureError(f"alpha must be in (0, 1), not {self.alpha}")
        if self.min_items < 1 or self.min_active_items < 1:
            raise FeatureError("min_items and min_active_items must be at least 1")


@dataclass(frozen=True)
class Selectivity:
    """Per feature x emotion statistics (arrays `[d_sae, n_emotions]`; NaN where a feature was not tested).

    `mean_in` is the mean activation on the emotion's items (so also the per-emotion class mean), `mean_out` on
    all other items; `rate_in` the share of the emotion's items on which the feature is active; `frequency` the
    share of all items. `selective` applies the full rule of `SelectivityConfig`; `matrix("auroc")` the
    effect-size half only (what `bootstrap_selectivity` uses by default).
    """

    emotions: tuple[str, ...]
    class_sizes: tuple[int, ...]
    config: SelectivityConfig
    auroc: np.ndarray
    p_value: np.ndarray
    q_value: np.ndarray
    mean_in: np.ndarray
    mean_out: np.ndarray
    rate_in: np.ndarray
    frequency: np.ndarray
    tested: np.ndarray
    selective: np.ndarray

    @property
    def n_features(self) -> int:
        return self.auroc.shape[0]

    @property
    def n_tested(self) -> int:
        return int(self.tested.sum())

    @property
    def n_never_active(self) -> int:
        """Features active on no item at all (dead for this data); excluded from testing."""
        return int((self.frequency == 0).sum())

    @property
    def n_untested(self) -> int:
        """Features not tested: never active, active on fewer than `min_active_items` items, or constant."""
        return self.n_features - self.n_tested

    def _columns(self, among: Sequence[str] | None) -> list[int]:
        if among is None:
            return list(range(len(self.emotions)))
        unknown = [e for e in among if e not in self.emotions]
        if unknown:
            raise FeatureError(f"emotions {unknown} are not among this selectivity's {list(self.emotions)}")
        return [self.emotions.index(e) for e in among]

    def matrix(self, criterion: str = "full", among: Sequence[str] | None = None) -> np.ndarray:
        """Boolean `[d_sae, len(among)]`: selective by the full rule, or by the AUROC-only rule ("auroc")."""
        _choice(criterion, CRITERIA, "criterion")
        if criterion == "full":
            chosen = self.selective
        else:
            chosen = _effect_rule(self.auroc, self.mean_in, self.mean_out, self.config) & self.tested[:, None]
        return chosen[:, self._columns(among)]

    def sets(self, criterion: str = "full", among: Sequence[str] | None = None) -> dict[str, frozenset[int]]:
        """The selective feature ids of each emotion."""
        names = list(among) if among is not None else list(self.emotions)
        chosen = self.matrix(criterion, names)
        return {e: frozenset(np.flatnonzero(chosen[:, j]).tolist()) for j, e in enumerate(names)}

    def counts(self, criterion: str = "full") -> dict[str, int]:
        """Selective features per emotion, then `any`, `specific` (exactly one emotion), `shared` (two or more)."""
        return _count_row(self.matrix(criterion), self.emotions)

    def table(self, emotion: str | None = None, only_selective: bool = True) -> pd.DataFrame:
        """A long table (feature, emotion, auroc, q, means, rate, selective), strongest AUROC first."""
        features, cols = np.nonzero(
            self.selective if only_selective else self.tested[:, None] & ~np.isnan(self.auroc)
        )
        frame = pd.DataFrame(
            {
                "feature": features,
                "emotion": [self.emotions[c] for c in cols],
                "auroc": self.auroc[features, cols],
                "p_value": self.p_value[features, cols],
                "q_value": self.q_value[features, cols],
                "mean_in": self.mean_in[features, cols],
                "mean_out": self.mean_out[features, cols],
                "rate_in": self.rate_in[features, cols],
                "selective": self.selective[features, cols],
            }
        )
        if emotion is not None:
            self._columns([emotion])
            frame = frame[frame["emotion"] == emotion]
        return frame.sort_values(["auroc", "feature"], ascending=[False, True], ignore_index=True)


def _effect_rule(auroc: np.ndarray, mean_in: np.ndarray, mean_out: np.ndarray, config: SelectivityConfig):
    with np.errstate(invalid="ignore"):
        return (np.nan_to_num(auroc, nan=0.0) >= config.auroc_threshold) & (mean_in > mean_out)


def _count_row(selective: np.ndarray, emotions: Sequence[str]) -> dict[str, int]:
    per_feature = selective.sum(axis=1)
    row = {e: int(n) for e, n in zip(emotions, selective.sum(axis=0), strict=True)}
    row.update(
        any=int((per_feature >= 1).sum()),
        specific=int((per_feature == 1).sum()),
        shared=int((per_feature >= 2).sum()),
    )
    return row


def _encode(labels: Sequence[str], emotions: Sequence[str], n_items: int, min_items: int) -> np.ndarray:
    """Label indices into `emotions`, after checking labels, counts and class sizes (with errors naming them)."""
    emotions = tuple(emotions)
    if len(emotions) < 2:
        raise FeatureError(f"one-vs-rest needs at least two emotions, got {list(emotions)}")
    if len(set(emotions)) != len(emotions):
        raise FeatureError(f"emotions are repeated: {list(emotions)}")
    labels = list(labels)
    if len(labels) != n_items:
        raise FeatureError(f"codes have {n_items} rows (items) but there are {len(labels)} labels")
    position = {e: i for i, e in enumerate(emotions)}
    unknown = sorted({str(v) for v in labels if v not in position})
    if unknown:
        raise FeatureError(f"labels {unknown} are not in emotions {list(emotions)}")
    y = np.fromiter((position[v] for v in labels), dtype=np.int64, count=n_items)
    sizes = np.bincount(y, minlength=len(emotions))
    small = {e: int(n) for e, n in zip(emotions, sizes, strict=True) if n < min_items}
    if small:
        raise FeatureError(
            f"too few items for emotions {small}: each needs at least {min_items} (SelectivityConfig.min_items)"
        )
    return y


def _prepare(
    codes, labels, emotions, config: SelectivityConfig
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    acts = _array(codes, "codes", 2)
    y = _encode(labels, emotions, acts.shape[0], config.min_items)
    return acts, y, tuple(emotions)


def _testable(acts: np.ndarray, config: SelectivityConfig) -> np.ndarray:
    """Label-blind filter: active on enough items and not constant."""
    n_active = (acts > config.active_threshold).sum(axis=0)
    return (n_active >= config.min_active_items) & (acts.max(axis=0) > acts.min(axis=0))


def _tie_term(acts: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per column, the sum over groups of equal values of t^3 - t (t: the group's size), `[d]`."""
    n, d = acts.shape
    out = np.empty(d)
    for start in range(0, d, chunk):
        ordered = np.sort(acts[:, start : start + chunk], axis=0)
        width = ordered.shape[1]
        new_group = np.ones(ordered.shape, dtype=bool)
        new_group[1:] = ordered[1:] != ordered[:-1]
        group = np.cumsum(new_group, axis=0) - 1 + np.arange(width)[None, :] * n
        t = np.bincount(group.ravel(), minlength=n * width).reshape(width, n).astype(np.float64)
        out[start : start + width] = (t**3 - t).sum(axis=1)
    return out


def _one_vs_rest_tests(
    acts: np.ndarray, onehot: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mann-Whitney U of each class against all other items, and its two-sided p-value, for every column.

    The same numbers as `scipy.stats.mannwhitneyu(inside, outside, method="asymptotic")` (tie-corrected normal
    approximation with continuity correction) class by class, from a single ranking of all items: one-vs-rest
    always ranks the same pooled sample, so ranks and ties are shared by every class. Returns `[d, E]` arrays.
    """
    n = acts.shape[0]
    u1 = rankdata(acts, axis=0).T @ onehot - sizes * (sizes + 1) / 2
    n1, n2 = sizes, n - sizes
    u = np.maximum(u1, n1 * n2 - u1)
    spread = np.sqrt(n1 * n2 / 12 * ((n + 1) - _tie_term(acts)[:, None] / (n * (n - 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u - n1 * n2 / 2 - 0.5) / spread
    return u1, np.clip(2 * ndtr(-z), 0.0, 1.0)


def _compute(
    acts: np.ndarray,
    y: np.ndarray,
    emotions: tuple[str, ...],
    config: SelectivityConfig,
    allowed: np.ndarray | None,
) -> Selectivity:
    n, d = acts.shape
    n_emotions = len(emotions)
    onehot = np.eye(n_emotions)[y]
    sizes = onehot.sum(axis=0)
    active = acts > config.active_threshold
    sums = acts.T @ onehot
    mean_in = sums / sizes
    mean_out = (sums.sum(axis=1, keepdims=True) - sums) / (n - sizes)
    rate_in = active.T.astype(np.float64) @ onehot / sizes
    tested = _testable(acts, config) if allowed is None else allowed & (acts.max(axis=0) > acts.min(axis=0))
    auroc = np.full((d, n_emotions), np.nan)
    p_value = np.full((d, n_emotions), np.nan)
    q_value = np.full((d, n_emotions), np.nan)
    cols = np.flatnonzero(tested)
    if cols.size:
        # U of each emotion's items; midranks handle the many ties at zero; AUROC = U / (n_pos n_neg).
        u1, p = _one_vs_rest_tests(acts[:, cols], onehot, sizes)
        auroc[cols] = u1 / (sizes * (n - sizes))
        p_value[cols] = p
        q_value[cols] = false_discovery_control(p_value[cols].ravel(), method="bh").reshape(-1, n_emotions)
    with np.errstate(invalid="ignore"):
        significant = np.nan_to_num(q_value, nan=1.0) < config.alpha
    selective = tested[:, None] & significant & _effect_rule(auroc, mean_in, mean_out, config)
    return Selectivity(
        emotions=emotions,
        class_sizes=tuple(int(s) for s in sizes),
        config=config,
        auroc=auroc,
        p_value=p_value,
        q_value=q_value,
        mean_in=mean_in,
        mean_out=mean_out,
        rate_in=rate_in,
        frequency=active.mean(axis=0),
        tested=tested,
        selective=selective,
    )


def selectivity(
    codes, labels: Sequence[str], emotions: Sequence[str], config: SelectivityConfig = SelectivityConfig()
) -> Selectivity:
    """One-vs-rest selectivity of every feature for every emotion (see `SelectivityConfig` for the rule).

    `codes` is `[n_items, d_sae]` (numpy or torch), `labels` the gold emotion of each item, all in `emotions`.
    """
    acts, y, emotions = _prepare(codes, labels, emotions, config)
    return _compute(acts, y, emotions, config, allowed=None)


def contrast_labels(labels: Sequence[str], neutral: str = "neutral") -> tuple[list[str], tuple[str, str]]:
    """Labels recoded as `emotional` / `neutral`, with the two-class emotion list, for `selectivity` and its
    controls: features selective for `emotional` carry general emotional content rather than one emotion."""
    labels = list(labels)
    if neutral not in labels:
        raise FeatureError(f"no item is labelled {neutral!r}: general emotional features need neutral items")
    if all(v == neutral for v in labels):
        raise FeatureError("every item is neutral: general emotional features need emotional items")
    return [neutral if v == neutral else EMOTIONAL for v in labels], (EMOTIONAL, neutral)


def emotional_vs_neutral(
    codes, labels: Sequence[str], config: SelectivityConfig = SelectivityConfig(), neutral: str = "neutral"
) -> Selectivity:
    """Selectivity of emotional items (any emotion) against neutral ones; `.sets()["emotional"]` are the features
    of general emotional content. With two classes the two columns are mirror tests (AUROCs add to 1, same
    p-value), so BH counts each feature twice: slightly conservative."""
    return selectivity(codes, *contrast_labels(labels, neutral), config)


# ------------------------------------------------------------------------------------- layers of the final phase


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


@dataclass(frozen=True)
class PooledCodes:
    """Codes of several layers' SAEs side by side: column `j` is feature `feature[j]` of layer `layer[j]`.

    Only features that `selectivity` would test are kept (active on at least `min_active_items` items and not
    constant: a label-blind filter, so selectivity, its controls and its BH correction are unchanged, only
    cheaper). `n_features` counts every feature of the pooled layers, kept or not.
    """

    codes: np.ndarray
    layer: np.ndarray
    feature: np.ndarray
    n_features: int

    def name(self, column: int) -> str:
        """`L<layer>/<feature>`: how a pooled feature is named in tables and figures."""
        return f"L{int(self.layer[column])}/{int(self.feature[column])}"

    def columns_of(self, layer: int) -> np.ndarray:
        return np.flatnonzero(self.layer == layer)


def pool_layers(codes_by_layer: Mapping[int, np.ndarray], config: SelectivityConfig = SelectivityConfig()):
    """Pool per-layer codes `[n_items, d_sae]` into one `PooledCodes` (features identified as (layer, feature))."""
    if not codes_by_layer:
        raise FeatureError("no layers to pool")
    blocks, layers, ids, total, n_items = [], [], [], 0, None
    for layer, codes in codes_by_layer.items():
        acts = _array(codes, f"codes of layer {layer}", 2)
        if n_items is not None and acts.shape[0] != n_items:
            raise FeatureError(f"layer {layer} has {acts.shape[0]} items, the others {n_items}")
        n_items = acts.shape[0]
        keep = np.flatnonzero(_testable(acts, config))
        blocks.append(acts[:, keep])
        layers.append(np.full(len(keep), int(layer)))
        ids.append(keep)
        total += acts.shape[1]
    return PooledCodes(
        codes=np.concatenate(blocks, axis=1),
        layer=np.concatenate(layers),
        feature=np.concatenate(ids),
        n_features=total,
    )


# ------------------------------------------------------------------------------------------ shuffled control


@dataclass(frozen=True)
class NullCounts:
    """Selective-feature counts on label permutations: one row per shuffle, one column per emotion and `TOTALS`."""

    emotions: tuple[str, ...]
    counts: pd.DataFrame
    seed: int

    def summary(self, observed: Selectivity) -> pd.DataFrame:
        """Observed counts beside the null: mean, 95th percentile, maximum, and the permutation p-value
        (1 + #shuffles with at least as many) / (1 + #shuffles)."""
        if observed.emotions != self.emotions:
            raise FeatureError(
                f"observed emotions {observed.emotions} differ from the null's {self.emotions}"
            )
        seen = pd.Series(observed.counts())
        n = len(self.counts)
        return pd.DataFrame(
            {
                "observed": seen,
                "null_mean": self.counts.mean(),
                "null_q95": self.counts.quantile(0.95),
                "null_max": self.counts.max(),
                "p_value": (1 + (self.counts >= seen).sum()) / (1 + n),
            }
        )


def shuffled_control(
    codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig = SelectivityConfig(),
    n_shuffles: int = 20,
    seed: int = 0,
) -> NullCounts:
    """The full selectivity procedure on `n_shuffles` seeded permutations of the labels.

    Permuting keeps the codes, the class sizes and the feature filter and breaks only the link to the labels, so
    the counts are what the procedure finds by chance on this very data (a check of the FDR control, and the
    yardstick for every observed count). Costs `n_shuffles` calls of `selectivity`.
    """
    if n_shuffles < 1:
        raise FeatureError(f"n_shuffles must be at least 1, not {n_shuffles}")
    acts, y, emotions = _prepare(codes, labels, emotions, config)
    allowed = _testable(acts, config)
    rng = np.random.default_rng(seed)
    rows = [
        _count_row(_compute(acts, rng.permutation(y), emotions, config, allowed).selective, emotions)
        for _ in range(n_shuffles)
    ]
    return NullCounts(emotions=emotions, counts=pd.DataFrame(rows), seed=seed)


# ------------------------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapConfig:
    """Resampling items with replacement within each label (class sizes stay as in the data), seeded.

    `criterion="auroc"` (default) re-decides selectivity in each resample by the effect-size half of the rule
    (AUROC >= threshold and more active on the emotion), from a single ranking of all items per resample instead
    of one Mann-Whitney test per emotion plus a BH pass: several times cheaper. At this project's class sizes a
    feature with AUROC >= 0.7 has a p-value far below the BH cut-off, so the dropped q-condition rarely binds;
    the point estimates reported beside these intervals use the same criterion, so value and interval agree.
    `criterion="full"` reruns `selectivity` on every resample (exact, `n_boot` times its cost).
    """

    n_boot: int = 200
    seed: int = 0
    level: float = 0.95
    criterion: str = "auroc"

    def __post_init__(self) -> None:
        _choice(self.criterion, CRITERIA, "criterion")
        if self.n_boot < 2:
            raise FeatureError(f"n_boot must be at least 2, not {self.n_boot}")
        if not 0 < self.level < 1:
            raise FeatureError(f"level must be in (0, 1), not {self.level}")


@dataclass(frozen=True)
class SelectivityDraws:
    """Bootstrap resamples of selectivity: arrays `[n_boot, d_sae, n_emotions]` (AUROC NaN where untested)."""

    emotions: tuple[str, ...]
    config: BootstrapConfig
    auroc: np.ndarray
    mean_diff: np.ndarray
    selective: np.ndarray


def bootstrap_selectivity(
    codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig = SelectivityConfig(),
    boot: BootstrapConfig = BootstrapConfig(),
) -> SelectivityDraws:
    """Selectivity on `boot.n_boot` item resamples stratified by label (see `BootstrapConfig` for the criterion).

    One set of draws serves `shared_specific`, `diffuseness` and `compare_diffuseness`, so their intervals come
    from the same resamples.
    """
    acts, y, emotions = _prepare(codes, labels, emotions, config)
    n, d = acts.shape
    n_emotions = len(emotions)
    allowed = _testable(acts, config)
    cols = np.flatnonzero(allowed)
    members = [np.flatnonzero(y == e) for e in range(n_emotions)]
    sizes = np.array([len(m) for m in members], dtype=np.float64)
    y_sorted = np.repeat(np.arange(n_emotions), sizes.astype(int))  # resamples are laid out class by class
    onehot = np.eye(n_emotions)[y_sorted]
    shape = (boot.n_boot, d, n_emotions)
    auroc = np.full(shape, np.nan, dtype=np.float32)
    mean_diff = np.zeros(shape, dtype=np.float32)
    selective = np.zeros(shape, dtype=bool)
    rng = np.random.default_rng(boot.seed)
    for b in range(boot.n_boot):
        index = np.concatenate([m[rng.integers(0, len(m), size=len(m))] for m in members])
        acts_b = acts[index]
        if boot.criterion == "full":
            result = _compute(acts_b, y_sorted, emotions, config, allowed)
            auroc[b], mean_diff[b], selective[b] = (
                result.auroc,
                result.mean_in - result.mean_out,
                result.selective,
            )
            continue
        acts_t = acts_b[:, cols]
        rank_sums = rankdata(acts_t, axis=0).T @ onehot  # [n_tested, n_emotions]; midranks for ties
        u = rank_sums - sizes * (sizes + 1) / 2
        sums = acts_t.T @ onehot
        diff = sums / sizes - (sums.sum(axis=1, keepdims=True) - sums) / (n - sizes)
        auroc[b, cols] = u / (sizes * (n - sizes))
        mean_diff[b, cols] = diff
        selective[b, cols] = (auroc[b, cols] >= config.auroc_threshold) & (diff > 0)
    return SelectivityDraws(
        emotions=emotions, config=boot, auroc=auroc, mean_diff=mean_diff, selective=selective
    )


def _check_draws(sel: Selectivity, draws: SelectivityDraws) -> None:
    if draws.emotions != sel.emotions or draws.auroc.shape[1] != sel.n_features:
        raise FeatureError(
            f"draws ({draws.emotions}, {draws.auroc.shape[1]} features) do not match the selectivity "
            f"({sel.emotions}, {sel.n_features} features)"
        )


def _bounds(value: float, resampled: np.ndarray, level: float) -> Estimate:
    finite = resampled[np.isfinite(resampled)]
    if finite.size == 0:
        return Estimate(float(value), float("nan"), float("nan"), level)
    return interval_from_draws(value, finite, level)


def _with_intervals(points: pd.DataFrame, resampled: Mapping[str, np.ndarray], level: float) -> pd.DataFrame:
    """`points` (rows x measures) with `<measure>_low` / `_high` columns from `resampled[measure]` `[n_boot, rows]`."""
    out = {}
    for measure in points.columns:
        out[measure] = points[measure]
        if measure in resampled:
            bounds = [_bounds(v, resampled[measure][:, i], level) for i, v in enumerate(points[measure])]
            out[f"{measure}_low"] = [b.low for b in bounds]
            out[f"{measure}_high"] = [b.high for b in bounds]
    frame = pd.DataFrame(out, index=points.index)
    frame.attrs["level"] = level
    return frame


# ------------------------------------------------------------------------------------------ shared / specific


def _shared_specific_counts(selective: np.ndarray) -> dict[str, np.ndarray]:
    """`[..., d, E]` -> per-emotion counts `[..., E + 1]` (last entry: over all emotions)."""
    per_feature = selective.sum(axis=-1, keepdims=True)
    specific = selective & (per_feature == 1)
    shared = selective & (per_feature >= 2)

    def with_total(per_emotion: np.ndarray, total: np.ndarray) -> np.ndarray:
        return np.concatenate([per_emotion, total[..., None]], axis=-1)

    return {
        "n_selective": with_total(selective.sum(axis=-2), (per_feature[..., 0] >= 1).sum(axis=-1)),
        "n_specific": with_total(specific.sum(axis=-2), (per_feature[..., 0] == 1).sum(axis=-1)),
        "n_shared": with_total(shared.sum(axis=-2), (per_feature[..., 0] >= 2).sum(axis=-1)),
    }


def shared_specific(
    sel: Selectivity, draws: SelectivityDraws | None = None, among: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per emotion: selective features, specific ones (selective for this emotion only) and shared ones (also for
    at least one other emotion); a last row `any` counts features over all emotions.

    `among` restricts the emotions considered (e.g. without neutral: a feature shared only with neutral then counts
    as specific). With `draws`, `_low` / `_high` columns give bootstrap intervals and the point values use the
    draws' criterion; without, the full rule.
    """
    names = list(among) if among is not None else list(sel.emotions)
    criterion = draws.config.criterion if draws is not None else "full"
    points = pd.DataFrame(_shared_specific_counts(sel.matrix(criterion, names)), index=[*names, "any"])
    points.index.name = "emotion"
    if draws is None:
        return points
    _check_draws(sel, draws)
    columns = sel._columns(names)
    return _with_intervals(points, _shared_specific_counts(draws.selective[..., columns]), draws.config.level)


# ------------------------------------------------------------------------------ shared / specific under the null


@dataclass(frozen=True)
class NullSharedSpecific:
    """`shared_specific` counts on label permutations, for each criterion of the selectivity rule.

    `counts` has one row per (criterion, shuffle) and columns (measure, emotion), measures `n_selective`,
    `n_specific`, `n_shared`, emotions as in `shared_specific` (with the row `any`).
    """

    emotions: tuple[str, ...]
    counts: pd.DataFrame
    seed: int

    @property
    def n_shuffles(self) -> int:
        return int(self.counts.index.get_level_values("shuffle").nunique())

    def summary(self, observed: pd.DataFrame, criterion: str = "full") -> pd.DataFrame:
        """`observed` (a `shared_specific` table by the same `criterion`) beside the null: for each measure its
        null mean, 95th percentile, and permutation p-value (1 + #shuffles with at least as many) / (1 + #shuffles).
        Rows are emotions (and `any`); columns are (measure, statistic)."""
        _choice(criterion, CRITERIA, "criterion")
        null = self.counts.xs(criterion, level="criterion")
        rows = list(observed.index)
        unknown = [r for r in rows if r not in null["n_selective"].columns]
        if unknown:
            raise FeatureError(
                f"observed rows {unknown} are not among the null's {list(null['n_selective'])}"
            )
        out = {}
        for measure in ("n_selective", "n_specific", "n_shared"):
            seen = observed[measure].reindex(rows)
            values = null[measure][rows]
            out[(measure, "observed")] = seen
            out[(measure, "null_mean")] = values.mean()
            out[(measure, "null_q95")] = values.quantile(0.95)
            out[(measure, "p_value")] = (1 + (values >= seen).sum()) / (1 + len(values))
        frame = pd.DataFrame(out)
        frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["measure", "statistic"])
        frame.index.name = "emotion"
        return frame


def shuffled_shared_specific(
    codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig = SelectivityConfig(),
    n_shuffles: int = 20,
    seed: int = 0,
    among: Sequence[str] | None = None,
) -> NullSharedSpecific:
    """`shared_specific` per emotion on `n_shuffles` seeded label permutations, by both criteria ("full" and
    "auroc") from the same permutations: the control for every count of specific and shared features.

    The permutations are those of `shuffled_control` with the same seed (its `any` counts are this null's
    `n_selective` / `any` under the full rule). `among` restricts the emotions counted, as in `shared_specific`.
    """
    if n_shuffles < 1:
        raise FeatureError(f"n_shuffles must be at least 1, not {n_shuffles}")
    acts, y, emotions = _prepare(codes, labels, emotions, config)
    names = list(among) if among is not None else list(emotions)
    unknown = [e for e in names if e not in emotions]
    if unknown:
        raise FeatureError(f"emotions {unknown} are not among {list(emotions)}")
    columns = [emotions.index(e) for e in names]
    allowed = _testable(acts, config)
    rng = np.random.default_rng(seed)
    rows, index = [], []
    for shuffle in range(n_shuffles):
        result = _compute(acts, rng.permutation(y), emotions, config, allowed)
        for criterion in CRITERIA:
            counts = _shared_specific_counts(result.matrix(criterion)[:, columns])
            rows.append(
                {
                    (m, e): int(v)
                    for m, values in counts.items()
                    for e, v in zip([*names, "any"], values, strict=True)
                }
            )
            index.append((criterion, shuffle))
    frame = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["criterion", "shuffle"]))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["measure", "emotion"])
    return NullSharedSpecific(emotions=tuple(names), counts=frame, seed=seed)


def specific_sets(sets: EmotionSets) -> dict[str, frozenset[int]]:
    """Each emotion's features that belong to no other emotion's set."""
    counts: dict[int, int] = {}
    for members in sets.values():
        for feature in set(members):
            counts[feature] = counts.get(feature, 0) + 1
    return {e: frozenset(f for f in set(members) if counts[f] == 1) for e, members in sets.items()}


# --------------------------------------------------------------------------------------------------- overlap


def jaccard(sets: EmotionSets) -> pd.DataFrame:
    """|A & B| / |A | B| between every two emotions' feature sets (NaN when both are empty)."""
    names = list(sets)
    as_sets = {e: set(sets[e]) for e in names}
    values = [
        [
            len(as_sets[a] & as_sets[b]) / len(union) if (union := as_sets[a] | as_sets[b]) else np.nan
            for b in names
        ]
        for a in names
    ]
    return pd.DataFrame(
        values, index=pd.Index(names, name="emotion"), columns=pd.Index(names, name="emotion")
    )


def intersections(sets: EmotionSets) -> pd.DataFrame:
    """UpSet data: every exact combination of emotions that some feature is selective for, with its features.

    Each feature is counted once, in the combination of all the emotions it belongs to (so the sizes add up to the
    number of features in any set). Columns: `combination` ("anger & disgust"), `emotions` (tuple), `degree`,
    `n_features`, `features`; largest first. `attrs` hold the emotions and their set sizes, for `upset_figure`.
    """
    names = list(sets)
    membership: dict[int, list[str]] = {}
    for name in names:
        for feature in sorted(set(sets[name])):
            membership.setdefault(int(feature), []).append(name)
    groups: dict[tuple[str, ...], list[int]] = {}
    for feature, combo in sorted(membership.items()):
        groups.setdefault(tuple(combo), []).append(feature)
    rows = [
        {"combination": " & ".join(c), "emotions": c, "degree": len(c), "n_features": len(f), "features": f}
        for c, f in groups.items()
    ]
    frame = pd.DataFrame(rows, columns=["combination", "emotions", "degree", "n_features", "features"])
    if rows:
        order = [tuple(names.index(e) for e in c) for c in frame["emotions"]]
        frame = frame.assign(_order=order).sort_values(
            ["n_features", "degree", "_order"], ascending=[False, True, True]
        )
        frame = frame.drop(columns="_order").reset_index(drop=True)
    frame.attrs.update(emotions=tuple(names), set_sizes={e: len(set(sets[e])) for e in names})
    return frame


def upset_figure(
    table: pd.DataFrame, top_n: int = 15, title: str | None = None, figure: Figure | SubFigure | None = None
) -> Figure | SubFigure:
    """UpSet-style figure of `intersections(...)`: bars of the `top_n` largest combinations over a dot matrix
    (a filled dot per emotion in the combination); rows are labelled with each emotion's set size.

    Draws into `figure` (e.g. one of `Figure.subfigures`, as `upset_grid` does) when given, else a new figure."""
    emotions = list(table.attrs.get("emotions") or dict.fromkeys(e for c in table["emotions"] for e in c))
    sizes = table.attrs.get("set_sizes", {})
    shown = table.head(top_n)
    n = max(len(shown), 1)
    layout = {"sharex": True, "gridspec_kw": {"height_ratios": [2.2, 0.25 * len(emotions) + 0.3]}}
    if figure is None:
        fig, (bars, dots) = plt.subplots(
            2, 1, figsize=(max(5.5, 0.45 * n + 2.0), 2.8 + 0.28 * len(emotions)), **layout
        )
    else:
        fig = figure
        bars, dots = fig.subplots(2, 1, **layout)
    x = np.arange(len(shown))
    bars.bar(x, shown["n_features"], color="#444444", width=0.6)
    for xi, value in zip(x, shown["n_features"], strict=True):
        bars.text(xi, value, str(value), ha="center", va="bottom", fontsize=7)
    bars.set_ylabel("features")
    bars.grid(axis="x", visible=False)
    omitted = len(table) - len(shown)
    heading = title or "Features by exact combination of emotions"
    bars.set_title(heading + (f"\n(top {len(shown)} of {len(table)} combinations)" if omitted > 0 else ""))
    for xi, combo in zip(x, shown["emotions"], strict=True):
        rows = [emotions.index(e) for e in combo]
        dots.scatter([xi] * len(emotions), range(len(emotions)), s=30, color="#dddddd", zorder=1)
        dots.scatter([xi] * len(rows), rows, s=30, color="#222222", zorder=3)
        if len(rows) > 1:
            dots.plot([xi, xi], [min(rows), max(rows)], color="#222222", linewidth=1.5, zorder=2)
    dots.set_yticks(range(len(emotions)), [f"{e} ({sizes[e]})" if e in sizes else e for e in emotions])
    dots.set_ylim(len(emotions) - 0.5, -0.5)
    dots.set_xticks(x, [""] * len(x))
    dots.tick_params(axis="x", length=0)
    dots.set_xlim(-0.6, n - 0.4)
    dots.grid(False)
    for side in ("top", "right", "bottom"):
        dots.spines[side].set_visible(False)
    return fig


def upset_grid(tables: Mapping[str, pd.DataFrame], top_n: int = 12) -> Figure:
    """`upset_figure` of each model's `intersections(...)`, stacked in one figure (one caption, one image)."""
    if not tables:
        raise FeatureError("no tables to draw")
    heights = []
    for table in tables.values():
        n_emotions = len(table.attrs.get("emotions") or ())
        heights.append(2.8 + 0.28 * max(n_emotions, 1))
    widest = max(min(len(t), top_n) for t in tables.values())
    fig = plt.figure(figsize=(max(6.0, 0.45 * widest + 2.5), sum(heights)))
    subfigures = fig.subfigures(len(tables), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, (name, table) in zip(subfigures, tables.items(), strict=True):
        upset_figure(table, top_n=top_n, title=name, figure=sub)
    return fig


def _errors(value, low, high) -> np.ndarray:
    """Error bar lengths `[2, n]` from an interval; a percentile interval can miss its point estimate (a count
    whose resamples all lie on one side of it), and the bar on that side is then drawn with length zero."""
    value, low, high = (np.asarray(v, dtype=float) for v in (value, low, high))
    return np.clip(np.stack([value - low, high - value]), 0, None)


def _model_panels(n: int, width: float, height: float, ncols: int | None = None):
    ncols = ncols or n
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for k in range(n, nrows * ncols):
        axes.flat[k].axis("off")
    return fig, list(axes.flat)[:n]


def _annotated_heatmap(ax, values: np.ndarray, labels: Sequence[str], vmax: float, fmt: str, cmap: str):
    colours = plt.get_cmap(cmap).with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=vmax, cmap=colours)
    short = [str(x)[:5] for x in labels]
    ax.set_xticks(range(len(short)), short, rotation=90, fontsize=8)
    ax.set_yticks(range(len(short)), short, fontsize=8)
    ax.grid(False)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = "-" if not np.isfinite(v) else format(v, fmt)
            dark = np.isfinite(v) and v > 0.6 * vmax
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    return image


def jaccard_figure(frames: Mapping[str, pd.DataFrame]) -> Figure:
    """Jaccard overlap of the emotions' selective sets (`jaccard(...)`), one heatmap per model; the diagonal is
    blanked (always 1) and the colour scale runs to the largest off-diagonal value."""
    fig, axes = _model_panels(len(frames), 3.6, 3.4)
    for ax, (name, frame) in zip(axes, frames.items(), strict=True):
        values = frame.to_numpy(dtype=float).copy()
        np.fill_diagonal(values, np.nan)
        top = np.nanmax(values) if np.isfinite(values).any() else 1.0
        image = _annotated_heatmap(ax, values, list(frame.index), max(top, 1e-6), ".2f", "Purples")
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.7, label="Jaccard")
    return fig


def counts_figure(tables: Mapping[str, pd.DataFrame], nulls: Mapping[str, pd.DataFrame]) -> Figure:
    """Specific and shared features per emotion with bootstrap intervals (bars), each beside the 95th percentile
    of the same count on shuffled labels (black ticks). `tables[model]` is a `shared_specific(sel, draws)` table,
    `nulls[model]` its `NullSharedSpecific.summary(..., criterion)` by the draws' criterion."""
    fig, axes = _model_panels(len(tables), 5.2, 3.2)
    styles = {"n_specific": ("specific", "#4c72b0"), "n_shared": ("shared", "#dd8452")}
    for ax, (name, table) in zip(axes, tables.items(), strict=True):
        emotions = [e for e in table.index if e != "any"]
        x = np.arange(len(emotions))
        for k, (measure, (label, colour)) in enumerate(styles.items()):
            rows = table.loc[emotions]
            xs = x + (k - 0.5) * 0.38
            ax.bar(
                xs,
                rows[measure],
                0.36,
                yerr=_errors(rows[measure], rows[f"{measure}_low"], rows[f"{measure}_high"]),
                capsize=2,
                color=colour,
                label=label,
                alpha=0.85,
            )
            q95 = nulls[name].loc[emotions, (measure, "null_q95")]
            ax.scatter(
                xs, q95, marker="_", s=160, color="black", zorder=3, label=None if k else "null 95th pct"
            )
        ax.set_xticks(x, emotions, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("features")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    return fig


def layer_counts_figure(frames: Mapping[str, pd.DataFrame], phases: Mapping[str, tuple[int, int]]) -> Figure:
    """Selective features per layer (each layer's SAE on its own): any, specific and shared counts beside the
    shuffled-label null of the `any` count (mean and 95th percentile); the final phase is shaded.

    `frames[model]` has columns layer, any, specific, shared, null_mean, null_q95."""
    fig, axes = _model_panels(len(frames), 4.6, 3.0)
    for ax, (name, frame) in zip(axes, frames.items(), strict=True):
        first, last = phases[name]
        ax.axvspan(first - 0.5, last + 0.5, color="#2ca02c", alpha=0.1, lw=0, label="final phase")
        for column, colour in (("any", "black"), ("specific", "#4c72b0"), ("shared", "#dd8452")):
            ax.plot(frame["layer"], frame[column], "o-", ms=3, color=colour, label=column)
        ax.fill_between(frame["layer"], 0, frame["null_q95"], color="grey", alpha=0.25, lw=0,
                        label="null (any), 95th pct")  # fmt: skip
        ax.set_xlabel("layer")
        ax.set_ylabel("selective features")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    return fig


def diffuseness_figure(
    frames: Mapping[str, pd.DataFrame],
    measures: Sequence[str] = ("k50", "k80", "entropy"),
    highlight: str = "disgust",
) -> Figure:
    """Each emotion's diffuseness (`diffuseness(sel, draws)`) with bootstrap intervals: one row of panels per
    model, one column per measure; `highlight` is drawn in red."""
    n_rows, n_cols = len(frames), len(measures)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.6 * n_rows), squeeze=False)
    for r, (name, frame) in enumerate(frames.items()):
        emotions = list(frame.index)
        for c, measure in enumerate(measures):
            ax = axes[r][c]
            for i, e in enumerate(emotions):
                value = frame.loc[e, measure]
                low, high = frame.loc[e, f"{measure}_low"], frame.loc[e, f"{measure}_high"]
                colour = "#d62728" if e == highlight else "#444444"
                ax.errorbar(i, value, yerr=_errors([value], [low], [high]), fmt="o", capsize=3, color=colour)
            ax.set_xticks(range(len(emotions)), [e[:5] for e in emotions], rotation=90, fontsize=8)
            ax.set_title(f"{name}: {measure}" if n_cols > 1 else name, fontsize=8)
    return fig


def coactivation_figure(results: Mapping[str, HeldOutCoactivation]) -> Figure:
    """`heldout_coactivation` matrices, one heatmap per model (rows: features of; columns: items of); rows
    without features are blank."""
    fig, axes = _model_panels(len(results), 3.8, 3.5)
    for ax, (name, result) in zip(axes, results.items(), strict=True):
        values = result.matrix.to_numpy(dtype=float)
        top = np.nanmax(values) if np.isfinite(values).any() else 1.0
        image = _annotated_heatmap(ax, values, result.emotions, max(top, 1.0), ".2f", "Oranges")
        ax.set_ylabel("features of")
        ax.set_xlabel("items of")
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.7, label="mean on column / mean on row emotion")
    return fig


# ----------------------------------------------------------------------------------------------- diffuseness


@dataclass(frozen=True)
class DiffusenessConfig:
    """How an emotion's selectivity mass is defined and which features carry it.

    `mass="auroc"`: max(AUROC - 0.5, 0), a rank effect size comparable across features whatever their activation
    scale (SAE features differ in scale a lot, so with `"mean_diff"`, max(mean_in - mean_out, 0), a few
    large-norm features can hold most of the mass). `support="selective"`: only the emotion's selective features
    carry mass. With `"all"` every tested feature does, and thousands of null features each add sampling noise
    (|AUROC - 0.5| of a few hundredths at a hundred items) that can outweigh the signal and grows as classes
    shrink, making small classes look diffuse.
    """

    mass: str = "auroc"
    support: str = "selective"

    def __post_init__(self) -> None:
        _choice(self.mass, MASSES, "mass")
        _choice(self.support, SUPPORTS, "support")


def _concentration(mass: np.ndarray, n_reference: int) -> dict[str, np.ndarray]:
    """Vectorised `concentration` over the last axis."""
    mass = np.clip(np.nan_to_num(mass, nan=0.0), 0, None)
    total = mass.sum(axis=-1)
    has_mass = total > 0
    ordered = -np.sort(-mass, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.cumsum(ordered, axis=-1) / total[..., None]
        p = mass / total[..., None]
    out = {}
    for name, fraction in (("k50", 0.5), ("k80", 0.8)):
        k = (share < fraction - 1e-9).sum(axis=-1) + 1  # fewest largest features reaching the fraction
        out[name] = np.where(has_mass, k, 0).astype(np.float64)
    entropy = np.where(has_mass, entr(np.nan_to_num(p)).sum(axis=-1), np.nan)
    out["entropy"] = entropy / np.log(n_reference) if n_reference > 1 else np.full_like(entropy, np.nan)
    out["effective_n"] = np.exp(entropy)
    return out


def concentration(mass, n_reference: int | None = None) -> dict[str, float]:
    """How concentrated a mass vector is (negative entries and NaN count as zero).

    `k50` / `k80`: the fewest features, largest first, holding 50% / 80% of the mass (0 when there is no mass);
    `entropy`: Shannon entropy of the mass shares over log(`n_reference`) (default: the vector's length), 0 when
    one feature holds everything and 1 when all `n_reference` hold equal shares; `effective_n`: exp(entropy in
    nats), the number of equal features with the same entropy. Entropy is NaN without mass.
    """
    values = np.asarray(mass.detach().cpu() if isinstance(mass, torch.Tensor) else mass, dtype=np.float64)
    if values.ndim != 1:
        raise FeatureError(f"mass must be 1-D, got shape {values.shape}")
    n_reference = len(values) if n_reference is None else n_reference
    if n_reference < len(values):
        raise FeatureError(
            f"n_reference ({n_reference}) is smaller than the number of masses ({len(values)})"
        )
    return {name: float(v) for name, v in _concentration(values, n_reference).items()}


def _masses(
    auroc: np.ndarray,
    mean_diff: np.ndarray,
    selective: np.ndarray,
    tested: np.ndarray,
    config: DiffusenessConfig,
) -> np.ndarray:
    """`[..., d, E]` -> mass `[..., E, n_tested]` over the tested features."""
    base = auroc - 0.5 if config.mass == "auroc" else mean_diff
    mass = np.clip(np.nan_to_num(base, nan=0.0), 0, None)
    if config.support == "selective":
        mass = np.where(selective, mass, 0.0)
    return np.swapaxes(mass[..., tested, :], -1, -2)


def _diffuseness_arrays(
    sel: Selectivity, draws: SelectivityDraws | None, config: DiffusenessConfig, criterion: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    n_reference = max(sel.n_tested, 1)
    mass = _masses(sel.auroc, sel.mean_in - sel.mean_out, sel.matrix(criterion), sel.tested, config)
    point = {"n_support": (mass > 0).sum(axis=-1).astype(np.float64), **_concentration(mass, n_reference)}
    if draws is None:
        return point, None
    _check_draws(sel, draws)
    mass = _masses(draws.auroc, draws.mean_diff, draws.selective, sel.tested, config)
    return point, {
        "n_support": (mass > 0).sum(axis=-1).astype(np.float64),
        **_concentration(mass, n_reference),
    }


def diffuseness(
    sel: Selectivity, draws: SelectivityDraws | None = None, config: DiffusenessConfig = DiffusenessConfig()
) -> pd.DataFrame:
    """Per emotion: `n_support` (features with mass), `k50`, `k80`, `entropy` (normalised by log of the number of
    tested features) and `effective_n` of its selectivity mass (see `concentration`, `DiffusenessConfig`).

    A diffuse emotion spreads its mass over many features (large k50, k80, entropy). With `draws`, `_low` / `_high`
    columns give bootstrap intervals and point values use the draws' criterion; without, the full rule.
    """
    criterion = draws.config.criterion if draws is not None else "full"
    point, resampled = _diffuseness_arrays(sel, draws, config, criterion)
    points = pd.DataFrame(
        {m: point[m] for m in ("n_support", *MEASURES)}, index=pd.Index(sel.emotions, name="emotion")
    )
    if resampled is None:
        return points
    return _with_intervals(points, resampled, draws.config.level)


def compare_diffuseness(
    sel: Selectivity,
    draws: SelectivityDraws,
    emotion: str,
    measure: str = "k80",
    others: Sequence[str] | None = None,
    config: DiffusenessConfig = DiffusenessConfig(),
) -> pd.DataFrame:
    """Is `emotion` more diffuse than the others? Paired bootstrap differences of `measure` (emotion minus other,
    same resamples) against each other emotion and against the others' mean (row `others (mean)`).

    Columns: `difference` with `low` / `high`, and `share_more` (share of resamples where `emotion` is the more
    diffuse). An interval above zero says more diffuse. `others` defaults to every other emotion (pass the list
    without neutral to compare among emotions only).
    """
    _choice(measure, MEASURES, "measure")
    sel._columns([emotion])
    others = [e for e in sel.emotions if e != emotion] if others is None else list(others)
    sel._columns(others)
    if not others or emotion in others:
        raise FeatureError(
            f"others must be a non-empty list of emotions other than {emotion!r}, not {others}"
        )
    point, resampled = _diffuseness_arrays(sel, draws, config, draws.config.criterion)
    a = sel.emotions.index(emotion)
    columns = sel._columns(others)
    rows = {}
    for name, p_other, r_other in [
        *((o, point[measure][c], resampled[measure][:, c]) for o, c in zip(others, columns, strict=True)),
        ("others (mean)", point[measure][columns].mean(), resampled[measure][:, columns].mean(axis=1)),
    ]:
        diff = resampled[measure][:, a] - r_other
        estimate = _bounds(point[measure][a] - p_other, diff, draws.config.level)
        finite = diff[np.isfinite(diff)]
        share = float((finite > 0).mean()) if finite.size else float("nan")
        rows[name] = {
            "difference": estimate.value,
            "low": estimate.low,
            "high": estimate.high,
            "share_more": share,
        }
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "versus"
    frame.attrs.update(emotion=emotion, measure=measure, level=draws.config.level)
    return frame


# ----------------------------------------------------------------------------------------------- coactivation


def coactivation(
    sel: Selectivity, specific_only: bool = False, among: Sequence[str] | None = None
) -> pd.DataFrame:
    """Row A, column B: how strongly A's selective features fire on B's items, relative to A's own items.

    For each feature selective for A, its mean activation on B's items over its mean on A's items, averaged over
    A's features (each feature normalised on its own, so a few large-scale features cannot dominate). The diagonal
    is 1; an off-diagonal row well above the others' (e.g. Surprise features firing on every emotion) is
    co-activation. `specific_only` keeps features selective for A alone, so overlap between selective sets does
    not count as co-activation. Rows without features are NaN; `attrs["n_features"]` gives each row's count.
    """
    names = list(among) if among is not None else list(sel.emotions)
    columns = sel._columns(names)
    chosen = sel.matrix("full", names)
    if specific_only:
        chosen = chosen & (chosen.sum(axis=1, keepdims=True) == 1)
    means = sel.mean_in[:, columns]
    values = np.full((len(names), len(names)), np.nan)
    for a in range(len(names)):
        features = np.flatnonzero(chosen[:, a])
        if features.size:
            values[a] = (means[features] / means[features, a : a + 1]).mean(axis=0)
    frame = pd.DataFrame(
        values, index=pd.Index(names, name="features of"), columns=pd.Index(names, name="items of")
    )
    frame.attrs["n_features"] = {e: int(chosen[:, j].sum()) for j, e in enumerate(names)}
    return frame


@dataclass(frozen=True)
class HeldOutCoactivation:
    """Co-activation with features chosen on one set of items and measured on another (see `heldout_coactivation`).

    `matrix` (rows: features of, columns: items of) holds point values, `draws` `[n_boot, E, E]` the bootstrap
    resamples of the measuring items; `n_features` the features chosen per row, `n_measured` those with a
    positive mean on the row emotion's measuring items (the others cannot be normalised and are left out).
    """

    matrix: pd.DataFrame
    draws: np.ndarray
    n_features: dict[str, int]
    n_measured: dict[str, int]
    level: float

    @property
    def emotions(self) -> list[str]:
        return list(self.matrix.index)

    def _off(self, values: np.ndarray) -> np.ndarray:
        """Mean off-diagonal value of each row, `[..., E]` (NaN for rows without features)."""
        n = values.shape[-1]
        off = ~np.eye(n, dtype=bool)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.where(off, values, np.nan), axis=-1)

    def excess(self, emotion: str) -> Estimate:
        """How much more `emotion`'s features fire on the other emotions' items than the other emotions' features
        do: its row's mean off-diagonal value minus the mean of the other rows' (rows without features skipped)."""
        if emotion not in self.emotions:
            raise FeatureError(f"{emotion!r} is not among {self.emotions}")
        a = self.emotions.index(emotion)

        def excess_of(values: np.ndarray) -> np.ndarray:
            off = self._off(values)
            others = np.delete(off, a, axis=-1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return off[..., a] - np.nanmean(others, axis=-1)

        return _bounds(float(excess_of(self.matrix.to_numpy())), excess_of(self.draws), self.level)

    def table(self) -> pd.DataFrame:
        """Per row emotion: features chosen and measured, mean off-diagonal co-activation with its interval, and
        the excess over the other rows with its interval."""
        off_point, off_draws = self._off(self.matrix.to_numpy()), self._off(self.draws)
        rows = {}
        for i, e in enumerate(self.emotions):
            off = _bounds(off_point[i], off_draws[:, i], self.level)
            ex = self.excess(e)
            rows[e] = {
                "n_features": self.n_features[e],
                "n_measured": self.n_measured[e],
                "off_diagonal": off.value,
                "off_diagonal_low": off.low,
                "off_diagonal_high": off.high,
                "excess": ex.value,
                "excess_low": ex.low,
                "excess_high": ex.high,
            }
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = "features of"
        return frame


def _coactivation_matrix(means: np.ndarray, members: Sequence[np.ndarray]) -> np.ndarray:
    """`means` `[..., d, E]` class means -> `[..., E, E]`: row A the median over A's features of mean_B / mean_A."""
    n = means.shape[-1]
    out = np.full((*means.shape[:-2], n, n), np.nan)
    for a, features in enumerate(members):
        if features.size == 0:
            continue
        own = means[..., features, a : a + 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(own > 0, means[..., features, :] / np.where(own > 0, own, 1.0), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[..., a, :] = np.nanmedian(ratio, axis=-2)
    return out


def heldout_coactivation(
    sets: EmotionSets,
    codes,
    labels: Sequence[str],
    emotions: Sequence[str] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> HeldOutCoactivation:
    """Row A, column B: how strongly A's features fire on B's items relative to A's own, on items that did not
    choose them.

    `sets` are each emotion's features chosen on other items (e.g. `selectivity(dev codes).sets()`); `codes`
    `[n_items, d_sae]` and `labels` are the measuring items (e.g. the test split). For each feature of A, its mean
    activation on B's measuring items over its mean on A's (features silent on A's measuring items cannot be
    normalised and are dropped, see `n_measured`); the row is the median over A's features, robust to the few
    features whose mean on A is tiny. The diagonal is 1. Choosing and measuring on the same items would bias
    every off-diagonal value down (a feature is chosen partly because its mean on A happened to be high), so
    the split keeps the comparison between rows fair. Intervals resample the measuring items within each label.
    """
    emotions = list(emotions) if emotions is not None else list(sets)
    missing = [e for e in emotions if e not in sets]
    if missing:
        raise FeatureError(f"no feature set for emotions {missing}")
    acts = _array(codes, "codes", 2)
    y = _encode(labels, emotions, acts.shape[0], 1)
    if n_boot < 2:
        raise FeatureError(f"n_boot must be at least 2, not {n_boot}")
    union = np.array(sorted({int(f) for e in emotions for f in sets[e]}), dtype=np.int64)
    if union.size and (union.min() < 0 or union.max() >= acts.shape[1]):
        raise FeatureError(f"feature ids must be in 0..{acts.shape[1] - 1}")
    position = {int(f): i for i, f in enumerate(union)}
    members = [np.array([position[int(f)] for f in sorted(set(sets[e]))], dtype=np.int64) for e in emotions]
    sub = acts[:, union]
    classes = [np.flatnonzero(y == e) for e in range(len(emotions))]

    def class_means(index_of: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([sub[i].mean(axis=0) for i in index_of], axis=-1)  # [d_union, E]

    point_means = class_means(classes)
    rng = np.random.default_rng(seed)
    boot_means = np.stack(
        [class_means([c[rng.integers(0, len(c), len(c))] for c in classes]) for _ in range(n_boot)]
    )
    matrix = pd.DataFrame(
        _coactivation_matrix(point_means, members),
        index=pd.Index(emotions, name="features of"),
        columns=pd.Index(emotions, name="items of"),
    )
    return HeldOutCoactivation(
        matrix=matrix,
        draws=_coactivation_matrix(boot_means, members),
        n_features={e: int(m.size) for e, m in zip(emotions, members, strict=True)},
        n_measured={
            e: int((point_means[m, a] > 0).sum())
            for a, (e, m) in enumerate(zip(emotions, members, strict=True))
        },
        level=level,
    )


# ------------------------------------------------------------------------------------------------ token roles


@dataclass(frozen=True)
class RoleConfig:
    """Thresholds of `feature_roles`.

    `min_rate`: a feature active (code > `active_threshold`) on fewer than this share of all tokens, and not
    emotion-selective, is inactive. `template_share`: a feature is a template feature when its mean activation per
    template token is at least this share of (mean per template token + mean per content token); 0.8 means at
    least 4x as strong on the template. Means per token, not totals, because a prompt holds many more template
    tokens (instruction, label list, "Answer:") than text tokens.
    """

    min_rate: float = 1e-3
    template_share: float = 0.8
    active_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not 0.5 <= self.template_share <= 1:
            raise FeatureError(f"template_share must be in [0.5, 1], not {self.template_share}")
        if not 0 <= self.min_rate < 1:
            raise FeatureError(f"min_rate must be in [0, 1), not {self.min_rate}")


def _token_chunks(token_codes, is_template) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    if isinstance(token_codes, np.ndarray | torch.Tensor):
        token_codes, is_template = [token_codes], [is_template]
    if len(token_codes) != len(is_template):
        raise FeatureError(f"{len(token_codes)} arrays of token codes but {len(is_template)} template masks")
    for i, (codes, mask) in enumerate(zip(token_codes, is_template, strict=True)):
        acts = _array(codes, f"token codes [{i}]", 2)
        m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
        if m.dtype != bool:
            raise FeatureError(f"template mask [{i}] must be boolean, got {m.dtype}")
        if m.shape != (acts.shape[0],):
            raise FeatureError(
                f"template mask [{i}] has shape {m.shape}, expected ({acts.shape[0]},) (one per token)"
            )
        yield acts, m


def feature_roles(
    token_codes, is_template, emotion_selective, config: RoleConfig = RoleConfig()
) -> pd.DataFrame:
    """Classify every feature as "emotion", "template", "content" or "inactive" over all tokens of the prompts.

    `token_codes` is `[n_tokens, d_sae]` with `is_template` `[n_tokens]` (True on the prompt's fixed tokens:
    instruction, field name, "Answer:", chat markup; False on the text), or lists of such arrays per prompt.
    `emotion_selective` is a `Selectivity` of last-token codes or a boolean `[d_sae]` / `[d_sae, n_emotions]`.
    The first rule that applies wins: emotion (selective at the last token; it comes first because the last token
    is itself a template token), inactive (see `RoleConfig.min_rate`), template (fires mostly on template tokens,
    see `RoleConfig.template_share`; it is not emotion-selective, so it fires whatever the emotion), content
    (everything else that is active: it fires on the text, possibly on the template too).
    """
    sums = {True: 0.0, False: 0.0}
    actives = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    width = None
    for acts, m in _token_chunks(token_codes, is_template):
        if width is not None and acts.shape[1] != width:
            raise FeatureError(
                f"token codes have {acts.shape[1]} features in one array and {width} in another"
            )
        width = acts.shape[1]
        for part in (True, False):
            rows = acts[m == part]
            sums[part] = sums[part] + rows.sum(axis=0)
            actives[part] = actives[part] + (rows > config.active_threshold).sum(axis=0)
            counts[part] += len(rows)
    if width is None:
        raise FeatureError("no token codes given")
    if counts[True] == 0 or counts[False] == 0:
        raise FeatureError(f"need both template and content tokens, got {counts[True]} and {counts[False]}")
    if isinstance(emotion_selective, Selectivity):
        emotion = emotion_selective.selective.any(axis=1)
    else:
        emotion = np.asarray(emotion_selective, dtype=bool)
        emotion = emotion.any(axis=1) if emotion.ndim == 2 else emotion
    if emotion.shape != (width,):
        raise FeatureError(f"emotion_selective covers {emotion.shape[0]} features, the token codes {width}")
    mean_template, mean_content = sums[True] / counts[True], sums[False] / counts[False]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = mean_template / (mean_template + mean_content)
    rate = (actives[True] + actives[False]) / (counts[True] + counts[False])
    role = np.select(
        [emotion, rate < config.min_rate, np.nan_to_num(share) >= config.template_share],
        ["emotion", "inactive", "template"],
        default="content",
    )
    frame = pd.DataFrame(
        {
            "role": pd.Categorical(role, categories=ROLES),
            "rate": rate,
            "rate_template": actives[True] / counts[True],
            "rate_content": actives[False] / counts[False],
            "mean_template": mean_template,
            "mean_content": mean_content,
            "template_share": share,
            "emotion_selective": emotion,
        }
    )
    frame.index.name = "feature"
    frame.attrs.update(n_template_tokens=counts[True], n_content_tokens=counts[False])
    return frame


# ------------------------------------------------------------------------------------------------ feature cards


def top_activating(
    activations, texts: Sequence[str], k: int = 10, labels: Sequence[str] | None = None
) -> pd.DataFrame:
    """The `k` items on which one feature fires most: rank, item index, activation, text (and label).

    `activations` is one feature's codes over items (`codes[:, f]`). Only active items (> 0) are listed, so a
    rarely active feature shows fewer than `k` rows instead of arbitrary zeros; ties keep item order.
    """
    values = _array(activations, "activations", 1)
    texts = list(texts)
    labels = None if labels is None else list(labels)
    if len(texts) != len(values):
        raise FeatureError(f"{len(values)} activations but {len(texts)} texts")
    if labels is not None and len(labels) != len(values):
        raise FeatureError(f"{len(values)} activations but {len(labels)} labels")
    order = np.argsort(-values, kind="stable")
    order = order[values[order] > 0][:k]
    frame = pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "item": order,
            "activation": values[order],
            "text": [texts[i] for i in order],
        }
    )
    if labels is not None:
        frame["label"] = [labels[i] for i in order]
    return frame


def promoted_tokens(
    decoder_row, model, tokenizer=None, k: int = 10, ln_scale: bool = True, suppressed: bool = False
) -> pd.DataFrame:
    """The tokens a feature's decoder direction pushes up (or, with `suppressed`, down) in the logits.

    Scores are `(d * w) @ W_U` for the decoder row `d` (`sae.W_dec[f]`), with `w = model.ln_final.w` when
    `ln_scale` and the model has one (models here are loaded unfolded, and TransformerLens stores Gemma's norm
    weight with its +1 already added, so `w` is the effective per-dimension scale), else `d @ W_U`. Ignored on
    purpose: the final norm's division by the residual's RMS (a positive factor per token: it rescales, never
    reorders), the unembedding bias (the same for every feature) and Gemma's logit soft cap (monotone).
    """
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    W_U = model.W_U
    with torch.no_grad():
        row = torch.as_tensor(
            np.asarray(decoder_row) if not isinstance(decoder_row, torch.Tensor) else decoder_row
        )
        row = row.detach().to(device=W_U.device, dtype=W_U.dtype).flatten()
        if row.shape[0] != W_U.shape[0]:
            raise FeatureError(
                f"decoder row has {row.shape[0]} dimensions, the model's residual stream {W_U.shape[0]}"
            )
        ln_final = getattr(model, "ln_final", None)
        if ln_scale and ln_final is not None and hasattr(ln_final, "w"):
            row = row * ln_final.w
        scores = row @ W_U
        top = torch.topk(-scores if suppressed else scores, min(k, scores.shape[0]))
    ids = top.indices.tolist()
    return pd.DataFrame(
        {
            "rank": np.arange(1, len(ids) + 1),
            "token_id": ids,
            "token": [tokenizer.decode([i]) for i in ids],
            "score": scores[top.indices].cpu().numpy(),
        }
    )


# ---------------------------------------------------------------------------------------------------- verdicts

VERDICTS = ("holds", "partly", "does not hold", "inconclusive")


@dataclass(frozen=True)
class Verdict:
    """A claim's verdict (one of `VERDICTS`) with the numbers that decided it, in words."""

    verdict: str
    reason: str

    def __post_init__(self) -> None:
        _choice(self.verdict, VERDICTS, "verdict")

    def as_dict(self) -> dict[str, str]:
        return {"verdict": self.verdict, "reason": self.reason}


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


# ------------------------------------------------------------------------------------------------- presets


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

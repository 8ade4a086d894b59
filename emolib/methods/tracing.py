"""Phase-stratified causal tracing: which SAE features drive the classifier's emotion predictions.

Method
------
*Splice.* Each traced layer `l` has an SAE on `blocks.{l}.hook_resid_post`, spliced in at the traced positions with
its error term kept (`emolib.sae.interventions`): the residual becomes `x + decode(a') - decode(a)` with
`a = encode(x)`, which is `x` itself for `a' = a` and equals sae-lens' `use_error_term=True` splice (tested), so
setting chosen features in `a'` changes only their decoder contributions. Downstream SAEs encode the residual they
receive, so their other features respond to an upstream edit while the features edited there stay fixed.
Attribution uses the gradient-transparent leaf splice of that module (sae-lens' detached error term would route
gradients through the reconstruction instead of the identity a spliced layer is), so all layers' feature gradients
come from one forward and one backward pass and equal those of the clean model (tested against a single-layer splice
and finite differences).

*Traced positions.* `positions="last"` (default) traces the last prompt position only, where the answer is read;
`positions="suffix"` traces every real (non-padding) token of the per-text suffix (the text and the answer cue),
summing attributions over those positions and ablating at all of them. Prefix positions (the shared instruction)
are never traced. A feature that encodes emotion on the text's tokens is seen by "last" only where its effect
arrives at the answer position (in later layers' residual there), by "suffix" also where it originates.

*Label scores and margin.* As the classifier's first-token scoring: `score_j = log sum over label j's verbalisers
of P(first token)` right after the prompt (log-softmax over the whole vocabulary). The gold gap is
`score_gold - mean_{j != gold} score_j`: linear in the scores, so an intervention that only shifts every item's
label scores by one vector (a label prior) moves the mean gap of a label-balanced item set by exactly zero; it is
the primary measure. The gold margin is `score_gold - max_{j != gold} score_j`; the gold probability is
`softmax(score)[gold]`, renormalised over labels (both move with a label prior).
Sequence scoring (labels sharing first tokens) is not supported: the classifier must use first-token scoring.

*Attribution.* For item i, layer l and feature f: `attr = a_f * d gap / d a_f`, summed over the traced
positions, from one forward and one backward pass per batch (rows are independent, so the backward of the summed
gaps gives every row's gradients). It is the first-order estimate of the gap lost by zero-ablating the
feature; positive values support the gold label. Ranking a set of layers (a phase) sorts all their features by the
mean attribution over one emotion's items (training items), jointly across layers: attributions are in gap units,
so they compare across layers.

*Ablation.* Inside one phase (a contiguous range of layers) the top-k features of an emotion's ranking are set to
zero ("zero") or to their mean activation over a reference set of items at the traced positions ("mean", see
`feature_means`), at the traced positions of every held-out item of that emotion, for each k in `ks`. Controls:
k random features of the same layers, several seeds (by default matched to the top k on activation frequency and
magnitude on the emotion's ranking items, `matched_draw`; or any active feature, or any feature: `random_pool`;
never among the top k being compared; all of the pool when it has fewer than k, see `n_features`), and the whole phase (every feature of every layer of the phase set to the reference: zero-ablation
leaves error term plus decoder bias, mean-ablation sets inactive features to their means too).
Effects per item are drops, clean minus ablated: of the gap, of the gold probability, of the margin, and of
correctness (their mean is the drop in accuracy).

*k50.* For one emotion, phase and ablation, the smallest k whose mean drop reaches half of the emotion's mean clean
value (e.g. half of its clean gap: reference "clean"), or half of the whole-phase drop (reference "whole"); `inf`
when no k does, NaN when the reference is not above a floor (a model that does not prefer the gold label on average
has no gap to explain). A bootstrap interval over items uses the same resamples for every k and the reference.

*Cross-emotion effects.* Ablating emotion A's top-k features on held-out items of every emotion B: how B's
predicted label distribution moves (confusion shift), and how much B's gold probability drops.

*Verification.* For the top features of each emotion and phase, the Spearman correlation between the predicted
effect of zero-ablating each single feature (its mean attribution on the held-out items) and the measured gap
drop when that one feature is ablated.

Efficiency: batches are laid out as the classifier's (`[prefix][pad][suffix]`). Interventions happen only at
traced positions, so everything before the first traced position is causally upstream of every intervention and
needs no gradient: its keys and values come from one clean pass and are reused, frozen, by every intervention on
the batch (`reuse_cache`). With "last" that is the whole prompt but its last token (one no-grad pass per batch),
so each ablation, and the forward and backward of attribution, cost one token; with "suffix" it is the shared
prefix (computed once per call). With "last", the blocks before an ablation's first edited layer compute exactly
their clean values, so the clean residual entering every block is recorded once per batch and each ablation starts
at its first edited block (a final-phase ablation runs only the final phase's blocks). `reuse_cache=False` runs the whole sequence for every forward instead (the
reference the cached path is tested against). Feature activations are encoded at the traced positions only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from sae_lens import SAE
from scipy.special import softmax
from scipy.stats import rankdata, spearmanr
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from emolib.lm.batching import final_logits, final_logprobs, forward_residual
from emolib.lm.classify import EmotionClassifier, Predictions
from emolib.lm.prompts import encode_suffix
from emolib.sae.interventions import (
    SetFeatures,
    block_input_recorders,
    first_edited_block,
    leaf_hook,
    resid_post,
    resume_at_block,
    splice_hook,
)
from emolib.sae.loading import SAEError
from emolib.sae.quality import resume_layer

POSITIONS = ("last", "suffix")


ABLATIONS = ("zero", "mean")


#: Where random control features come from: "matched" (default) draws, for each of the top k, one of its
#: `MATCH_NEIGHBOURS` nearest features in (activation frequency, magnitude when active) on the emotion's ranking
#: items; "active" any feature active on them; "all" any feature of the phase. Never among the top k.
RANDOM_POOLS = ("matched", "active", "all")
MATCH_NEIGHBOURS = 8


CONDITIONS = ("top", "random", "shuffled", "whole")


# Shapes (aliases, so that linters do not read jaxtyping's shape strings as forward references).
#: One layer's per-item values (attributions or activations), items x that layer's SAE features.
PerItem = Float[np.ndarray, "items d_sae"]
#: Per layer, every feature's mean activation at the traced positions (the mean-ablation reference).
FeatureMeans = Mapping[int, Float[Tensor, " d_sae"]]

#: Effect metrics: name -> column of the per-item table (drops, clean minus ablated).
METRICS = {"gap": "drop_gap", "prob": "drop_prob", "margin": "drop_margin", "accuracy": "drop_correct"}


#: SAE input normalisations whose decoder is stateless (others keep per-call state that a second decode breaks).
_STATELESS = ("none", "expected_average_only_in")


class TracingError(ValueError):
    """Bad tracing inputs: unknown labels, phases without SAEs, k beyond the available features, and the like."""


@dataclass(frozen=True)
class TracerConfig:
    """How to trace. `ks` are the numbers of top features ablated; `random_seeds` the seeds of the random control.

    `positions` is "last" or "suffix" (module docstring). `reuse_cache` reuses the clean keys and values of
    everything before the traced positions (results do not depend on it or on `batch_size`, tested). `ablations`
    are run by `ablation_curves` and `cross_emotion`; "mean" needs `means`; `control_ablations` those that also run
    the shuffled-label ranking's top features (when given one). `n_verify` is the number of top features
    per emotion and phase that `verify` ablates one at a time. `seed` and `random_seeds` seed the random controls.
    """

    positions: str = "last"
    batch_size: int = 8
    reuse_cache: bool = True
    ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    ablations: tuple[str, ...] = ("zero", "mean")
    random_seeds: tuple[int, ...] = (0, 1, 2)
    random_pool: str = "matched"
    n_verify: int = 16
    control_ablations: tuple[str, ...] = ("zero",)
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise TracingError(f"positions must be one of {POSITIONS}, not {self.positions!r}")
        if self.random_pool not in RANDOM_POOLS:
            raise TracingError(f"random_pool must be one of {RANDOM_POOLS}, not {self.random_pool!r}")
        unknown = [a for a in self.ablations if a not in ABLATIONS]
        if unknown or not self.ablations:
            raise TracingError(f"ablations must be a non-empty subset of {ABLATIONS}, not {self.ablations}")
        if not self.ks or any(int(k) != k or k < 1 for k in self.ks) or list(self.ks) != sorted(set(self.ks)):
            raise TracingError(f"ks must be increasing positive integers, not {self.ks}")
        if self.batch_size < 1 or self.n_verify < 1:
            raise TracingError("batch_size and n_verify must be at least 1")


@dataclass
class Attributions:
    """Per-item attributions of every traced feature, from `FeatureTracer.attribute`.

    `values[layer][i, f]` is activation x gradient of item i's gold gap for feature f (summed over the traced
    positions), `activations[layer][i, f]` the feature's activation (summed likewise), `label_logprobs` the clean
    label scores. Means over one emotion's items rank features (`ranking`).
    """

    labels: tuple[str, ...]
    layers: tuple[int, ...]
    positions: str
    texts: list[str]
    gold: list[str]
    values: dict[int, PerItem]
    activations: dict[int, PerItem]
    label_logprobs: Float[np.ndarray, "items labels"]
    meta: dict = field(default_factory=dict)

    @property
    def margin(self) -> np.ndarray:
        """Clean gold margin per item."""
        return _margins(self.label_logprobs, _label_indices(self.gold, self.labels))

    @property
    def gap(self) -> np.ndarray:
        """Clean gold gap per item (the attributed quantity)."""
        return gold_gaps(self.label_logprobs, _label_indices(self.gold, self.labels))

    def items(self, emotion: str) -> np.ndarray:
        """Indices of the items whose gold label is `emotion`."""
        if emotion not in self.labels:
            raise TracingError(f"unknown emotion {emotion!r}; labels are {list(self.labels)}")
        return np.flatnonzero(np.asarray(self.gold) == emotion)

    def _check_layers(self, layers: Iterable[int] | None) -> tuple[int, ...]:
        layers = self.layers if layers is None else tuple(int(layer) for layer in layers)
        missing = [layer for layer in layers if layer not in self.values]
        if missing:
            raise TracingError(f"no attributions for layers {missing}; traced layers are {list(self.layers)}")
        return layers

    def _stacked(
        self, emotion: str, layers: Iterable[int] | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Feature keys `[n, 2]` (layer, feature) of `layers` in order, and per-feature statistics."""
        layers = self._check_layers(layers)
        rows = self.items(emotion)
        if len(rows) == 0:
            raise TracingError(f"no items of emotion {emotion!r} to rank features by")
        widths = [self.values[layer].shape[1] for layer in layers]
        keys = np.stack([np.repeat(layers, widths), np.concatenate([np.arange(w) for w in widths])], axis=1)
        values = np.concatenate([self.values[layer][rows] for layer in layers], axis=1)
        acts = np.concatenate([self.activations[layer][rows] for layer in layers], axis=1)
        stats = {
            "attribution": values.mean(0),
            "attribution_sd": values.std(0),
            "active_share": (acts != 0).mean(0),
            "mean_activation": acts.mean(0),
        }
        return keys, stats

    def _ordered(
        self, emotion: str, layers: Iterable[int] | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        keys, stats = self._stacked(emotion, layers)
        order = np.argsort(-stats["attribution"], kind="stable")  # ties (e.g. inactive features) in key order
        return keys[order], {name: column[order] for name, column in stats.items()}

    def ranked(self, emotion: str, layers: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(layer, feature) keys `[n, 2]` of `layers`, best first by mean attribution, and those means."""
        keys, stats = self._ordered(emotion, layers)
        return keys, stats["attribution"]

    def ranking(
        self, emotion: str, layers: Iterable[int] | None = None, top: int | None = None
    ) -> pd.DataFrame:
        """Features of `layers` (default: all traced) ranked jointly by mean attribution over `emotion`'s items.

        Columns: rank (1 = strongest support of the gold label), layer, feature, attribution (mean), attribution_sd,
        active_share (share of items on which the feature is active at a traced position), mean_activation.
        """
        keys, stats = self._ordered(emotion, layers)
        frame = pd.DataFrame({"layer": keys[:top, 0], "feature": keys[:top, 1]})
        for name, column in stats.items():
            frame[name] = column[:top]
        frame.insert(0, "rank", np.arange(1, len(frame) + 1))
        frame.insert(0, "emotion", emotion)
        return frame

    def subset(self, rows: Sequence[int]) -> Attributions:
        """The attributions of items `rows` only (in that order): a smaller example set without a new pass."""
        rows = np.asarray(rows, dtype=np.int64)
        return Attributions(
            labels=self.labels,
            layers=self.layers,
            positions=self.positions,
            texts=[self.texts[i] for i in rows],
            gold=[self.gold[i] for i in rows],
            values={layer: v[rows] for layer, v in self.values.items()},
            activations={layer: a[rows] for layer, a in self.activations.items()},
            label_logprobs=self.label_logprobs[rows],
            meta=dict(self.meta),
        )

    def matched_random(
        self, emotion: str, layers: Iterable[int], k: int, rng: np.random.Generator
    ) -> dict[int, list[int]]:
        """k features of `layers` matched to `emotion`'s top k on activation frequency and magnitude
        (`matched_draw`), never among that top k, grouped by layer: the random control of equal size."""
        keys, stats = self._ordered(emotion, layers)
        if k >= len(keys):
            raise TracingError(f"k={k} leaves no features outside the top k of layers {list(layers)}")
        pool = np.arange(k, len(keys))
        return _group(keys[matched_draw(_activation_profile(stats), k, pool, rng)])

    def top_features(self, emotion: str, layers: Iterable[int], k: int) -> dict[int, list[int]]:
        """The top-k features of `layers`, ranked jointly, grouped by layer."""
        keys, _ = self.ranked(emotion, layers)
        if k > len(keys):
            raise TracingError(f"k={k} exceeds the {len(keys)} features of layers {list(layers)}")
        return _group(keys[:k])

    def table(self, phases: Mapping[str, Sequence[int]], top: int = 20) -> pd.DataFrame:
        """Top features of every emotion (with items) in every phase: `ranking` rows with a `phase` column."""
        frames = []
        for emotion in self.labels:
            if len(self.items(emotion)) == 0:
                continue
            for phase, layers in phases.items():
                frames.append(self.ranking(emotion, layers, top).assign(phase=phase))
        return pd.concat(frames, ignore_index=True)

    def concentration(self, phases: Mapping[str, Sequence[int]], ks: Sequence[int]) -> pd.DataFrame:
        """Share of an emotion's total positive mean attribution in a phase carried by its top-k features.

        An ablation-free measure of how diffuse an emotion's support is (near 1 at small k: concentrated).
        """
        rows = []
        for emotion in self.labels:
            if len(self.items(emotion)) == 0:
                continue
            for phase, layers in phases.items():
                _, means = self.ranked(emotion, layers)
                positive = np.clip(means, 0, None)
                total = positive.sum()
                for k in ks:
                    share = positive[:k].sum() / total if total > 0 else float("nan")
                    rows.append({"emotion": emotion, "phase": phase, "k": k, "share": share})
        return pd.DataFrame(rows)


def _activation_profile(stats: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per feature `[n, 2]`: the rank (0-1) of its activation frequency and of its mean activation when active,
    the coordinates in which random control features are matched to the top ones."""
    share = stats["active_share"]
    magnitude = np.divide(stats["mean_activation"], share, out=np.zeros_like(share), where=share > 0)
    return np.column_stack([rankdata(share), rankdata(magnitude)]) / len(share)


def matched_draw(
    profile: np.ndarray,
    k: int,
    pool: np.ndarray,
    rng: np.random.Generator,
    neighbours: int = MATCH_NEIGHBOURS,
) -> np.ndarray:
    """Sorted indices of k pool features, one per top feature 0..k-1, each drawn among the `neighbours` pool
    features nearest to it in `profile` (L1 distance; without replacement). A control that matches how often and
    how strongly the top features fire, so that "top beats random" is not "frequent features beat rare ones"."""
    available = np.asarray(pool)
    chosen = []
    for top in range(min(k, len(available))):
        distance = np.abs(profile[available] - profile[top]).sum(axis=1)
        nearest = np.argsort(distance, kind="stable")[:neighbours]
        pick = int(rng.choice(nearest))
        chosen.append(int(available[pick]))
        available = np.delete(available, pick)
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _label_indices(gold: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    position = {label: j for j, label in enumerate(labels)}
    unknown = sorted({g for g in gold if g not in position})
    if unknown:
        raise TracingError(f"gold labels {unknown} are not among the classifier's labels {list(labels)}")
    return np.fromiter((position[g] for g in gold), dtype=np.int64, count=len(gold))


def _margins(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    rows = np.arange(len(gold))
    others = scores.astype(np.float64).copy()
    others[rows, gold] = -np.inf
    return scores[rows, gold] - others.max(axis=1)


def gold_gaps(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Gold score minus the mean of the other labels' scores, per item (the bias-invariant measure)."""
    rows = np.arange(len(gold))
    scores = scores.astype(np.float64)
    others = (scores.sum(axis=1) - scores[rows, gold]) / (scores.shape[1] - 1)
    return scores[rows, gold] - others


def _metrics(scores: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """Gold gap, gold probability (renormalised over labels), gold margin and correctness per item."""
    probs = softmax(scores, axis=1)
    rows = np.arange(len(gold))
    return {
        "gap": gold_gaps(scores, gold),
        "prob": probs[rows, gold],
        "margin": _margins(scores, gold),
        "correct": (scores.argmax(axis=1) == gold).astype(np.float64),
    }


def _store(store: dict[int, Tensor], layer: int):
    """A callback that keeps a tensor as `store[layer]`."""

    def keep(tensor: Tensor) -> None:
        store[layer] = tensor

    return keep


def _group(keys: np.ndarray) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = {}
    for layer, feature in keys:
        grouped.setdefault(int(layer), []).append(int(feature))
    return grouped


def check_phases(phases: Mapping[str, Iterable[int]], available: Sequence[int]) -> dict[str, tuple[int, ...]]:
    if not phases:
        raise TracingError("no phases given; pass e.g. {'early': range(0, 10), ...}")
    checked = {}
    for name, layers in phases.items():
        layers = tuple(int(layer) for layer in layers)
        if not layers:
            raise TracingError(f"phase {name!r} has no layers")
        if layers != tuple(range(layers[0], layers[-1] + 1)):
            raise TracingError(
                f"phase {name!r} must be a contiguous increasing range of layers, not {layers}"
            )
        missing = [layer for layer in layers if layer not in available]
        if missing:
            raise TracingError(
                f"phase {name!r} has layers {missing} without SAEs; SAEs are loaded for layers {list(available)}"
            )
        checked[str(name)] = layers
    return checked


@dataclass
class _Layout:
    """One batch ready for traced forwards: the tokens each forward runs, the frozen cache before them, and the
    traced positions among them."""

    rows: np.ndarray
    tokens: Tensor
    mask: Tensor
    where: Tensor
    context: TransformerLensKeyValueCache
    #: With positions="last" and a reused cache: the attention mask over context + the last token, and the clean
    #: residual entering each block at that token (`[batch, 1, d_model]`, recorded by the first clean forward), so
    #: a forward whose first edit is at layer l starts at block l (the blocks before it compute the clean values).
    resid_in: dict[int, Tensor] | None = None
    full_mask: Tensor | None = None

    @property
    def index(self) -> tuple[Tensor, Tensor]:
        return self.where.nonzero(as_tuple=True)


#: Per layer: the features to set (None: all) and the values `[d_sae]` they are set to.
_Edits = dict[int, SetFeatures]


class FeatureTracer:
    """Attribution and ablation of SAE features in a classifier's model (see the module docstring for the method).

    `saes` maps `blocks.{l}.hook_resid_post` hook names (as `emolib.sae.training.load_saes` returns them) or layer numbers to
    inference SAEs. The model must have no SAEs attached through sae-lens; the tracer adds temporary hooks only.
    """

    def __init__(
        self,
        classifier: EmotionClassifier,
        saes: Mapping[str | int, SAE],
        config: TracerConfig | None = None,
    ) -> None:
        self.classifier = classifier
        self.model = classifier.model
        self.labels = classifier.parts.labels
        self.config = config or TracerConfig()
        if classifier.scoring_mode != "first-token":
            raise TracingError(
                "tracing needs first-token scoring, but the classifier scores whole sequences (labels share first "
                "tokens, or scoring='sequence' was forced)"
            )
        if len(self.labels) < 2:
            raise TracingError(
                "tracing needs at least two labels (the margin compares the gold label to others)"
            )
        if getattr(self.model, "acts_to_saes", None):
            raise TracingError("the model has SAEs attached; remove them (model.reset_saes()) before tracing")
        self.saes = self._check_saes(saes)
        self.layers = tuple(sorted(self.saes))
        ids: list[list[int]] = [[] for _ in self.labels]
        for j, tokens in classifier.sequences:
            ids[j].append(tokens[0])
        self._label_ids = [torch.tensor(sorted(set(t))) for t in ids]
        # every label token once, and where each label's tokens sit among them
        self._vocab_ids = torch.tensor(sorted({int(i) for t in self._label_ids for i in t}))
        slot = {int(token): j for j, token in enumerate(self._vocab_ids)}
        self._label_slots = [torch.tensor([slot[int(i)] for i in t]) for t in self._label_ids]
        self._zeros: dict[int, Tensor] = {}

    def _check_saes(self, saes: Mapping[str | int, SAE]) -> dict[int, SAE]:
        if not saes:
            raise TracingError("no SAEs given")
        n_layers = self.model.cfg.n_layers
        checked = {}
        for key, sae in saes.items():
            hook = f"blocks.{key}.hook_resid_post" if isinstance(key, int) else key
            if not hook.endswith(".hook_resid_post"):
                raise TracingError(f"tracing reads SAEs on blocks.<l>.hook_resid_post, not {hook!r}")
            try:
                layer = resume_layer(hook, n_layers) - 1
            except SAEError as error:
                raise TracingError(str(error)) from error
            declared = sae.cfg.metadata.hook_name
            if declared not in (None, hook):
                raise TracingError(f"the SAE given for {hook} was trained on {declared}")
            if sae.cfg.d_in != self.model.cfg.d_model:
                raise TracingError(
                    f"the SAE at {hook} reads d_in={sae.cfg.d_in}, the model has {self.model.cfg.d_model}"
                )
            if sae.cfg.normalize_activations not in _STATELESS:
                raise TracingError(
                    f"the SAE at {hook} normalises activations with {sae.cfg.normalize_activations!r}; tracing "
                    f"supports {_STATELESS} (fold the normalisation into the weights first)"
                )
            if layer in checked:
                raise TracingError(f"two SAEs for layer {layer}")
            sae.eval()
            checked[layer] = sae
        return checked

    def d_sae(self, layer: int) -> int:
        return self.saes[layer].cfg.d_sae

    def n_features(self, layers: Iterable[int]) -> int:
        return sum(self.d_sae(layer) for layer in layers)

    # ------------------------------------------------------------------------------------------ mechanics

    def _encode(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        if not texts:
            raise TracingError("no texts given")
        empty = [i for i, t in enumerate(texts) if not t or not t.strip()]
        if empty:
            raise TracingError(f"texts at positions {empty[:10]} are empty")
        limit = self.classifier.config.max_text_tokens
        encoded = [encode_suffix(self.classifier.tokenizer, self.classifier.parts, t, limit) for t in texts]
        return [ids for ids, _ in encoded], sum(cut for _, cut in encoded)

    @torch.no_grad()
    def _prefix(self) -> TransformerLensKeyValueCache | None:
        return self.classifier.prefix_cache() if self.config.reuse_cache else None

    def _batches(self, suffixes: list[list[int]], rows: Sequence[int]) -> list[np.ndarray]:
        """Item indices per batch: similar lengths together; one at a time where padding could cross a local
        attention window (as the classifier does)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = rows[np.argsort([len(suffixes[i]) for i in rows], kind="stable")]
        size = self.config.batch_size
        batches = []
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            if len(batch) > 1 and self.classifier._padding_reaches_window([suffixes[i] for i in batch]):
                batches.extend(batch[i : i + 1] for i in range(len(batch)))
            else:
                batches.append(batch)
        return batches

    @torch.no_grad()
    def _layout(self, batch: np.ndarray, suffixes: list[list[int]], prefix) -> _Layout:
        tokens, mask, cache = self.classifier.batch_inputs([suffixes[i] for i in batch], prefix)
        last = self.config.positions == "last"
        if prefix is None:  # tokens are [prefix][pad][suffix]; every forward runs them all
            where = torch.zeros_like(mask, dtype=torch.bool)
            if last:
                where[:, -1] = True
            else:
                where[:, len(self.classifier.prefix_ids) :] = mask[
                    :, len(self.classifier.prefix_ids) :
                ].bool()
        else:
            if (
                last and tokens.shape[1] > 1
            ):  # everything but the last token is upstream of every intervention
                forward_residual(self.model, tokens[:, :-1], mask[:, :-1], cache)
                tokens, mask = tokens[:, -1:], mask[:, -1:]
            where = torch.ones_like(mask, dtype=torch.bool) if last else mask.bool()
        cache.freeze()  # reused by every forward on this batch
        layout = _Layout(batch, tokens, mask, where, cache)
        if prefix is not None and last:  # blocks may be skipped: see `_scores`
            layout.full_mask = cache.append_attention_mask(mask)  # frozen: nothing is stored
        return layout

    def _input_recorders(self, layout: _Layout) -> list:
        """Hooks that store the residual entering every block (at the traced token) in `layout.resid_in`."""
        layout.resid_in = {}
        return block_input_recorders(self.model.cfg.n_layers, layout.resid_in)

    def _hooks(
        self,
        layout: _Layout,
        layers: Iterable[int],
        edits: _Edits | None = None,
        record: dict[int, Tensor] | None = None,
        leaves: dict[int, Tensor] | None = None,
    ) -> list:
        """Splice hooks (`emolib.sae.interventions`) for `layers` at the traced positions of `layout`: gradient
        leaves stored in `leaves`, or codes stored in `record` and `edits` applied."""
        positions = layout.index
        edits = edits or {}
        hooks = []
        for layer in layers:
            sae = self.saes[layer]
            if leaves is not None:
                hook = leaf_hook(sae, positions, _store(leaves, layer))
            elif record is not None or layer in edits:
                keep = _store(record, layer) if record is not None else None
                hook = splice_hook(sae, positions, edits.get(layer), record=keep)
            else:
                continue
            hooks.append((resid_post(layer), hook))
        return hooks

    def _scores(self, layout: _Layout, hooks: list, start: int = 0, normalised: bool = True) -> Tensor:
        """Label log-probabilities `[batch, n_labels]` (first-token scoring) with `hooks` attached.

        `start`: the first layer any hook changes; blocks before it are skipped where the layout holds their
        clean outputs (tested equal to running every block). `normalised=False` leaves out the log-normaliser
        over the vocabulary, common to all labels of a row: margins, probabilities renormalised over labels and
        correctness are unchanged, and only the label tokens' columns of the unembedding are computed (Gemma's
        has 262k).
        """
        skippable = layout.full_mask is not None
        if skippable and layout.resid_in is None:
            if not hooks:  # a clean forward: record the blocks' inputs as it runs
                hooks = self._input_recorders(layout)
            elif start > 0:  # a skipping forward before any clean one: run the clean one first
                with torch.no_grad():
                    self._scores(layout, [], normalised=False)
        with self.model.hooks(fwd_hooks=hooks):
            if start > 0 and skippable:
                resid = resume_at_block(
                    self.model,
                    layout.resid_in,
                    start,
                    attention_mask=layout.full_mask,
                    past_kv_cache=layout.context,
                )
            else:
                resid = self.model(
                    layout.tokens,
                    attention_mask=layout.mask,
                    past_kv_cache=layout.context,
                    stop_at_layer=self.model.cfg.n_layers,
                )
        if normalised:
            first = final_logprobs(self.model, resid[:, -1])
            return torch.stack([torch.logsumexp(first[:, ids], dim=1) for ids in self._label_ids], dim=1)
        logits = final_logits(self.model, resid[:, -1], self._vocab_ids)
        return torch.stack([torch.logsumexp(logits[:, slots], dim=1) for slots in self._label_slots], dim=1)

    def _edits(
        self, features: Mapping[int, Sequence[int] | None], ablation: str, means: Mapping[int, Tensor] | None
    ) -> _Edits:
        if ablation not in ABLATIONS:
            raise TracingError(f"ablation must be one of {ABLATIONS}, not {ablation!r}")
        edits: _Edits = {}
        for layer, chosen in features.items():
            if layer not in self.saes:
                raise TracingError(
                    f"no SAE for layer {layer}; SAEs are loaded for layers {list(self.layers)}"
                )
            d_sae = self.d_sae(layer)
            index = None
            if chosen is not None:
                index = torch.as_tensor(list(chosen), dtype=torch.long)
                if len(index) == 0:
                    continue
                if int(index.min()) < 0 or int(index.max()) >= d_sae:
                    raise TracingError(
                        f"feature indices {list(chosen)} out of range for layer {layer} (d_sae={d_sae})"
                    )
            edits[layer] = SetFeatures(self._reference(layer, ablation, means), index)
        return edits

    def _reference(self, layer: int, ablation: str, means: Mapping[int, Tensor] | None) -> Tensor:
        """The values ablated features are set to: zeros, or the layer's mean activations."""
        dtype = self.saes[layer].W_dec.dtype
        if ablation == "zero":
            return self._zeros.setdefault(layer, torch.zeros(self.d_sae(layer), dtype=dtype))
        if means is None or layer not in means:
            raise TracingError(
                f"mean ablation needs the mean activations of layer {layer}: "
                "pass means=tracer.feature_means(reference_texts)"
            )
        values = torch.as_tensor(means[layer], dtype=dtype)  # no copy when already a tensor of that dtype
        if values.shape != (self.d_sae(layer),):
            raise TracingError(
                f"means[{layer}] has shape {tuple(values.shape)}, expected ({self.d_sae(layer)},)"
            )
        return values

    def _checked_means(self, means, layers: Iterable[int]) -> dict[int, Tensor] | None:
        """`means` as tensors of the SAEs' dtype (converted once), checked for every layer when mean-ablating."""
        if "mean" not in self.config.ablations:
            return None
        return {layer: self._reference(layer, "mean", means) for layer in layers}

    def _check_ks(self, ks: Sequence[int], phases: Mapping[str, tuple[int, ...]]) -> None:
        for name, layers in phases.items():
            available = self.n_features(layers)
            if max(ks) > available:
                raise TracingError(
                    f"k={max(ks)} exceeds the {available} features of phase {name!r} (layers {list(layers)})"
                )

    def _check_attributions(self, attributions: Attributions, phases: Mapping[str, tuple[int, ...]]) -> None:
        if attributions.positions != self.config.positions:
            raise TracingError(
                f"attributions traced positions={attributions.positions!r}, this tracer {self.config.positions!r}"
            )
        if tuple(attributions.labels) != tuple(self.labels):
            raise TracingError(
                f"attributions are over labels {attributions.labels}, the tracer's {self.labels}"
            )
        for layers in phases.values():
            attributions._check_layers(layers)

    def _progress(self, items, desc: str):
        return tqdm(items, desc=desc, disable=not self.config.progress, leave=False)

    # ------------------------------------------------------------------------------------------------ API

    @torch.no_grad()
    def run(
        self,
        texts: Sequence[str],
        features: Mapping[int, Sequence[int] | None] | None = None,
        *,
        ablation: str = "zero",
        means: FeatureMeans | None = None,
    ) -> Predictions:
        """Label scores with `features` ablated at the traced positions (`{layer: feature indices}`, None = all).

        Without features this is the classifier's restricted scoring (equal to `classifier.predict`, tested).
        """
        suffixes, truncated = self._encode(texts)
        edits = self._edits(features or {}, ablation, means)
        prefix = self._prefix()
        scores = np.zeros((len(texts), len(self.labels)))
        for batch in self._batches(suffixes, range(len(texts))):
            layout = self._layout(batch, suffixes, prefix)
            scores[batch] = (
                self._scores(layout, self._hooks(layout, sorted(edits), edits), first_edited_block(edits))
                .double()
                .cpu()
                .numpy()
            )
        return Predictions(
            self.labels, scores, "first-token", truncated, meta={"features": dict(features or {})}
        )

    @torch.no_grad()
    def feature_means(self, texts: Sequence[str]) -> dict[int, Float[Tensor, " d_sae"]]:
        """Mean activation of every feature at the traced positions over `texts` (the mean-ablation reference).

        With positions="suffix" the mean is over all traced tokens of all texts.
        """
        suffixes, _ = self._encode(texts)
        prefix = self._prefix()
        sums = {layer: torch.zeros(self.d_sae(layer), dtype=torch.float64) for layer in self.layers}
        count = 0
        for batch in self._batches(suffixes, range(len(texts))):
            layout = self._layout(batch, suffixes, prefix)
            record: dict[int, Tensor] = {}
            self._scores(layout, self._hooks(layout, self.layers, record=record), normalised=False)
            for layer, acts in record.items():
                sums[layer] += acts.double().sum(0)
            count += int(layout.where.sum())
        return {layer: (total / count).float() for layer, total in sums.items()}

    def attribute(self, texts: Sequence[str], gold: Sequence[str]) -> Attributions:
        """Activation x gradient of each item's gold gap for every feature of every traced layer.

        One forward and one backward pass per batch for all layers together.
        """
        if len(texts) != len(gold):
            raise TracingError(f"{len(texts)} texts but {len(gold)} gold labels")
        gold_index = _label_indices(gold, self.labels)
        suffixes, truncated = self._encode(texts)
        prefix = self._prefix()
        n = len(texts)
        values = {layer: np.zeros((n, self.d_sae(layer)), dtype=np.float32) for layer in self.layers}
        activations = {layer: np.zeros((n, self.d_sae(layer)), dtype=np.float32) for layer in self.layers}
        scores_out = np.zeros((n, len(self.labels)))
        for batch in self._progress(self._batches(suffixes, range(n)), "attributing"):
            layout = self._layout(batch, suffixes, prefix)
            leaves: dict[int, Tensor] = {}
            with torch.enable_grad():
                scores = self._scores(layout, self._hooks(layout, self.layers, leaves=leaves))
                target = torch.as_tensor(gold_index[batch])
                rows = torch.arange(len(batch))
                own = scores[rows, target]
                gap = own - (scores.sum(dim=1) - own) / (scores.shape[1] - 1)
                grads = torch.autograd.grad(
                    gap.sum(), [leaves[layer] for layer in self.layers], allow_unused=True
                )
            item = layout.index[0]
            for layer, grad in zip(self.layers, grads, strict=True):
                acts = leaves[layer].detach()
                attr = acts * grad if grad is not None else torch.zeros_like(acts)
                per_item = torch.zeros(len(batch), acts.shape[1], dtype=acts.dtype)
                values[layer][batch] = per_item.index_add(0, item, attr).cpu().numpy()
                activations[layer][batch] = torch.zeros_like(per_item).index_add(0, item, acts).cpu().numpy()
            scores_out[batch] = scores.detach().double().cpu().numpy()
        return Attributions(
            labels=self.labels,
            layers=self.layers,
            positions=self.config.positions,
            texts=list(texts),
            gold=list(gold),
            values=values,
            activations=activations,
            label_logprobs=scores_out,
            meta={"n_truncated": truncated},
        )

    def _plans(
        self,
        attributions: Attributions,
        emotion: str,
        phases: Mapping[str, tuple[int, ...]],
        means: Mapping[int, Tensor] | None,
        shuffled: Attributions | None = None,
    ) -> list[tuple[dict, _Edits]]:
        """Every ablation of one emotion: (row labels, edits) for top-k, random-k and whole-phase conditions."""
        cfg = self.config
        plans = []
        for phase_index, (phase, layers) in enumerate(phases.items()):
            keys, stats = attributions._ordered(emotion, layers)
            if cfg.random_pool == "active":
                active = stats["active_share"] > 0
            else:
                active = np.ones(len(keys), dtype=bool)
            profile = _activation_profile(stats)
            for ablation in cfg.ablations:
                base = {"emotion": emotion, "phase": phase, "ablation": ablation}
                for k in cfg.ks:
                    plans.append(
                        (
                            {**base, "condition": "top", "k": k, "seed": -1, "n_features": k},
                            self._edits(_group(keys[:k]), ablation, means),
                        )
                    )
                if shuffled is not None and ablation in cfg.control_ablations:
                    control, _ = shuffled._ordered(emotion, layers)
                    for k in cfg.ks:
                        plans.append(
                            (
                                {**base, "condition": "shuffled", "k": k, "seed": -1, "n_features": k},
                                self._edits(_group(control[:k]), ablation, means),
                            )
                        )
                for seed in cfg.random_seeds:
                    for k in cfg.ks:
                        pool = np.flatnonzero(active)
                        pool = pool[pool >= k]  # never the top k being compared
                        emotion_index = self.labels.index(emotion)
                        rng = np.random.default_rng([cfg.seed, seed, k, emotion_index, phase_index])
                        if cfg.random_pool == "matched":
                            chosen = matched_draw(profile, k, pool, rng)
                        else:
                            chosen = np.sort(rng.choice(pool, size=min(k, len(pool)), replace=False))
                        plans.append(
                            (
                                {
                                    **base,
                                    "condition": "random",
                                    "k": k,
                                    "seed": seed,
                                    "n_features": len(chosen),
                                },
                                self._edits(_group(keys[chosen]), ablation, means),
                            )
                        )
                whole = self.n_features(layers)
                plans.append(
                    (
                        {**base, "condition": "whole", "k": whole, "seed": -1, "n_features": whole},
                        self._edits(dict.fromkeys(layers), ablation, means),
                    )
                )
        return plans

    def _prepare(self, attributions, texts, gold, phases, means, emotions, check_means: bool = True):
        if len(texts) != len(gold):
            raise TracingError(f"{len(texts)} texts but {len(gold)} gold labels")
        gold_index = _label_indices(gold, self.labels)
        phases = check_phases(phases, self.layers)
        self._check_attributions(attributions, phases)
        if check_means:
            means = self._checked_means(
                means, sorted({layer for layers in phases.values() for layer in layers})
            )
        if emotions is None:
            emotions = [e for e in self.labels if e in set(gold) and e in set(attributions.gold)]
        for emotion in emotions:
            if emotion not in self.labels:
                raise TracingError(f"unknown emotion {emotion!r}; labels are {list(self.labels)}")
            if emotion not in set(attributions.gold):
                raise TracingError(f"the attributions have no items of {emotion!r} to rank features by")
        return gold_index, phases, list(emotions), means

    @torch.no_grad()
    def ablation_curves(
        self,
        attributions: Attributions,
        texts: Sequence[str],
        gold: Sequence[str],
        phases: Mapping[str, Iterable[int]],
        *,
        means: FeatureMeans | None = None,
        emotions: Sequence[str] | None = None,
        shuffled: Attributions | None = None,
    ) -> pd.DataFrame:
        """Per-item effects of ablating each emotion's top-k features (ranked on `attributions`) per phase.

        Each emotion's held-out items (`texts` with that `gold` label) are run with, per phase and ablation, the
        top-k features for every k in `config.ks`, k random features per seed, and the whole phase ablated. With
        `shuffled` (attributions of the same ranking items under permuted gold labels), also the top-k features of
        that ranking, for the ablations in `config.control_ablations`: a ranking that knows no emotion, so top
        features beating it are specific to the emotion, not merely important for any answer.
        Returns one row per item and condition: emotion, phase, ablation, condition (`CONDITIONS`), k,
        seed (-1 unless random), n_features, item (index into `texts`), clean_/ablated `gap`, `prob`, `margin`,
        `correct`, and the drops `drop_gap`, `drop_prob`, `drop_margin`, `drop_correct` (clean minus ablated).
        Summarise with `summarize_effects` and `k50_table`.
        """
        gold_index, phases, emotions, means = self._prepare(
            attributions, texts, gold, phases, means, emotions
        )
        self._check_ks(self.config.ks, phases)
        suffixes, _ = self._encode(texts)
        prefix = self._prefix()
        frames = []
        for emotion in self._progress(emotions, "ablating"):
            items = np.flatnonzero(np.asarray(gold) == emotion)
            if len(items) == 0:
                raise TracingError(f"no held-out items of {emotion!r}")
            plans = self._plans(attributions, emotion, phases, means, shuffled)
            clean = np.zeros((len(texts), len(self.labels)))
            ablated = [np.zeros((len(texts), len(self.labels))) for _ in plans]
            for batch in self._batches(suffixes, items):
                layout = self._layout(batch, suffixes, prefix)
                clean[batch] = self._scores(layout, [], normalised=False).double().cpu().numpy()
                for p, (_, edits) in enumerate(plans):
                    scores = self._scores(
                        layout,
                        self._hooks(layout, sorted(edits), edits),
                        first_edited_block(edits),
                        normalised=False,
                    )
                    ablated[p][batch] = scores.double().cpu().numpy()
            before = _metrics(clean[items], gold_index[items])
            for (labels, _), scores in zip(plans, ablated, strict=True):
                after = _metrics(scores[items], gold_index[items])
                frame = pd.DataFrame({**labels, "item": items})
                for name in ("gap", "prob", "margin", "correct"):
                    frame[f"clean_{name}"] = before[name]
                    frame[name] = after[name]
                    frame[f"drop_{name}"] = before[name] - after[name]
                frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    @torch.no_grad()
    def cross_emotion(
        self,
        attributions: Attributions,
        texts: Sequence[str],
        gold: Sequence[str],
        phases: Mapping[str, Iterable[int]],
        k: int | Mapping[str, int],
        *,
        means: FeatureMeans | None = None,
        sources: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """How ablating emotion A's top-k features (per phase and ablation) moves predictions of items of every B.

        `k` is one number or one per source emotion (e.g. its k50). Returns one row per phase, ablation, source A,
        target B (gold label of the items) and label C: n_items, the mean renormalised probability of C among
        B's items clean and ablated (`clean_prob`, `prob`, `prob_shift` = ablated - clean), and the share of B's
        items predicted as C (`clean_share`, `share`, `share_shift`). See `confusion_shift` and `gold_drop_matrix`.
        """
        gold_index, phases, sources, means = self._prepare(attributions, texts, gold, phases, means, sources)
        if isinstance(k, Mapping) and (missing := [s for s in sources if s not in k]):
            raise TracingError(f"k has no value for sources {missing}")
        ks = {s: k[s] if isinstance(k, Mapping) else k for s in sources}
        bad = {s: v for s, v in ks.items() if not np.isfinite(v) or int(v) != v}
        if bad:
            raise TracingError(f"k must be a whole number per source, got {bad} (k50 may be inf or NaN)")
        ks = {s: int(v) for s, v in ks.items()}
        for name, layers in phases.items():
            for source, value in ks.items():
                if not 1 <= value <= self.n_features(layers):
                    raise TracingError(
                        f"k={value} for {source!r} is outside 1..{self.n_features(layers)} in phase {name!r}"
                    )
        plans = []
        for phase, layers in phases.items():
            for ablation in self.config.ablations:
                for source in sources:
                    keys, _ = attributions.ranked(source, layers)
                    features = _group(keys[: ks[source]])
                    labels = {"phase": phase, "ablation": ablation, "source": source, "k": ks[source]}
                    plans.append((labels, self._edits(features, ablation, means)))
        suffixes, _ = self._encode(texts)
        prefix = self._prefix()
        clean = np.zeros((len(texts), len(self.labels)))
        ablated = [np.zeros((len(texts), len(self.labels))) for _ in plans]
        for batch in self._progress(self._batches(suffixes, range(len(texts))), "cross-emotion"):
            layout = self._layout(batch, suffixes, prefix)
            clean[batch] = self._scores(layout, [], normalised=False).double().cpu().numpy()
            for p, (_, edits) in enumerate(plans):
                ablated[p][batch] = (
                    self._scores(
                        layout,
                        self._hooks(layout, sorted(edits), edits),
                        first_edited_block(edits),
                        normalised=False,
                    )
                    .double()
                    .cpu()
                    .numpy()
                )

        def distribution(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            probs = softmax(scores, axis=1)
            shares = np.eye(len(self.labels))[scores.argmax(axis=1)]
            return probs, shares

        clean_probs, clean_shares = distribution(clean)
        rows = []
        targets = [j for j in range(len(self.labels)) if (gold_index == j).any()]
        for (labels, _), scores in zip(plans, ablated, strict=True):
            probs, shares = distribution(scores)
            for j in targets:
                items = gold_index == j
                for c, label in enumerate(self.labels):
                    rows.append(
                        {
                            **labels,
                            "target": self.labels[j],
                            "label": label,
                            "n_items": int(items.sum()),
                            "clean_prob": clean_probs[items, c].mean(),
                            "prob": probs[items, c].mean(),
                            "prob_shift": probs[items, c].mean() - clean_probs[items, c].mean(),
                            "clean_share": clean_shares[items, c].mean(),
                            "share": shares[items, c].mean(),
                            "share_shift": shares[items, c].mean() - clean_shares[items, c].mean(),
                        }
                    )
        return pd.DataFrame(rows)

    @torch.no_grad()
    def verify(
        self,
        ranking: Attributions,
        held_out: Attributions,
        phases: Mapping[str, Iterable[int]],
        *,
        n_top: int | None = None,
        emotions: Sequence[str] | None = None,
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Do attributions predict single-feature ablation effects? Per emotion and phase, the top `n_top`
        (default `config.n_verify`) features of `ranking` with a non-zero mean attribution (features never active
        on the ranking items are left out: their exact ties would inflate the correlation) are zero-ablated one at
        a time on `held_out`'s items of that emotion.

        Returns (per-feature table: emotion, phase, rank, layer, feature, predicted = mean attribution on the
        held-out items, measured = mean gap drop, measured_prob = mean gold-probability drop; summary: emotion,
        phase, n_features, spearman, p_value, sign_agreement).
        """
        n_top = n_top or self.config.n_verify
        gold_index, phases, emotions, _ = self._prepare(
            ranking, held_out.texts, held_out.gold, phases, None, emotions, check_means=False
        )
        self._check_attributions(held_out, phases)
        suffixes, _ = self._encode(held_out.texts)
        prefix = self._prefix()
        rows = []
        for emotion in self._progress(emotions, "verifying"):
            items = held_out.items(emotion)
            if len(items) == 0:
                raise TracingError(f"no held-out items of {emotion!r}")
            features = []  # (phase, rank, layer, feature, predicted)
            for phase, layers in phases.items():
                keys, means = ranking.ranked(emotion, layers)
                top = keys[means != 0][
                    :n_top
                ]  # inactive features (exact zeros, tied) would inflate the correlation
                for rank, (layer, feature) in enumerate(top, start=1):
                    predicted = float(held_out.values[int(layer)][items, int(feature)].mean())
                    features.append((phase, rank, int(layer), int(feature), predicted))
            clean = np.zeros((len(held_out.texts), len(self.labels)))
            ablated = [np.zeros_like(clean) for _ in features]
            for batch in self._batches(suffixes, items):
                layout = self._layout(batch, suffixes, prefix)
                clean[batch] = self._scores(layout, [], normalised=False).double().cpu().numpy()
                for p, (_, _, layer, feature, _) in enumerate(features):
                    edits = self._edits({layer: [feature]}, "zero", None)
                    ablated[p][batch] = (
                        self._scores(layout, self._hooks(layout, [layer], edits), layer, normalised=False)
                        .double()
                        .cpu()
                        .numpy()
                    )
            before = _metrics(clean[items], gold_index[items])
            for (phase, rank, layer, feature, predicted), scores in zip(features, ablated, strict=True):
                after = _metrics(scores[items], gold_index[items])
                rows.append(
                    {
                        "emotion": emotion,
                        "phase": phase,
                        "rank": rank,
                        "layer": layer,
                        "feature": feature,
                        "predicted": predicted,
                        "measured": float((before["gap"] - after["gap"]).mean()),
                        "measured_prob": float((before["prob"] - after["prob"]).mean()),
                    }
                )
        per_feature = pd.DataFrame(rows)
        summary = []
        for (emotion, phase), group in per_feature.groupby(["emotion", "phase"], sort=False):
            if len(group) > 1 and group["predicted"].nunique() > 1 and group["measured"].nunique() > 1:
                result = spearmanr(group["predicted"], group["measured"])
                rho, p_value = float(result.statistic), float(result.pvalue)
            else:
                rho = p_value = float("nan")
            agree = float((np.sign(group["predicted"]) == np.sign(group["measured"])).mean())
            summary.append(
                {
                    "emotion": emotion,
                    "phase": phase,
                    "n_features": len(group),
                    "spearman": rho,
                    "p_value": p_value,
                    "sign_agreement": agree,
                }
            )
        return per_feature, pd.DataFrame(summary)

"""Label-blind steering of emotion recognition: plans fixed before any test item is seen, their hooks, and a scorer
that runs each plan only from its first edited block.

*What a plan does (our definitions; the paper does not publish its formula).* A `SteeringPlan` is data: the model,
the SAEs it reads, the features per layer, a variant and a strength `alpha`. It is one intervention, the same for
every input, applied at every position of the prompt (instruction, text and answer cue) through the shared hooks of
`emolib.sae.interventions`, except attention-sink positions whose residual norm is an outlier of its sequence (the
SAEs' training rule, `SteeringPlan.outlier_factor`):

- "gain": each chosen feature's code times `1 + alpha` where it fires (inactive features stay 0), spliced in with
  the SAE's error term kept: the residual moves by `alpha * a_f * W_dec[f]` exactly where feature f is active, so
  it amplifies whatever emotion evidence the input already carries and leaves other inputs alone;
- "clamp": each chosen feature set to `(1 + alpha)` times its typical activation (its mean when active on the
  examples) where it fires;
- "add": `alpha * typical_f * W_dec[f]` added to the residual at every position whatever the input (a fixed
  vector: it can only shift every input the same way, much like a label prior);
- "subspace" (the DiffMean baseline): `x + alpha * P (x - c)` at one layer, `P` the projection onto the span of
  the emotions' mean-difference directions (class mean minus the mean of all examples, orthonormalised) and `c` the
  examples' mean: the residual's emotion-discriminating component is amplified, the equal-data analogue of "gain"
  without SAEs.

Nothing in a plan depends on the item it is applied to beyond that item's own residual: predictions under a plan
never see a test item's label.

*Scoring from the first edited block.* `SteeredScorer` tokenises a fixed set of texts once, runs the clean model
over them once and records the residual entering every block at every position. A plan whose first hook sits after
block `l` leaves blocks before `l` exactly clean, so each plan runs only blocks `l..`, of the shared instruction
prefix (once, from its clean residual there; the clean keys and values of the earlier blocks are kept) and of every
text. The first-token label scores are those of
`emolib.lm.classify`; equality with running every block is tested.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sae_lens import SAE
from scipy.optimize import minimize
from scipy.special import log_softmax
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from emolib.lm.batching import expanded_cache, final_logprobs, prefix_cache
from emolib.lm.classify import EmotionClassifier
from emolib.lm.prompts import encode_suffix
from emolib.sae.interventions import (
    ClampFeatures,
    Hook,
    Positions,
    ScaleFeatures,
    block_input_recorders,
    decoder_hook,
    edit_hooks,
    feature_index,
    outside_norm_outliers,
    position_index,
    resid_post,
    resume_at_block,
)
from emolib.stats import _f1_from_counts

#: Variants of SAE-feature steering (module docstring) and the residual-subspace variant of DiffMean.
FEATURE_VARIANTS = ("gain", "clamp", "add")
VARIANTS = (*FEATURE_VARIANTS, "subspace")

#: Bump when the meaning of a saved plan changes.
PLAN_FORMAT = "1"


class SteeringError(ValueError):
    """A plan that does not fit a model or its SAEs, a malformed plan file, bad steering inputs."""


# ------------------------------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class SteeringPlan:
    """One label-blind intervention (module docstring), saved and read as JSON.

    `features[layer]` are SAE feature indices with `typical[layer]` their typical activations (for "clamp" and
    "add"); `basis` (`[m, d_model]`, orthonormal rows), `center` (`[d_model]`) and `layer` define a "subspace"
    plan. `sae_source` names the SAEs the features index (their cache folder or release), so that a plan is never
    applied to other SAEs. `strength` 0 is the model itself. `meta` records how the plan was made.
    """

    model: str
    method: str
    variant: str
    strength: float
    sae_source: str | None = None
    features: dict[int, tuple[int, ...]] = field(default_factory=dict)
    typical: dict[int, tuple[float, ...]] = field(default_factory=dict)
    layer: int | None = None
    basis: tuple[tuple[float, ...], ...] | None = None
    center: tuple[float, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: Positions whose residual norm exceeds this multiple of their row's median are left alone (None: none are):
    #: attention sinks such as the first token, which the SAEs never saw (`outside_norm_outliers`).
    outlier_factor: float | None = 5.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise SteeringError(f"variant must be one of {VARIANTS}, not {self.variant!r}")
        if self.variant == "subspace":
            if self.layer is None or self.basis is None or self.center is None:
                raise SteeringError("a subspace plan needs a layer, a basis and a center")
        else:
            if self.sae_source is None:
                raise SteeringError(f"a {self.variant!r} plan needs the name of its SAEs (sae_source)")
            for layer, chosen in self.features.items():
                if len(self.typical.get(layer, ())) != len(chosen):
                    raise SteeringError(
                        f"layer {layer}: {len(chosen)} features but not as many typical values"
                    )

    # ------------------------------------------------------------------------------------------ reading

    @property
    def layers(self) -> list[int]:
        """The layers whose output the plan changes."""
        if self.variant == "subspace":
            return [int(self.layer)]
        return sorted(layer for layer, chosen in self.features.items() if chosen)

    @property
    def first_block(self) -> int:
        """The first block whose output the plan changes (0 when it changes nothing: nothing to skip)."""
        return min(self.layers) if self.layers and self.strength != 0 else 0

    @property
    def n_features(self) -> int:
        return sum(len(chosen) for chosen in self.features.values())

    def with_strength(self, strength: float) -> SteeringPlan:
        """The same plan at another strength."""
        return SteeringPlan(**{**self._fields(), "strength": float(strength)})

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    # ------------------------------------------------------------------------------------------ applying

    def check(
        self, model_name: str, d_model: int, saes: Mapping[int, SAE] | None, sae_source: str | None
    ) -> None:
        """Raise `SteeringError` unless the plan fits this model and these SAEs (the names, layers, widths)."""
        if model_name != self.model:
            raise SteeringError(f"the plan was made for model {self.model!r}, not {model_name!r}")
        if self.variant == "subspace":
            if len(self.center) != d_model or any(len(row) != d_model for row in self.basis):
                raise SteeringError(f"the plan's subspace has the wrong width for d_model={d_model}")
            return
        if sae_source != self.sae_source:
            raise SteeringError(
                f"the plan's features index the SAEs {self.sae_source!r}, but the SAEs given are {sae_source!r}"
            )
        saes = saes or {}
        missing = [layer for layer in self.layers if layer not in saes]
        if missing:
            raise SteeringError(
                f"the plan edits layers {missing}, which have no SAE (SAEs for {sorted(saes)})"
            )
        for layer in self.layers:
            d_sae = saes[layer].cfg.d_sae
            if max(self.features[layer]) >= d_sae or min(self.features[layer]) < 0:
                raise SteeringError(
                    f"layer {layer}: feature indices out of range for an SAE of {d_sae} features"
                )

    def hooks(self, saes: Mapping[int, SAE] | None = None) -> list[tuple[str, Hook]]:
        """TransformerLens forward hooks applying the plan at every position (none at strength 0)."""
        if self.strength == 0 or not self.layers:
            return []
        where = None if self.outlier_factor is None else outside_norm_outliers(self.outlier_factor)
        if self.variant == "subspace":
            hook = subspace_hook(self.basis, self.center, self.strength, where)
            return [(resid_post(int(self.layer)), hook)]
        saes = saes or {}
        if self.variant == "add":
            return [
                (
                    resid_post(layer),
                    decoder_hook(
                        saes[layer],
                        self.features[layer],
                        torch.as_tensor(self.typical[layer]) * self.strength,
                        where,
                    ),
                )
                for layer in self.layers
            ]
        edits = {}
        for layer in self.layers:
            index = feature_index(self.features[layer])
            if self.variant == "gain":
                edits[layer] = ScaleFeatures(self.strength, index)
            else:
                value = torch.as_tensor(self.typical[layer], dtype=torch.float32) * (1 + self.strength)
                edits[layer] = ClampFeatures(value, index, only_active=True)
        return edit_hooks(saes, edits, where)

    # ------------------------------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["features"] = {str(k): list(v) for k, v in self.features.items()}
        payload["typical"] = {str(k): list(v) for k, v in self.typical.items()}
        payload["basis"] = None if self.basis is None else [list(row) for row in self.basis]
        payload["center"] = None if self.center is None else list(self.center)
        return {"format": PLAN_FORMAT, **payload}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any], source: str = "the plan") -> SteeringPlan:
        """A plan from `to_json()`'s output; errors name `source` (e.g. the file) and the missing key."""
        if payload.get("format") != PLAN_FORMAT:
            raise SteeringError(
                f"{source} has plan format {payload.get('format')!r}, expected {PLAN_FORMAT!r}"
            )
        try:
            return cls(
                model=str(payload["model"]),
                method=str(payload["method"]),
                variant=str(payload["variant"]),
                strength=float(payload["strength"]),
                sae_source=payload.get("sae_source"),
                features={int(k): tuple(int(f) for f in v) for k, v in payload.get("features", {}).items()},
                typical={int(k): tuple(float(t) for t in v) for k, v in payload.get("typical", {}).items()},
                layer=None if payload.get("layer") is None else int(payload["layer"]),
                basis=None
                if payload.get("basis") is None
                else tuple(tuple(map(float, r)) for r in payload["basis"]),
                center=None if payload.get("center") is None else tuple(map(float, payload["center"])),
                meta=dict(payload.get("meta", {})),
                outlier_factor=None
                if payload.get("outlier_factor") is None
                else float(payload["outlier_factor"]),
            )
        except KeyError as error:
            raise SteeringError(f"{source} lacks the key {error.args[0]!r}") from error

    def save(self, path: Path | str) -> Path:
        """Write the plan as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> SteeringPlan:
        """A plan saved with `save`; errors name the file."""
        path = Path(path)
        if not path.exists():
            raise SteeringError(f"no steering plan at {path}")
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SteeringError(
                f"{path} is not JSON ({error}); write plans with SteeringPlan.save"
            ) from error
        return cls.from_json(payload, source=str(path))


def subspace_hook(
    basis: Sequence[Sequence[float]] | Tensor,
    center: Sequence[float] | Tensor,
    alpha: float,
    positions: Positions = None,
) -> Hook:
    """A hook adding `alpha * P (x - center)` at `positions` (None: every position), `P` the projection onto the
    rows of `basis` (orthonormal, `[m, d_model]`)."""
    rows = torch.as_tensor(basis, dtype=torch.float32)
    mean = torch.as_tensor(center, dtype=torch.float32)

    def hook(resid: Tensor, hook: Any) -> Tensor:
        index = position_index(resid, positions)
        picked = resid[index].float()
        change = alpha * ((picked - mean) @ rows.T) @ rows
        return resid.index_put(index, resid[index] + change.to(resid.dtype))

    return hook


# ------------------------------------------------------------------------------------------ making plans


def group_features(keys: Sequence[tuple[int, int]] | np.ndarray) -> dict[int, tuple[int, ...]]:
    """(layer, feature) pairs as sorted, de-duplicated features per layer."""
    grouped: dict[int, set[int]] = {}
    for layer, feature in keys:
        grouped.setdefault(int(layer), set()).add(int(feature))
    return {layer: tuple(sorted(chosen)) for layer, chosen in sorted(grouped.items())}


def typical_activations(
    features: Mapping[int, Sequence[int]], activations: Mapping[int, np.ndarray]
) -> dict[int, tuple[float, ...]]:
    """Each feature's mean activation where it is active on the examples (`activations[layer]` `[n, d_sae]`);
    a feature that never fires there gets its layer's median typical value (or 1 when none fires), so that "add"
    and "clamp" never scale by zero silently."""
    out = {}
    for layer, chosen in features.items():
        acts = np.asarray(activations[layer])[:, list(chosen)]
        active = acts > 0
        sums, counts = np.where(active, acts, 0).sum(0), active.sum(0)
        values = np.divide(sums, counts, out=np.full(len(chosen), np.nan), where=counts > 0)
        fallback = float(np.nanmedian(values)) if np.isfinite(values).any() else 1.0
        out[layer] = tuple(float(v) if np.isfinite(v) else fallback for v in values)
    return out


def diffmean_subspace(
    resid: Float[np.ndarray, "n d_model"], gold: Sequence[str], labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis `[m, d_model]` of the emotions' mean-difference directions (class mean minus the mean of
    all examples, classes present only) and that mean: the subspace DiffMean steering amplifies."""
    resid = np.asarray(resid, dtype=np.float64)
    gold = np.asarray(gold)
    center = resid.mean(0)
    directions = [resid[gold == label].mean(0) - center for label in labels if (gold == label).any()]
    if not directions:
        raise SteeringError("no examples to take class means of")
    q, r = np.linalg.qr(np.stack(directions, axis=1))
    keep = np.abs(np.diag(r)) > 1e-8 * max(1.0, float(np.abs(r).max()))
    return q[:, keep].T, center


def fit_label_bias(
    label_logprobs: np.ndarray, gold: Sequence[str], labels: Sequence[str], l2: float = 0.1
) -> np.ndarray:
    """Per-label offsets `b` that make `softmax(scores + b)` fit the examples' labels (cross-entropy with an L2
    penalty `l2 * |b|^2`, offsets centred): the bias correction a practitioner fits on a few labelled examples."""
    scores = np.asarray(label_logprobs, dtype=np.float64)
    index = {label: j for j, label in enumerate(labels)}
    unknown = sorted({g for g in gold if g not in index})
    if unknown:
        raise SteeringError(f"example labels {unknown} are not among {list(labels)}")
    y = np.array([index[g] for g in gold])

    def loss(b: np.ndarray) -> tuple[float, np.ndarray]:
        logp = log_softmax(scores + b, axis=1)
        p = np.exp(logp)
        onehot = np.eye(len(labels))[y]
        value = -logp[np.arange(len(y)), y].mean() + l2 * (b @ b)
        grad = (p - onehot).mean(0) + 2 * l2 * b
        return float(value), grad

    fitted = minimize(loss, np.zeros(len(labels)), jac=True, method="L-BFGS-B").x
    return fitted - fitted.mean()


# ------------------------------------------------------------------------------------------ scoring


@dataclass
class _Batch:
    """One batch of the scorer: its rows, tokens and mask, the clean residual entering the kept blocks (every
    position), the clean residual entering every block at the last position, and the clean label scores."""

    rows: np.ndarray
    tokens: Tensor
    mask: Tensor
    block_inputs: dict[int, Tensor]
    last_by_layer: dict[int, Tensor]
    last_scores: np.ndarray


class SteeredScorer:
    """First-token label scores of a fixed set of texts under any number of plans (module docstring).

    The clean pass records the residual entering blocks `from_block..` at every position (the memory is items x
    tokens x those blocks x d_model); `clean()` gives the clean scores, `residual(layer)` the clean residual after
    block `layer` at each text's last position (for DiffMean and probes). `resume=False` runs every block for
    every plan (the reference the fast path is tested against).
    """

    def __init__(
        self,
        classifier: EmotionClassifier,
        texts: Sequence[str],
        *,
        from_block: int = 0,
        batch_size: int = 32,
        resume: bool = True,
        progress: bool = False,
    ) -> None:
        if classifier.scoring_mode != "first-token":
            raise SteeringError(
                "steering scores need first-token scoring (labels with distinct first tokens)"
            )
        if not texts:
            raise SteeringError("no texts to score")
        self.classifier = classifier
        self.model = classifier.model
        self.labels = classifier.parts.labels
        self.n = len(texts)
        self.from_block = int(from_block)
        self.resume = resume
        self.progress = progress
        ids: list[set[int]] = [set() for _ in self.labels]
        for j, tokens in classifier.sequences:
            ids[j].add(tokens[0])
        self._label_ids = [torch.tensor(sorted(t)) for t in ids]
        limit = classifier.config.max_text_tokens
        encoded = [encode_suffix(classifier.tokenizer, classifier.parts, t, limit) for t in texts]
        self.n_truncated = sum(cut for _, cut in encoded)
        suffixes = [ids for ids, _ in encoded]
        order = np.argsort([len(s) for s in suffixes], kind="stable")
        groups = []
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) > 1 and classifier._padding_reaches_window([suffixes[i] for i in batch]):
                groups.extend(batch[i : i + 1] for i in range(len(batch)))
            else:
                groups.append(batch)
        self._suffixes = suffixes
        self._prefix_inputs: dict[int, Tensor] = {}
        if resume:  # the shared prefix's residual entering each kept block, so plans re-run only those blocks
            store: dict[int, Tensor] = {}
            n_layers = self.model.cfg.n_layers
            with self.model.hooks(fwd_hooks=block_input_recorders(n_layers, store)):
                self._clean_prefix = prefix_cache(self.model, classifier.prefix_ids, n_layers)
            self._prefix_inputs = {layer: store[layer] for layer in range(self.from_block, n_layers)}
        self._batches = [self._record(rows) for rows in self._progress(groups, "clean pass")]
        self._clean = self._collect([b.last_scores for b in self._batches])

    def _progress(self, items: Sequence, desc: str):
        return tqdm(items, desc=desc, disable=not self.progress, leave=False)

    @torch.no_grad()
    def _record(self, rows: np.ndarray) -> _Batch:
        prefix = self.classifier.prefix_cache()
        tokens, mask, cache = self.classifier.batch_inputs([self._suffixes[i] for i in rows], prefix)
        store: dict[int, Tensor] = {}
        n_layers = self.model.cfg.n_layers
        hooks = block_input_recorders(n_layers, store)
        with self.model.hooks(fwd_hooks=hooks):
            resid = self.model(tokens, attention_mask=mask, past_kv_cache=cache, stop_at_layer=n_layers)
        kept = {layer: store[layer] for layer in range(self.from_block, n_layers)} if self.resume else {}
        last = {layer: store[layer][:, -1].clone() for layer in range(1, n_layers)}
        last[n_layers] = resid[:, -1].clone()
        return _Batch(rows, tokens, mask, kept, last, self._label_scores(resid[:, -1]))

    def _label_scores(self, final_resid: Tensor) -> np.ndarray:
        first = final_logprobs(self.model, final_resid)
        scores = torch.stack([torch.logsumexp(first[:, ids], dim=1) for ids in self._label_ids], dim=1)
        return scores.double().cpu().numpy()

    def _collect(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((self.n, parts[0].shape[1]) if parts[0].ndim == 2 else (self.n,))
        for batch, values in zip(self._batches, parts, strict=True):
            out[batch.rows] = values
        return out

    def clean(self) -> np.ndarray:
        """Clean label log-probabilities `[n, n_labels]`."""
        return self._clean.copy()

    def residual(self, layer: int) -> np.ndarray:
        """The clean residual after block `layer` at each text's last position, `[n, d_model]`."""
        d = self.model.cfg.d_model
        out = np.zeros((self.n, d), dtype=np.float32)
        for batch in self._batches:
            out[batch.rows] = batch.last_by_layer[layer + 1].float().cpu().numpy()
        return out

    @torch.no_grad()
    def scores(self, hooks: Sequence[tuple[str, Hook]], start: int = 0) -> np.ndarray:
        """Label log-probabilities `[n, n_labels]` with `hooks` attached at every position; `start` is the first
        block whose output they change (`SteeringPlan.first_block`): blocks before it are not run again."""
        if not hooks:
            return self.clean()
        if start < self.from_block and self.resume:
            raise SteeringError(f"the scorer kept blocks from {self.from_block} on; a plan starts at {start}")
        with self.model.hooks(fwd_hooks=list(hooks)):
            if self.resume and start > 0:
                steered_prefix = self._prefix_from(start)
            else:
                steered_prefix = prefix_cache(self.model, self.classifier.prefix_ids, self.model.cfg.n_layers)
            parts = []
            for batch in self._batches:
                context = expanded_cache(steered_prefix, len(batch.rows))
                if self.resume and start > 0:
                    context.freeze()
                    full_mask = context.append_attention_mask(batch.mask)
                    resid = resume_at_block(
                        self.model, batch.block_inputs, start, attention_mask=full_mask, past_kv_cache=context
                    )
                else:
                    resid = self.model(
                        batch.tokens,
                        attention_mask=batch.mask,
                        past_kv_cache=context,
                        stop_at_layer=self.model.cfg.n_layers,
                    )
                parts.append(self._label_scores(resid[:, -1]))
        return self._collect(parts)

    def _prefix_from(self, start: int) -> TransformerLensKeyValueCache:
        """The prefix's keys and values with the hooks attached (by the caller) from block `start` on: the clean
        entries of the blocks before it, the prefix re-run from its clean residual entering block `start`."""
        cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.model.cfg.device, 1)
        cache.entries[:start] = self._clean_prefix.entries[:start]
        resid = self._prefix_inputs[start]
        mask = cache.append_attention_mask(torch.ones(resid.shape[:2], dtype=torch.long, device=resid.device))
        resume_at_block(self.model, self._prefix_inputs, start, attention_mask=mask, past_kv_cache=cache)
        cache.freeze()
        return cache

    def plan_scores(self, plan: SteeringPlan, saes: Mapping[int, SAE] | None = None) -> np.ndarray:
        """`scores` under one plan."""
        return self.scores(plan.hooks(saes), plan.first_block)


# ------------------------------------------------------------------------------------------ evaluation


def draw_bootstrap(
    gold: Sequence[str],
    predicted: Mapping[str, np.ndarray],
    labels: Sequence[str],
    metric: str = "macro_f1",
    n_boot: int = 1000,
    seed: int = 0,
    averaged: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Per method, `n_boot` resampled values of `metric` averaged over example draws, resampling the draws and
    the test items together (the same resamples for every method, so differences are paired).

    `predicted[method]` is `[n_draws, n_items]` of label indices (a method without draws has one row, used for
    every resampled draw). Macro-F1 averages over the label indices `averaged` (default all): answers outside
    them still count as errors (an "other" label for a transferred plan's unshared labels). Returns
    `{method: [n_boot]}`.
    """
    if metric not in ("macro_f1", "accuracy"):
        raise SteeringError(f"metric must be 'macro_f1' or 'accuracy', not {metric!r}")
    index = {label: j for j, label in enumerate(labels)}
    y = np.array([index[g] for g in gold])
    n, k = len(y), len(labels)
    n_draws = max(np.atleast_2d(p).shape[0] for p in predicted.values())
    rng = np.random.default_rng(seed)
    items = rng.integers(0, n, size=(n_boot, n))
    draws = rng.integers(0, n_draws, size=(n_boot, n_draws))
    out = {}
    for method, values in predicted.items():
        values = np.atleast_2d(np.asarray(values))
        rows = draws % values.shape[0]  # a method without draws: its only row
        pred = values[rows[:, :, None], items[:, None, :]]  # [n_boot, n_draws, n]
        if metric == "accuracy":
            out[method] = (pred == y[items][:, None, :]).mean(axis=(1, 2))
            continue
        cell = y[items][:, None, :] * k + pred
        offsets = (np.arange(n_boot * n_draws) * k * k).reshape(n_boot, n_draws, 1)
        counts = np.bincount((cell + offsets).ravel(), minlength=n_boot * n_draws * k * k)
        per_label = _f1_from_counts(counts.reshape(n_boot, n_draws, k, k))
        if averaged is not None:
            per_label = per_label[..., list(averaged)]
        out[method] = per_label.mean(-1).mean(-1)
    return out


def bootstrap_p(differences: np.ndarray) -> float:
    """One-sided bootstrap p-value that a difference is not above zero: `(1 + #{d <= 0}) / (1 + n)`."""
    differences = np.asarray(differences)
    return float((1 + (differences <= 0).sum()) / (1 + len(differences)))


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1) of a family keyed by name."""
    names = sorted(p_values, key=lambda name: p_values[name])
    m = len(names)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(names):
        running = max(running, min(1.0, (m - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted

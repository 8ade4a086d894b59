"""The logit lens: what a model would answer if it stopped at a layer, scored over the label tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from scipy.special import softmax
from torch import Tensor
from transformer_lens import HookedTransformer

from emolib.lm.batching import final_logprobs
from emolib.methods.common import FlowError


@dataclass
class LensResult:
    """Logit-lens scores of label answers: `label_logprobs[i, j]` is log p(first token of label j) under the
    full vocabulary (summed over the label's tokens when it has several), not renormalised."""

    label_logprobs: Float[np.ndarray, "items labels"]

    @property
    def label_probs(self) -> np.ndarray:
        return np.exp(self.label_logprobs)

    @property
    def renormalised(self) -> np.ndarray:
        """The distribution over labels only, `[n, n_labels]`: which label the layer prefers, whatever its mass."""
        return softmax(self.label_logprobs, axis=1)

    @property
    def mass(self) -> np.ndarray:
        """Total probability of all label answers per item: how much the layer answers within the label set."""
        return self.label_probs.sum(axis=1)


def _token_groups(label_token_ids: Sequence[int | Sequence[int]]) -> list[list[int]]:
    groups = [[int(t)] if np.isscalar(t) else list(dict.fromkeys(int(i) for i in t)) for t in label_token_ids]
    if not groups or any(not g for g in groups):
        raise FlowError("label_token_ids needs at least one token id per label")
    seen: dict[int, int] = {}
    for j, group in enumerate(groups):
        for token in group:
            if seen.setdefault(token, j) != j:
                raise FlowError(
                    f"token {token} belongs to labels {seen[token]} and {j}: scores would be ambiguous"
                )
    return groups


def _readout_interventions(model: HookedTransformer) -> list[str]:
    hooked = [
        name
        for name, hook in model.hook_dict.items()
        if name.startswith(("ln_final.", "unembed.")) and (hook.fwd_hooks or hook.bwd_hooks)
    ]
    saes = [name for name in getattr(model, "acts_to_saes", {}) if name.startswith(("ln_final.", "unembed."))]
    return hooked + saes


def logit_lens(
    model: HookedTransformer,
    resid: Float[np.ndarray, "items d_model"] | Float[Tensor, "items d_model"],
    label_token_ids: Sequence[int | Sequence[int]],
    *,
    batch_size: int = 64,
) -> LensResult:
    """Read residual vectors `resid` [n, d_model] of any layer through the model's final norm and unembedding.

    This is what the model would answer if the computation stopped at that layer (nostalgebraist's logit lens),
    with the same readout as the classifier (final norm, unembedding, logit soft cap, softmax over the whole
    vocabulary), so at the last layer it reproduces the model's own next-token probabilities. Each label is
    scored by its first token id (or the summed probability of several ids). Rows go through in batches so a
    large vocabulary is never materialised for all items at once.
    """
    groups = _token_groups(label_token_ids)
    ids = torch.tensor([t for g in groups for t in g])
    if int(ids.max()) >= model.cfg.d_vocab or int(ids.min()) < 0:
        raise FlowError(
            f"label token ids must be in [0, {model.cfg.d_vocab}), got {sorted(set(ids.tolist()))}"
        )
    intervened = _readout_interventions(model)
    if intervened:
        raise FlowError(f"hooks or SAEs are attached to the readout ({intervened}); remove them for the lens")
    resid = torch.as_tensor(np.asarray(resid) if not torch.is_tensor(resid) else resid)
    if resid.ndim != 2 or resid.shape[1] != model.cfg.d_model or resid.shape[0] == 0:
        raise FlowError(f"resid must be [n_items, d_model={model.cfg.d_model}], got {tuple(resid.shape)}")
    dtype = next(model.parameters()).dtype
    owner = torch.tensor([j for j, g in enumerate(groups) for _ in g])
    out = []
    with torch.inference_mode():
        for start in range(0, resid.shape[0], batch_size):
            chunk = resid[start : start + batch_size].to(device=model.cfg.device, dtype=dtype)
            picked = final_logprobs(model, chunk)[:, ids.to(chunk.device)].double().cpu()
            scores = torch.full((len(chunk), len(groups)), -torch.inf, dtype=torch.float64)
            for j in range(len(groups)):
                scores[:, j] = torch.logsumexp(picked[:, owner == j], dim=1)
            out.append(scores)
    return LensResult(label_logprobs=torch.cat(out).cpu().numpy())


def label_first_tokens(sequences: Sequence[tuple[int, Sequence[int]]], n_labels: int) -> list[list[int]]:
    """First token ids per label from `(label index, token ids)` pairs, e.g. an `EmotionClassifier.sequences`."""
    groups: list[list[int]] = [[] for _ in range(n_labels)]
    for j, ids in sequences:
        if not 0 <= j < n_labels or not ids:
            raise FlowError(f"bad verbaliser entry ({j}, {ids}) for {n_labels} labels")
        if ids[0] not in groups[j]:
            groups[j].append(int(ids[0]))
    missing = [j for j, g in enumerate(groups) if not g]
    if missing:
        raise FlowError(f"labels {missing} have no verbaliser")
    _token_groups(groups)  # a first token shared by two labels makes the lens ambiguous
    return groups


def at_gold(
    values: Float[np.ndarray, "items labels"], y, labels: Sequence[str]
) -> Float[np.ndarray, " items"]:
    """Each item's value in its gold label's column: `values` [n, n_labels], `y` [n] -> [n]."""
    values = np.asarray(values)
    position = {label: j for j, label in enumerate(labels)}
    unknown = sorted({v for v in y if v not in position})
    if unknown:
        raise FlowError(f"gold labels {unknown} are not among {list(labels)}")
    if values.ndim != 2 or values.shape != (len(y), len(labels)):
        raise FlowError(f"values must be [n_items={len(y)}, n_labels={len(labels)}], got {values.shape}")
    return values[np.arange(len(y)), [position[v] for v in y]]


def permutation_chance(predicted, gold) -> float:
    """Expected accuracy of fixed predictions against a random permutation of the gold labels.

    sum_j share(predicted = j) x share(gold = j): the control for a readout that is not fitted (such as the
    logit lens), where refitting on shuffled labels is impossible. It equals 1 / L for balanced gold labels and
    rises when the predictions collapse onto a frequent label.
    """
    predicted, gold = np.asarray(predicted).astype(str), np.asarray(gold).astype(str)
    if predicted.shape != gold.shape or predicted.ndim != 1 or len(gold) == 0:
        raise FlowError(
            f"predicted and gold need the same non-empty 1-D shape, got {predicted.shape}, {gold.shape}"
        )
    labels, inverse = np.unique(np.r_[predicted, gold], return_inverse=True)
    n = len(gold)
    share_pred = np.bincount(inverse[:n], minlength=len(labels)) / n
    share_gold = np.bincount(inverse[n:], minlength=len(labels)) / n
    return float(share_pred @ share_gold)


def above_permutation_chance(accuracy, chance, n_items: int, n_se: float = 2.0):
    """Whether a readout's accuracy exceeds its permutation chance by more than `n_se` binomial standard errors.

    The standard error is that of an accuracy at chance over `n_items` items, sqrt(chance (1 - chance) / n), so
    "above chance" means more than sampling noise around chance would give (about a 2.5% one-sided false alarm
    per layer at two standard errors). `accuracy` and `chance` are aligned arrays or Series (one entry per layer);
    the result has their type.
    """
    if n_items < 1:
        raise FlowError(f"n_items must be at least 1, not {n_items}")
    se = np.sqrt(chance * (1 - chance) / n_items)
    return accuracy > chance + n_se * se

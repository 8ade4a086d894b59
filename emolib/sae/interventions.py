"""SAE interventions as TransformerLens forward hooks: splice an SAE in with its error term, read or edit its
features, add decoder or arbitrary directions, at chosen positions. Tracing ablates with them; steering adds with them.

*Splice.* At the chosen positions of a residual hook point, `x` becomes `x + decode(a') - decode(a)` with
`a = encode(x)` and `a'` the edited codes: sae-lens' `use_error_term=True` splice (the error term `x - decode(a)` is
kept), written as a change so that an unedited splice (`a' = a`) is the model itself, and an edit moves the residual
only by the edited features' decoder contributions. Downstream SAEs encode the residual they receive.

*Edits* are functions of the codes `[n, d_sae] -> [n, d_sae]` applied without gradient: `SetFeatures` (zero- or
mean-ablation), `ScaleFeatures` (gain: active features times `1 + alpha`), `ClampFeatures` (a value where the
feature fires, or everywhere) and `AddToFeatures` (adding to a code adds that multiple of its decoder row).

*Gradient leaf* (`leaf_hook`, for attribution). sae-lens computes the error term under `no_grad`, so through its
splice a layer's output depends on its input only through the SAE's reconstruction, not through the identity the
spliced layer is. Here the codes are read as a detached leaf `a` and the output is `x + (decode(a) -
decode(a).detach())`: its value is `x`, its gradient with respect to `x` the identity and with respect to `a` the
decoder's Jacobian, so every spliced layer's feature gradients come from one backward pass of the clean model.

*Directions.* `direction_hook` adds `scale * direction` (e.g. a difference of class means) to the residual,
`decoder_hook` a combination of features' decoder rows, without encoding anything.

*Positions* are `(rows, cols)` index tensors, a boolean mask `[batch, pos]`, or None for every position.

*Starting late.* Blocks before the first edited one compute their clean values; a forward that records the residual
entering every block (`block_input_recorders`) lets later edited forwards start at `first_edited_block` with
`resume_at_block` instead of running those blocks again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from emolib.sae.activations import norm_outliers

# Shapes (aliases, so that linters do not read jaxtyping's shape strings as forward references).
Codes = Float[Tensor, "n d_sae"]
Residual = Float[Tensor, "batch pos d_model"]
Direction = Float[Tensor, " d_model"]
PositionIndex = tuple[Int[Tensor, " n"], Int[Tensor, " n"]]
PositionMask = Bool[Tensor, "batch pos"]
#: Where an intervention applies: index tensors, a mask, None (everywhere), or a function of the residual that
#: gives a mask (e.g. `outside_norm_outliers`: positions chosen by what the residual holds, call by call).
Positions = PositionIndex | PositionMask | Callable[[Tensor], PositionMask] | None
Hook = Callable[[Tensor, Any], Tensor | None]


class InterventionError(ValueError):
    """An intervention that cannot apply: features out of range, values of the wrong shape, positions that do not
    fit the residual, an edit on a gradient leaf."""


def resid_post(layer: int) -> str:
    """The hook point after block `layer`, where the book's SAEs read and write."""
    return f"blocks.{layer}.hook_resid_post"


def position_index(resid: Residual, positions: Positions) -> PositionIndex:
    """`(rows, cols)` of the chosen positions of `resid` (`[batch, pos, ...]`)."""
    if callable(positions) and not isinstance(positions, Tensor):
        positions = positions(resid)
    if positions is None:
        batch, width = resid.shape[:2]
        return torch.arange(batch).repeat_interleave(width), torch.arange(width).repeat(batch)
    if isinstance(positions, Tensor):
        if positions.dtype != torch.bool or tuple(positions.shape) != tuple(resid.shape[:2]):
            raise InterventionError(
                f"a position mask must be boolean of shape {tuple(resid.shape[:2])}, not "
                f"{positions.dtype} {tuple(positions.shape)}"
            )
        return positions.nonzero(as_tuple=True)
    return positions


def outside_norm_outliers(factor: float) -> Callable[[Tensor], PositionMask]:
    """Positions whose residual norm is at most `factor` x the median norm of their row (the rule that kept
    attention-sink tokens, such as the first token, out of SAE training: `emolib.sae.activations.norm_outliers`).
    An SAE reads such a token badly, and editing it moves what every later token attends to."""

    def mask(resid: Tensor) -> PositionMask:
        norms = resid.detach().float().norm(dim=-1)
        return ~norm_outliers(norms, torch.ones_like(norms, dtype=torch.bool), factor)

    return mask


# ------------------------------------------------------------------------------------------------ edits


class FeatureEdit(Protocol):
    """Edited codes from codes `[n, d_sae]`; `features` are the indices it changes (None: all)."""

    features: Tensor | None

    def __call__(self, codes: Codes) -> Codes: ...


def feature_index(features: Iterable[int] | Tensor | None) -> Tensor | None:
    """Feature indices as a long tensor (None stays None: every feature)."""
    if features is None:
        return None
    return torch.as_tensor(list(features) if not isinstance(features, Tensor) else features, dtype=torch.long)


def check_features(index: Tensor | None, d_sae: int) -> None:
    """Raise `InterventionError` unless every index is a feature of an SAE with `d_sae` features."""
    if index is not None and len(index) and (int(index.min()) < 0 or int(index.max()) >= d_sae):
        raise InterventionError(f"feature indices {index.tolist()} out of range (d_sae={d_sae})")


@dataclass(frozen=True, eq=False)
class SetFeatures:
    """Set `features` (None: every feature) to their entries of `values` `[d_sae]`: zeros for zero-ablation, mean
    activations for mean-ablation."""

    values: Float[Tensor, " d_sae"]
    features: Tensor | None = None

    def __call__(self, codes: Codes) -> Codes:
        edited = self.values.expand_as(codes).clone() if self.features is None else codes.clone()
        if self.features is not None:
            edited[:, self.features] = self.values[self.features]
        return edited


@dataclass(frozen=True, eq=False)
class ScaleFeatures:
    """Gain: multiply `features` (None: all) by `1 + alpha`. Only active features change (inactive ones are 0);
    `alpha = -1` is zero-ablation."""

    alpha: float
    features: Tensor | None = None

    def __call__(self, codes: Codes) -> Codes:
        if self.features is None:
            return codes * (1 + self.alpha)
        edited = codes.clone()
        edited[:, self.features] = codes[:, self.features] * (1 + self.alpha)
        return edited


@dataclass(frozen=True, eq=False)
class ClampFeatures:
    """Set `features` to `value` (one number, or one per feature) where they fire (`only_active`), or everywhere."""

    value: float | Float[Tensor, " k"]
    features: Tensor | None = None
    only_active: bool = True

    def __call__(self, codes: Codes) -> Codes:
        edited = codes.clone()
        index = slice(None) if self.features is None else self.features
        chosen = codes[:, index]
        value = torch.as_tensor(self.value, dtype=codes.dtype).expand_as(chosen)
        edited[:, index] = torch.where(chosen > 0, value, chosen) if self.only_active else value
        return edited


@dataclass(frozen=True, eq=False)
class AddToFeatures:
    """Add `amount` (one number, or one per feature) to `features`' codes: through the splice this adds that
    multiple of each feature's decoder row to the residual (for a linear decoder)."""

    amount: float | Float[Tensor, " k"]
    features: Tensor | None = None

    def __call__(self, codes: Codes) -> Codes:
        edited = codes.clone()
        index = slice(None) if self.features is None else self.features
        edited[:, index] = codes[:, index] + torch.as_tensor(self.amount, dtype=codes.dtype)
        return edited


# ------------------------------------------------------------------------------------------------ hooks


def splice_hook(
    sae: SAE,
    positions: Positions = None,
    edit: FeatureEdit | None = None,
    *,
    record: Callable[[Codes], None] | None = None,
) -> Hook:
    """A hook splicing `sae` in at `positions` (module docstring): `record(codes)` sees the codes `[n, d_sae]` there
    (n positions, in `(rows, cols)` order), and `edit` changes the residual by `decode(edit(a)) - decode(a)`. With
    neither the residual is left as it is."""
    if edit is not None:
        check_features(edit.features, sae.cfg.d_sae)
    rows_of_edited = _edited_decoder_rows(sae, edit)

    def hook(resid: Residual, hook: Any) -> Residual | None:
        rows, cols = position_index(resid, positions)
        picked = resid[rows, cols]
        with torch.no_grad():
            codes = sae.encode(picked.to(sae.W_dec.dtype))
        if record is not None:
            record(codes)
        if edit is None:
            return None
        with torch.no_grad():
            if rows_of_edited is None:
                change = sae.decode(edit(codes)) - sae.decode(codes)
            else:  # only the edited features' columns change: decode just those
                index = edit.features
                change = (edit(codes)[:, index] - codes[:, index]) @ rows_of_edited
        return resid.index_put((rows, cols), picked + change.to(resid.dtype))

    return hook


#: Output normalisations under which an SAE's decode is affine in the codes (what `_edited_decoder_rows` needs).
_AFFINE_DECODE = ("none", "expected_average_only_in")


@torch.no_grad()
def _edited_decoder_rows(sae: SAE, edit: FeatureEdit | None) -> Tensor | None:
    """`[k, d_in]`: what one unit of each edited feature adds through the SAE's own `decode` (its decoder row,
    rescaled as that architecture decodes), so that an edit of k features costs k rows instead of a full decode of
    both code vectors. None (decode in full) for edits of every feature or a decode that is not affine."""
    if edit is None or edit.features is None or sae.cfg.normalize_activations not in _AFFINE_DECODE:
        return None
    index = torch.as_tensor(edit.features, dtype=torch.long)
    units = torch.zeros(len(index), sae.cfg.d_sae, dtype=sae.W_dec.dtype)
    units[torch.arange(len(index)), index] = 1.0
    return sae.decode(units) - sae.decode(torch.zeros_like(units[:1]))


def leaf_hook(sae: SAE, positions: Positions, keep: Callable[[Codes], None]) -> Hook:
    """The gradient-transparent splice for attribution (module docstring): `keep(leaf)` receives the codes at
    `positions` as a leaf tensor that requires grad; the residual's value is unchanged."""

    def hook(resid: Residual, hook: Any) -> Residual:
        rows, cols = position_index(resid, positions)
        picked = resid[rows, cols]
        with torch.no_grad():
            codes = sae.encode(picked.to(sae.W_dec.dtype))
        leaf = codes.clone().requires_grad_(True)
        keep(leaf)
        recon = sae.decode(leaf)
        change = recon - recon.detach()  # zero, with the decoder's gradient
        return resid.index_put((rows, cols), picked + change.to(resid.dtype))

    return hook


def edit_hooks(
    saes: Mapping[int, SAE], edits: Mapping[int, FeatureEdit], positions: Positions = None
) -> list[tuple[str, Hook]]:
    """Splice hooks after each edited block (`edits[layer]` on `saes[layer]`), in layer order."""
    missing = sorted(set(edits) - set(saes))
    if missing:
        raise InterventionError(f"edits for layers {missing} without SAEs (SAEs for {sorted(saes)})")
    return [(resid_post(layer), splice_hook(saes[layer], positions, edits[layer])) for layer in sorted(edits)]


def direction_hook(direction: Direction, scale: float = 1.0, positions: Positions = None) -> Hook:
    """A hook adding `scale * direction` to the residual at `positions` (None: every position, also while
    generating): steering along a fixed direction such as a difference of class means."""
    if direction.ndim != 1:
        raise InterventionError(f"a direction is one vector [d_model], not shape {tuple(direction.shape)}")

    def hook(resid: Residual, hook: Any) -> Residual:
        if direction.shape[0] != resid.shape[-1]:
            raise InterventionError(
                f"the direction has {direction.shape[0]} dims, the residual {resid.shape[-1]}"
            )
        delta = (scale * direction).to(resid.dtype)
        if positions is None:
            return resid + delta
        rows, cols = position_index(resid, positions)
        return resid.index_put((rows, cols), resid[rows, cols] + delta)

    return hook


def decoder_direction(
    sae: SAE, features: Sequence[int] | Tensor, amounts: float | Sequence[float] | Tensor = 1.0
) -> Direction:
    """`sum_f amounts_f * W_dec[f]`: what adding `amounts` to `features`' codes adds to the residual."""
    index = feature_index(features)
    check_features(index, sae.cfg.d_sae)
    weights = torch.as_tensor(amounts, dtype=sae.W_dec.dtype).expand(len(index))
    return (weights[:, None] * sae.W_dec[index]).sum(0).detach()


def decoder_hook(
    sae: SAE,
    features: Sequence[int] | Tensor,
    amounts: float | Sequence[float] | Tensor = 1.0,
    positions: Positions = None,
) -> Hook:
    """A hook adding `amounts` times `features`' decoder rows to the residual at `positions` (no encoding)."""
    return direction_hook(decoder_direction(sae, features, amounts), 1.0, positions)


# ------------------------------------------------------------------------------------------ starting late


def first_edited_block(edits: Mapping[int, object]) -> int:
    """The first block whose output a set of edits (keyed by layer) changes; 0 without edits (nothing to skip)."""
    return min(edits) if edits else 0


def block_input_recorders(n_layers: int, store: dict[int, Tensor]) -> list[tuple[str, Hook]]:
    """Hooks storing the residual entering every block (`blocks.{l}.hook_resid_pre`, detached) in `store[l]`."""

    def keep(resid: Residual, hook: Any) -> None:
        store[hook.layer()] = resid.detach()

    return [(f"blocks.{layer}.hook_resid_pre", keep) for layer in range(n_layers)]


def resume_at_block(
    model: HookedTransformer, block_inputs: Mapping[int, Residual], start: int, **forward: Any
) -> Float[Tensor, "batch pos d_model"]:
    """The last block's residual from block `start` on, given the residual entering it (`block_input_recorders`);
    `forward` holds the other arguments of the forward pass (attention mask, key-value cache)."""
    return model(block_inputs[start], start_at_layer=start, stop_at_layer=model.cfg.n_layers, **forward)

"""How good an SAE is: reconstruction (FVE, L0, dead and dense features) and next-token loss with the SAE
spliced in, per layer on held-out tokens, against fixed goals."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Int
from sae_lens import SAE
from sae_lens.evals import ExplainedVarianceCalculator
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from emolib.lm.batching import next_token_nll
from emolib.sae.activations import norm_outliers
from emolib.sae.loading import SAEError

#: A feature is "dense" when it is active on more than this fraction of the evaluated tokens.
DENSE_THRESHOLD = 0.10


_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def resume_layer(hook: str, n_layers: int) -> int:
    """The `start_at_layer` that continues a forward pass from a replaced residual-stream activation at `hook`.

    TransformerLens' `start_at_layer=i` takes the residual stream *before* block i, so `blocks.l.hook_resid_post`
    resumes at l + 1 (n_layers: only the final norm and unembedding) and `blocks.l.hook_resid_pre` at l.
    """
    match = _RESID.match(hook)
    if match is None:
        raise SAEError(f"{hook!r} is not a residual-stream hook (blocks.<l>.hook_resid_pre/post)")
    layer = int(match.group(1))
    if layer >= n_layers:
        raise SAEError(f"{hook!r} is beyond the model's {n_layers} layers")
    return layer + 1 if match.group(2) == "post" else layer


def _keep_mask(keep_original: int | Tensor, tokens: Tensor) -> Tensor:
    if isinstance(keep_original, Tensor):
        if keep_original.shape != tokens.shape:
            raise SAEError(
                f"keep_original has shape {tuple(keep_original.shape)}, tokens {tuple(tokens.shape)}"
            )
        return keep_original.bool()
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return (positions < keep_original).expand_as(tokens)


class _HookStats:
    """Running sums for one hook's metrics over evaluation batches."""

    def __init__(self, d_sae: int) -> None:
        self.variance = ExplainedVarianceCalculator()
        self.fired = torch.zeros(d_sae, dtype=torch.float64)
        self.active = 0.0
        self.n_tokens = 0
        self.loss = {"sae": 0.0, "zero": 0.0}


def _length_batches(
    mask: Tensor, loss_rows: int, batch_size: int, max_padding: float = 0.25
) -> list[tuple[Tensor, bool]]:
    """Row batches of similar length, each with whether its losses are measured.

    The first `loss_rows` rows (the loss set) and the others are batched apart, each group sorted by length; a
    batch holds at most `batch_size` rows and closes early when the next row is more than `max_padding` longer
    than its shortest, so each batch, cut to its longest row, spends little compute on padding. Every metric is a
    sum over tokens, so the batching changes nothing but float rounding.
    """
    lengths = mask.sum(1).tolist()
    batches: list[tuple[Tensor, bool]] = []
    for rows, with_loss in ((range(loss_rows), True), (range(loss_rows, len(lengths)), False)):
        current: list[int] = []
        for row in sorted(rows, key=lambda r: lengths[r]):
            if current and (
                len(current) == batch_size or lengths[row] > (1 + max_padding) * max(lengths[current[0]], 1)
            ):
                batches.append((torch.tensor(current), with_loss))
                current = []
            current.append(row)
        if current:
            batches.append((torch.tensor(current), with_loss))
    return batches


@torch.no_grad()
def evaluate_saes(
    model: HookedTransformer,
    saes: Mapping[str, SAE],
    tokens: Int[Tensor, "batch pos"],  # noqa: F722
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,  # noqa: F722
    keep_original: int | Bool[Tensor, "batch pos"] = 1,  # noqa: F722
    outlier_factor: float | None = None,
    outlier_hooks: Sequence[str] | None = None,
    batch_size: int = 4,
    loss_sequences: int | None = None,
    dense_threshold: float = DENSE_THRESHOLD,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-hook quality of residual-stream SAEs on held-out tokens, as a table indexed by hook.

    Columns: `fve` (fraction of variance explained, 1 - SSE / total variance around the mean), `l0` (mean active
    features per token), `dead_fraction` (features never active here), `dense_fraction` (features active on more
    than `dense_threshold` of the tokens), next-token losses `loss_clean` / `loss_sae` / `loss_zero` (nats per
    predicted token, padding excluded) and `loss_recovered` = (L_zero - L_sae) / (L_zero - L_clean).

    Positions excluded from SAE training keep their original residual in both the SAE and the zero-ablation runs
    and are left out of the reconstruction metrics: those marked by `keep_original` (an int n means the first n
    positions, the attention sink: match `ExtractionConfig.skip_first`) and, with `outlier_factor` set, tokens
    whose residual norm at any of `outlier_hooks` (default: the evaluated hooks) exceeds that multiple of their
    sequence's median norm: the rule of `ExtractionConfig.outlier_factor`, so pass the extracted hooks as
    `outlier_hooks` to measure a few layers' SAEs on exactly the tokens their training saw. One clean forward caches
    every hook's residual (and only the norms of the other `outlier_hooks`); each variant then
    resumes at the next block (`start_at_layer`) with the same attention mask, so it costs half a forward on
    average, and equals a full forward with the SAE spliced in by a hook (tested).

    The spliced forwards cost one forward per hook, the reconstruction metrics almost nothing: `loss_sequences`
    limits the losses to the first `loss_sequences` sequences (so order the tokens with a representative mix
    first), while reconstruction, L0, dead and dense fractions use every sequence. Sequences are batched by length
    and each batch is cut to its longest sequence (causal attention: trailing padding changes nothing), and only
    the scored positions are unembedded.
    """
    if getattr(model, "acts_to_saes", None):
        raise SAEError("the model has SAEs attached; remove them (model.reset_saes()) before evaluating")
    if tokens.ndim != 2:
        raise SAEError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    hooks = list(saes)
    starts = {hook: resume_layer(hook, model.cfg.n_layers) for hook in hooks}
    norm_hooks = hooks if outlier_hooks is None else list(dict.fromkeys(outlier_hooks))
    norm_only = [hook for hook in norm_hooks if hook not in starts]
    last_needed = max([*starts.values(), *(resume_layer(hook, model.cfg.n_layers) for hook in norm_only)])
    for hook, sae in saes.items():
        if sae.cfg.d_in != model.cfg.d_model:
            raise SAEError(
                f"the SAE at {hook} reads d_in={sae.cfg.d_in}, the model has d_model={model.cfg.d_model}"
            )
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    keep_all = _keep_mask(keep_original, tokens)
    stats = {hook: _HookStats(sae.cfg.d_sae) for hook, sae in saes.items()}
    clean_loss, n_predicted, n_outliers = 0.0, 0, 0
    for sae in saes.values():
        sae.eval()

    norms: dict[str, Tensor] = {}  # this batch's residual norms at `norm_only`

    def keep_norm(resid: Tensor, hook: HookPoint) -> None:
        norms[hook.name] = torch.linalg.vector_norm(resid, dim=-1)

    n_layers = model.cfg.n_layers
    loss_rows = tokens.shape[0] if loss_sequences is None else min(loss_sequences, tokens.shape[0])
    for rows, with_loss in tqdm(
        _length_batches(attention_mask, loss_rows, batch_size), desc="SAE quality", disable=not progress
    ):
        columns = attention_mask[rows].any(0).nonzero()
        width = int(columns.max()) + 1 if len(columns) else 1
        toks, mask, keep = tokens[rows, :width], attention_mask[rows, :width], keep_all[rows, :width]
        measured = mask.bool() & ~keep
        norms.clear()
        with model.hooks(fwd_hooks=[(hook, keep_norm) for hook in norm_only]):
            final, cache = model.run_with_cache(
                toks,
                attention_mask=mask,
                names_filter=hooks,
                stop_at_layer=n_layers if with_loss else last_needed,
            )
        if outlier_factor is not None:
            outliers = torch.zeros_like(measured)
            for hook in norm_hooks:
                norm = norms[hook] if hook in norms else torch.linalg.vector_norm(cache[hook], dim=-1)
                outliers |= norm_outliers(norm, measured, outlier_factor)
            keep, measured = keep | outliers, measured & ~outliers
            n_outliers += int(outliers.sum())
        if with_loss:
            nll, scored = next_token_nll(model, final, toks, mask)
            clean_loss, n_predicted = clean_loss + nll, n_predicted + scored
        del final
        for hook, sae in saes.items():
            resid = cache[hook]
            acts = sae.encode(resid)
            recon = sae.decode(acts).to(resid.dtype)
            hook_stats = stats[hook]
            hook_stats.variance.add_batch(recon[measured], resid[measured])
            fired = acts[measured] != 0
            hook_stats.fired += fired.sum(0).double()
            hook_stats.active += float(fired.sum())
            hook_stats.n_tokens += int(measured.sum())
            if not with_loss:
                continue
            variants = {
                "sae": torch.where(keep[..., None], resid, recon),
                "zero": torch.where(keep[..., None], resid, torch.zeros_like(resid)),
            }
            for variant, replaced in variants.items():
                out = model(
                    replaced, start_at_layer=starts[hook], stop_at_layer=n_layers, attention_mask=mask
                )
                hook_stats.loss[variant] += next_token_nll(model, out, toks, mask)[0]
        del cache

    rows = []
    loss_clean = clean_loss / max(n_predicted, 1)
    for hook, sae in saes.items():
        s = stats[hook]
        n = max(s.n_tokens, 1)
        loss_sae, loss_zero = s.loss["sae"] / max(n_predicted, 1), s.loss["zero"] / max(n_predicted, 1)
        gap = loss_zero - loss_clean
        rows.append(
            {
                "hook": hook,
                "layer": int(_RESID.match(hook).group(1)),
                "d_sae": sae.cfg.d_sae,
                "n_tokens": s.n_tokens,
                "fve": s.variance.compute(),
                "l0": s.active / n,
                "dead_fraction": float((s.fired == 0).double().mean()),
                "dense_fraction": float((s.fired / n > dense_threshold).double().mean()),
                "loss_clean": loss_clean,
                "loss_sae": loss_sae,
                "loss_zero": loss_zero,
                "loss_recovered": (loss_zero - loss_sae) / gap if gap != 0 else float("nan"),
            }
        )
    table = pd.DataFrame(rows).set_index("hook")
    table.attrs.update(
        {
            "dense_threshold": dense_threshold,
            "n_predicted_tokens": n_predicted,
            "n_loss_sequences": loss_rows,
            "n_sequences": tokens.shape[0],
            "n_outlier_tokens": n_outliers,
        }
    )
    return table


def quality_dict(table: pd.DataFrame) -> dict[str, Any]:
    """The quality table as plain JSON-able data: `{"dense_threshold", "n_predicted_tokens", "hooks": {...}}`."""

    def plain(value: Any) -> Any:
        value = value.item() if hasattr(value, "item") else value
        return None if isinstance(value, float) and math.isnan(value) else value

    hooks = {
        hook: {col: plain(value) for col, value in row.items()}
        for hook, row in table.to_dict(orient="index").items()
    }
    return {**{k: plain(v) for k, v in table.attrs.items()}, "hooks": hooks}


def quality_table(payload: Mapping[str, Any]) -> pd.DataFrame:
    """The inverse of `quality_dict`: a table indexed by hook, with the run's attributes in `.attrs`."""
    table = pd.DataFrame.from_dict(payload["hooks"], orient="index")
    table.index.name = "hook"
    table.attrs.update({k: v for k, v in payload.items() if k != "hooks"})
    return table


@dataclass(frozen=True)
class QualityGoals:
    """The issue's goals for the full preset, per layer."""

    min_fve: float = 0.80
    min_loss_recovered: float = 0.90
    max_dead_fraction: float = 0.10
    l0_tolerance: float = 0.20  # |L0 - k| <= tolerance * k


GOALS = QualityGoals()


def missed_goals(table: pd.DataFrame, k: float | None, goals: QualityGoals = GOALS) -> pd.DataFrame:
    """The rows of a quality table that miss at least one goal, with a `missed` column naming the goals (`k` None:
    SAEs not trained for a number of active features, e.g. a pretrained JumpReLU release, have no L0 goal)."""
    checks = pd.DataFrame(
        {
            "fve": table["fve"] < goals.min_fve,
            "loss_recovered": ~(table["loss_recovered"] >= goals.min_loss_recovered),
            "dead_fraction": table["dead_fraction"] > goals.max_dead_fraction,
        },
        index=table.index,
    )
    if k is not None:
        checks["l0"] = (table["l0"] - k).abs() > goals.l0_tolerance * k
    missed = checks.apply(lambda row: ", ".join(name for name, bad in row.items() if bad), axis=1)
    out = table.assign(missed=missed)
    return out[out["missed"] != ""]


def goal_summary(table: pd.DataFrame, k: float | None, goals: QualityGoals = GOALS) -> str:
    """One line for a chapter: how many layers meet every goal, and which miss which."""
    misses = missed_goals(table, k, goals)
    if misses.empty:
        return f"all {len(table)} layers meet every goal"
    detail = "; ".join(f"{hook}: {row.missed}" for hook, row in misses.iterrows())
    return f"{len(table) - len(misses)} of {len(table)} layers meet every goal; missing: {detail}"

"""Forward-pass plumbing shared by every batched run: padding layouts, prefix key-value caches, the local-attention
check, and the model's readout (final norm, unembedding, soft cap) from the last block's residual.

Two layouts keep padded batches exact. *Right padding* (`right_padded`) suits a causal model that reads every
position: a real token never attends to the padding after it. *Prefix layout* (`prefix_layout`) puts a shared prefix
first and left-pads the rest of each sequence after it, `[prefix][pad...][rest]`, so that every sequence ends in the
last column; TransformerLens derives rotary positions from the attention mask, so the padding changes no real token's
position or attention. The prefix's keys and values can come from `prefix_cache`, computed once and broadcast to a
batch with `expanded_cache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformers import PreTrainedTokenizerBase

from emolib.lm.attention import share_rotated_keys

Tokens = Int[Tensor, "batch pos"]
Mask = Int[Tensor, "batch pos"]


def pad_id(tokenizer: PreTrainedTokenizerBase | None) -> int:
    """The id padding slots hold: the tokenizer's pad token, else 0 (masked slots are never read)."""
    if tokenizer is None or tokenizer.pad_token_id is None:
        return 0
    return int(tokenizer.pad_token_id)


def right_padded(sequences: Sequence[Sequence[int]], pad: int) -> tuple[Tokens, Mask]:
    """Tokens and attention mask `[n, longest]`, each sequence from column 0 (causal: real tokens never see the
    padding after them)."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)] = torch.tensor(list(ids))
        mask[row, : len(ids)] = 1
    return tokens, mask


def left_padded(sequences: Sequence[Sequence[int]], pad: int) -> tuple[Tokens, Mask]:
    """Tokens and attention mask `[n, longest]`, each sequence ending in the last column."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        tokens[row, width - len(ids) :] = torch.tensor(list(ids))
        mask[row, width - len(ids) :] = 1
    return tokens, mask


def prefix_layout(prefix: Sequence[int], rests: Sequence[Sequence[int]], pad: int) -> tuple[Tokens, Mask]:
    """`[prefix][pad...][rest]` for every row: the shared prefix, then each rest left-padded to the longest."""
    tokens, mask = left_padded(rests, pad)
    head = torch.tensor([list(prefix)], dtype=torch.long).expand(len(rests), -1)
    return torch.cat([head, tokens], 1), torch.cat([torch.ones_like(head), mask], 1)


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Number of leading tokens that every sequence shares."""
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return n


def local_window(cfg: HookedTransformerConfig) -> int | None:
    """The local-attention window of a model with local layers (Gemma's sliding window), else None."""
    if cfg.use_local_attn and isinstance(cfg.window_size, int):
        return cfg.window_size
    return None


def padding_fits_window(window: int | None, width: int) -> bool:
    """Whether a padded batch of `width` slots (cache and continuations included) is exact under a local-attention
    `window` (`local_window(cfg)`; None: no local attention).

    TransformerLens' sliding window counts cache slots, padding included, so padding could push a real token out of
    the window; a batch is exact while its whole padded width fits in it.
    """
    return window is None or width <= window


def forward_residual(
    model: HookedTransformer, tokens: Tokens, mask: Mask, cache: TransformerLensKeyValueCache | None
) -> Float[Tensor, "batch pos d_model"]:
    """Residual after the last block for `tokens`, extending `cache` in place (unless it is frozen)."""
    return model(tokens, attention_mask=mask, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)


def prefix_cache(
    model: HookedTransformer, prefix: Sequence[int], stop_at_layer: int | None = None
) -> TransformerLensKeyValueCache:
    """Keys and values of `prefix` (batch 1, run once without hooks) for every block before `stop_at_layer`
    (None: every block), frozen: broadcast it to a batch with `expanded_cache`."""
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    tokens = torch.tensor([list(prefix)])
    kwargs: dict[str, Any] = (
        {"stop_at_layer": stop_at_layer} if stop_at_layer is not None else {"return_type": None}
    )
    model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=cache, **kwargs)
    cache.freeze()
    return cache


def expanded_cache(cache: TransformerLensKeyValueCache, batch: int) -> TransformerLensKeyValueCache:
    """A copy of a batch-1 cache broadcast to `batch` rows (views; appends allocate new tensors, never frozen)."""
    entries = []
    for source in cache.entries:
        entry = TransformerLensKeyValueCacheEntry(
            past_keys=source.past_keys.expand(batch, -1, -1, -1),
            past_values=source.past_values.expand(batch, -1, -1, -1),
        )
        share_rotated_keys(source, entry, batch)
        entries.append(entry)
    return TransformerLensKeyValueCache(
        entries=entries, previous_attention_mask=cache.previous_attention_mask.expand(batch, -1)
    )


# ------------------------------------------------------------------------------------------------- readout


def final_logits(
    model: HookedTransformer, resid: Float[Tensor, "... d_model"], columns: Tensor | None = None
) -> Float[Tensor, "... vocab"]:
    """Logits from the last block's residual: final norm, unembedding (all columns, or only `columns` of the
    vocabulary, e.g. the label tokens), soft cap. Applied only where needed instead of at every position."""
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    if columns is None:
        logits = model.unembed(resid)
    else:
        logits = resid @ model.unembed.W_U[:, columns] + model.unembed.b_U[columns]
    cap = model.cfg.output_logits_soft_cap
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits.float()


def final_logprobs(
    model: HookedTransformer, resid: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... vocab"]:
    """Log-softmax over the whole vocabulary from the last block's residual (`final_logits`, every column)."""
    return torch.log_softmax(final_logits(model, resid), dim=-1)


def scored_positions(mask: Mask) -> Tensor:
    """Positions whose token and next token are both real: the positions a next-token loss scores (TransformerLens'
    `lm_cross_entropy_loss` rule), `[batch, pos - 1]`."""
    return mask[:, :-1].bool() & mask[:, 1:].bool()


def next_token_nll(
    model: HookedTransformer, final_resid: Float[Tensor, "batch pos d_model"], tokens: Tokens, mask: Mask
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of scored positions, from the last block's
    residual; only scored positions are unembedded (padding never reaches the unembedding)."""
    scored = scored_positions(mask)
    logprobs = final_logprobs(model, final_resid[:, :-1][scored])
    return -logprobs.gather(1, tokens[:, 1:][scored][:, None]).sum().item(), int(scored.sum())


@torch.no_grad()
def lm_loss(
    model: HookedTransformer,
    sequences: Sequence[Sequence[int]],
    *,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    batch_size: int = 8,
    pad: int | None = None,
) -> tuple[float, int]:
    """Mean next-token loss (nats per predicted token) of token sequences and the number of predicted tokens, with
    `fwd_hooks` attached (e.g. a steering intervention): perplexity is `exp` of the loss.

    Sequences are right-padded per batch (exact for a causal model); padding is never scored.
    """
    if not sequences:
        raise ValueError("lm_loss needs at least one sequence")
    pad = pad_id(model.tokenizer) if pad is None else pad
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        tokens, mask = right_padded(sequences[start : start + batch_size], pad)
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            resid = model(tokens, attention_mask=mask, stop_at_layer=model.cfg.n_layers)
        nll, n = next_token_nll(model, resid, tokens, mask)
        total, count = total + nll, count + n
    if count == 0:
        raise ValueError("no sequence has two tokens: nothing to predict")
    return total / count, count

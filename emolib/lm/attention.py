"""Fused attention for TransformerLens blocks: the same function, without materialising the attention pattern.

TransformerLens computes attention eagerly: the `[batch, head, query, key]` scores and pattern are built, masked,
soft-maxed, NaN-checked and copied between dtypes, so that `hook_attn_scores` and `hook_pattern` can read them.
On the 2-core machine these element-wise passes are memory-bound and take about 40% of a short prompt's forward,
and most of it behind a long shared prefix (an n-shot prompt of 800 tokens: 85% of the time). `use_fused_attention`
gives each attention module a forward that computes the same thing through `torch.nn.functional.
scaled_dot_product_attention`, keeping every other hook point (q, k, v, rotary q and k, z) and the key-value cache.

The fused path is taken only where it is the same function: causal attention with rotary or absolute positions,
no attention-score soft cap, no sinks, no per-head result, and nothing hooked on `hook_attn_scores` or
`hook_pattern` (a hook there, e.g. `run_with_cache` of everything, gets TransformerLens' own forward for that
call). Rows with no visible key (left padding) give zero, as TransformerLens' NaN-to-zero does. Tested against
TransformerLens on tiny models of every book architecture (grouped-query, local windows, QK-norm, padding, cache).

Behind a key-value cache, TransformerLens stores keys before the rotary embedding and rotates every cached key
again at every call. A cached key's position depends only on the attention mask up to it, so its rotation never
changes: the fused forward keeps the rotated keys beside the cache entry they were computed for
(`_ROTATED`, checked by identity with the entry's keys) and rotates only the new ones. Behind chapter 4's n-shot
prefix of 1,300 tokens, re-rotating took 28% of the forward.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import einops
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer
from transformer_lens.components.abstract_attention import AbstractAttention

_ENABLED = True
_REUSE_ROTATED = True
#: Attribute of a cache entry holding `(past_keys, rotated)`: the rotated copy of exactly those keys.
_ROTATED = "_emolib_rotated_keys"
_OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


@contextlib.contextmanager
def rerotated_keys() -> Iterator[None]:
    """Inside the block the fused forward rotates every cached key again at every call, as TransformerLens does
    (the benchmark's and the tests' comparison)."""
    global _REUSE_ROTATED
    previous, _REUSE_ROTATED = _REUSE_ROTATED, False
    try:
        yield
    finally:
        _REUSE_ROTATED = previous


def share_rotated_keys(source, target, batch: int) -> None:
    """Give cache entry `target` (`source`'s keys broadcast to `batch` rows) `source`'s rotated keys, if kept."""
    kept = getattr(source, _ROTATED, None)
    if kept is not None and kept[0] is source.past_keys:
        setattr(target, _ROTATED, (target.past_keys, kept[1].expand(batch, -1, -1, -1)))


@contextlib.contextmanager
def reference_attention() -> Iterator[None]:
    """Inside the block every model uses TransformerLens' own attention (for comparisons and debugging)."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = previous


def use_fused_attention(model: HookedTransformer) -> None:
    """Give every attention module of `model` the fused forward (where `fusable` allows it; idempotent)."""
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn, AbstractAttention) and not hasattr(attn, "_emolib_reference_forward"):
            attn._emolib_reference_forward = attn.forward
            attn.forward = types.MethodType(_forward, attn)


def fusable(attn: AbstractAttention) -> bool:
    """True if the fused forward computes what TransformerLens' forward computes for this module's config, and no
    hook needs the scores or the pattern."""
    cfg = attn.cfg
    soft_cap = cfg.attn_scores_soft_cap
    return (
        _ENABLED
        and cfg.positional_embedding_type in ("rotary", "standard", "shortformer")
        and (attn._attention_dir_override or cfg.attention_dir) == "causal"
        and not (soft_cap is not None and soft_cap > 0)
        and not cfg.use_attention_sinks
        and not cfg.use_attn_result
        and not cfg.load_in_4bit
        and not cfg.use_logn_attn
        and cfg.clip_qkv is None
        and cfg.original_architecture not in _OLMO
        and not _hooked(attn.hook_attn_scores)
        and not _hooked(attn.hook_pattern)
    )


def _kept_rotation(self: AbstractAttention, entry) -> torch.Tensor | None:
    """The rotated keys kept for `entry`'s current keys, if any and if reusing them is the same function (no
    dynamic NTK scaling, whose rotary tables change with the length)."""
    kept = getattr(entry, _ROTATED, None)
    if not _REUSE_ROTATED or kept is None or self.cfg.use_dynamic_ntk_rope or kept[0] is not entry.past_keys:
        return None
    return kept[1]


def _hooked(point: torch.nn.Module) -> bool:
    return bool(point._forward_hooks or point._forward_pre_hooks or point._backward_hooks)


def _forward(
    self: AbstractAttention,
    query_input: torch.Tensor,
    key_input: torch.Tensor,
    value_input: torch.Tensor,
    past_kv_cache_entry=None,
    additive_attention_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if additive_attention_mask is not None or position_bias is not None or not fusable(self):
        return self._emolib_reference_forward(
            query_input,
            key_input,
            value_input,
            past_kv_cache_entry=past_kv_cache_entry,
            additive_attention_mask=additive_attention_mask,
            attention_mask=attention_mask,
            position_bias=position_bias,
        )
    q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
    offset, entry = 0, past_kv_cache_entry
    kept = None
    if entry is not None:
        offset = entry.past_keys.size(1)
        kept = _kept_rotation(self, entry)
        new_keys = k
        k, v = entry.append(k, v)
    if self.cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
        if kept is not None:  # rotate only the new keys, in the dtype the appended keys have
            k = torch.cat([kept, self.apply_rotary(new_keys.to(k.dtype), offset, attention_mask)], dim=1)
        else:
            k = self.apply_rotary(k, 0, attention_mask)
        if entry is not None:
            setattr(entry, _ROTATED, (entry.past_keys, k[:, : entry.past_keys.size(1)]))
        k = self.hook_rot_k(k)
    mask = self._make_causal_mask(q.size(1), k.size(1), offset, q.device)  # [1, 1, query, key]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].to(q.device).bool()
    visible = mask.any(dim=-1, keepdim=True)  # [batch, 1, query, 1]: False for rows of padding only
    blind = not bool(visible.all())
    if blind:
        mask = mask | ~visible  # any finite row; zeroed below, as TransformerLens turns its NaNs into zeros
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=1.0 / float(self.attn_scale),
        enable_gqa=q.size(2) != k.size(2),
    )  # [batch, head, query, d_head]
    if blind:
        z = z.masked_fill(~visible, 0.0)
    z = self.hook_z(z.transpose(1, 2))  # [batch, query, head, d_head]
    w = einops.rearrange(self.W_O, "head_index d_head d_model -> d_model (head_index d_head)")
    if z.dtype != w.dtype:
        z = z.to(w.dtype)
    return F.linear(z.reshape(z.shape[0], z.shape[1], -1), w, self.b_O)

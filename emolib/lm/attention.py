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
_OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


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
    offset = 0
    if past_kv_cache_entry is not None:
        offset = past_kv_cache_entry.past_keys.size(1)
        k, v = past_kv_cache_entry.append(k, v)
    if self.cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
        k = self.hook_rot_k(self.apply_rotary(k, 0, attention_mask))
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

"""The fused attention computes TransformerLens' attention: same logits, gradients, cache and hooks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import gemma_like_config, llama_like_config, make_tiny_model

from emolib.lm.attention import fusable, reference_attention, rerotated_keys, use_fused_attention
from emolib.lm.batching import expanded_cache, left_padded, prefix_cache

ROWS = [[5, 9, 13, 2, 7, 7, 30, 4], [11, 3], [8, 8, 21, 17, 6]]


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded(ROWS, pad=0)


@pytest.fixture(params=["llama", "gemma", "gemma-window-3", "no-gqa"])
def model(request, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    cfg = {
        "llama": llama_like_config(vocab),
        "gemma": gemma_like_config(vocab),
        "gemma-window-3": gemma_like_config(vocab, window_size=3),  # padding crosses the local window
        "no-gqa": dataclasses.replace(llama_like_config(vocab), n_key_value_heads=None),
    }[request.param]
    return make_tiny_model(cfg, tiny_tokenizer)


def test_fused_logits_equal_transformer_lens_with_left_padding(model):
    tokens, mask = _padded()
    assert not mask.all()  # rows of padding only: TransformerLens' NaN-to-zero case
    fused = model(tokens, attention_mask=mask)
    with reference_attention():
        reference = model(tokens, attention_mask=mask)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=0)
    assert torch.isfinite(fused).all()


def test_fused_logits_equal_transformer_lens_behind_a_prefix_cache(model):
    prefix = [1, 4, 9, 16, 25, 3]
    tokens, mask = _padded()
    outputs = []
    for context in (torch.no_grad, reference_attention):
        with context():
            cache = expanded_cache(prefix_cache(model, prefix), len(ROWS))
            outputs.append(model(tokens, attention_mask=mask, past_kv_cache=cache))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)


def _prefix_then_two_steps(model) -> list[torch.Tensor]:
    """Logits of a padded batch behind a prefix cache, then of one more token per row through the same cache."""
    tokens, mask = _padded()
    with torch.no_grad():
        cache = expanded_cache(prefix_cache(model, [1, 4, 9, 16, 25, 3]), len(ROWS))
        first = model(tokens, attention_mask=mask, past_kv_cache=cache)
        step = torch.tensor([[7], [2], [19]])
        second = model(step, attention_mask=torch.ones_like(step), past_kv_cache=cache)
    return [first, second]


def test_kept_rotated_keys_give_the_same_logits_as_rotating_again(model):
    kept = _prefix_then_two_steps(model)
    with rerotated_keys():
        again = _prefix_then_two_steps(model)
    with reference_attention():
        reference = _prefix_then_two_steps(model)
    for ours, theirs, tl in zip(kept, again, reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)  # the same elementwise rotation
        torch.testing.assert_close(ours, tl, atol=1e-5, rtol=0)


def test_behind_a_cache_only_the_new_keys_are_rotated(monkeypatch, tiny_tokenizer):
    model = make_tiny_model(llama_like_config(len(tiny_tokenizer)), tiny_tokenizer)
    attn = model.blocks[0].attn
    lengths = []
    rotate = attn.apply_rotary
    monkeypatch.setattr(
        attn, "apply_rotary", lambda x, *a, **k: lengths.append(x.size(1)) or rotate(x, *a, **k)
    )
    _prefix_then_two_steps(model)
    prefix, suffix = 6, _padded()[0].shape[1]
    assert lengths == [prefix, prefix, suffix, suffix, 1, 1]  # (q, k) per call: never the cached keys again
    lengths.clear()
    with rerotated_keys():
        _prefix_then_two_steps(model)
    assert lengths == [prefix, prefix, suffix, prefix + suffix, 1, prefix + suffix + 1]


def test_fused_gradients_equal_transformer_lens(model):
    tokens, mask = _padded()
    grads = []
    for context in (torch.enable_grad, reference_attention):
        with context():
            embed = model.embed(tokens).detach().requires_grad_(True)
            logits = model(embed, tokens=tokens, attention_mask=mask, start_at_layer=0)
            logits[:, -1].logsumexp(-1).sum().backward()
            grads.append(embed.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=0)


def test_a_hook_on_the_pattern_gets_transformer_lens_attention(tiny_model):
    tokens, mask = _padded()
    seen = []
    with tiny_model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: seen.append(x.shape))]):
        assert not fusable(tiny_model.blocks[0].attn)
        assert fusable(tiny_model.blocks[1].attn)
        tiny_model(tokens, attention_mask=mask)
    assert seen == [(len(ROWS), tiny_model.cfg.n_heads, tokens.shape[1], tokens.shape[1])]
    assert fusable(tiny_model.blocks[0].attn)
    _, cache = tiny_model.run_with_cache(tokens, attention_mask=mask)
    assert "blocks.1.attn.hook_pattern" in cache


def test_hooks_on_q_and_z_still_fire_on_the_fused_path(tiny_model):
    tokens, _ = _padded()
    seen = []
    hooks = [
        (f"blocks.0.attn.{name}", lambda x, hook: seen.append(hook.name)) for name in ("hook_rot_q", "hook_z")
    ]
    with tiny_model.hooks(fwd_hooks=hooks):
        tiny_model(tokens)
    assert seen == ["blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_z"]


def test_configs_that_change_the_function_are_not_fused(tiny_tokenizer):
    capped = dataclasses.replace(gemma_like_config(len(tiny_tokenizer)), attn_scores_soft_cap=50.0)
    model = make_tiny_model(capped, tiny_tokenizer)
    assert not any(fusable(block.attn) for block in model.blocks)
    with reference_attention():
        reference = model(torch.tensor([ROWS[0]]))
    torch.testing.assert_close(model(torch.tensor([ROWS[0]])), reference, atol=0, rtol=0)


def test_installing_twice_keeps_one_reference_forward(tiny_tokenizer):
    model = make_tiny_model(llama_like_config(len(tiny_tokenizer)), tiny_tokenizer)
    reference = model.blocks[0].attn._emolib_reference_forward
    use_fused_attention(model)
    assert model.blocks[0].attn._emolib_reference_forward is reference

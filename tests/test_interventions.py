"""The SAE splice and edit hooks (emolib.sae.interventions) on a tiny model, each against the residual edit it stands
for, computed by hand: an unedited splice is the model, gain -1 is zero-ablation, adding to a code adds its decoder
row, clamping sets a feature where it fires, a direction is added at masked positions only; and the public LM loss
sees the hooks."""

from __future__ import annotations

import pytest
import torch
from test_tracing import make_sae

from emolib.lm.batching import lm_loss
from emolib.sae.interventions import (
    AddToFeatures,
    ClampFeatures,
    InterventionError,
    ScaleFeatures,
    SetFeatures,
    block_input_recorders,
    decoder_direction,
    decoder_hook,
    direction_hook,
    edit_hooks,
    feature_index,
    first_edited_block,
    leaf_hook,
    resid_post,
    resume_at_block,
    splice_hook,
)

D_SAE = 16
SEQUENCES = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51, 52], [1, 60, 61, 62, 63, 64]]


@pytest.fixture(scope="module")
def sae():
    """Layer 0's SAE, decoders about as large as the residual, so that edits move the model."""
    return make_sae(0, seed=3, decoder_norm=1.0)


@pytest.fixture
def tokens():
    return torch.tensor([[1, 40, 41, 42, 43, 44, 45], [1, 50, 51, 52, 53, 54, 55]])


def run(model, tokens, hooks):
    """Logits with `hooks`, and the residual entering block 1 (= after block 0's hooks)."""
    seen = {}

    def keep(resid, hook):
        seen["resid"] = resid.detach().clone()

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[*hooks, ("blocks.1.hook_resid_pre", keep)])
    return logits, seen["resid"]


def clean_resid(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=[resid_post(0)])
    return cache[resid_post(0)]


def edited_by_hand(model, tokens, sae, change):
    """Logits when block 0's output x becomes x + change(x, codes) at every position (codes = sae.encode(x))."""

    def hook(resid, hook):
        return resid + change(resid, sae.encode(resid))

    return run(model, tokens, [(resid_post(0), hook)])


# ---------------------------------------------------------------------------------------------- the splice


def test_an_unedited_splice_is_the_model_and_records_the_codes(tiny_model, sae, tokens):
    clean, _ = run(tiny_model, tokens, [])
    recorded = []
    for hook in (
        splice_hook(sae, record=recorded.append),
        splice_hook(sae, None, ScaleFeatures(0.0)),  # gain 1: codes unchanged
    ):
        logits, _ = run(tiny_model, tokens, [(resid_post(0), hook)])
        assert torch.equal(logits, clean)
    codes = sae.encode(clean_resid(tiny_model, tokens).reshape(-1, tiny_model.cfg.d_model))
    torch.testing.assert_close(recorded[0], codes)


def test_positions_as_mask_index_or_none_agree(tiny_model, sae, tokens):
    edit = SetFeatures(torch.zeros(D_SAE), feature_index([1, 2, 3]))
    everywhere = torch.ones(tokens.shape, dtype=torch.bool)
    results = [
        run(tiny_model, tokens, [(resid_post(0), splice_hook(sae, positions, edit))])[0]
        for positions in (None, everywhere, everywhere.nonzero(as_tuple=True))
    ]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    with pytest.raises(InterventionError, match="position mask"):
        run(tiny_model, tokens, [(resid_post(0), splice_hook(sae, everywhere[:, :3], edit))])


def test_zero_and_mean_ablation_move_the_residual_by_the_features_decoder_rows(tiny_model, sae, tokens):
    features = [2, 7]
    means = torch.rand(D_SAE, generator=torch.Generator().manual_seed(0))
    for values in (torch.zeros(D_SAE), means):
        got, _ = run(
            tiny_model,
            tokens,
            [(resid_post(0), splice_hook(sae, None, SetFeatures(values, feature_index(features))))],
        )

        def change(resid, codes, values=values):
            return sum((values[f] - codes[..., f : f + 1]) * sae.W_dec[f] for f in features)

        expected, _ = edited_by_hand(tiny_model, tokens, sae, change)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_gain_minus_one_is_zero_ablation_and_gain_scales_the_contribution(tiny_model, sae, tokens):
    index = feature_index([4])
    zero, _ = run(
        tiny_model, tokens, [(resid_post(0), splice_hook(sae, None, SetFeatures(torch.zeros(D_SAE), index)))]
    )
    gain0, _ = run(tiny_model, tokens, [(resid_post(0), splice_hook(sae, None, ScaleFeatures(-1.0, index)))])
    assert torch.equal(zero, gain0)
    doubled, _ = run(tiny_model, tokens, [(resid_post(0), splice_hook(sae, None, ScaleFeatures(1.0, index)))])
    expected, _ = edited_by_hand(tiny_model, tokens, sae, lambda resid, codes: codes[..., 4:5] * sae.W_dec[4])
    torch.testing.assert_close(doubled, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(doubled, zero)


def test_adding_to_a_code_adds_its_decoder_row(tiny_model, sae, tokens):
    alpha = 3.0
    via_code, resid_code = run(
        tiny_model,
        tokens,
        [(resid_post(0), splice_hook(sae, None, AddToFeatures(alpha, feature_index([5]))))],
    )
    via_decoder, resid_decoder = run(tiny_model, tokens, [(resid_post(0), decoder_hook(sae, [5], alpha))])
    torch.testing.assert_close(resid_code, resid_decoder, atol=1e-5, rtol=0)
    torch.testing.assert_close(via_code, via_decoder, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        resid_decoder - clean_resid(tiny_model, tokens), (alpha * sae.W_dec[5]).expand_as(resid_decoder)
    )
    # several features, one amount each
    direction = decoder_direction(sae, [1, 2], [0.5, -2.0])
    torch.testing.assert_close(direction, 0.5 * sae.W_dec[1] - 2.0 * sae.W_dec[2])


def test_clamping_sets_a_feature_where_it_fires_or_everywhere():
    codes = torch.tensor([[0.0, 2.0, 0.5], [1.0, 0.0, 0.0]])
    active = ClampFeatures(5.0, feature_index([0, 1]))(codes)
    assert active.tolist() == [[0.0, 5.0, 0.5], [5.0, 0.0, 0.0]]
    everywhere = ClampFeatures(5.0, feature_index([1]), only_active=False)(codes)
    assert everywhere.tolist() == [[0.0, 5.0, 0.5], [1.0, 5.0, 0.0]]
    per_feature = ClampFeatures(torch.tensor([7.0, 8.0]), feature_index([0, 2]))(codes)
    assert per_feature.tolist() == [[0.0, 2.0, 8.0], [7.0, 0.0, 0.0]]
    assert AddToFeatures(1.0, feature_index([2]))(codes).tolist() == [[0.0, 2.0, 1.5], [1.0, 0.0, 1.0]]
    assert ScaleFeatures(1.0)(codes).tolist() == [[0.0, 4.0, 1.0], [2.0, 0.0, 0.0]]
    assert codes.tolist() == [[0.0, 2.0, 0.5], [1.0, 0.0, 0.0]], "edits never change their input"


def test_clamping_in_the_model_is_the_residual_edit_where_the_feature_fires(tiny_model, sae, tokens):
    codes = sae.encode(clean_resid(tiny_model, tokens))
    f = int((codes > 0).float().mean((0, 1)).sub(0.5).abs().argmin())  # fires at some positions, not all
    assert 0 < int((codes[..., f] > 0).sum()) < codes[..., f].numel()
    got, _ = run(
        tiny_model, tokens, [(resid_post(0), splice_hook(sae, None, ClampFeatures(4.0, feature_index([f]))))]
    )

    def change(resid, codes):
        a = codes[..., f : f + 1]
        return torch.where(a > 0, 4.0 - a, torch.zeros_like(a)) * sae.W_dec[f]

    expected, _ = edited_by_hand(tiny_model, tokens, sae, change)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_direction_is_added_at_masked_positions_only(tiny_model, tokens):
    direction = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[0, 2] = mask[1, 4:] = True
    _, steered = run(tiny_model, tokens, [(resid_post(0), direction_hook(direction, 2.5, mask))])
    delta = steered - clean_resid(tiny_model, tokens)
    torch.testing.assert_close(delta[mask], (2.5 * direction).expand(int(mask.sum()), -1), atol=1e-5, rtol=0)
    assert delta[~mask].abs().max() == 0
    _, everywhere = run(tiny_model, tokens, [(resid_post(0), direction_hook(direction, 2.5))])
    torch.testing.assert_close(everywhere[~mask], steered[~mask] + 2.5 * direction, atol=1e-5, rtol=0)
    with pytest.raises(InterventionError, match="one vector"):
        direction_hook(direction[None])


def test_leaf_splice_keeps_the_value_and_passes_the_decoder_jacobian(tiny_model, sae, tokens):
    leaves = []
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    with (
        torch.enable_grad(),
        tiny_model.hooks(fwd_hooks=[(resid_post(0), leaf_hook(sae, None, leaves.append))]),
    ):
        resid = tiny_model(tokens, stop_at_layer=1)  # the residual after block 0, its hook applied
        (grad,) = torch.autograd.grad((resid * v).sum(), leaves)
    torch.testing.assert_close(resid.detach(), clean_resid(tiny_model, tokens))
    torch.testing.assert_close(grad, (sae.W_dec @ v).expand_as(grad), atol=1e-5, rtol=1e-5)


def test_starting_at_the_first_edited_block_equals_the_whole_forward(tiny_model, tokens):
    saes = {1: make_sae(1, seed=4, decoder_norm=1.0)}
    edits = {1: SetFeatures(torch.zeros(D_SAE))}
    hooks = edit_hooks(saes, edits)
    start = first_edited_block(edits)
    assert start == 1 and first_edited_block({}) == 0
    inputs: dict = {}
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=block_input_recorders(tiny_model.cfg.n_layers, inputs)):
        tiny_model(tokens)
    assert sorted(inputs) == [0, 1]
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=hooks):
        whole = tiny_model(tokens, stop_at_layer=tiny_model.cfg.n_layers)
        late = resume_at_block(tiny_model, inputs, start)
    torch.testing.assert_close(late, whole, atol=1e-5, rtol=0)
    with pytest.raises(InterventionError, match="without SAEs"):
        edit_hooks(saes, {0: edits[1]})


def test_bad_features_raise(sae):
    with pytest.raises(InterventionError, match="out of range"):
        splice_hook(sae, None, SetFeatures(torch.zeros(D_SAE), feature_index([D_SAE])))
    with pytest.raises(InterventionError, match="out of range"):
        decoder_direction(sae, [-1])


# ----------------------------------------------------------------------------------------- LM loss with hooks


def test_lm_loss_sees_the_hooks(tiny_model, sae):
    clean, n = lm_loss(tiny_model, SEQUENCES)
    identity, n_identity = lm_loss(
        tiny_model, SEQUENCES, fwd_hooks=[(resid_post(0), splice_hook(sae, None, ScaleFeatures(0.0)))]
    )
    assert identity == clean and n_identity == n == sum(len(s) - 1 for s in SEQUENCES)
    ablated, _ = lm_loss(
        tiny_model,
        SEQUENCES,
        fwd_hooks=[(resid_post(0), splice_hook(sae, None, SetFeatures(torch.zeros(D_SAE))))],
    )
    assert abs(ablated - clean) > 1e-3
    assert not any(hp.fwd_hooks for hp in tiny_model.hook_dict.values())

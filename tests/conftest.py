"""Shared fixtures: a tiny trained tokenizer with a chat template, and tiny random-weight TransformerLens models.

The tiny models mirror the real models' architectures (Llama-like SmolLM2, Gemma-3-like) at a size where a forward
pass takes milliseconds, so the mechanics of prompting and scoring can be tested exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from sae_lens import HookedSAETransformer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from emolib.lm.attention import use_fused_attention
from emolib.lm.models import LoadedModel, ModelInfo, use_transposed_layout

# Nothing in the test suite may reach the Hugging Face hub (huggingface_hub reads the flag when it is first
# imported, which may happen before this file runs: `offline_hub` below sets it again for every session).
os.environ["HF_HUB_OFFLINE"] = "1"

#: Threads torch would use; the tiny models run on one (see `threads`).
DEFAULT_THREADS = torch.get_num_threads()

EMOTIONS = ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")

#: Special tokens of the tiny tokenizer (ids 0..6 in this order).
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

#: Minimal chat template in the usual style: BOS, one block per turn, and an opened assistant turn on request.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

#: Training corpus of the tiny tokenizer. "joy" and "fear" are frequent in both spellings (single-token
#: verbalisers); "shame" and "guilt" never occur (multi-token verbalisers).
CORPUS = [
    "Choose the most appropriate emotion from the following list: anger, disgust, fear, joy, sadness, surprise, "
    "neutral. Respond with only the emotion, without any explanation.",
    "Experience: I lost my keys on the way home. Answer: fear",
    "Text: The cake was wonderful and everyone sang. Answer: joy",
    "Text: My brother took my car without asking. Answer: anger",
    "Experience: The milk in the fridge had gone bad. Answer: disgust",
    "Text: Our old dog died last winter. Answer: sadness",
    "Experience: A friend I had not seen in years knocked on the door. Answer: surprise",
    "Text: The bus arrives at nine. Answer: neutral",
    "Answer: joy Answer: Joy Answer: fear Answer: Fear",
    " joy Joy fear Fear joy Joy fear Fear anger Anger sadness Sadness",
    "I was happy, then sad, then angry, then afraid, then disgusted, then surprised.",
    "She felt joy. He felt fear. They felt anger. We felt sadness. You felt surprise.",
    "The weather today is mild and the shops open at ten.",
    "When the results came in I could not stop smiling.",
    "The spider crawled across my pillow in the dark.",
    "I waited for hours and nobody called me back.",
]


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tokenizer


def make_tiny_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """A deterministic byte-level BPE tokenizer (~400 tokens) that prepends BOS and has a chat template.

    Saved to `folder` and loaded back, like a real checkpoint's tokenizer (TransformerLens reloads tokenizers by
    their `name_or_path`).
    """
    PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        add_bos_token=True,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def llama_like_config(d_vocab: int) -> HookedTransformerConfig:
    """SmolLM2's architecture (grouped-query attention, rotary, gated SiLU MLP, RMSNorm) at toy size."""
    return HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        n_key_value_heads=2,
        d_mlp=64,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        final_rms=True,
        n_ctx=512,
        d_vocab=d_vocab,
        seed=0,
        device="cpu",
        original_architecture="LlamaForCausalLM",
    )


def gemma_like_config(d_vocab: int, window_size: int = 512) -> HookedTransformerConfig:
    """Gemma 3's architecture (norms before and after each sublayer, q/k norms, local and global layers) at toy
    size, with a logit soft cap to exercise that branch."""
    return HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        n_key_value_heads=1,
        d_mlp=64,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        rotary_base=1_000_000,
        rotary_base_local=10_000,
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        use_qk_norm=True,
        use_local_attn=True,
        window_size=window_size,
        attn_types=["local", "global"],
        output_logits_soft_cap=30.0,
        n_ctx=512,
        d_vocab=d_vocab,
        seed=0,
        device="cpu",
        original_architecture="Gemma3ForCausalLM",
    )


def make_tiny_model(cfg: HookedTransformerConfig, tokenizer, transposed: bool = True) -> HookedSAETransformer:
    """Random weights (seeded by the config), norm weights perturbed, in eval mode; by default with the memory
    layout and the fused attention `load_model` uses (`use_transposed_layout`, `use_fused_attention`)."""
    torch.manual_seed(cfg.seed or 0)
    model = HookedSAETransformer(cfg, tokenizer, move_to_device=False)
    # Norm weights are initialised to one; perturb them so a wrong norm placement would show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".w"):
                param.add_(0.1 * torch.randn_like(param))
    model.eval()
    if transposed:
        use_transposed_layout(model)
        use_fused_attention(model)
    return model


def tiny_loaded(model, tokenizer, *, name: str, chat: bool) -> LoadedModel:
    info = ModelInfo(
        name=name,
        family=model.cfg.original_architecture or "tiny",
        chat=chat,
        n_layers=model.cfg.n_layers,
        d_model=model.cfg.d_model,
        d_vocab=model.cfg.d_vocab,
        n_params=sum(p.numel() for p in model.parameters()),
        source="tests",
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


@pytest.fixture(scope="session", autouse=True)
def offline_hub():
    """Offline mode for every test, whatever the import order (huggingface_hub reads the flag at call time)."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="session", autouse=True)
def float32_forwards():
    """Real models load in float32 in every test, so a test gives the same numbers on a CPU with bfloat16 units
    (where "auto" picks bfloat16) as on one without; tests of the precision choice set it themselves."""
    from emolib.lm.precision import PRECISION_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PRECISION_ENV, "float32")
        yield


@pytest.fixture(autouse=True)
def threads(request):
    """One thread for fast tests: the tiny models' matrices are so small that thread hand-offs dominate a forward
    pass, and on a busy machine two threads can be a hundred times slower than one. Real models keep the default."""
    torch.set_num_threads(DEFAULT_THREADS if request.node.get_closest_marker("slow") else 1)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> PreTrainedTokenizerBase:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer) -> HookedSAETransformer:
    """Llama-like tiny model; session-scoped, so tests that add hooks must remove them (use `model.hooks()`)."""
    return make_tiny_model(llama_like_config(len(tiny_tokenizer)), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_gemma(tiny_tokenizer) -> HookedSAETransformer:
    return make_tiny_model(gemma_like_config(len(tiny_tokenizer)), tiny_tokenizer)


@pytest.fixture(params=["llama", "gemma"])
def any_tiny_model(request, tiny_model, tiny_gemma) -> HookedSAETransformer:
    return {"llama": tiny_model, "gemma": tiny_gemma}[request.param]


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A fresh EMOLIB_CACHE_DIR for tests that write cache entries."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("EMOLIB_CACHE_DIR", str(folder))
    return folder

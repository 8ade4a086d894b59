"""Sparse autoencoders on every layer's residual stream: trained with sae-lens, saved in its format, and measured.

All layers' SAEs train together with sae-lens' `MultiSAETrainer` from one stream of `{hook: activations}` batches
(one pass over cached activations drives every SAE), are saved as SAELens folders (`cfg.json` + safetensors, one
per hook) that `sae_lens.SAE.load_from_disk` reads, and are cached under a key of the activations and the config.
`evaluate_saes` measures reconstruction and downstream next-token loss per hook on held-out tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE, LoggingConfig, TrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata, TrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from emolib.cache import cache_dir, cached_entry, config_key, write_json
from emolib.lm.classify import final_logprobs

#: Bump when training or the saved layout changes, so cached SAEs are retrained.
SAE_FORMAT_VERSION = "1"

#: Written at the top of a folder of saved SAEs: format version, hooks in order, training config.
INDEX_FILE = "emolib_saes.json"

#: A feature is "dense" when it is active on more than this fraction of the evaluated tokens.
DENSE_THRESHOLD = 0.10

#: Training-time SAE configs by architecture name (both are sparsity-by-count: no L1 coefficient to tune).
ARCHITECTURES: dict[str, type[TrainingSAEConfig]] = {
    "batchtopk": BatchTopKTrainingSAEConfig,
    "topk": TopKTrainingSAEConfig,
}

NORMALIZATIONS = ("none", "expected_average_only_in")
LR_SCHEDULERS = ("constant", "cosineannealing")

ActivationBatch = dict[str, Float[Tensor, "batch d_in"]]  # noqa: F722 (jaxtyping shape)


class SAEError(ValueError):
    """A bad SAE config, a batch stream that does not match it, or a source that holds no SAEs."""


class BatchFactory(Protocol):
    """Makes an endless stream of `{hook: [batch, d_in]}` batches with rows aligned across hooks.

    `functools.partial(store.endless_batches, hooks=hooks)` is one (for an `emolib.sae.activations.ActivationStore`);
    tests pass synthetic generators.
    """

    def __call__(self, batch_size: int, *, seed: int) -> Iterator[ActivationBatch]: ...


@dataclass(frozen=True)
class SAETrainingConfig:
    """How to train one SAE per hook. Presets: `QUICK` (seconds, for tests and quick builds) and `FULL`.

    `total_training_samples` is the token budget including repeats (tokens x epochs); steps are that divided by
    `train_batch_size`. The SAE width is `d_sae` if given, else `expansion_factor` x d_in. `k` is the number of
    active features per token (on average over the batch for "batchtopk"). Windows are in training steps:
    a feature is dead (and trained by the auxiliary loss) after `dead_feature_window` steps without firing. The
    learning rate warms up linearly over `lr_warm_up_steps`, follows `lr_scheduler_name`, and decays linearly to 0
    over the last `lr_decay_fraction` of the steps. `init_b_dec_to_mean` starts the decoder bias at the data mean
    (estimated with the activation scale from the first `n_batches_for_norm_estimate` batches): Gemma's residual
    stream has a mean as long as a typical token's vector, and a short run that must first learn it from zero
    ends with reconstructions worse than the mean itself.
    """

    architecture: str = "batchtopk"
    d_sae: int | None = None
    expansion_factor: int = 4
    k: int = 32
    lr: float = 2e-3
    lr_scheduler_name: str = "constant"
    lr_warm_up_steps: int = 0
    lr_decay_fraction: float = 0.2
    lr_end: float | None = None
    train_batch_size: int = 512
    total_training_samples: int = 330_000
    dead_feature_window: int = 50
    feature_sampling_window: int = 100
    aux_loss_coefficient: float = 1.0
    normalize_activations: str = "expected_average_only_in"
    n_batches_for_norm_estimate: int = 20
    init_b_dec_to_mean: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEError(
                f"unknown SAE architecture {self.architecture!r}; choose one of {sorted(ARCHITECTURES)}"
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEError(
                f"normalize_activations must be one of {NORMALIZATIONS}, not {self.normalize_activations!r}"
            )
        if self.lr_scheduler_name not in LR_SCHEDULERS:
            raise SAEError(
                f"lr_scheduler_name must be one of {LR_SCHEDULERS}, not {self.lr_scheduler_name!r}"
            )
        for name in ("k", "expansion_factor", "train_batch_size", "total_training_samples", "dead_feature_window",
                     "feature_sampling_window", "n_batches_for_norm_estimate"):  # fmt: skip
            if getattr(self, name) < 1:
                raise SAEError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.d_sae is not None and self.d_sae < self.k:
            raise SAEError(f"d_sae ({self.d_sae}) must be at least k ({self.k})")
        if self.total_training_samples < self.train_batch_size:
            raise SAEError("total_training_samples is smaller than one batch: no training step would run")
        if not 0 <= self.lr_decay_fraction < 1:
            raise SAEError(f"lr_decay_fraction must be in [0, 1), not {self.lr_decay_fraction}")
        if self.lr_warm_up_steps + self.lr_decay_steps >= self.n_steps:
            raise SAEError("lr_warm_up_steps and lr_decay_fraction leave no steps at the full learning rate")

    def for_rows(self, n_rows: int, epochs: int) -> SAETrainingConfig:
        """This config with a budget of `epochs` passes over `n_rows` cached tokens (whole batches)."""
        total = n_rows * epochs // self.train_batch_size * self.train_batch_size
        return dataclasses.replace(self, total_training_samples=total)

    @property
    def n_steps(self) -> int:
        return self.total_training_samples // self.train_batch_size

    @property
    def lr_decay_steps(self) -> int:
        """Steps of the final linear decay of the learning rate to 0 (`lr_decay_fraction` of the run)."""
        return round(self.lr_decay_fraction * self.n_steps)

    def width(self, d_in: int) -> int:
        """The number of SAE features for activations of width `d_in`."""
        return self.d_sae if self.d_sae is not None else self.expansion_factor * d_in

    def trainer_config(self) -> SAETrainerConfig:
        """The sae-lens trainer config: quiet (no wandb, no checkpoints), on CPU."""
        return SAETrainerConfig(
            total_training_samples=self.total_training_samples,
            train_batch_size_samples=self.train_batch_size,
            lr=self.lr,
            lr_end=self.lr_end if self.lr_end is not None else self.lr / 10,
            lr_scheduler_name=self.lr_scheduler_name,
            lr_warm_up_steps=self.lr_warm_up_steps,
            lr_decay_steps=self.lr_decay_steps,
            dead_feature_window=self.dead_feature_window,
            feature_sampling_window=self.feature_sampling_window,
            n_batches_for_norm_estimate=self.n_batches_for_norm_estimate,
            device="cpu",
            n_checkpoints=0,
            checkpoint_path=None,
            save_final_checkpoint=False,
            logger=LoggingConfig(log_to_wandb=False),
        )


#: A few seconds per layer on CPU: for tests and the quick build (quality goals are not expected). Plain TopK:
#: BatchTopK's inference threshold is a moving average (rate 0.01 per step) that 50 steps leave far too low.
QUICK = SAETrainingConfig(
    architecture="topk",
    expansion_factor=2,
    k=16,
    train_batch_size=256,
    total_training_samples=16_384,
    dead_feature_window=20,
    feature_sampling_window=32,
    n_batches_for_norm_estimate=4,
)

#: The book's SAEs: width 4 x d_model, k 32, lr 2e-3 decaying over the last 20%. The token budget here (330k
#: samples) is a default; the book sets it from its corpus (`FULL.for_rows(store.n_rows, epochs)`, see
#: `emolib.sae.suite`). On SmolLM2 WikiText, 110k tokens x 3 epochs gave loss recovered ~0.97 but FVE ~0.76 at
#: layer 15 and ~0.67 at layer 27 (attention-sink outliers excluded): see `GOALS`.
FULL = SAETrainingConfig()

PRESETS: dict[str, SAETrainingConfig] = {"quick": QUICK, "full": FULL}


# ------------------------------------------------------------------------------------------------ training


def _hook_seed(seed: int, hook: str) -> int:
    """A per-hook initialisation seed, so an SAE does not depend on which other hooks train alongside it."""
    return int(hashlib.sha256(f"{seed}:{hook}".encode()).hexdigest()[:8], 16)


def make_training_sae(
    config: SAETrainingConfig, *, hook: str, d_in: int, metadata: Mapping[str, Any] | None = None
) -> TrainingSAE:
    """A freshly initialised (seeded) sae-lens training SAE for one hook, with emolib's metadata attached."""
    meta = SAEMetadata(
        **{
            **dict(metadata or {}),
            "hook_name": hook,
            "training_tokens": config.total_training_samples,
            "emolib_training_config": dataclasses.asdict(config),
            "emolib_format": SAE_FORMAT_VERSION,
        }
    )
    cfg_class = ARCHITECTURES[config.architecture]
    sae_cfg = cfg_class(
        d_in=d_in,
        d_sae=config.width(d_in),
        k=config.k,
        aux_loss_coefficient=config.aux_loss_coefficient,
        normalize_activations=config.normalize_activations,
        dtype="float32",
        device="cpu",
        metadata=meta,
    )
    sae_class, _ = get_sae_training_class(config.architecture)
    with torch.random.fork_rng():
        torch.manual_seed(_hook_seed(config.seed, hook))
        return sae_class(sae_cfg)


def _checked(
    stream: Iterable[ActivationBatch], hooks: Sequence[str], d_in: int, batch_size: int
) -> Iterator[ActivationBatch]:
    """Pass batches through, raising `SAEError` on a missing hook, a wrong shape, or an exhausted stream."""
    n = 0
    for batch in stream:
        if not isinstance(batch, Mapping):
            raise SAEError(f"batches must be {{hook: tensor}} dicts, got {type(batch).__name__}")
        missing = [hook for hook in hooks if hook not in batch]
        if missing:
            raise SAEError(f"the batch stream has no activations for hooks {missing}; it has {sorted(batch)}")
        for hook in hooks:
            shape = tuple(batch[hook].shape)
            if len(shape) != 2 or shape[1] != d_in:
                raise SAEError(f"activations at {hook} have shape {shape}, expected (batch, d_in={d_in})")
            if shape[0] != batch_size:
                raise SAEError(
                    f"activations at {hook} come in batches of {shape[0]} rows, but train_batch_size is "
                    f"{batch_size}: pass a factory (it is asked for the right size) or an endless stream of full batches"
                )
        n += 1
        yield batch
    raise SAEError(
        f"the batch stream ended after {n} batches; training needs an endless stream (e.g. `endless_batches`)"
    )


def _stream(
    batches: BatchFactory | Iterable[ActivationBatch], config: SAETrainingConfig
) -> Iterable[ActivationBatch]:
    if callable(batches) and not isinstance(batches, Iterator):
        return batches(config.train_batch_size, seed=config.seed)
    return batches


def _check_hooks(hooks: Sequence[str]) -> list[str]:
    hooks = list(hooks)
    if not hooks:
        raise SAEError("no hooks to train SAEs for")
    if len(set(hooks)) != len(hooks):
        raise SAEError(f"hooks are repeated: {hooks}")
    return hooks


def _start_from_data(
    stream: Iterator[ActivationBatch],
    saes: Mapping[str, TrainingSAE],
    scalers: Mapping[str, ActivationScaler],
    config: SAETrainingConfig,
) -> Iterator[ActivationBatch]:
    """Set each hook's activation scale and (optionally) initial decoder bias from the stream's first batches.

    The scale is sae-lens' own (`sqrt(d_in) / mean norm`, set on the trainer's scaler so it does not estimate it
    again and folds it into the weights at the end); the bias starts at the scaled mean. The batches read here go
    back in front of the stream and are trained on.
    """
    head = [next(stream) for _ in range(config.n_batches_for_norm_estimate)]
    for hook, sae in saes.items():
        x = torch.cat([batch[hook] for batch in head]).to(torch.float32)
        scale = 1.0
        if config.normalize_activations == "expected_average_only_in":
            scale = sae.cfg.d_in**0.5 / torch.linalg.vector_norm(x, dim=-1).mean().item()
            scalers[hook].scaling_factor = scale
        if config.init_b_dec_to_mean:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0) * scale)
    return itertools.chain(head, stream)


def train_saes(
    batches: BatchFactory | Iterable[ActivationBatch],
    config: SAETrainingConfig,
    *,
    hooks: Sequence[str],
    d_in: int,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, TrainingSAE]:
    """Train one SAE per hook in lockstep with sae-lens' `MultiSAETrainer` from one `{hook: [batch, d_in]}` stream.

    `batches` is a `BatchFactory` (called once with the config's batch size and seed) or an endless iterable of
    full batches. Each SAE gets its own optimiser, schedule, activation scaler and dead-feature tracking; the
    activation scaling is folded into the weights at the end. `metadata` (e.g. `model_name`) goes into every SAE's
    saved config. Returns sae-lens training SAEs (see `save_saes` / `load_saes` for the inference form).
    """
    hooks = _check_hooks(hooks)
    stream = _checked(_stream(batches, config), hooks, d_in, config.train_batch_size)
    saes = {hook: make_training_sae(config, hook=hook, d_in=d_in, metadata=metadata) for hook in hooks}
    trainer = MultiSAETrainer(
        cfg=config.trainer_config(),
        saes=saes,
        hook_names={hook: hook for hook in hooks},
        data_provider=stream,
    )
    scalers = {hook: trainer.trainers[hook].activation_scaler for hook in hooks}
    trainer.data_provider = _start_from_data(stream, saes, scalers, config)
    return trainer.fit()


def train_sae(
    batches: BatchFactory | Iterable[ActivationBatch],
    config: SAETrainingConfig,
    *,
    hook: str,
    d_in: int,
    metadata: Mapping[str, Any] | None = None,
) -> TrainingSAE:
    """Train the SAE of one hook with sae-lens' single-SAE `SAETrainer` (same stream format as `train_saes`)."""
    stream = _checked(_stream(batches, config), [hook], d_in, config.train_batch_size)
    sae = make_training_sae(config, hook=hook, d_in=d_in, metadata=metadata)
    trainer = SAETrainer(cfg=config.trainer_config(), sae=sae, data_provider=iter(()))
    stream = _start_from_data(stream, {hook: sae}, {hook: trainer.activation_scaler}, config)
    trainer.data_provider = (batch[hook] for batch in stream)
    return trainer.fit()


# ---------------------------------------------------------------------------------------- save and load


def save_saes(saes: Mapping[str, SAE], folder: Path | str, *, index: Mapping[str, Any] | None = None) -> Path:
    """Save SAEs in the SAELens format, one folder per hook (`folder/<hook>/cfg.json` + weights).

    Training SAEs are saved as their inference SAEs (`save_inference_model`: a BatchTopK SAE becomes a JumpReLU
    SAE with the learned global threshold), exactly as sae-lens' own training runners save them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for hook, sae in saes.items():
        if isinstance(sae, TrainingSAE):
            sae.save_inference_model(folder / hook)
        else:
            sae.save_model(folder / hook)
    write_json(folder / INDEX_FILE, {"format": SAE_FORMAT_VERSION, "hooks": list(saes), **dict(index or {})})
    return folder


def to_inference(saes: Mapping[str, SAE]) -> dict[str, SAE]:
    """The inference SAEs of training SAEs, through sae-lens' own save and load (others are returned as they are)."""
    if not any(isinstance(sae, TrainingSAE) for sae in saes.values()):
        return dict(saes)
    tmp = Path(tempfile.mkdtemp(prefix="emolib-saes-"))
    try:
        return load_saes(save_saes(saes, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def saes_key(
    config: SAETrainingConfig, *, activation_key: str, hooks: Sequence[str], d_in: int, metadata=None
) -> str:
    """Cache key of trained SAEs: the activations they learn from, the config, the hooks, and the format."""
    return config_key(SAE_FORMAT_VERSION, activation_key, config, list(hooks), d_in, dict(metadata or {}))


def train_saes_cached(
    batches: BatchFactory,
    config: SAETrainingConfig,
    *,
    hooks: Sequence[str],
    d_in: int,
    activation_key: str,
    metadata: Mapping[str, Any] | None = None,
    name: str = "saes",
) -> Path:
    """Folder of SAEs trained by `train_saes` and saved by `save_saes`, cached; a later call reuses it.

    `activation_key` identifies the activations `batches` reads (the activation cache's key), so SAEs are
    retrained when those change; the factory is only called when the SAEs are built.
    """
    hooks = _check_hooks(hooks)
    key = saes_key(config, activation_key=activation_key, hooks=hooks, d_in=d_in, metadata=metadata)
    folder = cache_dir("saes") / f"{name}-{key}"
    index = {"activation_key": activation_key, "d_in": d_in, "training_config": dataclasses.asdict(config)}

    def build(tmp: Path) -> None:
        with_key = {**dict(metadata or {}), "activation_key": activation_key}
        saes = train_saes(batches, config, hooks=hooks, d_in=d_in, metadata=with_key)
        save_saes(saes, tmp, index=index)

    return cached_entry(folder, build, meta={"name": name, "hooks": hooks, **index})


@dataclass(frozen=True)
class PretrainedSAEs:
    """SAEs of a sae-lens pretrained release: `sae_ids` maps each hook to its SAE id in the release."""

    release: str
    sae_ids: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PretrainedSpec:
    """One entry of the pretrained-SAE registry: a release with one SAE per layer, ids by layer template."""

    model: str
    release: str
    sae_id: str
    n_layers: int
    hook: str = "blocks.{layer}.hook_resid_post"

    def source(self, layers: Iterable[int] | None = None) -> PretrainedSAEs:
        layers = range(self.n_layers) if layers is None else layers
        return PretrainedSAEs(
            self.release, {self.hook.format(layer=i): self.sae_id.format(layer=i) for i in layers}
        )


#: Pretrained residual-stream SAEs for every layer of a registered model (they need the Hugging Face hub, or its
#: cache, and the network for sae-lens' Gemma 3 loader; see `load_saes`).
PRETRAINED: dict[str, PretrainedSpec] = {
    "gemma-scope-2-270m-res-16k-small": PretrainedSpec(
        model="gemma-3-270m",
        release="gemma-scope-2-270m-pt-res-all",
        sae_id="layer_{layer}_width_16k_l0_small",
        n_layers=18,
    ),
    "gemma-scope-2-270m-res-16k-big": PretrainedSpec(
        model="gemma-3-270m",
        release="gemma-scope-2-270m-pt-res-all",
        sae_id="layer_{layer}_width_16k_l0_big",
        n_layers=18,
    ),
}


def _select(available: Sequence[str], hooks: Sequence[str] | None, where: str) -> list[str]:
    if hooks is None:
        return list(available)
    missing = [hook for hook in hooks if hook not in available]
    if missing:
        raise SAEError(f"{where} has no SAEs for hooks {missing}; it has {list(available)}")
    return list(hooks)


def _local_hooks(folder: Path) -> list[str]:
    index = folder / INDEX_FILE
    if index.is_file():
        return list(json.loads(index.read_text())["hooks"])
    found = [p.name for p in folder.iterdir() if (p / "cfg.json").is_file()]
    return sorted(found, key=lambda h: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", h)])


def load_saes(
    source: Path | str | PretrainedSAEs, hooks: Sequence[str] | None = None, *, device: str = "cpu"
) -> dict[str, SAE]:
    """Inference SAEs by hook, from a folder saved by `save_saes`, a `PRETRAINED` name, or a `PretrainedSAEs`.

    Pretrained SAEs load through `SAE.from_pretrained(release, sae_id)`, which resolves the release in sae-lens'
    `pretrained_saes.yaml` and downloads through the Hugging Face hub (its local cache when offline). sae-lens'
    Gemma 3 (Gemma Scope 2) loader also reads each weight file's header over HTTP to learn the shapes, so those
    releases need the network even when the weights are cached.
    """
    if isinstance(source, str) and source in PRETRAINED:
        source = PRETRAINED[source].source()
    if isinstance(source, PretrainedSAEs):
        selected = _select(list(source.sae_ids), hooks, f"release {source.release!r}")
        saes = {}
        for hook in selected:
            sae = SAE.from_pretrained(source.release, source.sae_ids[hook], device=device)
            if sae.cfg.metadata.hook_name not in (None, hook):
                raise SAEError(
                    f"{source.release}/{source.sae_ids[hook]} reads {sae.cfg.metadata.hook_name}, not {hook}"
                )
            saes[hook] = sae
        return saes
    folder = Path(source)
    if not folder.is_dir():
        raise SAEError(
            f"{source!r} is neither a folder of saved SAEs nor a pretrained name; pretrained: {sorted(PRETRAINED)}"
        )
    available = _local_hooks(folder)
    if not available:
        raise SAEError(f"{folder} holds no SAEs (no <hook>/cfg.json)")
    return {
        hook: SAE.load_from_disk(folder / hook, device=device)
        for hook in _select(available, hooks, str(folder))
    }


# ------------------------------------------------------------------------------------------------ quality


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


def _outliers(resids: Sequence[Tensor], measured: Tensor, factor: float) -> Tensor:
    """Tokens whose norm at any of `resids` exceeds `factor` x the median norm of their sequence's measured tokens."""
    flagged = torch.zeros_like(measured)
    for resid in resids:
        norms = torch.linalg.vector_norm(resid, dim=-1)
        median = norms.masked_fill(~measured, torch.nan).nanmedian(dim=1).values
        flagged |= measured & (norms > factor * median[:, None])
    return flagged


def _nll_sum(model: HookedTransformer, final_resid: Tensor, tokens: Tensor, mask: Tensor) -> float:
    """Summed next-token NLL from the last block's residual, unembedding only the scored positions.

    Scored positions are those whose token and next token are both real (TransformerLens'
    `lm_cross_entropy_loss` rule); padding never reaches the unembedding, which for Gemma's 262k-token
    vocabulary is most of a forward pass's cost.
    """
    scored = mask[:, :-1].bool() & mask[:, 1:].bool()
    logprobs = final_logprobs(model, final_resid[:, :-1][scored])
    return -logprobs.gather(1, tokens[:, 1:][scored][:, None]).sum().item()


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
    whose residual norm at any evaluated hook exceeds that multiple of their sequence's median norm (the rule of
    `ExtractionConfig.outlier_factor`, the same when the same hooks are evaluated as were extracted). One clean forward caches every hook's residual; each variant then
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

    n_layers = model.cfg.n_layers
    loss_rows = tokens.shape[0] if loss_sequences is None else min(loss_sequences, tokens.shape[0])
    for rows, with_loss in tqdm(
        _length_batches(attention_mask, loss_rows, batch_size), desc="SAE quality", disable=not progress
    ):
        columns = attention_mask[rows].any(0).nonzero()
        width = int(columns.max()) + 1 if len(columns) else 1
        toks, mask, keep = tokens[rows, :width], attention_mask[rows, :width], keep_all[rows, :width]
        measured = mask.bool() & ~keep
        final, cache = model.run_with_cache(
            toks,
            attention_mask=mask,
            names_filter=hooks,
            stop_at_layer=n_layers if with_loss else max(starts.values()),
        )
        if outlier_factor is not None:
            outliers = _outliers([cache[hook] for hook in hooks], measured, outlier_factor)
            keep, measured = keep | outliers, measured & ~outliers
            n_outliers += int(outliers.sum())
        if with_loss:
            clean_loss += _nll_sum(model, final, toks, mask)
            n_predicted += int((mask[:, :-1].bool() & mask[:, 1:].bool()).sum())
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
                hook_stats.loss[variant] += _nll_sum(model, out, toks, mask)
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


def missed_goals(table: pd.DataFrame, k: float, goals: QualityGoals = GOALS) -> pd.DataFrame:
    """The rows of a quality table that miss at least one goal, with a `missed` column naming the goals."""
    checks = pd.DataFrame(
        {
            "fve": table["fve"] < goals.min_fve,
            "loss_recovered": ~(table["loss_recovered"] >= goals.min_loss_recovered),
            "dead_fraction": table["dead_fraction"] > goals.max_dead_fraction,
            "l0": (table["l0"] - k).abs() > goals.l0_tolerance * k,
        },
        index=table.index,
    )
    missed = checks.apply(lambda row: ", ".join(name for name, bad in row.items() if bad), axis=1)
    out = table.assign(missed=missed)
    return out[out["missed"] != ""]


def goal_summary(table: pd.DataFrame, k: float, goals: QualityGoals = GOALS) -> str:
    """One line for a chapter: how many layers meet every goal, and which miss which."""
    misses = missed_goals(table, k, goals)
    if misses.empty:
        return f"all {len(table)} layers meet every goal"
    detail = "; ".join(f"{hook}: {row.missed}" for hook, row in misses.iterrows())
    return f"{len(table) - len(misses)} of {len(table)} layers meet every goal; missing: {detail}"

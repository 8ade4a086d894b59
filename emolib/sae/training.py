"""Training one SAE per layer together with sae-lens' `MultiSAETrainer`, from one stream of `{hook: activations}`
batches, and caching the trained SAEs under a key of the activations and the config."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from jaxtyping import Float
from sae_lens import LoggingConfig, TrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata, TrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from torch import Tensor

from emolib.cache import cache_dir, cached_entry, config_key
from emolib.lm.precision import dtype_name
from emolib.sae.loading import SAE_FORMAT_VERSION, SAEError, save_saes

#: A feature is "dense" when it is active on more than this fraction of the evaluated tokens.

#: Training-time SAE configs by architecture name (both are sparsity-by-count: no L1 coefficient to tune).
ARCHITECTURES: dict[str, type[TrainingSAEConfig]] = {
    "batchtopk": BatchTopKTrainingSAEConfig,
    "topk": TopKTrainingSAEConfig,
}

NORMALIZATIONS = ("none", "expected_average_only_in")
LR_SCHEDULERS = ("constant", "cosineannealing")

ActivationBatch = dict[str, Float[Tensor, "batch d_in"]]  # noqa: F722 (jaxtyping shape)


class BatchFactory(Protocol):
    """Makes an endless stream of `{hook: [batch, d_in]}` batches with rows aligned across hooks.

    `functools.partial(store.endless_batches, hooks=hooks)` is one (for an `emolib.sae.activations.ActivationStore`);
    tests pass synthetic generators.
    """

    def __call__(self, batch_size: int, *, seed: int) -> Iterator[ActivationBatch]: ...


@dataclass(frozen=True)
class SAETrainingConfig:
    """How to train one SAE per hook; the defaults are the book's SAEs (presets: `emolib.studies.presets`).

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

    def trainer_config(self, device: str = "cpu") -> SAETrainerConfig:
        """The sae-lens trainer config: quiet (no wandb, no checkpoints), on `device`."""
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
            device=device,
            n_checkpoints=0,
            checkpoint_path=None,
            save_final_checkpoint=False,
            logger=LoggingConfig(log_to_wandb=False),
        )


# ------------------------------------------------------------------------------------------------ training


def _hook_seed(seed: int, hook: str) -> int:
    """A per-hook initialisation seed, so an SAE does not depend on which other hooks train alongside it."""
    return int(hashlib.sha256(f"{seed}:{hook}".encode()).hexdigest()[:8], 16)


def make_training_sae(
    config: SAETrainingConfig,
    *,
    hook: str,
    d_in: int,
    metadata: Mapping[str, Any] | None = None,
    device: str = "cpu",
) -> TrainingSAE:
    """A freshly initialised (seeded) sae-lens training SAE for one hook, with emolib's metadata attached.

    The weights are drawn on the CPU and then moved, so a seed gives the same initial SAE on every device."""
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
        sae = sae_class(sae_cfg)
    if device != "cpu":
        sae.to(device)
        sae.cfg.device = device
    return sae


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


def _on_device(stream: Iterable[ActivationBatch], device: str) -> Iterator[ActivationBatch]:
    """The batches moved to the SAEs' device (the activation cache reads them into CPU memory)."""
    for batch in stream:
        yield {hook: x.to(device, non_blocking=True) for hook, x in batch.items()}


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
    precision: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict[str, TrainingSAE]:
    """Train one SAE per hook in lockstep with sae-lens' `MultiSAETrainer` from one `{hook: [batch, d_in]}` stream.

    `batches` is a `BatchFactory` (called once with the config's batch size and seed) or an endless iterable of
    full batches. Each SAE gets its own optimiser, schedule, activation scaler and dead-feature tracking; the
    activation scaling is folded into the weights at the end. `metadata` (e.g. `model_name`) goes into every SAE's
    saved config. `precision` bfloat16 runs the SAEs' matrix products under sae-lens' autocast (float32 master
    weights, optimiser and losses). `device` is where the SAEs train ("cpu", "cuda:0", ...; the batches are moved
    there). Returns sae-lens training SAEs (see `save_saes` / `load_saes` for the inference form).
    """
    hooks = _check_hooks(hooks)
    stream = _checked(_stream(batches, config), hooks, d_in, config.train_batch_size)
    if device != "cpu":
        stream = _on_device(stream, device)
    saes = {
        hook: make_training_sae(config, hook=hook, d_in=d_in, metadata=metadata, device=device)
        for hook in hooks
    }
    trainer = MultiSAETrainer(
        cfg=dataclasses.replace(config.trainer_config(device), autocast=precision == torch.bfloat16),
        saes=saes,
        hook_names={hook: hook for hook in hooks},
        data_provider=stream,
    )
    scalers = {hook: trainer.trainers[hook].activation_scaler for hook in hooks}
    trainer.data_provider = _start_from_data(stream, saes, scalers, config)
    return trainer.fit()


def saes_key(
    config: SAETrainingConfig,
    *,
    activation_key: str,
    hooks: Sequence[str],
    d_in: int,
    metadata=None,
    precision: torch.dtype = torch.float32,
    device: str = "cpu",
) -> str:
    """Cache key of trained SAEs: the activations they learn from, the config, the hooks, the format and (when they
    are not float32 on CPU) the training precision and device kind."""
    parts = [SAE_FORMAT_VERSION, activation_key, config, list(hooks), d_in, dict(metadata or {})]
    if precision != torch.float32:
        parts.append(dtype_name(precision))
    if torch.device(device).type != "cpu":
        parts.append(torch.device(device).type)
    return config_key(*parts)


def saes_folder(
    config: SAETrainingConfig,
    *,
    hooks: Sequence[str],
    d_in: int,
    activation_key: str,
    metadata: Mapping[str, Any] | None = None,
    name: str = "saes",
    precision: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """The cache folder `train_saes_cached` keeps these SAEs in (whether or not they have been trained)."""
    key = saes_key(
        config,
        activation_key=activation_key,
        hooks=list(hooks),
        d_in=d_in,
        metadata=metadata,
        precision=precision,
        device=device,
    )
    return cache_dir("saes") / f"{name}-{key}"


def train_saes_cached(
    batches: BatchFactory,
    config: SAETrainingConfig,
    *,
    hooks: Sequence[str],
    d_in: int,
    activation_key: str,
    metadata: Mapping[str, Any] | None = None,
    name: str = "saes",
    precision: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Folder of SAEs trained by `train_saes` and saved by `save_saes`, cached; a later call reuses it.

    `activation_key` identifies the activations `batches` reads (the activation cache's key), so SAEs are
    retrained when those change; the factory is only called when the SAEs are built.
    """
    hooks = _check_hooks(hooks)
    folder = saes_folder(
        config,
        hooks=hooks,
        d_in=d_in,
        activation_key=activation_key,
        metadata=metadata,
        name=name,
        precision=precision,
        device=device,
    )
    index = {"activation_key": activation_key, "d_in": d_in, "training_config": dataclasses.asdict(config)}

    def build(tmp: Path) -> None:
        with_key = {**dict(metadata or {}), "activation_key": activation_key}
        saes = train_saes(
            batches, config, hooks=hooks, d_in=d_in, metadata=with_key, precision=precision, device=device
        )
        save_saes(saes, tmp, index=index)

    return cached_entry(folder, build, meta={"name": name, "hooks": hooks, **index})

"""The book's SAEs: for one model, every layer's residual-stream SAE, from corpus to quality table, cached.

Three stages, each cached under a key of everything before it, so a second `make build` reuses all of them:

1. the training corpus (TRAIN splits only: prompt-formatted emotion texts plus WikiText articles) run through the
   model once per batch, every layer's `hook_resid_post` streamed to the activation cache (`emolib.sae.activations`);
2. all layers' SAEs trained together from that cache with sae-lens' `MultiSAETrainer` (`emolib.sae.training.train_saes`);
3. their quality on a held-out DEV corpus (`emolib.sae.training.evaluate_saes`).

The analysis chapters call `sae_suite(lm, preset, config)` (configs per preset in `emolib.studies.presets`) and get
the SAEs with their quality flags.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from sae_lens import SAE
from torch import Tensor

from emolib.cache import (
    BUILD_SECONDS,
    cache_dir,
    cached_entry,
    config_key,
    entry_digest,
    entry_meta,
    verify_entry,
    write_json,
)
from emolib.lm.batching import pad_id, right_padded
from emolib.lm.device import device_of
from emolib.lm.models import LoadedModel
from emolib.lm.precision import compute_dtype, dtype_name
from emolib.sae.activations import ActivationStore, ExtractionConfig, extract_activations, resid_hooks
from emolib.sae.corpus import Corpus, CorpusConfig, build_corpus
from emolib.sae.loading import PRETRAINED, SAEError, load_saes
from emolib.sae.quality import evaluate_saes, missed_goals, quality_dict, quality_table
from emolib.sae.training import SAETrainingConfig, saes_folder, train_saes_cached


@dataclass(frozen=True)
class SuiteConfig:
    """Everything that makes one model's SAEs: corpora, extraction, training, evaluation (defaults: the book's).

    Training runs `epochs` passes over the stored training tokens (`SAETrainingConfig.for_rows`). Evaluation
    measures reconstruction on every evaluation token, and next-token losses with each SAE spliced in on the first
    `loss_sequences` sequences of the shuffled evaluation corpus (each costs a forward per layer).
    """

    corpus: CorpusConfig = field(
        default_factory=lambda: CorpusConfig(emotion_per_label=25, general_tokens=45_000, max_length=256)
    )
    eval_corpus: CorpusConfig = field(
        default_factory=lambda: CorpusConfig(
            split="dev", emotion_per_label=3, general_tokens=5_000, max_length=256
        )
    )
    extraction: ExtractionConfig = field(
        default_factory=lambda: ExtractionConfig(
            mode="all", outlier_factor=5.0, storage_dtype="bfloat16", progress=True
        )
    )
    training: SAETrainingConfig = field(default_factory=SAETrainingConfig)
    epochs: int = 2
    loss_sequences: int = 8
    eval_batch_size: int = 8
    seed: int = 0
    #: Pretrained releases to read instead of training (names in `emolib.sae.loading.PRETRAINED`, e.g. Gemma Scope
    #: for a hub model): a model with a release here gets its SAEs, measured on the evaluation corpus like ours;
    #: every other model trains its own.
    pretrained: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [name for name in self.pretrained if name not in PRETRAINED]
        if unknown:
            raise SAEError(f"unknown pretrained SAE release(s) {unknown}; registered: {sorted(PRETRAINED)}")

    def release_for(self, model: str) -> str | None:
        """The pretrained release this suite reads for `model`, or None (train)."""
        matches = [name for name in self.pretrained if PRETRAINED[name].model == model]
        if len(matches) > 1:
            raise SAEError(f"several pretrained releases are given for {model!r}: {matches}; keep one")
        return matches[0] if matches else None


@dataclass
class SAESuite:
    """One model's SAEs for every layer, what they learned from, how good they are and how long each stage took.

    `timings` are each stage's build time in seconds as recorded in its cache entry, so a reused suite still
    reports what it cost to make.
    """

    model: str
    preset: str
    config: SuiteConfig
    hooks: list[str]
    saes: dict[str, SAE]
    #: The trained SAEs' cache folder (None for a pretrained release).
    folder: Path | None
    #: The training corpus (None for a pretrained release: its training data are its authors').
    corpus: Corpus | None
    eval_corpus: Corpus
    extraction: dict[str, Any]
    #: How the SAEs were trained (None for a pretrained release).
    training: SAETrainingConfig | None
    quality: pd.DataFrame
    #: The cache entries of each stage ("extract", "train", "evaluate"; only "evaluate" for a pretrained release).
    entries: dict[str, Path]
    #: The pretrained release read instead of training (`SuiteConfig.pretrained`), or None.
    release: str | None = None

    @property
    def key(self) -> str:
        """What identifies these SAEs in the cache keys of the studies that read them."""
        if self.release is not None:
            return pretrained_key(self.release)
        assert self.folder is not None
        return self.folder.name

    @property
    def k(self) -> int | None:
        """Active features per token the SAEs were trained for (None for a pretrained release: no L0 goal)."""
        return None if self.training is None else self.training.k

    @property
    def timings(self) -> dict[str, float]:
        """Each stage's build time in seconds, as its cache entry recorded it."""
        return {stage: entry_meta(folder)[BUILD_SECONDS] for stage, folder in self.entries.items()}

    def digests(self) -> dict[str, str]:
        """Each stage's content digest (`emolib.cache.entry_digest`): equal digests mean bitwise-equal stored
        activations, SAE weights and quality numbers (what "the same config gives the same numbers" checks)."""
        return {stage: entry_digest(folder) for stage, folder in self.entries.items()}

    @property
    def missed(self) -> pd.DataFrame:
        """Layers that miss at least one quality goal (`emolib.sae.training.GOALS`), with the goals they miss."""
        return missed_goals(self.quality, self.k)

    def flag(self, layer: int) -> str:
        """The goals this layer's SAE misses ("" if none): analysis chapters print it beside results."""
        missed = self.missed
        rows = missed[missed["layer"] == layer]
        return "" if rows.empty else str(rows["missed"].iloc[0])


def evaluation_batch(corpus: Corpus, skip_first: int, pad: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens, attention mask and keep-original mask of an evaluation corpus, sequences in a seeded order.

    The order mixes sources, so the leading sequences that the losses use are representative. Positions the
    training data leaves out keep their original residual and are not measured: the first `skip_first` positions
    and each prompt's shared instruction prefix beyond the first prompt of its dataset (as in training).
    """
    order = list(range(len(corpus.sequences)))
    random.Random(seed).shuffle(order)
    tokens, mask = right_padded([corpus.sequences[i] for i in order], pad)
    first = torch.tensor([max(corpus.starts[i], skip_first) for i in order])
    keep = torch.arange(tokens.shape[1])[None, :] < first[:, None]
    return tokens, mask, keep


def sae_suite(lm: LoadedModel, preset: str, config: SuiteConfig) -> SAESuite:
    """Train (or reuse) the SAEs of every layer of `lm` and measure them on held-out text (`preset` names the
    cache folder: a preset's chapters share one suite). A model with a release in `config.pretrained` reads that
    release's SAEs instead (no training)."""
    release = config.release_for(lm.info.name)
    if release is not None:
        return _pretrained_suite(lm, preset, config, release)
    name = lm.info.name
    hooks = list(resid_hooks(lm.info.n_layers))
    corpus, store = _training_activations(lm, preset, config)
    training = config.training.for_rows(store.n_rows, config.epochs)
    folder = _train(lm, store, training, hooks)
    saes = load_saes(folder, device=device_of(lm.model))
    eval_corpus, quality, quality_folder = _measured(lm, saes, folder.name, config)
    return SAESuite(
        model=name,
        preset=preset,
        config=config,
        hooks=hooks,
        saes=saes,
        folder=folder,
        corpus=corpus,
        eval_corpus=eval_corpus,
        extraction={k: store.meta.get(k) for k in ("n_rows", "n_tokens", "dropped", "storage_dtype", "key")},
        training=training,
        quality=quality,
        entries={"extract": store.folder, "train": folder, "evaluate": quality_folder},
    )


def _training_activations(
    lm: LoadedModel, preset: str, config: SuiteConfig
) -> tuple[Corpus, ActivationStore]:
    """The training corpus and its stored activations at every layer (cached)."""
    extraction = dataclasses.replace(config.extraction, hooks=tuple(resid_hooks(lm.info.n_layers)))
    corpus = build_corpus(lm.tokenizer, lm.info.chat, config.corpus)
    store = extract_activations(
        lm,
        lm.info.name,
        corpus.sequences,
        extraction,
        description=corpus.description,
        preset=preset,
        starts=corpus.starts,
    )
    return corpus, store


def _train_args(lm: LoadedModel, store: ActivationStore, hooks: Sequence[str]) -> dict[str, Any]:
    """What identifies a model's SAEs of `hooks` trained on `store`, besides the training config."""
    return {
        "hooks": list(hooks),
        "d_in": lm.info.d_model,
        "activation_key": store.key,
        "metadata": {"model_name": lm.info.name},
        "name": lm.info.name,
        "precision": compute_dtype(lm.model),
        "device": device_of(lm.model),
    }


def _train(
    lm: LoadedModel, store: ActivationStore, training: SAETrainingConfig, hooks: Sequence[str]
) -> Path:
    """SAEs of `hooks` trained on `store` (cached), in the precision and on the device the model's forwards use."""
    return train_saes_cached(
        functools.partial(store.endless_batches, hooks=list(hooks)),
        training,
        **_train_args(lm, store, hooks),
    )


def seed_saes(
    lm: LoadedModel, preset: str, config: SuiteConfig, layers: Sequence[int], seed: int
) -> dict[str, SAE]:
    """SAEs of `layers` retrained with another training `seed` (initialisation and data order), on the same stored
    activations and otherwise as the suite's: how much a feature-level verdict owes to one training run. Each
    hook's initialisation depends only on the seed and the hook, so training a few layers gives the SAEs a full
    run with that seed would, and a cached run of every layer with that seed (chapter 1's) is read instead of
    training again. Cached; empty for a model whose suite reads a pretrained release (one set of SAEs)."""
    if config.release_for(lm.info.name) is not None:
        return {}
    _, store = _training_activations(lm, preset, config)
    training = dataclasses.replace(config.training.for_rows(store.n_rows, config.epochs), seed=seed)
    every_hook = resid_hooks(lm.info.n_layers)
    hooks = [every_hook[layer] for layer in layers]
    every = saes_folder(training, **_train_args(lm, store, every_hook))
    if set(hooks) < set(every_hook) and verify_entry(every):
        return load_saes(every, hooks, device=device_of(lm.model))
    return load_saes(_train(lm, store, training, hooks), device=device_of(lm.model))


def seed_flags(lm: LoadedModel, suite: SAESuite, saes: dict[str, SAE], seed: int) -> dict[int, str]:
    """Per layer, the quality goals a retrained seed's SAE (`seed_saes`) misses ("" for none), measured as the
    suite's own on its evaluation corpus (cached under the suite's key and the seed), on the tokens their training
    saw (outliers flagged at any layer, so a few layers' numbers equal chapter 1's measurement of every layer): a
    seed's verdict read through SAEs that fail their goals is no better evidence than the book's."""
    _, quality, _ = _measured(lm, saes, f"{suite.key}-seed{seed}", suite.config)
    missed = missed_goals(quality, suite.k).set_index("layer")["missed"]
    return {int(layer): str(missed.get(layer, "")) for layer in quality["layer"]}


def pretrained_key(release: str) -> str:
    """What identifies a pretrained release's SAEs in cache keys (a trained suite uses its cache folder's name)."""
    return f"pretrained-{release}"


def _pretrained_suite(lm: LoadedModel, preset: str, config: SuiteConfig, release: str) -> SAESuite:
    """A pretrained release's SAEs for every layer of `lm` (through sae-lens' registry: the hub or its cache),
    measured like the project's own."""
    spec = PRETRAINED[release]
    if spec.n_layers != lm.info.n_layers:
        raise SAEError(
            f"release {release!r} has SAEs for {spec.n_layers} layers, {lm.info.name} has {lm.info.n_layers}"
        )
    saes = load_saes(spec.source(), device=device_of(lm.model))
    widths = {sae.cfg.d_in for sae in saes.values()}
    if widths != {lm.info.d_model}:
        raise SAEError(
            f"release {release!r} reads width {sorted(widths)}, {lm.info.name} has {lm.info.d_model}"
        )
    eval_corpus, quality, quality_folder = _measured(lm, saes, pretrained_key(release), config)
    return SAESuite(
        model=lm.info.name,
        preset=preset,
        config=config,
        hooks=list(saes),
        saes=saes,
        folder=None,
        corpus=None,
        eval_corpus=eval_corpus,
        extraction={},
        training=None,
        quality=quality,
        entries={"evaluate": quality_folder},
        release=release,
    )


def measure_saes(
    lm: LoadedModel, saes: dict[str, SAE], eval_corpus: Corpus, config: SuiteConfig, progress: bool = True
) -> pd.DataFrame:
    """The quality table of `saes` on `eval_corpus` with the suite's evaluation settings (uncached): the one
    measurement of the suite's own SAEs, of pretrained releases and of the budget benchmark."""
    extraction = config.extraction
    tokens, mask, keep = evaluation_batch(
        eval_corpus, extraction.skip_first, pad_id(lm.tokenizer), config.seed
    )
    return evaluate_saes(
        lm.model,
        saes,
        tokens,
        attention_mask=mask,
        keep_original=keep,
        outlier_factor=extraction.outlier_factor,
        outlier_hooks=resid_hooks(lm.info.n_layers),  # the suite extracts every layer: training's tokens
        batch_size=config.eval_batch_size,
        loss_sequences=config.loss_sequences,
        progress=progress,
    )


def _measured(
    lm: LoadedModel, saes: dict[str, SAE], saes_id: str, config: SuiteConfig
) -> tuple[Corpus, pd.DataFrame, Path]:
    """The evaluation corpus, the SAEs' quality table on it and its cache entry (keyed by `saes_id` and the hooks
    measured). A few layers of SAEs whose every layer is measured already (a seed's final phase in chapters 2 and
    3, after chapter 1's run of every layer with that seed) read those layers' rows of that measurement: on the
    same tokens their numbers are the same (tested), so they are not measured again."""
    eval_corpus = build_corpus(lm.tokenizer, lm.info.chat, config.eval_corpus)
    every_hook = sorted(resid_hooks(lm.info.n_layers))
    every_layer = sorted(saes) == every_hook
    if not every_layer:
        whole = _quality_folder(
            lm, saes_id, every_hook, _eval_settings(lm, config, eval_corpus, every_layer=True)
        )
        if verify_entry(whole):
            quality = quality_table(json.loads((whole / "quality.json").read_text()))
            return eval_corpus, quality.loc[[hook for hook in quality.index if hook in saes]], whole
    settings = _eval_settings(lm, config, eval_corpus, every_layer)

    def evaluate(tmp: Path) -> None:
        write_json(tmp / "quality.json", quality_dict(measure_saes(lm, saes, eval_corpus, config)))

    quality_folder = cached_entry(
        _quality_folder(lm, saes_id, sorted(saes), settings),
        evaluate,
        meta={"model": lm.info.name, "saes": saes_id, **settings},
    )
    quality = quality_table(json.loads((quality_folder / "quality.json").read_text()))
    return eval_corpus, quality, quality_folder


def _eval_settings(
    lm: LoadedModel, config: SuiteConfig, eval_corpus: Corpus, every_layer: bool
) -> dict[str, Any]:
    """What a quality measurement depends on besides the SAEs (its cache key)."""
    extraction = config.extraction
    settings = {
        "corpus": eval_corpus.digest(),
        "skip_first": extraction.skip_first,
        "outlier_factor": extraction.outlier_factor,
        "loss_sequences": config.loss_sequences,
        "batch_size": config.eval_batch_size,
        "seed": config.seed,
    }
    if not every_layer:
        # measured on training's tokens (outliers at any layer); earlier entries of a few layers used only theirs
        settings["outliers_at"] = "every layer"
    precision = compute_dtype(lm.model)
    if precision != torch.float32:  # quality measured through bf16 forwards is another number
        settings["precision"] = dtype_name(precision)
    device = device_of(lm.model)
    if torch.device(device).type != "cpu":
        settings["device"] = torch.device(device).type
    return settings


def _quality_folder(lm: LoadedModel, saes_id: str, hooks: Sequence[str], settings: Mapping[str, Any]) -> Path:
    return cache_dir("sae_quality") / f"{lm.info.name}-{config_key(saes_id, list(hooks), dict(settings))}"

"""The items the analysis chapters read: one dataset's held-out prompts, the model's answers, every layer's residual.

Chapters 1-3 analyse the same items: a seeded sample per label from the dev and test splits of one dataset (never
the train split the SAEs learned from), rendered with the paper's prompt, classified by restricted scoring (cached),
and their last-token residual stream at every layer extracted in one forward pass per batch (cached).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from sae_lens import SAE

from emolib import data
from emolib.lm.baselines import BaselineConfig, evaluation_items, make_classifier
from emolib.lm.classify import ClassifierConfig, EmotionClassifier, cached_predict
from emolib.lm.models import LoadedModel
from emolib.lm.prompts import encode_prefix, encode_suffix, suffix_text_mask
from emolib.sae.activations import ActivationStore, ExtractionConfig, extract_activations, resid_hooks


@dataclass(frozen=True)
class AnalysisConfig:
    """Which items: `n_per_label` per label from each of `splits` of `dataset` (None: ISEAR if available, else the
    built-in set), labels per `label_set` ("native" as the paper did for ISEAR, or "ekman")."""

    dataset: str | None = None
    splits: tuple[str, ...] = ("dev", "test")
    n_per_label: int | None = 40
    label_set: str = "native"
    seed: int = 0
    classifier: ClassifierConfig = field(
        default_factory=lambda: ClassifierConfig(generate=False, progress=False)
    )
    extraction_batch_size: int = 16

    def dataset_name(self) -> str:
        """The dataset the items come from (`dataset`, or the default)."""
        return self.dataset or default_dataset()


def default_dataset() -> str:
    """The paper's dataset when it is available, else the built-in one."""
    return "isear" if "isear" in data.available_datasets() else "builtin"


@dataclass
class AnalysisSet:
    """One model's analysis items with its answers and every layer's last-token residual stream.

    Row `i` of every array is item `i`. `text_masks[i]` marks, per token of prompt `i`, the tokens of the text
    itself (the rest is the template: instruction, text field name, answer cue, chat markers).
    """

    model: str
    dataset: str
    labels: tuple[str, ...]
    ids: list[str]
    texts: list[str]
    gold: np.ndarray
    splits: np.ndarray
    predicted: np.ndarray
    label_probs: np.ndarray
    prompts: list[list[int]]
    prefix_length: int
    text_masks: list[np.ndarray]
    classifier: EmotionClassifier
    store: ActivationStore

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.gold

    @property
    def layers(self) -> list[int]:
        return list(range(len(self.store.hooks)))

    def resid(self, layer: int) -> Float[np.ndarray, "items d_model"]:
        """Last-token residual stream after block `layer`, `[n, d_model]` float32."""
        return self.store.load(f"blocks.{layer}.hook_resid_post").numpy().astype(np.float32, copy=False)

    @torch.no_grad()
    def codes(self, layer: int, sae: SAE) -> Float[np.ndarray, "items d_sae"]:
        """The SAE's feature activations for the last-token residual after block `layer`, `[n, d_sae]`."""
        return sae.encode(torch.from_numpy(self.resid(layer)).to(sae.W_dec.device)).cpu().numpy()


def analysis_set(lm: LoadedModel, preset: str, config: AnalysisConfig) -> AnalysisSet:
    """Build (or read from the caches) the analysis set of `lm` (`preset` names the cache entry: a preset's
    chapters share one set; configs per preset in `emolib.studies.presets`)."""
    dataset = config.dataset_name()
    parts_of_splits = [
        evaluation_items(
            dataset,
            BaselineConfig(
                split=split,
                n_per_label=config.n_per_label,
                sample_seed=config.seed,
                label_set=config.label_set,
            ),
        )
        for split in config.splits
    ]
    labels = parts_of_splits[0].labels
    ids = [i for items in parts_of_splits for i in items.ids]
    texts = [t for items in parts_of_splits for t in items.texts]
    gold = np.array([g for items in parts_of_splits for g in items.gold])
    splits = np.array([s for s, items in zip(config.splits, parts_of_splits, strict=True) for _ in items.ids])

    classifier = make_classifier(lm, labels, dataset, config.classifier)
    parts = classifier.parts
    max_text = config.classifier.max_text_tokens
    prefix = encode_prefix(lm.tokenizer, parts)
    suffixes = [encode_suffix(lm.tokenizer, parts, text, max_text) for text in texts]
    prompts = [prefix + ids for ids, _ in suffixes]
    text_masks = [
        np.array([False] * len(prefix) + suffix_text_mask(lm.tokenizer, parts, text, max_text))
        for text in texts
    ]
    extraction = ExtractionConfig(
        hooks=resid_hooks(lm.info.n_layers),
        mode="last",
        batch_size=config.extraction_batch_size,
        progress=False,
    )
    store = extract_activations(
        lm,
        lm.info.name,
        prompts,
        extraction,
        description=f"{dataset} {'+'.join(config.splits)} prompts, {config.n_per_label} per label: "
        f"{dataclasses.asdict(config)}",
        preset=preset,
    )
    if classifier.scoring_mode == "first-token":  # the answers are in the stored residual: no second pass
        last = store.load(f"blocks.{lm.info.n_layers - 1}.hook_resid_post")
        predictions = classifier.predictions_from_residual(last, sum(cut for _, cut in suffixes))
    else:
        predictions = cached_predict(classifier, lm.info.name, ids, texts)
    return AnalysisSet(
        model=lm.info.name,
        dataset=dataset,
        labels=labels,
        ids=ids,
        texts=texts,
        gold=gold,
        splits=splits,
        predicted=np.array(predictions.predicted),
        label_probs=predictions.label_probs,
        prompts=prompts,
        prefix_length=len(prefix),
        text_masks=text_masks,
        classifier=classifier,
        store=store,
    )

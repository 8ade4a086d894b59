"""Zero-shot emotion classification by restricted next-token scoring and by greedy generation.

Restricted scoring reads the probability of each label's answer (summed over its verbalisers, whole token
sequences when a label spans several tokens) right after the prompt, and predicts the most probable label.
Generation decodes up to `max_new_tokens` greedily, as the paper did, and parses a label from the text.

Batches put padding between the shared prefix and each text's suffix (`[prefix][pad...][suffix]`) with an
attention mask; TransformerLens derives rotary positions from the mask, so padding changes no real token's
position or attention. The prefix's keys and values are computed once per call and reused by every batch.
All forward passes go through the model's hook points, so SAEs or steering hooks attached by later chapters apply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import softmax
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformers import PreTrainedTokenizerBase

from emolib.cache import cache_dir, cached_entry, config_key, pairs_digest
from emolib.lm.batching import (
    expanded_cache,
    final_logprobs,
    forward_residual,
    left_padded,
    local_window,
    pad_id,
    padding_fits_window,
    prefix_cache,
    prefix_layout,
)
from emolib.lm.models import has_interventions
from emolib.lm.precision import model_key
from emolib.lm.prompts import PromptParts, encode_prefix, encode_suffix


@dataclass(frozen=True)
class ClassifierConfig:
    """How to run the classifier. Results do not depend on `batch_size` or `reuse_prefix` (tested).

    `scoring` is "auto" (first-token scoring when each label's first tokens are its own, else whole sequences),
    "first-token" or "sequence".
    """

    batch_size: int = 16
    scoring: str = "auto"
    generate: bool = True
    max_new_tokens: int = 8
    max_text_tokens: int = 256
    reuse_prefix: bool = True
    progress: bool = True


#: Extra spellings a generated answer may use for a label (lower case); the label itself always matches.
ANSWER_SYNONYMS: dict[str, tuple[str, ...]] = {
    "anger": ("angry", "anger", "rage", "annoyed", "annoyance", "frustration", "frustrated"),
    "disgust": ("disgusted", "disgusting", "disgust"),
    "fear": ("fearful", "afraid", "scared", "fear", "anxiety", "anxious", "terror"),
    "joy": ("happy", "happiness", "joyful", "joy"),
    "sadness": ("sad", "sadness", "sorrow"),
    "surprise": ("surprised", "surprise", "shock", "shocked"),
    "neutral": ("neutral", "none", "no emotion"),
    "shame": ("ashamed", "shame", "embarrassment", "embarrassed"),
    "guilt": ("guilty", "guilt"),
    "love": ("love", "loving"),
}


@dataclass
class Predictions:
    """Classifier outputs for `n` texts over `labels`.

    `label_logprobs[i, j]` is log P(answer is label j | prompt i) under the full vocabulary (not renormalised);
    `predicted` is its argmax. `label_mass[i]` is the total probability of all label answers, i.e. how much the
    model wants to answer within the label set at all.
    """

    labels: tuple[str, ...]
    label_logprobs: np.ndarray
    scoring_mode: str
    n_truncated: int
    generations: list[str] | None = None
    generated_labels: list[str | None] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def predicted(self) -> list[str]:
        return [self.labels[j] for j in self.label_logprobs.argmax(axis=1)]

    @property
    def label_probs(self) -> np.ndarray:
        """Probabilities renormalised over the label set, `[n, n_labels]`."""
        return softmax(self.label_logprobs, axis=1)

    @property
    def label_mass(self) -> np.ndarray:
        return np.exp(self.label_logprobs).sum(axis=1)

    def agreement(self) -> dict[str, float]:
        """How often the generated answer names the label that restricted scoring picked.

        `parsed` is the share of generations containing a label at all; `agree_all` counts unparsed generations
        as disagreements, `agree_parsed` looks only at parsed ones.
        """
        if self.generated_labels is None:
            raise ValueError("these predictions were made without generation")
        parsed = np.array([g is not None for g in self.generated_labels])
        same = np.array([g == p for g, p in zip(self.generated_labels, self.predicted, strict=True)])
        return {
            "parsed": float(parsed.mean()),
            "agree_all": float(same.mean()),
            "agree_parsed": float(same[parsed].mean()) if parsed.any() else float("nan"),
        }

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.label_probs, columns=[f"p_{label}" for label in self.labels])
        frame.insert(0, "predicted", self.predicted)
        frame["label_mass"] = self.label_mass
        if self.generations is not None:
            frame["generation"] = self.generations
            frame["generated_label"] = self.generated_labels
        return frame


def parse_label(generation: str, labels: tuple[str, ...]) -> str | None:
    """The label named first in a generated answer (labels or their synonyms, whole words), else None."""
    text = generation.lower()
    best: tuple[int, str] | None = None
    for label in labels:
        for word in {label, *ANSWER_SYNONYMS.get(label, ())}:
            match = re.search(rf"\b{re.escape(word)}\b", text)
            if match and (best is None or match.start() < best[0]):
                best = (match.start(), label)
    return None if best is None else best[1]


SCORING_MODES = ("auto", "first-token", "sequence")


def _verbaliser_ids(
    tokenizer: PreTrainedTokenizerBase, parts: PromptParts, scoring: str = "auto"
) -> tuple[list[tuple[int, tuple[int, ...]]], str]:
    """(label index, token sequence) pairs to score, and the scoring mode used.

    "first-token" scores each label by the probability of its verbalisers' first tokens, which identifies the
    label only if no first token belongs to two labels; "sequence" scores whole verbalisers (one extra forward
    pass per multi-token verbaliser); "auto" picks first-token when it is valid and sequence otherwise.
    """
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring must be one of {SCORING_MODES}, not {scoring!r}")
    sequences = []
    for j, label in enumerate(parts.labels):
        for verbaliser in parts.verbalisers[label]:
            ids = tuple(tokenizer(verbaliser, add_special_tokens=False).input_ids)
            if not ids:
                raise ValueError(f"verbaliser {verbaliser!r} of label {label!r} tokenises to nothing")
            sequences.append((j, ids))
    owners: dict[int, set[int]] = {}
    for j, ids in sequences:
        owners.setdefault(ids[0], set()).add(j)
    shared = sorted(token for token, labels in owners.items() if len(labels) > 1)
    if scoring == "first-token" and shared:
        names = [tokenizer.convert_ids_to_tokens(t) for t in shared]
        raise ValueError(
            f"first-token scoring is ambiguous: tokens {names} start verbalisers of several labels"
        )
    if scoring == "sequence" or shared:
        return list(dict.fromkeys(sequences)), "sequence"
    return list(dict.fromkeys((j, ids[:1]) for j, ids in sequences)), "first-token"


class EmotionClassifier:
    """Scores and generates answers for emotion prompts with a TransformerLens model."""

    def __init__(
        self,
        model: HookedTransformer,
        tokenizer: PreTrainedTokenizerBase,
        parts: PromptParts,
        config: ClassifierConfig | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.parts = parts
        self.config = config or ClassifierConfig()
        self.prefix_ids = encode_prefix(tokenizer, parts)
        self.sequences, self.scoring_mode = _verbaliser_ids(tokenizer, parts, self.config.scoring)
        self.pad_id = pad_id(tokenizer)
        self.stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        for stop in ("<|im_end|>", "<end_of_turn>", "\n"):
            ids = tokenizer(stop, add_special_tokens=False).input_ids
            if len(ids) == 1:
                self.stop_ids.add(ids[0])

    @torch.inference_mode()
    def predict(self, texts: list[str], allow_empty: bool = False) -> Predictions:
        """Restricted scores (and generations, if configured) for every text, in input order.

        An empty text is refused (a data error) unless `allow_empty`: contextual calibration scores "" on purpose.
        """
        if not texts:
            raise ValueError("predict() needs at least one text")
        empty = [i for i, t in enumerate(texts) if not t or not t.strip()]
        if empty and not allow_empty:
            raise ValueError(
                f"texts at positions {empty[:10]} are empty; drop or fix them before classifying"
            )
        cfg = self.config
        encoded = [encode_suffix(self.tokenizer, self.parts, t, cfg.max_text_tokens) for t in texts]
        prefix_cache = self.prefix_cache() if cfg.reuse_prefix else None
        scores, generations = [], []
        order = np.argsort([len(ids) for ids, _ in encoded], kind="stable")  # similar lengths share a batch
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for batch in tqdm(batches, desc="classifying", disable=not cfg.progress, leave=False):
            batch_scores, batch_generations = self._run_batch([encoded[i][0] for i in batch], prefix_cache)
            scores.append((batch, batch_scores))
            generations.append((batch, batch_generations))
        label_logprobs = np.zeros((len(texts), len(self.parts.labels)))
        for batch, batch_scores in scores:
            label_logprobs[batch] = batch_scores
        predictions = Predictions(
            labels=self.parts.labels,
            label_logprobs=label_logprobs,
            scoring_mode=self.scoring_mode,
            n_truncated=sum(truncated for _, truncated in encoded),
        )
        if cfg.generate:
            texts_out = [""] * len(texts)
            for batch, batch_generations in generations:
                for i, text in zip(batch, batch_generations, strict=True):
                    texts_out[i] = text
            predictions.generations = texts_out
            predictions.generated_labels = [parse_label(g, self.parts.labels) for g in texts_out]
        return predictions

    @torch.inference_mode()
    def predictions_from_residual(self, resid: torch.Tensor, n_truncated: int = 0) -> Predictions:
        """Restricted scores read from each prompt's residual after the last block at its last token (`[n, d_model]`,
        what `predict` reads out), so that a pass which stores that residual needs no second pass. First-token
        scoring only: sequence scoring runs further forwards over each verbaliser."""
        if self.scoring_mode != "first-token":
            raise ValueError(
                f"scores can be read from the residual under first-token scoring only, not {self.scoring_mode!r}"
            )
        first = final_logprobs(self.model, torch.as_tensor(resid, dtype=torch.float32))
        columns = [
            [ids[0] for label, ids in self.sequences if label == j] for j in range(len(self.parts.labels))
        ]
        scores = torch.stack([torch.logsumexp(first[:, ids], dim=1) for ids in columns], dim=1)
        return Predictions(self.parts.labels, scores.double().cpu().numpy(), self.scoring_mode, n_truncated)

    def prefix_cache(self) -> TransformerLensKeyValueCache:
        """The shared prefix's keys and values, computed once per call of `predict` (frozen)."""
        return prefix_cache(self.model, self.prefix_ids, self.model.cfg.n_layers)

    def batch_inputs(
        self, suffixes: list[list[int]], prefix_cache
    ) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Tokens, mask and cache for one batch laid out as `[prefix][pad...][suffix]`."""
        if prefix_cache is not None:
            tokens, mask = left_padded(suffixes, self.pad_id)
            return tokens, mask, expanded_cache(prefix_cache, len(suffixes))
        tokens, mask = prefix_layout(self.prefix_ids, suffixes, self.pad_id)
        cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.model.cfg.device, len(suffixes))
        return tokens, mask, cache

    def _padding_reaches_window(self, suffixes: list[list[int]]) -> bool:
        """True if padding could move a real token out of a local-attention window (`padding_fits_window`),
        counting the prefix, the longest suffix, and the continuations and generated tokens after it."""
        lengths = [len(ids) for ids in suffixes]
        if min(lengths) == max(lengths):
            return False
        continuation = max(len(ids) for _, ids in self.sequences) - 1
        steps = max(continuation, self.config.max_new_tokens - 1 if self.config.generate else 0)
        width = len(self.prefix_ids) + max(lengths) + steps
        return not padding_fits_window(local_window(self.model.cfg), width)

    def _run_batch(self, suffixes: list[list[int]], prefix_cache) -> tuple[np.ndarray, list[str]]:
        if len(suffixes) > 1 and self._padding_reaches_window(suffixes):
            rows = [self._run_batch([ids], prefix_cache) for ids in suffixes]  # one at a time: no padding
            return np.concatenate([s for s, _ in rows]), [g for _, gens in rows for g in gens]
        tokens, mask, cache = self.batch_inputs(suffixes, prefix_cache)
        resid = forward_residual(self.model, tokens, mask, cache)
        first = final_logprobs(self.model, resid[:, -1])  # [batch, d_vocab]
        scores = self._label_scores(first, cache)
        generations = self._generate(first, cache) if self.config.generate else []
        return scores, generations

    def _label_scores(self, first: torch.Tensor, cache: TransformerLensKeyValueCache) -> np.ndarray:
        """log P(label) = logsumexp over the label's verbalisers of their sequence log-probabilities."""
        batch = first.shape[0]
        per_sequence = torch.empty((batch, len(self.sequences)))
        cache.freeze()  # continuations must not extend the prompt's cache
        for k, (_, ids) in enumerate(self.sequences):
            logprob = first[:, ids[0]].clone()
            if len(ids) > 1:
                cont = torch.tensor(ids[:-1]).expand(batch, -1)
                resid = forward_residual(self.model, cont, torch.ones_like(cont), cache)
                steps = final_logprobs(self.model, resid)  # [batch, len-1, d_vocab]
                logprob += steps[:, torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum(dim=1)
            per_sequence[:, k] = logprob
        cache.unfreeze()
        scores = torch.full((batch, len(self.parts.labels)), -torch.inf)
        for j in range(len(self.parts.labels)):
            columns = [k for k, (label, _) in enumerate(self.sequences) if label == j]
            scores[:, j] = torch.logsumexp(per_sequence[:, columns], dim=1)
        return scores.cpu().numpy().astype(np.float64)

    def _generate(self, first: torch.Tensor, cache: TransformerLensKeyValueCache) -> list[str]:
        """Greedy decoding of up to `max_new_tokens`, continuing from the prompt's cache."""
        batch = first.shape[0]
        stop = torch.tensor(sorted(self.stop_ids))
        next_ids = first.argmax(dim=-1)
        out = [next_ids]
        done = torch.isin(next_ids, stop)
        for _ in range(self.config.max_new_tokens - 1):
            if bool(done.all()):
                break
            step = next_ids[:, None]
            resid = forward_residual(self.model, step, torch.ones_like(step), cache)
            next_ids = final_logprobs(self.model, resid[:, -1]).argmax(dim=-1)
            next_ids = torch.where(done, torch.tensor(self.pad_id), next_ids)
            out.append(next_ids)
            done = done | torch.isin(next_ids, stop)
        generated = torch.stack(out, dim=1)
        texts = []
        for row in range(batch):
            ids = generated[row].tolist()
            cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
            texts.append(self.tokenizer.decode(ids[:cut], skip_special_tokens=True).strip())
        return texts


# ------------------------------------------------------------------------------------------ cached runs

#: Bump when scoring or generation changes, so cached predictions are recomputed.
PREDICTIONS_VERSION = "1"


def predictions_key(model_name: str, classifier: EmotionClassifier, ids: list[str], texts: list[str]) -> str:
    """Cache key: model, rendered prompt, verbalisers, result-relevant config and the exact items."""
    cfg = classifier.config
    relevant = {
        "generate": cfg.generate,
        "max_new_tokens": cfg.max_new_tokens,
        "max_text_tokens": cfg.max_text_tokens,
        "scoring_mode": classifier.scoring_mode,
        "sequences": classifier.sequences,
    }
    return config_key(
        PREDICTIONS_VERSION, model_name, *prompt_fingerprint(classifier), relevant, pairs_digest(ids, texts)
    )


def prompt_fingerprint(classifier: EmotionClassifier) -> tuple:
    """What a classifier's rendered prompts and label scores depend on: instruction prefix, per-text template,
    labels and verbalisers (cache-key parts for anything computed from its prompts)."""
    parts = classifier.parts
    return parts.prefix, parts.suffix_template, parts.labels, parts.verbalisers


def cached_predict(
    classifier: EmotionClassifier,
    model_name: str,
    ids: list[str],
    texts: list[str],
    allow_empty: bool = False,
) -> Predictions:
    """`classifier.predict(texts, allow_empty)`, stored on disk under a key of everything that determines the result.

    Runs with hooks or SAEs attached are computed, never cached.
    """
    if has_interventions(classifier.model):
        return classifier.predict(texts, allow_empty)
    model_name = model_key(model_name, classifier.model)  # bf16 / GPU numbers get their own keys
    folder = cache_dir("predictions") / f"{model_name}-{predictions_key(model_name, classifier, ids, texts)}"

    def build(tmp: Path) -> None:
        predictions = classifier.predict(texts, allow_empty)
        payload = {
            "labels": list(predictions.labels),
            "label_logprobs": predictions.label_logprobs.tolist(),
            "scoring_mode": predictions.scoring_mode,
            "n_truncated": predictions.n_truncated,
            "generations": predictions.generations,
            "generated_labels": predictions.generated_labels,
            "ids": ids,
        }
        (tmp / "predictions.json").write_text(json.dumps(payload))

    entry = cached_entry(folder, build, meta={"model": model_name, "n": len(ids)})
    payload = json.loads((entry / "predictions.json").read_text())
    if payload["ids"] != ids:  # a key collision would be a bug; never return someone else's predictions
        raise RuntimeError(f"cached predictions in {entry} are for other items; delete the folder")
    return Predictions(
        labels=tuple(payload["labels"]),
        label_logprobs=np.asarray(payload["label_logprobs"], dtype=np.float64),
        scoring_mode=payload["scoring_mode"],
        n_truncated=payload["n_truncated"],
        generations=payload["generations"],
        generated_labels=payload["generated_labels"],
    )

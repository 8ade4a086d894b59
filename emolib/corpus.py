"""Token corpora for training and evaluating SAEs: prompt-formatted emotion texts mixed with general text.

Training uses TRAIN splits only (emotion datasets' train split, WikiText articles assigned to train); evaluation
uses dev splits, so that no text an analysis chapter reads (dev/test) is ever seen while training an SAE. Without
`EMOLIB_DATA_DIR` the built-in dataset is the only source and WikiText is absent; the corpus says so.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import pandas as pd
from transformers import PreTrainedTokenizerBase

from emolib import data
from emolib.prompts import build_prompt, encode_prefix, encode_suffix, template_for

LM_DATASET = "wikitext-2-raw"


@dataclass(frozen=True)
class CorpusConfig:
    """What goes into an SAE corpus.

    `emotion_per_label` prompts per (dataset, label) from `split`, rendered with the model's classification prompt;
    `general_tokens` tokens of WikiText articles from the same split, cut into `max_length`-token sequences.
    `emotion_datasets=None` means every available emotion dataset.
    """

    split: str = "train"
    emotion_datasets: tuple[str, ...] | None = None
    emotion_per_label: int = 40
    general_tokens: int = 60_000
    max_length: int = 256
    seed: int = 0


@dataclass
class Corpus:
    """Token sequences (each starts with the model's BOS where it uses one) and where they came from."""

    sequences: list[list[int]]
    sources: list[str]
    table: pd.DataFrame
    description: str
    notes: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def digest(self) -> str:
        """sha256 of the exact token sequences: part of every activation cache key built from this corpus."""
        h = hashlib.sha256()
        for seq in self.sequences:
            h.update(len(seq).to_bytes(4, "little"))
            h.update(b"".join(t.to_bytes(4, "little") for t in seq))
        return h.hexdigest()


def _emotion_prompts(
    tokenizer: PreTrainedTokenizerBase, chat: bool, dataset: str, config: CorpusConfig
) -> list[list[int]]:
    loaded = data.select_split(data.load(dataset), config.split)
    sample, _ = data.stratified_subsample(loaded, config.emotion_per_label, seed=config.seed)
    labels = data.get_spec(dataset).labels
    parts = build_prompt(tokenizer, labels, chat=chat, template=template_for(dataset))
    prefix = encode_prefix(tokenizer, parts)
    return [prefix + encode_suffix(tokenizer, parts, text, config.max_length)[0] for text in sample["text"]]


def _general_sequences(tokenizer: PreTrainedTokenizerBase, config: CorpusConfig) -> list[list[int]]:
    """WikiText articles of the split, tokenised and cut into `max_length` chunks, up to `general_tokens`."""
    articles = data.wikitext_articles(config.split)
    random.Random(config.seed).shuffle(articles)
    bos = (
        [tokenizer.bos_token_id]
        if tokenizer("x", add_special_tokens=True).input_ids[0] == tokenizer.bos_token_id
        else []
    )
    body = config.max_length - len(bos)
    sequences: list[list[int]] = []
    total = 0
    for article in articles:
        ids = tokenizer(article, add_special_tokens=False).input_ids
        for start in range(0, len(ids), body):
            chunk = bos + ids[start : start + body]
            if len(chunk) < 16:  # a dangling tail carries little context
                continue
            sequences.append(chunk)
            total += len(chunk)
            if total >= config.general_tokens:
                return sequences
    return sequences


def build_corpus(tokenizer: PreTrainedTokenizerBase, chat: bool, config: CorpusConfig) -> Corpus:
    """The mixed corpus for one model: emotion prompts of every dataset, then WikiText chunks (if available)."""
    available = data.available_datasets()
    emotion = config.emotion_datasets or tuple(d for d in available if data.get_spec(d).kind == "emotion")
    sequences: list[list[int]] = []
    sources: list[str] = []
    rows = []
    for dataset in emotion:
        prompts = _emotion_prompts(tokenizer, chat, dataset, config)
        sequences += prompts
        sources += [dataset] * len(prompts)
        rows.append(
            {
                "source": dataset,
                "kind": "emotion prompts",
                "sequences": len(prompts),
                "tokens": sum(map(len, prompts)),
            }
        )
    notes = []
    if LM_DATASET in available and config.general_tokens > 0:
        general = _general_sequences(tokenizer, config)
        sequences += general
        sources += [LM_DATASET] * len(general)
        rows.append(
            {
                "source": LM_DATASET,
                "kind": "general text",
                "sequences": len(general),
                "tokens": sum(map(len, general)),
            }
        )
    elif config.general_tokens > 0:
        notes.append(
            f"{LM_DATASET} is not available (EMOLIB_DATA_DIR unset): the corpus has no general text."
        )
    table = pd.DataFrame(rows)
    table["share of tokens"] = table["tokens"] / table["tokens"].sum()
    description = (
        f"{config.split} split: {config.emotion_per_label} prompts per label from {', '.join(emotion)}; "
        f"up to {config.general_tokens} WikiText tokens in chunks of {config.max_length}"
    )
    return Corpus(sequences, sources, table, description, notes)

"""Token corpora for training and evaluating SAEs: prompt-formatted emotion texts mixed with general text.

Training uses TRAIN splits only (emotion datasets' train split, WikiText articles assigned to train); evaluation
uses dev splits, so that no text an analysis chapter reads (dev/test) is ever seen while training an SAE. Without
`EMOLIB_DATA_DIR` the built-in dataset is the only source and WikiText is absent; the corpus says so.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pandas as pd
from transformers import PreTrainedTokenizerBase

from emolib import data
from emolib.data.splits import column
from emolib.lm.prompts import build_prompt, encode_prefix, encode_suffix, template_for
from emolib.sae.activations import sequences_sha256, token_chunks

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
    """Token sequences (each starts with the model's BOS where it uses one) and where they came from.

    `starts[i]` is the first position of sequence `i` worth storing: prompts of one dataset share their instruction
    prefix token for token, so its activations are identical in every prompt (the model is causal) and are kept
    once, from the dataset's first prompt (`emolib.sae.activations.extract_activations(..., starts=...)`).
    """

    sequences: list[list[int]]
    starts: list[int]
    sources: list[str]
    table: pd.DataFrame
    description: str
    notes: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def n_stored(self) -> int:
        """Tokens whose activations are stored (before dropping first positions and outliers)."""
        return sum(len(s) - b for s, b in zip(self.sequences, self.starts, strict=True))

    def digest(self) -> str:
        """sha256 of the exact token sequences (as `emolib.sae.activations` hashes them for its cache keys)."""
        return sequences_sha256(self.sequences)


def _emotion_prompts(
    tokenizer: PreTrainedTokenizerBase, chat: bool, dataset: str, config: CorpusConfig
) -> tuple[list[list[int]], int]:
    """The dataset's sampled prompts as token ids, and the length of their shared prefix."""
    loaded = data.select_split(data.load(dataset), config.split)
    sample, _ = data.stratified_subsample(loaded, config.emotion_per_label, seed=config.seed)
    labels = data.get_spec(dataset).labels
    parts = build_prompt(tokenizer, labels, chat=chat, template=template_for(dataset))
    prefix = encode_prefix(tokenizer, parts)
    prompts = [
        prefix + encode_suffix(tokenizer, parts, text, config.max_length)[0]
        for text in column(sample, "text")
    ]
    return prompts, len(prefix)


def _general_sequences(tokenizer: PreTrainedTokenizerBase, config: CorpusConfig) -> list[list[int]]:
    """WikiText articles of the split (seeded order), cut into `max_length` chunks, up to `general_tokens`."""
    articles = data.wikitext_articles(config.split)
    random.Random(config.seed).shuffle(articles)
    sequences: list[list[int]] = []
    total = 0
    for chunk in token_chunks(tokenizer, articles, config.max_length):
        if len(chunk) < 16:  # a dangling tail carries little context
            continue
        sequences.append(chunk)
        total += len(chunk)
        if total >= config.general_tokens:
            break
    return sequences


def build_corpus(tokenizer: PreTrainedTokenizerBase, chat: bool, config: CorpusConfig) -> Corpus:
    """The mixed corpus for one model: emotion prompts of every dataset, then WikiText chunks (if available)."""
    available = data.available_datasets()
    emotion = config.emotion_datasets or tuple(d for d in available if data.get_spec(d).kind == "emotion")
    sequences: list[list[int]] = []
    starts: list[int] = []
    sources: list[str] = []
    rows = []
    for dataset in emotion:
        prompts, prefix = _emotion_prompts(tokenizer, chat, dataset, config)
        sequences += prompts
        starts += [0] + [prefix] * (len(prompts) - 1)
        sources += [dataset] * len(prompts)
        n = sum(map(len, prompts))
        rows.append(_row(dataset, "emotion prompts", len(prompts), n, n - prefix * (len(prompts) - 1)))
    notes = []
    if LM_DATASET in available and config.general_tokens > 0:
        general = _general_sequences(tokenizer, config)
        sequences += general
        starts += [0] * len(general)
        sources += [LM_DATASET] * len(general)
        n = sum(map(len, general))
        rows.append(_row(LM_DATASET, "general text", len(general), n, n))
    elif config.general_tokens > 0:
        notes.append(
            f"{LM_DATASET} is not available (EMOLIB_DATA_DIR unset): the corpus has no general text."
        )
    table = pd.DataFrame(rows)
    table["share of stored tokens"] = table["stored tokens"] / table["stored tokens"].sum()
    description = (
        f"{config.split} split: {config.emotion_per_label} prompts per label from {', '.join(emotion)} "
        f"(shared instruction prefix stored once per dataset); up to {config.general_tokens} WikiText tokens "
        f"in chunks of {config.max_length}"
    )
    return Corpus(sequences, starts, sources, table, description, notes)


def _row(source: str, kind: str, sequences: int, tokens: int, stored: int) -> dict:
    return {"source": source, "kind": kind, "sequences": sequences, "tokens": tokens, "stored tokens": stored}

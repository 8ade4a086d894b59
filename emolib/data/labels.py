"""Canonical emotion labels and the one table that maps native spellings onto them."""

from __future__ import annotations

from collections.abc import Sequence

from emolib.data.schema import EmolibDataError

EKMAN6 = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
EKMAN7 = (*EKMAN6, "neutral")
#: Non-Ekman labels stay labels of their own: merging shame/guilt/love into an Ekman class would change the task.
#: relief, trust, pride and boredom are Crowd-enVENT's.
CANONICAL_LABELS = (*EKMAN7, "shame", "guilt", "love", "relief", "trust", "pride", "boredom")

#: The one harmonisation table: native spelling (lowercase, `_`/`-` read as spaces) -> canonical label.
LABEL_ALIASES: dict[str, str] = {
    **{label: label for label in CANONICAL_LABELS},
    "happiness": "joy",
    "happy": "joy",
    "joyful": "joy",
    "sad": "sadness",
    "angry": "anger",
    "fearful": "fear",
    "scared": "fear",
    "afraid": "fear",
    "disgusted": "disgust",
    "surprised": "surprise",
    "no emotion": "neutral",
    "ashamed": "shame",
    "guilty": "guilt",
}


def canonical_label(raw: str) -> str | None:
    """The canonical label for a native spelling (`"Happy"`, `"no_emotion"`), or None if the table lacks it."""
    key = " ".join(raw.replace("_", " ").replace("-", " ").lower().split())
    return LABEL_ALIASES.get(key)


def canonical_labels(labels: Sequence[str]) -> tuple[str, ...]:
    out = []
    for label in labels:
        canonical = canonical_label(label)
        if canonical is None:
            raise EmolibDataError(f"unknown label {label!r}; known spellings: {sorted(LABEL_ALIASES)}")
        out.append(canonical)
    return tuple(dict.fromkeys(out))

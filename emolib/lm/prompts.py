"""Emotion-classification prompts: the paper's template, rendered for chat and base models.

Every prompt is split into a shared prefix (system turn and instruction, identical for all texts) and a per-text
suffix. The two halves are always tokenised separately and concatenated, with and without prefix caching, so that
reusing the prefix's keys and values cannot change a single token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from transformers import PreTrainedTokenizerBase

#: Placeholder for the text while the chat template is rendered (never appears in real data).
_SENTINEL = "\u2063EMOLIB_TEXT\u2063"


@dataclass(frozen=True)
class PromptTemplate:
    """The classification prompt.

    The default is the paper's ISEAR template: an instruction listing the labels, then `Experience: {text}` and
    `Answer:`. `text_field` names the text ("Experience" for ISEAR situations, "Text" elsewhere). For chat models
    the answer cue opens the assistant's turn, so that in both kinds of model the answer follows "Answer:" and a
    space, and the label words are scored in the same form.
    """

    instruction: str = (
        "Choose the most appropriate emotion from the following list: {labels}. "
        "Respond with only the emotion, without any explanation."
    )
    text_field: str = "Experience"
    answer_cue: str = "Answer:"
    label_separator: str = ", "
    #: Chat models only: None keeps the model's default system turn (if its template adds one).
    system: str | None = None

    def body(self, text: str) -> str:
        return f"{self.text_field}: {text}"


PAPER_TEMPLATE = PromptTemplate()

#: Name of the text field per dataset (the paper's ISEAR wording; a neutral "Text" for the others).
TEXT_FIELDS: dict[str, str] = {"isear": "Experience"}


def template_for(dataset: str, base: PromptTemplate = PAPER_TEMPLATE) -> PromptTemplate:
    """The template with the dataset's text field (`Experience` for ISEAR, `Text` otherwise)."""
    return replace(base, text_field=TEXT_FIELDS.get(dataset, "Text"))


def shuffled_order(labels: tuple[str, ...], seed: int) -> tuple[str, ...]:
    """A seeded permutation of the label list, for the label-order check."""
    order = list(labels)
    random.Random(seed).shuffle(order)
    return tuple(order)


@dataclass(frozen=True)
class PromptParts:
    """A template rendered for one model and label order: shared prefix, per-text suffix, answer verbalisers.

    `verbalisers[label]` are the surface forms whose probabilities are summed to score the label: the label in
    lower case and capitalised, each after a space (the answer follows the cue "Answer:").
    """

    prefix: str
    suffix_template: str
    labels: tuple[str, ...]
    label_order: tuple[str, ...]
    chat: bool
    verbalisers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def suffix(self, text: str) -> str:
        # `replace`, not `format`: texts may contain braces.
        return self.suffix_template.replace(_SENTINEL, text)

    def render(self, text: str) -> str:
        """The whole prompt as one string (for display and for the one-prompt-at-a-time baseline)."""
        return self.prefix + self.suffix(text)


def _verbalisers(labels: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {label: tuple(dict.fromkeys([" " + label, " " + label.capitalize()])) for label in labels}


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    labels: tuple[str, ...],
    *,
    chat: bool,
    template: PromptTemplate = PAPER_TEMPLATE,
    label_order: tuple[str, ...] | None = None,
) -> PromptParts:
    """Render `template` for a model: its chat template for chat models, raw text for base models.

    `labels` are the classes scored; `label_order` is the order they are listed in the instruction (default:
    `labels`), a parameter because the listed order can bias small models.
    """
    order = tuple(label_order) if label_order is not None else tuple(labels)
    if sorted(order) != sorted(labels):
        raise ValueError(f"label_order {order} must be a permutation of labels {tuple(labels)}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels contain duplicates: {labels}")
    instruction = template.instruction.format(labels=template.label_separator.join(order))
    body = template.body(_SENTINEL)
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat=True but the tokenizer has no chat template")
        messages = [{"role": "user", "content": f"{instruction}\n{body}"}]
        if template.system is not None:
            messages.insert(0, {"role": "system", "content": template.system})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rendered += template.answer_cue
    else:
        rendered = f"{instruction}\n{body}\n{template.answer_cue}"
    # Split at the start of the body line: everything before it is shared by all prompts.
    head = body[: body.index(_SENTINEL)]
    cut = rendered.index(head + _SENTINEL)
    return PromptParts(
        prefix=rendered[:cut],
        suffix_template=rendered[cut:],
        labels=tuple(labels),
        label_order=order,
        chat=chat,
        verbalisers=_verbalisers(tuple(labels)),
    )


def encode_prefix(tokenizer: PreTrainedTokenizerBase, parts: PromptParts) -> list[int]:
    """Token ids of the shared prefix, with the BOS token unless the rendered text already starts with it."""
    bos = tokenizer.bos_token
    already = bos is not None and parts.prefix.startswith(bos)
    return tokenizer(parts.prefix, add_special_tokens=not already).input_ids


def encode_suffix(
    tokenizer: PreTrainedTokenizerBase, parts: PromptParts, text: str, max_text_tokens: int
) -> tuple[list[int], bool]:
    """Token ids of one text's suffix, the text cut to `max_text_tokens` tokens; also whether it was cut."""
    text, truncated = _cut(tokenizer, text, max_text_tokens)
    return tokenizer(parts.suffix(text), add_special_tokens=False).input_ids, truncated


def suffix_text_mask(
    tokenizer: PreTrainedTokenizerBase, parts: PromptParts, text: str, max_text_tokens: int
) -> list[bool]:
    """For each token of `encode_suffix(...)`, whether it belongs to the text (True) or to the template around it
    (the text field's name, the answer cue, chat markers): what tells content features from template features."""
    text, _ = _cut(tokenizer, text, max_text_tokens)
    start = parts.suffix_template.index(_SENTINEL)
    end = start + len(text)
    encoded = tokenizer(parts.suffix(text), add_special_tokens=False, return_offsets_mapping=True)
    return [first < end and last > start for first, last in encoded["offset_mapping"]]


def _cut(tokenizer: PreTrainedTokenizerBase, text: str, max_text_tokens: int) -> tuple[str, bool]:
    text_ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(text_ids) <= max_text_tokens:
        return text, False
    return tokenizer.decode(text_ids[:max_text_tokens]), True

"""Tests for emolib.lm.prompts: the paper's template rendered for base and chat models, split into prefix and suffix."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from emolib.lm import prompts
from emolib.lm.prompts import PAPER_TEMPLATE, build_prompt, encode_prefix, encode_suffix

LABELS = ("joy", "fear", "anger")
INSTRUCTION = (
    "Choose the most appropriate emotion from the following list: joy, fear, anger. "
    "Respond with only the emotion, without any explanation."
)
TEXTS = ["I lost my keys.", "ok", "The cake was wonderful and everyone sang and danced all night long."]


def test_base_prompt_is_raw_text_ending_with_the_answer_cue(tiny_tokenizer):
    parts = build_prompt(tiny_tokenizer, LABELS, chat=False)
    assert parts.render("I lost my keys.") == f"{INSTRUCTION}\nExperience: I lost my keys.\nAnswer:"
    assert parts.prefix == f"{INSTRUCTION}\n"
    assert parts.suffix("x") == "Experience: x\nAnswer:"
    assert not parts.chat and parts.labels == LABELS and parts.label_order == LABELS


def test_chat_prompt_uses_the_chat_template_and_opens_the_assistant_turn_with_the_cue(tiny_tokenizer):
    parts = build_prompt(tiny_tokenizer, LABELS, chat=True)
    expected = f"<|bos|><|user|>\n{INSTRUCTION}\nExperience: I lost my keys.<|end|>\n<|assistant|>\nAnswer:"
    assert parts.render("I lost my keys.") == expected
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{INSTRUCTION}\nExperience: I lost my keys."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert parts.render("I lost my keys.") == rendered + "Answer:"
    assert parts.prefix == f"<|bos|><|user|>\n{INSTRUCTION}\n"
    assert parts.chat


def test_chat_prompt_with_a_system_turn(tiny_tokenizer):
    template = replace(PAPER_TEMPLATE, system="You label emotions.")
    parts = build_prompt(tiny_tokenizer, LABELS, chat=True, template=template)
    assert parts.prefix == f"<|bos|><|system|>\nYou label emotions.<|end|>\n<|user|>\n{INSTRUCTION}\n"
    assert parts.suffix("x") == "Experience: x<|end|>\n<|assistant|>\nAnswer:"


def test_chat_without_a_chat_template_is_an_error(tiny_tokenizer):
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt(plain, LABELS, chat=True)


@pytest.mark.parametrize("chat", [False, True])
def test_prefix_plus_suffix_is_the_whole_prompt_and_the_prefix_is_shared(tiny_tokenizer, chat):
    parts = build_prompt(tiny_tokenizer, LABELS, chat=chat)
    for text in TEXTS:
        assert parts.prefix + parts.suffix(text) == parts.render(text)
        assert parts.render(text).startswith(parts.prefix)
        assert text in parts.suffix(text) and text not in parts.prefix
    # the shared part ends right before the body line, so nothing per-text leaks into it
    assert parts.suffix_template.startswith("Experience: ")


@pytest.mark.parametrize("chat", [False, True])
def test_texts_with_braces_and_format_fields_survive(tiny_tokenizer, chat):
    parts = build_prompt(tiny_tokenizer, LABELS, chat=chat)
    for text in ["a {b} c", "{}", "{labels}", "{0} and }{", "100% {{double}}"]:
        assert f"Experience: {text}" in parts.render(text)
        assert parts.suffix(text).count(text) == 1


def test_custom_template_fields(tiny_tokenizer):
    template = replace(PAPER_TEMPLATE, text_field="Utterance", answer_cue="Emotion:", label_separator=" / ")
    parts = build_prompt(tiny_tokenizer, ("joy", "fear"), chat=False, template=template)
    assert "list: joy / fear." in parts.prefix
    assert parts.suffix("hi") == "Utterance: hi\nEmotion:"


def test_label_order_changes_only_the_listed_order(tiny_tokenizer):
    parts = build_prompt(tiny_tokenizer, LABELS, chat=False, label_order=("anger", "joy", "fear"))
    assert "list: anger, joy, fear." in parts.prefix
    assert parts.labels == LABELS  # scored labels keep their order
    assert parts.label_order == ("anger", "joy", "fear")
    assert parts.verbalisers == build_prompt(tiny_tokenizer, LABELS, chat=False).verbalisers


@pytest.mark.parametrize(
    ("labels", "order", "message"),
    [
        (LABELS, ("joy", "fear"), "permutation"),  # missing one
        (LABELS, ("joy", "fear", "anger", "sadness"), "permutation"),  # an extra one
        (LABELS, ("joy", "fear", "fear"), "permutation"),  # duplicate in the order
        (LABELS, ("joy", "fear", "surprise"), "permutation"),  # a different label
        (("joy", "fear", "joy"), None, "duplicates"),
        (("joy", "fear", "joy"), ("joy", "joy", "fear"), "duplicates"),
    ],
)
def test_bad_label_order_or_duplicate_labels_raise(tiny_tokenizer, labels, order, message):
    with pytest.raises(ValueError, match=message):
        build_prompt(tiny_tokenizer, labels, chat=False, label_order=order)


def test_template_for_uses_experience_for_isear_and_text_elsewhere():
    assert prompts.template_for("isear").text_field == "Experience"
    for dataset in ["builtin", "meld", "goemotions", "carer_emotion", "anything"]:
        assert prompts.template_for(dataset).text_field == "Text"
    base = replace(PAPER_TEMPLATE, answer_cue="A:")
    assert prompts.template_for("meld", base) == replace(base, text_field="Text")
    assert PAPER_TEMPLATE.text_field == "Experience"  # the default template is not modified


def test_shuffled_order_is_a_seeded_permutation():
    labels = ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")
    orders = {seed: prompts.shuffled_order(labels, seed) for seed in range(6)}
    for seed, order in orders.items():
        assert sorted(order) == sorted(labels)
        assert prompts.shuffled_order(labels, seed) == order
    assert len(set(orders.values())) > 1  # seeds give different orders
    assert labels == ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")  # input untouched


def test_verbalisers_are_the_label_after_a_space_lower_and_capitalised(tiny_tokenizer):
    parts = build_prompt(tiny_tokenizer, ("joy", "no emotion", "Fear"), chat=False)
    assert parts.verbalisers == {
        "joy": (" joy", " Joy"),
        "no emotion": (" no emotion", " No emotion"),
        "Fear": (" Fear",),  # already capitalised: one form, not two identical ones
    }


@pytest.mark.parametrize("chat", [False, True])
def test_encode_prefix_has_exactly_one_bos_at_the_start(tiny_tokenizer, chat):
    parts = build_prompt(tiny_tokenizer, LABELS, chat=chat)
    assert parts.prefix.startswith("<|bos|>") == chat  # the chat template writes BOS itself
    ids = encode_prefix(tiny_tokenizer, parts)
    bos = tiny_tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == (
        parts.prefix if chat else "<|bos|>" + parts.prefix
    )


def test_encode_suffix_adds_no_special_tokens_and_matches_the_whole_prompt(tiny_tokenizer):
    for chat in (False, True):
        parts = build_prompt(tiny_tokenizer, LABELS, chat=chat)
        for text in TEXTS:
            suffix, truncated = encode_suffix(tiny_tokenizer, parts, text, max_text_tokens=256)
            assert not truncated
            assert tiny_tokenizer.bos_token_id not in suffix
            assert suffix == tiny_tokenizer(parts.suffix(text), add_special_tokens=False).input_ids
            # for this tokenizer the split at the body line is also a token boundary of the whole prompt
            whole = tiny_tokenizer(parts.render(text), add_special_tokens=not chat).input_ids
            assert encode_prefix(tiny_tokenizer, parts) + suffix == whole


def test_encode_suffix_truncates_at_max_text_tokens(tiny_tokenizer):
    parts = build_prompt(tiny_tokenizer, LABELS, chat=False)
    text = "The cake was wonderful and everyone sang and danced all night long."
    text_ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    n = len(text_ids)
    assert n > 4
    exact, truncated = encode_suffix(tiny_tokenizer, parts, text, max_text_tokens=n)
    assert not truncated
    assert exact == tiny_tokenizer(parts.suffix(text), add_special_tokens=False).input_ids
    cut, truncated = encode_suffix(tiny_tokenizer, parts, text, max_text_tokens=n - 3)
    assert truncated
    shortened = tiny_tokenizer.decode(text_ids[: n - 3])
    assert tiny_tokenizer.decode(cut) == parts.suffix(shortened)
    assert len(cut) < len(exact)
    assert tiny_tokenizer.decode(cut).endswith("\nAnswer:")  # the cue survives truncation


def test_the_tiny_tokenizer_fixture_is_deterministic(tiny_tokenizer):
    from conftest import _train_tokenizer

    assert _train_tokenizer().to_str() == _train_tokenizer().to_str()
    assert 300 <= len(tiny_tokenizer) <= 500
    assert tiny_tokenizer("joy").input_ids[0] == tiny_tokenizer.bos_token_id


@pytest.mark.parametrize("chat", [False, True])
def test_suffix_text_mask_marks_exactly_the_text_tokens(tiny_tokenizer, chat):
    parts = build_prompt(tiny_tokenizer, LABELS, chat=chat)
    for text in TEXTS:
        suffix, _ = encode_suffix(tiny_tokenizer, parts, text, max_text_tokens=256)
        mask = prompts.suffix_text_mask(tiny_tokenizer, parts, text, max_text_tokens=256)
        assert len(mask) == len(suffix)
        inside = [t for t, m in zip(suffix, mask, strict=True) if m]
        assert tiny_tokenizer.decode(inside).strip() == text
        # the template's own words stay outside the text
        outside = tiny_tokenizer.decode([t for t, m in zip(suffix, mask, strict=True) if not m])
        assert "Experience:" in outside and "Answer:" in outside
        assert mask[0] is False and mask[-1] is False


def test_suffix_text_mask_follows_truncation(tiny_tokenizer):
    parts = build_prompt(tiny_tokenizer, LABELS, chat=False)
    text = TEXTS[2]
    cut, _ = encode_suffix(tiny_tokenizer, parts, text, max_text_tokens=4)
    mask = prompts.suffix_text_mask(tiny_tokenizer, parts, text, max_text_tokens=4)
    assert len(mask) == len(cut) and sum(mask) == 4

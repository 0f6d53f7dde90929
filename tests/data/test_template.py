"""LLaVA-1.5 v1 label masking, checked token by token on hand-written conversations (tiny tokenizer)."""

from __future__ import annotations

import pytest

from road_vlm.data.template import IGNORE_INDEX, SYSTEM_V1, LabelingError, encode_training_sample


@pytest.fixture(scope="module")
def tok(tiny_llava_dir):
    from road_vlm.model import load_base

    model, processor = load_base(tiny_llava_dir)
    return processor.tokenizer, model.config.image_token_id


def _encode(tok, conv, has_image, max_length=999):
    tokenizer, image_id = tok
    return encode_training_sample(tokenizer, conv, has_image=has_image, num_image_tokens=16,
                                  image_token_id=image_id, max_length=max_length)


def _runs(tok, sample):
    """[(supervised?, tokens)] runs; image ids shown as '<image>'."""
    tokenizer, _ = tok
    out: list[tuple[bool, list[str]]] = []
    for token, label in zip(tokenizer.convert_ids_to_tokens(sample.input_ids), sample.labels):
        sup = label != IGNORE_INDEX
        if not out or out[-1][0] != sup:
            out.append((sup, []))
        out[-1][1].append(token)
    return out


def _human(v):
    return {"from": "human", "value": v}


def _gpt(v):
    return {"from": "gpt", "value": v}


def test_single_turn_with_image_supervises_answer_and_eos_only(tok):
    tokenizer, image_id = tok
    sample = _encode(tok, [_human("<image>\nWhat color is the circle?"), _gpt("red")], True)
    runs = _runs(tok, sample)
    assert [sup for sup, _ in runs] == [False, True]
    assert runs[1][1] == ["▁red", "</s>"]
    prompt = runs[0][1]
    assert prompt[0] == "<s>" and prompt[-7:] == ["W", "hat", "▁color", "▁is", "▁the", "▁circle?", "▁ASSISTANT:"]
    start = sample.input_ids.index(image_id)
    assert sample.input_ids[start:start + 16] == [image_id] * 16 and sample.input_ids.count(image_id) == 16
    assert tokenizer.convert_ids_to_tokens(sample.input_ids[start - 2:start]) == ["▁USER:", "▁"]
    assert all(label == IGNORE_INDEX for label in sample.labels[:start + 16])
    # The text is LLaVA's v1 string: SYSTEM USER: <image>\nQ ASSISTANT: A</s>
    text = tokenizer.decode([t for t in sample.input_ids if t != image_id])
    assert text.replace("<s>", "").strip() == f"{SYSTEM_V1} USER: \nWhat color is the circle? ASSISTANT: red</s>"


def test_image_after_the_text_is_moved_to_the_front(tok):
    before = _encode(tok, [_human("<image>\nWhat color is the circle?"), _gpt("red")], True)
    after = _encode(tok, [_human("What color is the circle?\n<image>"), _gpt("red")], True)
    assert after.input_ids == before.input_ids and after.labels == before.labels


def test_multi_turn_text_only_supervises_each_answer(tok):
    conv = [_human("Is a circle a color or a shape?"), _gpt("a shape"),
            _human("How many sides does a triangle have?"), _gpt("three")]
    sample = _encode(tok, conv, False)
    runs = _runs(tok, sample)
    assert [sup for sup, _ in runs] == [False, True, False, True]
    assert runs[1][1] == ["▁a", "▁shape", "</s>"]
    # No space after </s>: the second round starts directly with USER.
    assert runs[2][1] == ["US", "ER:", "▁How", "▁many", "▁sides", "▁does", "▁a", "▁triangle", "▁have?", "▁ASSISTANT:"]
    assert runs[3][1] == ["▁three", "</s>"]
    assert runs[0][1][-10:] == ["▁USER:", "▁Is", "▁a", "▁circle", "▁a", "▁color", "▁or", "▁a", "▁shape?",
                                "▁ASSISTANT:"]
    assert tok[1] not in sample.input_ids


def test_image_tokens_beyond_max_length_raise_instead_of_being_cut(tok):
    conv = [_human("<image>\nWhat color is the circle?"), _gpt("red")]
    full = _encode(tok, conv, True)
    last_image = max(i for i, t in enumerate(full.input_ids) if t == tok[1])
    with pytest.raises(LabelingError, match="image tokens"):
        _encode(tok, conv, True, max_length=last_image)
    with pytest.raises(LabelingError, match="no answer token"):
        _encode(tok, conv, True, max_length=last_image + 2)  # image fits, the answer does not


def test_plain_template_is_image_then_supervised_caption_and_newline(tok):
    # LLaVA's preprocess_plain: the human text is dropped, no system prompt, no roles, no </s>.
    tokenizer, image_id = tok
    conv = [_human("<image>\nDescribe the image briefly."), _gpt("A red circle.")]
    sample = encode_training_sample(tokenizer, conv, has_image=True, num_image_tokens=16, image_token_id=image_id,
                                    max_length=999, template="plain")
    assert sample.input_ids[0] == tokenizer.bos_token_id and sample.input_ids[1:17] == [image_id] * 16
    assert all(label == IGNORE_INDEX for label in sample.labels[:17])
    assert sample.labels[17:] == sample.input_ids[17:]  # everything after the image is supervised
    assert tokenizer.decode(sample.input_ids[17:]) == "A red circle.\n"
    assert tokenizer.eos_token_id not in sample.input_ids and "Describe" not in tokenizer.decode(sample.input_ids)


@pytest.mark.parametrize("conv,has_image", [
    ([_human("A text-only question?"), _gpt("An answer.")], False),
    ([_human("<image>\nDescribe."), _gpt("A circle."), _human("More?"), _gpt("No.")], True),
])
def test_plain_template_refuses_samples_that_are_not_one_captioned_image(tok, conv, has_image):
    tokenizer, image_id = tok
    with pytest.raises(LabelingError, match="plain template"):
        encode_training_sample(tokenizer, conv, has_image=has_image, num_image_tokens=16, image_token_id=image_id,
                               max_length=999, template="plain")


def test_plain_template_is_for_training_only(tiny_llava_dir):
    from road_vlm.data.template import PromptFormat
    from road_vlm.generation import prepare_prompt
    from road_vlm.model import load_vlm

    model, processor, _ = load_vlm(tiny_llava_dir)
    with pytest.raises(ValueError, match="stage-1 captioning format"):
        prepare_prompt(model, processor, PromptFormat(template="plain"), [], "Describe the image.")

"""The shared generation helper: prompts, per-row streaming, per-row sampling/limits, context checks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from road_vlm.data.images import load_image
from road_vlm.data.template import PromptFormat, encode_prompt
from road_vlm.model import load_vlm, num_image_tokens
from road_vlm.generation import (
    GenerationRequest,
    PromptTooLongError,
    SamplingError,
    SamplingParams,
    StreamedGeneration,
    generate_batch,
    prepare_prompt,
)


@pytest.fixture(scope="module")
def base(tiny_llava_dir):
    return load_vlm(tiny_llava_dir)


def test_prepare_prompt_uses_template_and_pad_preprocessing(base, image_path):
    model, processor, fmt = base
    image = load_image(image_path)
    prompt = prepare_prompt(model, processor, fmt, [], "What is in the image?", image)
    expected = encode_prompt(processor.tokenizer, [], "What is in the image?", has_image=True,
                             num_image_tokens=num_image_tokens(processor), image_token_id=model.config.image_token_id)
    assert prompt.input_ids == expected
    assert prompt.pixel_values.shape == (1, 3, 32, 32)
    # "pad": the 48x32 image is centred on a square of the CLIP mean colour, so the top rows are that colour
    # (normalised mean = 0), not the image's red.
    assert torch.allclose(prompt.pixel_values[0, :, 0, :], torch.zeros(3, 32), atol=0.02)
    cropped = prepare_prompt(model, processor, replace(fmt, image_aspect_ratio="crop"), [], "q?", image)
    assert not torch.allclose(cropped.pixel_values, prompt.pixel_values)


def test_streamer_emits_several_pieces_that_join_to_the_answer(base):
    model, processor, fmt = base
    prompt = prepare_prompt(model, processor, fmt, [], "Describe the image briefly.")
    pieces: list[str] = []
    request = GenerationRequest(prompt, sampling=SamplingParams(max_new_tokens=10), on_text=pieces.append)
    (result,) = generate_batch(model, processor.tokenizer, [request])
    assert len(pieces) > 1
    assert "".join(pieces) == result.text
    assert result.completion_tokens == 10 and result.finish_reason == "length"

    streamed = StreamedGeneration(model, processor.tokenizer,
                                  GenerationRequest(prompt, sampling=SamplingParams(max_new_tokens=10)))
    chunks = list(streamed)
    assert len(chunks) > 1 and "".join(chunks) == result.text
    assert streamed.result.token_ids == result.token_ids


def test_greedy_rows_answer_the_same_in_a_mixed_batch_as_alone(base, image_path):
    model, processor, fmt = base
    image = load_image(image_path)
    with_image = prepare_prompt(model, processor, fmt, [], "What is in the image?", image)
    text_only = prepare_prompt(model, processor, fmt, [("Hi", "Hello there.")], "Describe the image briefly.")
    alone = [
        generate_batch(model, processor.tokenizer, [GenerationRequest(p, sampling=SamplingParams(max_new_tokens=n))])[0]
        for p, n in ((with_image, 7), (text_only, 4))
    ]
    batch = generate_batch(model, processor.tokenizer, [
        GenerationRequest(text_only, sampling=SamplingParams(temperature=1.3, top_p=0.9, max_new_tokens=9)),
        GenerationRequest(with_image, sampling=SamplingParams(max_new_tokens=7)),
        GenerationRequest(text_only, sampling=SamplingParams(max_new_tokens=4)),
    ])
    assert batch[1].token_ids == alone[0].token_ids
    assert batch[2].token_ids == alone[1].token_ids
    assert [r.completion_tokens for r in batch[1:]] == [7, 4]  # each row stops at its own limit
    assert batch[0].completion_tokens <= 9


def test_eos_ends_a_row_with_finish_reason_stop(base):
    model, processor, fmt = base
    prompt = prepare_prompt(model, processor, fmt, [], "Describe the image briefly.")
    eos = processor.tokenizer.eos_token_id

    def force_eos(_module, _args, logits):
        forced = torch.full_like(logits, float("-inf"))
        forced[..., eos] = 0.0
        return forced

    hook = model.get_output_embeddings().register_forward_hook(force_eos)
    try:
        (result,) = generate_batch(model, processor.tokenizer, [GenerationRequest(prompt)])
    finally:
        hook.remove()
    assert result.finish_reason == "stop" and result.token_ids == [] and result.text == ""


def test_prompt_beyond_the_context_limit_is_refused(base):
    model, processor, _ = base
    short = PromptFormat(max_length=40)
    with pytest.raises(PromptTooLongError, match=r"context limit of 40 tokens"):
        prepare_prompt(model, processor, short, [], "Describe the image briefly. " * 10)
    # An answer never runs past the limit either.
    prompt = prepare_prompt(model, processor, short, [], "Describe it.")
    (result,) = generate_batch(model, processor.tokenizer,
                               [GenerationRequest(prompt, sampling=SamplingParams(max_new_tokens=500))])
    assert prompt.num_tokens + result.completion_tokens == 40 and result.finish_reason == "length"


# max_new_tokens=0 is valid: it scores a prompt without generating (/v1/completions with echo).
@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=-1), dict(top_k=-1),
                                    dict(min_p=1.5), dict(repetition_penalty=0), dict(presence_penalty=2.5),
                                    dict(frequency_penalty=-3), dict(logprobs=21), dict(logit_bias=((5, 101.0),)),
                                    dict(max_new_tokens=4, min_tokens=5), dict(seed=2**64)])
def test_bad_sampling_settings_are_refused(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


def test_a_cancelled_row_stops_early_and_the_others_finish(base):
    model, processor, fmt = base
    prompt = prepare_prompt(model, processor, fmt, [], "Describe the image briefly.")
    leaving = GenerationRequest(prompt, sampling=SamplingParams(max_new_tokens=12))
    leaving.on_text = lambda piece: leaving.cancelled.set()  # the client goes away after its first piece
    staying = GenerationRequest(prompt, sampling=SamplingParams(max_new_tokens=12))
    left, stayed = generate_batch(model, processor.tokenizer, [leaving, staying])
    assert left.finish_reason == "cancelled" and left.completion_tokens < 12
    assert stayed.completion_tokens == 12 and stayed.finish_reason == "length"


def test_every_decode_step_feeds_the_lm_head_a_contiguous_input(base):
    # torch 2.13 CPU: F.linear on a strided input with a frozen weight is ~100-2000x slower; transformers feeds the
    # head hidden_states[:, -1:, :]. load_vlm makes the head's input contiguous (scripts/repro_strided_linear.py).
    from road_vlm.model import contiguous_lm_head_input

    model, processor, fmt = base
    head = model.get_output_embeddings()
    seen: list[bool] = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    try:
        requests = [GenerationRequest(prepare_prompt(model, processor, fmt, [], q), sampling=SamplingParams(max_new_tokens=3))
                    for q in ("Describe the image briefly.", "What?")]
        generate_batch(model, processor.tokenizer, requests)
    finally:
        handle.remove()
    assert len(seen) == 3 and all(seen)
    hooks = len(head._forward_pre_hooks)
    assert contiguous_lm_head_input(model) is model and len(head._forward_pre_hooks) == hooks  # idempotent


PROMPTS = ["Describe the image briefly.", "What?", "Hello there", "Which shape has three sides?",
           "What color is the circle?", "Tell me a story.", "Read the sign."]


def test_streamed_text_equals_the_answer_even_with_invalid_byte_sequences(base):
    # The random tiny model emits byte-fallback tokens that do not form valid UTF-8; a byte group is decoded as a
    # whole, so text from a group still open may change (once seen: stream 'weenm', answer 'ween\ufffd\ufffd...').
    model, processor, fmt = base
    tokenizer = processor.tokenizer
    saw_invalid = False
    for question in PROMPTS:
        prompt = prepare_prompt(model, processor, fmt, [], question)
        (result,) = generate_batch(model, tokenizer, [GenerationRequest(prompt, sampling=SamplingParams(max_new_tokens=60))])
        streamed = StreamedGeneration(model, tokenizer, GenerationRequest(prompt, sampling=SamplingParams(max_new_tokens=60)))
        pieces = list(streamed)
        assert len(pieces) > 1 and "".join(pieces) == result.text, question
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True), question
        saw_invalid |= "\ufffd" in result.text
    assert saw_invalid, "no prompt produced an invalid byte sequence: the test no longer covers the case"


def test_a_closed_invalid_byte_group_replaces_text_the_stream_had_not_yet_sent(base):
    from road_vlm.generation.detokenize import IncrementalDetokenizer

    _, processor, _ = base
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(["▁square", "<0x36>", "<0xA5>", "▁square"])  # '6' then a lone 0xA5
    pieces: list[str] = []
    text = IncrementalDetokenizer(tokenizer, pieces.append)
    for token in ids:
        text.push(token)
    text.finish()
    assert "".join(pieces) == text.text == tokenizer.decode(ids) == "square\ufffd\ufffd square"
    assert not any("6" in piece for piece in pieces)  # the '6' was never sent: its group turned out invalid


def test_stop_strings_cut_the_answer_and_the_stream_never_shows_the_cut_text(base):
    from road_vlm.generation.detokenize import IncrementalDetokenizer

    _, processor, _ = base
    tokenizer = processor.tokenizer
    ids = tokenizer.encode("a red square and a blue circle", add_special_tokens=False)
    full = tokenizer.decode(ids)
    for stop, expected in (((" and",), "a red square"), (("blue", "red"), "a "), (("zebra",), full)):
        pieces: list[str] = []
        text = IncrementalDetokenizer(tokenizer, pieces.append, stop)
        for token in ids:
            text.push(token)
            assert not any(s in "".join(pieces) for s in stop)
            if text.stopped:
                break
        text.finish()
        assert "".join(pieces) == text.text == expected, stop
        assert text.stopped == (expected != full)
    # Held back while it may still become a stop string, released once it cannot.
    pieces = []
    text = IncrementalDetokenizer(tokenizer, pieces.append, ("square and a green",))
    prefix = len(tokenizer.encode("a red square and a", add_special_tokens=False))
    assert ids[:prefix] == tokenizer.encode("a red square and a", add_special_tokens=False)
    for token in ids[:prefix]:
        text.push(token)
    assert "".join(pieces) == "a red "  # "square and a" is held: it may still become the stop string
    for token in ids[prefix:]:
        text.push(token)
    text.finish()
    assert "".join(pieces) == full and not text.stopped


def test_a_stop_string_ends_a_row_with_finish_reason_stop_in_a_batch(base):
    model, processor, fmt = base
    prompt = prepare_prompt(model, processor, fmt, [], "Describe the image briefly.")
    free = SamplingParams(max_new_tokens=12)
    (reference,) = generate_batch(model, processor.tokenizer, [GenerationRequest(prompt, sampling=free)])
    stop = reference.text[len(reference.text) // 2:][:3]
    assert stop.strip(), reference.text
    cut = reference.text[:reference.text.find(stop)]
    streamed: list[str] = []
    stopped, other = generate_batch(model, processor.tokenizer, [
        GenerationRequest(prompt, sampling=replace(free, stop=(stop,)), on_text=streamed.append),
        GenerationRequest(prompt, sampling=free)])
    assert stopped.text == "".join(streamed) == cut and stopped.finish_reason == "stop"
    assert other.text == reference.text  # the row next to it is unaffected


@pytest.mark.parametrize("stop", [("",), ("a",) * 5, ("x" * 65,), ["a"]])
def test_bad_stop_strings_are_refused(stop):
    with pytest.raises(SamplingError, match="stop"):
        SamplingParams(stop=stop)

"""Terminal chat: one-shot (streamed and JSON), multi-turn history, interactive commands and bad input."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest

from road_vlm.data.template import encode_prompt
from road_vlm.model import LoadedVLM, load_vlm, num_image_tokens
from road_vlm.serve.chat import ChatSession, answer_once, run_interactive
from road_vlm.generation import SamplingParams


class RecordingOutput(io.StringIO):
    """A stdout stand-in that remembers every write, to see text arrive in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture(scope="module")
def tuned(tiny_llava_dir, adapter_dirs):
    return load_vlm(tiny_llava_dir, adapter_dirs["road1proj"])


def test_prompt_mode_streams_the_answer_in_pieces(tuned, image_path):
    session = ChatSession(tuned, sampling=SamplingParams(max_new_tokens=8))
    session.set_image(image_path)
    out = RecordingOutput()
    assert answer_once(session, "What is in the image?", out=out) == 0
    answer = session.history[-1][1]
    assert len(out.writes) > 2  # several pieces before the closing newline
    assert out.getvalue() == answer + "\n"


def test_prompt_mode_json_via_cli(serve_cli, tiny_llava_dir, adapter_dirs, image_path, capsys):
    args = serve_cli.parse_args([
        "chat", "--model", str(tiny_llava_dir), "--adapter", str(adapter_dirs["road4"]),
        "--image", str(image_path), "--prompt", "What is in the image?", "--json", "--max-new-tokens", "12",
    ])
    assert args.func(args) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(payload) >= {"answer", "prompt", "adapter", "tokens"}
    assert payload["adapter"] == str(adapter_dirs["road4"]) and payload["tokens"] == 12
    assert payload["prompt"].endswith("USER: <image>\nWhat is in the image? ASSISTANT:")

    # The adapter changes the answer: the same question without it answers differently.
    args = serve_cli.parse_args(["chat", "--model", str(tiny_llava_dir), "--image", str(image_path),
                                 "--prompt", "What is in the image?", "--json", "--max-new-tokens", "12"])
    assert args.func(args) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plain["adapter"] is None and plain["answer"] != payload["answer"]


def test_cli_reports_a_bad_image_in_prompt_mode(serve_cli, tiny_llava_dir, tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    args = serve_cli.parse_args(["chat", "--model", str(tiny_llava_dir), "--image", str(bad), "--prompt", "hi"])
    assert args.func(args) == 2
    assert f"{bad}: not a recognised image format" in capsys.readouterr().err


def test_second_turn_prompt_contains_the_first_answer(tuned, image_path):
    model, processor, _ = tuned
    session = ChatSession(tuned, sampling=SamplingParams(max_new_tokens=6))
    session.set_image(image_path)
    first = session.ask("What is in the image?")
    first_ids = session.last_prompt_ids
    session.ask("Describe the image briefly.")
    second_ids = session.last_prompt_ids

    def encode(history, question):
        return encode_prompt(processor.tokenizer, history, question, has_image=True,
                             num_image_tokens=num_image_tokens(processor), image_token_id=model.config.image_token_id)

    assert second_ids == encode([("What is in the image?", first.text)], "Describe the image briefly.")
    assert second_ids != encode([], "Describe the image briefly.")
    assert second_ids[: len(first_ids)] == first_ids  # the first turn is kept verbatim
    assert len(session.history) == 2


def test_interactive_commands_and_bad_input(tuned, image_path, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    script = "\n".join([
        "/image /no/such/file.png",
        f"/image {not_image}",
        "Describe the image briefly.",          # no image yet: a text-only turn
        f"/image {image_path}",                  # new image: new conversation
        "What is in the image?",
        "And the colours?",
        "/reset",
        "/bogus",
        "/quit",
        "never read",
    ]) + "\n"
    session = ChatSession(tuned, sampling=SamplingParams(max_new_tokens=4))
    out = io.StringIO()
    assert run_interactive(session, inp=io.StringIO(script), out=out) == 0
    text = out.getvalue()
    assert "error: /no/such/file.png: image file not found" in text
    assert f"error: {not_image}: not a recognised image format" in text
    assert f"[image {image_path} loaded; new conversation]" in text
    assert text.count("ASSISTANT: ") == 3
    assert "[new conversation]" in text and "error: unknown command /bogus" in text
    assert session.image_path == str(image_path)
    assert session.history == []  # /reset came after the two image turns


def test_interactive_over_long_turn_reports_and_continues(tiny_llava_dir):
    model, processor, fmt = load_vlm(tiny_llava_dir)
    session = ChatSession(LoadedVLM(model, processor, replace(fmt, max_length=40)),
                          sampling=SamplingParams(max_new_tokens=2))
    out = io.StringIO()
    script = "Describe the image briefly. " * 10 + "\nHi\n"
    assert run_interactive(session, inp=io.StringIO(script), out=out) == 0
    assert "error: the prompt is" in out.getvalue()
    assert len(session.history) == 1 and session.history[0][0] == "Hi"

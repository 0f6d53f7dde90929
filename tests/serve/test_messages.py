"""OpenAI messages -> LLaVA-1.5 conversation (no model needed)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from road_vlm.data.template import SYSTEM_V1
from road_vlm.serve.messages import BadImageError, MessageError, parse_messages


def _png_url(size=(20, 10)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_multi_turn_messages_become_history_question_and_image():
    history, question, image = parse_messages([
        {"role": "system", "content": SYSTEM_V1},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_url()}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [{"type": "text", "text": "Which"}, {"type": "text", "text": "colour?"}]},
    ])
    assert history == [("What is this?", "A square.")]
    assert question == "Which\ncolour?"
    assert image.size == (20, 10) and image.mode == "RGB"


def test_wrapped_base64_and_bare_string_image_url_are_accepted():
    url = _png_url()
    head, data = url.split(",", 1)
    wrapped = head + "," + "\n".join(data[i:i + 40] for i in range(0, len(data), 40))
    _, _, image = parse_messages([{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": wrapped}]}])
    assert image.size == (20, 10)


@pytest.mark.parametrize("messages, needle", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ([{"role": "tool", "content": "a"}], "role must be"),
    ([{"role": "user", "content": 5}], "string or a list"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "type 'text' or 'image_url'"),
    ([{"role": "user", "content": "look at <image> this"}], "may not contain '<image>'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_url()}}]}], "has no text"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"},
                                   {"type": "image_url", "image_url": {"url": _png_url()}},
                                   {"type": "image_url", "image_url": {"url": _png_url()}}]}], "only one image"),
])
def test_messages_that_llava_cannot_express_are_refused(messages, needle):
    with pytest.raises(MessageError, match=needle):
        parse_messages(messages)


def test_image_errors_name_the_problem(tmp_path):
    def ask(url: str, **kwargs):
        return parse_messages([{"role": "user", "content": [
            {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": url}}]}], **kwargs)

    with pytest.raises(BadImageError, match="must be base64"):
        ask("data:image/png,rawbytes")
    with pytest.raises(BadImageError, match="larger than the server's limit of 100 bytes"):
        ask(_png_url((64, 64)), max_image_bytes=100)
    with pytest.raises(BadImageError, match="image file not found"):
        ask(str(tmp_path / "missing.png"), allow_local_images=True)

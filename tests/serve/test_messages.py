"""OpenAI messages -> LLaVA-1.5 conversation (no model needed)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from road_vlm.data.template import SYSTEM_V1
from road_vlm.serve.messages import BadImageError, ImagePolicy, MessageError, parse_messages


def _png_url(size=(20, 10)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_multi_turn_messages_become_history_question_and_image():
    conversation = parse_messages([
        {"role": "system", "content": SYSTEM_V1},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_url()}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [{"type": "text", "text": "Which"}, {"type": "text", "text": "colour?"}]},
    ])
    assert conversation.history == [("What is this?", "A square.")]
    assert conversation.question == "Which\ncolour?"
    assert conversation.image.size == (20, 10) and conversation.image.mode == "RGB"
    assert conversation.system == SYSTEM_V1


def test_system_messages_fill_the_templates_system_slot():
    assert parse_messages([{"role": "user", "content": "hi"}]).system is None  # the template's own text
    custom = parse_messages([{"role": "system", "content": "You are a pirate."},
                             {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                             {"role": "user", "content": "hi"}])
    assert custom.system == "You are a pirate.\nBe brief." and custom.question == "hi"
    assert parse_messages([{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]).system == ""


def test_wrapped_base64_and_bare_string_image_url_are_accepted():
    url = _png_url()
    head, data = url.split(",", 1)
    wrapped = head + "," + "\n".join(data[i:i + 40] for i in range(0, len(data), 40))
    image = parse_messages([{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": wrapped}]}]).image
    assert image.size == (20, 10)


@pytest.mark.parametrize("messages, needle", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ([{"role": "tool", "content": "a"}], "role must be"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "before the conversation"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": _png_url()}}]},
      {"role": "user", "content": "a"}], "text only"),
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
    def ask(url: str, **policy):
        return parse_messages([{"role": "user", "content": [
            {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": url}}]}], ImagePolicy(**policy))

    with pytest.raises(BadImageError, match="must be base64"):
        ask("data:image/png,rawbytes")
    with pytest.raises(BadImageError, match="larger than the server's limit of 100 bytes"):
        ask(_png_url((64, 64)), max_bytes=100)
    with pytest.raises(BadImageError, match="image file not found"):
        ask(str(tmp_path / "missing.png"), allow_local_images=True)


def _image_url(image, fmt: str, **save) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return "data:image/x;base64," + base64.b64encode(buffer.getvalue()).decode()


def _ask(url: str, policy: ImagePolicy | None = None):
    return parse_messages([{"role": "user", "content": [
        {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": url}}]}], policy).image


def test_pixel_budget_is_checked_from_the_header_before_decoding():
    import time

    from PIL import Image

    # A 1-bit 13,300 x 13,300 PNG compresses to ~21 KB but decodes to 177 M pixels (below PIL's bomb limit).
    bomb = _image_url(Image.new("1", (13_300, 13_300)), "PNG", optimize=True)
    assert len(bomb) < 64 * 1024
    start = time.perf_counter()
    with pytest.raises(BadImageError, match=r"13300 x 13300 = 176,890,000 pixels, more than the limit of 16,777,216"):
        _ask(bomb)
    assert time.perf_counter() - start < 1.0  # refused from the header, not after decoding
    image = _ask(_image_url(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG"), ImagePolicy(max_pixels=1200))
    assert image.size == (40, 30)
    with pytest.raises(BadImageError, match="more than the limit of 1,199"):
        _ask(_image_url(Image.new("RGB", (40, 30)), "PNG"), ImagePolicy(max_pixels=1199))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_decode(fmt):
    from PIL import Image

    image = _ask(_image_url(Image.new("RGB", (8, 6), (200, 10, 10)), fmt))
    assert image.size == (8, 6) and image.mode == "RGB"


@pytest.mark.parametrize("fmt", ["EPS", "TIFF", "ICO", "PPM"])
def test_other_formats_are_refused_without_being_decoded(fmt):
    from PIL import Image

    try:
        url = _image_url(Image.new("RGB", (8, 8)), fmt)
    except (OSError, KeyError):  # EPS writing needs Ghostscript; the header below is enough to be recognised
        import base64

        url = "data:image/x;base64," + base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n").decode()
    with pytest.raises(BadImageError, match=r"not a recognised or allowed image format \(allowed: PNG, JPEG, WEBP"):
        _ask(url)


def test_lone_surrogates_in_text_are_a_400_not_a_crash():
    with pytest.raises(MessageError, match="lone surrogate"):
        parse_messages([{"role": "user", "content": "bad \ud800 text"}])

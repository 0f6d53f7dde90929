"""OpenAI chat ``messages`` -> a :class:`Conversation` (system text, history, question, image) for the LLaVA-1.5
v1 template.

LLaVA-1.5 conversations hold at most one image, in the first user turn, and one system text, before the turns
(vicuna_v1's system slot; a custom one replaces LLaVA's default). A request that cannot be expressed that way is
rejected with a message that says why, instead of being silently reshaped.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from road_vlm.data.images import ImageLoadError, load_image
from road_vlm.data.template import IMAGE_TOKEN

from .image_fetch import ImageFetchError, fetch_image_bytes

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.-]+)*?)(?P<b64>;base64)?,(?P<data>.*)$", re.DOTALL)


class MessageError(ValueError):
    """A chat request whose messages cannot be turned into a LLaVA-1.5 conversation (``param`` names the field)."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


class BadImageError(MessageError):
    """An image part that cannot be decoded or is not allowed."""


# Decoders a client may reach: the common web formats. PIL knows dozens more (EPS would hand the bytes to
# Ghostscript), none of which a chat client needs.
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class ImagePolicy:
    """What the server accepts as an image: source, bytes, pixels, formats, and how many decode at once."""

    allow_local_images: bool = False
    allow_image_urls: bool = False  # fetch http(s) image URLs (public addresses only: image_fetch.py)
    url_timeout_s: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    formats: tuple[str, ...] = ALLOWED_IMAGE_FORMATS
    max_concurrent_decodes: int = 2
    _slots: threading.BoundedSemaphore = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_concurrent_decodes", "url_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        object.__setattr__(self, "_slots", threading.BoundedSemaphore(self.max_concurrent_decodes))

    def load(self, source: Any, param: str) -> Image.Image:
        with self._slots:  # bounded concurrent decodes: each one may briefly hold max_pixels x 4 bytes
            try:
                return load_image(source, max_pixels=self.max_pixels, formats=self.formats)
            except ImageLoadError as err:
                raise BadImageError(f"cannot use the image: {err}", param) from err


# The policy of callers that pass none: one instance, so its bound on concurrent decodes is shared by them all.
DEFAULT_IMAGE_POLICY = ImagePolicy()


def decode_image_url(url: str, policy: ImagePolicy, *, param: str) -> Image.Image:
    """A ``data:`` URL (base64), with ``allow_image_urls`` an http(s) URL, with ``allow_local_images`` a local
    path / ``file://`` URL -> RGB image."""
    max_bytes = policy.max_bytes
    if not isinstance(url, str) or not url:
        raise BadImageError("image_url.url must be a non-empty string", param)
    match = _DATA_URL.match(url)
    if match:
        if not match.group("b64"):
            raise BadImageError("image data URLs must be base64 encoded (data:image/png;base64,...)", param)
        data = "".join(match.group("data").split())  # some clients wrap long base64 lines
        if len(data) > (max_bytes * 4) // 3 + 4:
            raise BadImageError(f"image is larger than the server's limit of {max_bytes} bytes", param)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadImageError(f"image data URL is not valid base64: {err}", param) from err
        if len(raw) > max_bytes:
            raise BadImageError(f"image is larger than the server's limit of {max_bytes} bytes", param)
        return policy.load(raw, param)
    if url.startswith(("http://", "https://")):
        if not policy.allow_image_urls:
            raise BadImageError("remote image URLs are not fetched by this server (start it with "
                                "--allow-image-urls); send the image as a data:image/...;base64 URL", param)
        try:
            raw = fetch_image_bytes(url, max_bytes=max_bytes, timeout_s=policy.url_timeout_s)
        except ImageFetchError as err:
            raise BadImageError(f"cannot use the image URL: {err}", param) from err
        return policy.load(raw, param)
    if not policy.allow_local_images:
        raise BadImageError("local image paths are disabled (start the server with --allow-local-images); "
                            "send the image as a data:image/...;base64 URL", param)
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if path.is_file() and path.stat().st_size > max_bytes:
        raise BadImageError(f"{path}: larger than the server's limit of {max_bytes} bytes", param)
    return policy.load(path, param)


def _content_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise MessageError(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
            raise MessageError(
                f"{where}.content[{j}] must be an object with type 'text' or 'image_url'", f"{where}.content[{j}]"
            )
    return content


@dataclass
class Conversation:
    """A chat request as the template takes it; ``system`` None keeps the template's own system text."""

    history: list[tuple[str, str]]
    question: str
    image: Image.Image | None
    system: str | None = None


SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system role


def _system_text(message: dict[str, Any], where: str) -> str:
    pieces = []
    for j, part in enumerate(_content_parts(message.get("content"), where)):
        if part["type"] != "text" or not isinstance(part.get("text"), str):
            raise MessageError(f"{where}.content[{j}]: a system message holds text only", f"{where}.content[{j}]")
        pieces.append(part["text"])
    text = "\n".join(pieces).strip()
    if IMAGE_TOKEN in text:
        raise MessageError(f"{where}: the text may not contain {IMAGE_TOKEN!r}", f"{where}.content")
    return text


def parse_messages(messages: Any, images: ImagePolicy | None = None) -> Conversation:
    """Split OpenAI messages into the system text, finished ``(user, assistant)`` turns, the last user question and
    the image. System messages must come before the first turn (several are joined by newlines)."""
    images = images or DEFAULT_IMAGE_POLICY
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages must be a non-empty list")
    turns: list[tuple[str, Any]] = []
    systems: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise MessageError(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role in SYSTEM_ROLES:
            if turns:
                raise MessageError(f"{where}: a system message must come before the conversation (LLaVA-1.5's "
                                   "vicuna_v1 template has one system slot, at the start)", f"{where}.role")
            systems.append(_system_text(message, where))
            continue
        if role not in ("user", "assistant"):
            raise MessageError(f"{where}.role must be 'system', 'developer', 'user' or 'assistant', got {role!r}",
                               f"{where}.role")
        turns.append((role, (i, message.get("content"))))
    if not turns or turns[-1][0] != "user":
        raise MessageError("the last message must come from the user")
    for k, (role, (i, _)) in enumerate(turns):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise MessageError(
                f"messages[{i}]: turns must alternate user/assistant, starting with user", f"messages[{i}].role"
            )

    image: Image.Image | None = None
    texts: list[str] = []
    for k, (role, (i, content)) in enumerate(turns):
        where = f"messages[{i}]"
        pieces: list[str] = []
        for j, part in enumerate(_content_parts(content, where)):
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise MessageError(f"{where}.content[{j}].text must be a string", f"{where}.content[{j}].text")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:  # JSON allows "\ud800"; no tokenizer or response can carry it
                    raise MessageError(f"{where}.content[{j}].text is not valid Unicode (a lone surrogate at "
                                       f"position {err.start})", f"{where}.content[{j}].text") from err
                if IMAGE_TOKEN in text:
                    raise MessageError(f"{where}: the text may not contain {IMAGE_TOKEN!r}; send images as "
                                       "image_url parts", f"{where}.content[{j}].text")
                pieces.append(text)
                continue
            if role != "user":
                raise MessageError(f"{where}: only user messages may carry images", f"{where}.content[{j}]")
            if k != 0:
                raise MessageError(
                    f"{where}: LLaVA-1.5 takes one image per conversation, in the first user message; "
                    "start a new conversation for a new image", f"{where}.content[{j}]"
                )
            if image is not None:
                raise MessageError(f"{where}: only one image per conversation is supported", f"{where}.content[{j}]")
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            image = decode_image_url(url, images, param=f"{where}.content[{j}].image_url")
        text = "\n".join(p for p in pieces if p.strip()).strip()
        if role == "user" and not text:
            raise MessageError(f"{where}: the user message has no text", f"{where}.content")
        texts.append(text)
    history = [(texts[k], texts[k + 1]) for k in range(0, len(texts) - 1, 2)]
    return Conversation(history, texts[-1], image, "\n".join(t for t in systems if t) if systems else None)

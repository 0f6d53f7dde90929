"""Image loading and LLaVA-1.5's ``pad`` preprocessing.

The HF CLIP processor alone resizes and centre-crops, which cuts off the sides of non-square images. LLaVA-1.5
trained and evaluated with ``expand2square`` first: the image is centred on a square canvas filled with the
processor's mean colour (122, 116, 104 for CLIP), so nothing is cropped.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError


class ImageLoadError(ValueError):
    """An image that is missing, not an image, or cannot be decoded."""


def load_image(
    source: str | Path | bytes | Image.Image,
    *,
    max_pixels: int | None = None,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """Open an image file (or bytes, or a PIL image) as RGB, with an error that names the file.

    ``max_pixels`` bounds width x height, checked from the header before anything is decoded (a 21 KB PNG can
    claim 13,300 x 13,300 pixels, below PIL's own bomb limit). ``formats`` restricts which decoders may be used
    (PIL names, e.g. ``("PNG", "JPEG")``); anything else is refused without being parsed further. Animated
    formats give their first frame.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        if isinstance(source, bytes):
            image = Image.open(io.BytesIO(source), formats=formats)
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageLoadError(f"{name}: image file not found")
            image = Image.open(path, formats=formats)
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageLoadError(f"{name}: {image.width} x {image.height} = {image.width * image.height:,} pixels, "
                                 f"more than the limit of {max_pixels:,}")
        image.load()  # decode now, so a truncated file fails here and not deep inside a batch
        return image.convert("RGB")
    except ImageLoadError:
        raise
    except UnidentifiedImageError as err:
        allowed = f" (allowed: {', '.join(formats)})" if formats is not None else ""
        raise ImageLoadError(f"{name}: not a recognised{' or allowed' if formats else ''} image format{allowed}") from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{name}: cannot read image ({err})") from err


def background_color(image_processor: Any) -> tuple[int, int, int]:
    """The pad colour LLaVA uses: the processor's mean, times 255, truncated."""
    mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    r, g, b = (int(m * 255) for m in mean)
    return (r, g, b)


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Centre ``image`` on a square canvas of its longer side (LLaVA's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_images(
    image_processor: Any, images: list[Image.Image], image_aspect_ratio: str = "pad"
) -> torch.Tensor:
    """Pixel values ``[B, 3, H, W]`` as LLaVA-1.5 computed them (``pad``) or as the bare processor does (``crop``)."""
    if image_aspect_ratio not in ("pad", "crop"):
        raise ValueError(f"unknown image_aspect_ratio {image_aspect_ratio!r}; use 'pad' or 'crop'")
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    prepared = [img.convert("RGB") for img in images]
    if image_aspect_ratio == "pad":
        bg = background_color(image_processor)
        prepared = [expand2square(img, bg) for img in prepared]
    return image_processor(images=prepared, return_tensors="pt")["pixel_values"]

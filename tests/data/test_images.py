"""LLaVA-1.5 ``pad`` preprocessing: expand2square with the CLIP mean colour, then the CLIP processor."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from road_vlm.data.images import ImageLoadError, background_color, expand2square, load_image, preprocess_images


@pytest.fixture(scope="module")
def image_processor(tiny_llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava_dir).image_processor


def test_background_is_clip_mean_times_255_truncated(image_processor):
    assert background_color(image_processor) == (122, 116, 104)


def test_expand2square_centres_the_image_on_the_short_axis():
    wide = Image.new("RGB", (40, 21), (255, 0, 0))
    square = expand2square(wide, (122, 116, 104))
    assert square.size == (40, 40)
    offset = (40 - 21) // 2  # 9 rows of padding above, 10 below
    assert square.getpixel((0, offset - 1)) == (122, 116, 104)
    assert square.getpixel((0, offset)) == (255, 0, 0) and square.getpixel((39, offset + 20)) == (255, 0, 0)
    assert square.getpixel((0, offset + 21)) == (122, 116, 104)
    same = Image.new("RGB", (8, 8))
    assert expand2square(same, (0, 0, 0)) is same


def test_pad_keeps_the_whole_image_where_crop_cuts_the_sides(image_processor):
    # Left third blue, rest red: a centre crop of this 96x32 image loses the blue entirely; pad keeps it.
    image = Image.new("RGB", (96, 32), (255, 0, 0))
    image.paste(Image.new("RGB", (32, 32), (0, 0, 255)), (0, 0))
    pad = preprocess_images(image_processor, [image], "pad")
    crop = preprocess_images(image_processor, [image], "crop")
    assert pad.shape == crop.shape == (1, 3, 32, 32)
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    pad_rgb = (pad[0] * std + mean) * 255
    crop_rgb = (crop[0] * std + mean) * 255
    assert crop_rgb[2].max() < 30  # no blue left after cropping
    assert pad_rgb[2, 16, 2] > 200 and pad_rgb[0, 16, 30] > 200  # blue at the left, red at the right
    assert torch.allclose(pad_rgb[:, 0, 16], torch.tensor([122.0, 116.0, 104.0]), atol=3)  # padded band on top


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="missing.png: image file not found"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageLoadError, match="bad.png: not a recognised image format"):
        load_image(bad)

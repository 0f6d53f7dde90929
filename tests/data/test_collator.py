"""Right padding, attention masks from lengths, images of image samples only."""

from __future__ import annotations

import pytest
import torch

from road_vlm.data.collator import SupervisedCollator


def _item(sid: str, ids: list[int], image: bool) -> dict:
    return {"id": sid, "input_ids": torch.tensor(ids), "labels": torch.tensor([-100] + ids[1:]),
            "pixel_values": torch.ones(3, 4, 4) * len(ids) if image else None, "skipped": False}


def test_right_padding_masks_and_labels():
    batch = SupervisedCollator(pad_token_id=9)([_item("a", [1, 5, 6], True), _item("b", [1, 7], False)])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 9]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # Only the image sample contributes pixel values, in batch order.
    assert batch["pixel_values"].shape == (1, 3, 4, 4) and batch["pixel_values"][0, 0, 0, 0] == 3
    assert batch["ids"] == ["a", "b"]


def test_real_token_equal_to_pad_id_stays_attended():
    batch = SupervisedCollator(pad_token_id=0)([_item("a", [1, 0, 6], False), _item("b", [1], False)])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_all_text_batch_has_no_pixel_values_and_overlong_sample_is_an_error():
    collate = SupervisedCollator(pad_token_id=0, max_length=2)
    with pytest.raises(ValueError, match="sample a"):
        collate([_item("a", [1, 2, 3], False)])
    assert SupervisedCollator(pad_token_id=0)([_item("a", [1, 2], False)])["pixel_values"] is None

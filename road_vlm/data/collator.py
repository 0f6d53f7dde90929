"""Batch tokenised samples: right padding, attention mask from true lengths, images of image samples only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from road_vlm.data.template import IGNORE_INDEX


@dataclass
class SupervisedCollator:
    """Collate ``LazySupervisedDataset`` items into model inputs.

    ``pixel_values`` stacks the images of the samples that have one, in batch order, which is what HF LLaVA
    expects (one image per run of image tokens); it is None for an all-text batch. The attention mask comes
    from each sample's length, not from ``input_ids != pad`` (LLaVA's pad = unk would also mask real <unk>s).
    """

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        lengths = [int(item["input_ids"].numel()) for item in items]
        if self.max_length is not None and max(lengths) > self.max_length:
            worst = items[lengths.index(max(lengths))]["id"]
            # The dataset already enforces max_length; a longer sample here means inconsistent settings.
            raise ValueError(f"sample {worst} has {max(lengths)} tokens, more than max_length {self.max_length}")
        width = max(lengths)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (item, length) in enumerate(zip(items, lengths)):
            input_ids[row, :length] = item["input_ids"]
            labels[row, :length] = item["labels"]
            attention_mask[row, :length] = 1
        images = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.stack(images) if images else None,
            "ids": [item["id"] for item in items],
            "num_skipped": sum(1 for item in items if item.get("skipped")),
            "num_truncated": sum(1 for item in items if item.get("truncated")),
        }

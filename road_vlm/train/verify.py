"""End-of-training check that the saved adapter is the trained one: reload it with ``load_vlm`` (the loader chat,
eval and serving use) and compare its logits with the training model's on one training sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from road_vlm.train.distributed import DistInfo, barrier, broadcast_object
from road_vlm.filenames import RELOAD_CHECK


def probe_index(dataset: Any) -> int:
    """The first sample with an image (exercises projector + adapter), else the first sample."""
    return dataset.has_image.index(True) if any(dataset.has_image) else 0


@torch.no_grad()
def _logits(model: Any, batch: dict[str, Any], device: torch.device, pixel_dtype: torch.dtype) -> torch.Tensor:
    pixel_values = batch["pixel_values"]
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        pixel_values=None if pixel_values is None else pixel_values.to(device, pixel_dtype),
        use_cache=False,
    )
    return out.logits.float().cpu()


def verify_saved_adapter(
    *, engine: Any, dataset: Any, collator: Any, checkpoint: Path, base_model: str, dtype: str,
    pixel_dtype: torch.dtype, output_dir: Path, dist: DistInfo,
) -> dict[str, Any]:
    """Collective (ZeRO-3 forward). Writes both logits to ``reload_check.safetensors``; returns the max |diff|."""
    from road_vlm.model import load_vlm

    index = probe_index(dataset)
    batch = collator([dataset[index]])
    was_training = engine.module.training
    engine.module.eval()
    trained = _logits(engine, batch, engine.device, pixel_dtype)
    if was_training:
        engine.module.train()
    result = None
    if dist.is_main:
        # A quantized base comes back quantized: load_vlm reads it from the saved adapter.
        reloaded_model = load_vlm(base_model, checkpoint, device=dist.device, dtype=dtype).model
        reloaded = _logits(reloaded_model, batch, dist.device, pixel_dtype)
        del reloaded_model
        diff = float((trained - reloaded).abs().max())
        save_file({"trained": trained.contiguous(), "reloaded": reloaded.contiguous(),
                   "input_ids": batch["input_ids"].contiguous(), "attention_mask": batch["attention_mask"].contiguous(),
                   **({"pixel_values": batch["pixel_values"].contiguous()} if batch["pixel_values"] is not None else {})},
                  str(output_dir / RELOAD_CHECK), metadata={"sample_id": str(batch["ids"][0])})
        result = {"sample_id": str(batch["ids"][0]), "checkpoint": str(checkpoint), "max_abs_diff": diff}
    result = broadcast_object(result)
    barrier()
    return result

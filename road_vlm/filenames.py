"""The names of the files road_vlm writes and reads, defined once.

An adapter directory (a checkpoint, an export, a composition) holds `ADAPTER_CONFIG`, `ADAPTER_WEIGHTS`, and where the
run trained it, `PROJECTOR` and `PROMPT_FORMAT`. A training checkpoint adds `TRAINER_STATE`, `CHECKPOINT_MANIFEST`
and `RELOAD_CHECK`. The names of the adapter files are PEFT's, so an exported adapter loads there unchanged.
"""

from __future__ import annotations

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROJECTOR = "projector.safetensors"  # the trained multimodal projector, when the run trained it
PROMPT_FORMAT = "prompt_format.json"  # the conversation template the adapter was trained with
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_MANIFEST = "road_vlm_manifest.json"  # SHA-256 of every file in a checkpoint
RELOAD_CHECK = "reload_check.safetensors"  # logits of one batch, compared when the checkpoint is loaded again
PREDICTIONS = "predictions.jsonl"  # one benchmark's answers, one JSON object per line
HF_CONFIG = "config.json"  # a transformers model directory's config

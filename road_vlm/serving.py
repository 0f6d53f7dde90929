"""Public serving API: one base model, many adapters, mixed-adapter batches (see road_vlm/serve/batching.py)."""

from road_vlm.serve.batching import (
    AdapterLoadError,
    BatchRecord,
    BatchScheduler,
    QueueFullError,
    ServingEngine,
    UnknownAdapterError,
)
from road_vlm.generation import (
    GenerationRequest,
    GenerationResult,
    PreparedPrompt,
    PromptTooLongError,
    SamplingParams,
    generate_batch,
    prepare_prompt,
)

__all__ = [
    "AdapterLoadError",
    "BatchRecord",
    "BatchScheduler",
    "GenerationRequest",
    "GenerationResult",
    "PreparedPrompt",
    "PromptTooLongError",
    "QueueFullError",
    "SamplingParams",
    "ServingEngine",
    "UnknownAdapterError",
    "generate_batch",
    "prepare_prompt",
]

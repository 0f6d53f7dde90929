"""Using a tuned model: terminal chat, web chat, merge/export, and serving one base with many adapters in one batch.

The rooms, by role:

- ``engine``: :class:`ServingEngine`, one base model and its named adapters (compositions ``"a+b"`` included),
  generating mixed-adapter batches; ``projectors``: each adapter's trained projector, chosen per image;
- ``scheduler``: :class:`BatchScheduler`, concurrent requests into the engine's running batch (continuous batching);
- ``server``: the OpenAI-compatible FastAPI app over the scheduler, its protocol in ``openai/``; ``http_guards``:
  the ``Host`` check every road_vlm web app shares; ``messages`` / ``image_fetch``: a request's messages and images;
- ``chat`` (terminal), ``web`` (the chat page), ``export`` (merge, PEFT export), ``commands`` (the CLI).

The serving API is re-exported here: ``from road_vlm.serve import ServingEngine, BatchScheduler``. Attributes
resolve lazily (PEP 562), so that ``road-vlm --help`` does not load torch.
"""

from __future__ import annotations

from road_vlm.lazy import lazy_getattr

_EXPORTS = {
    "AdapterLoadError": "road_vlm.serve.engine",
    "BatchRecord": "road_vlm.serve.engine",
    "ServingEngine": "road_vlm.serve.engine",
    "UnknownAdapterError": "road_vlm.serve.engine",
    "BatchScheduler": "road_vlm.serve.scheduler",
    "QueueFullError": "road_vlm.serve.scheduler",
    "create_app": "road_vlm.serve.server",
    "GenerationRequest": "road_vlm.generation",
    "GenerationResult": "road_vlm.generation",
    "PreparedPrompt": "road_vlm.generation",
    "PromptTooLongError": "road_vlm.generation",
    "SamplingParams": "road_vlm.generation",
    "generate_batch": "road_vlm.generation",
    "prepare_prompt": "road_vlm.generation",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

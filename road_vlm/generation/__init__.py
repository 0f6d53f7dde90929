"""Generation, the one path of eval, chat, web chat and serving.

- ``prompts``: a conversation encoded as training encoded it (template, image preprocessing, context checks);
- ``requests``: what a request holds (prompt, adapter, sampling settings, text callback) and what it returns;
- ``sampling``: each row's own sampling settings, random generator and token mask; ``grammar``: JSON masks;
- ``decode``: the decode loop over one KV cache, rows joining and leaving between steps, each with its adapter;
- ``detokenize``: incremental text per row, never half a character, streamed == final text;
- ``batch``: one batch to the end (:func:`generate_batch`), and a streamed single request.
"""

from road_vlm.generation.batch import StreamedGeneration, generate_batch
from road_vlm.generation.decode import DecodeBatch, eos_ids
from road_vlm.generation.prompts import (
    PreparedPrompt,
    PromptTooLongError,
    context_limit,
    prepare_prompt,
    prepare_raw_prompt,
)
from road_vlm.generation.requests import (
    GenerationRequest,
    GenerationResult,
    SamplingError,
    SamplingParams,
    TextCallback,
)

__all__ = [
    "DecodeBatch",
    "GenerationRequest",
    "GenerationResult",
    "PreparedPrompt",
    "PromptTooLongError",
    "SamplingError",
    "SamplingParams",
    "StreamedGeneration",
    "TextCallback",
    "context_limit",
    "eos_ids",
    "generate_batch",
    "prepare_prompt",
    "prepare_raw_prompt",
]

"""The generation runner shared by all benchmarks: LLaVA-1.5 prompts, pad preprocessing, greedy
decoding, left-padded batches, contiguous shards per process and resumable answers files."""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from pathlib import Path

import torch
from tqdm.auto import tqdm

from road_vlm.data.images import load_image
from road_vlm.eval.common import EvalQuestion
from road_vlm.eval.predictions import append_rows, collect_answered, merge, shard_file
from road_vlm.generation import GenerationRequest, SamplingParams, generate_batch, prepare_prompt
from road_vlm.model import LoadedVLM
from road_vlm.filenames import PREDICTIONS

logger = logging.getLogger(__name__)


def shard_bounds(num_questions: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of this rank's contiguous chunk, ceil(n / world_size) long (LLaVA's get_chunk)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid shard rank {rank} of world size {world_size}")
    size = math.ceil(num_questions / world_size)
    start = min(rank * size, num_questions)
    return start, min(start + size, num_questions)


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed if initialised, else from RANK/WORLD_SIZE
    (set by torchrun and accelerate launch), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def answer_batch(loaded: LoadedVLM, batch: list[EvalQuestion]) -> tuple[list[str], int]:
    """Greedy answers for one batch and the number of tokens generated.

    Goes through the package's one generation path (road_vlm.generation): prompts built as in training,
    left padding, one prefill and decode steps until every row ends. Text-only rows (ScienceQA) get no image.
    """
    model, processor, prompt_format = loaded
    requests = [
        GenerationRequest(
            prompt=prepare_prompt(model, processor, prompt_format, [], q.question,
                                  load_image(q.image) if q.image is not None else None),
            sampling=SamplingParams(temperature=0.0, max_new_tokens=q.max_new_tokens),
        )
        for q in batch
    ]
    results = generate_batch(model, processor.tokenizer, requests)
    return [r.text.strip() for r in results], sum(r.completion_tokens for r in results)


def run_benchmark(
    loaded: LoadedVLM | None,
    questions: list[EvalQuestion],
    out_dir: str | Path,
    *,
    model_id: str,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    desc: str = "eval",
    limit: int | None = None,
) -> int:
    """Answer this rank's share of ``questions`` into ``out_dir``, skipping answered ones.

    Single process: appends to ``predictions.jsonl``. Several ranks: each appends to its own
    ``predictions.rank<r>-of-<w>.jsonl``; call ``predictions.merge`` on one rank afterwards.
    Every batch is flushed, so a killed run loses at most the batch in flight. ``loaded`` may
    be None when nothing is left to answer. ``limit`` restricts the work to the first questions;
    answers already on disk are checked against the full list (a limited rerun of a full run is
    fine). Returns the number of questions answered now.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    own = out / PREDICTIONS if world_size == 1 else shard_file(out, rank, world_size)
    answered = collect_answered(out, questions, own=own)
    work = questions if limit is None else questions[:limit]
    start, end = shard_bounds(len(work), rank, world_size)
    todo = [q for q in work[start:end] if q.answer_key not in answered]
    logger.info("%s: rank %d of %d answers questions %d..%d (%d left, %d already answered)", desc, rank, world_size,
                start, end - 1, len(todo), end - start - len(todo))
    if todo and loaded is None:
        raise ValueError(f"{out}: {len(todo)} questions still need answers but no model was given")
    bar = tqdm(total=end - start, initial=end - start - len(todo), desc=desc, unit="q",
               disable=not progress or rank != 0, dynamic_ncols=True)
    tokens, started = 0, time.perf_counter()
    try:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            texts, generated = answer_batch(loaded, batch)  # type: ignore[arg-type]
            tokens += generated
            append_rows(own, [{"question_id": q.question_id, "prompt": q.prompt, "text": text,
                               "answer_id": uuid.uuid4().hex[:22], "model_id": model_id, "metadata": {}}
                              for q, text in zip(batch, texts)])
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.1f}")
    finally:
        bar.close()
    if world_size == 1:
        # Fold in shards left by an earlier multi-process run and keep question order,
        # whatever order earlier (resumed) runs wrote answers in.
        merge(out, questions)
    return len(todo)

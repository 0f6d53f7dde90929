"""One batch of requests, generated to the end: the entry point of eval, chat and offline use."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from road_vlm.generation.decode import DecodeBatch, PrefillContext
from road_vlm.generation.requests import GenerationRequest, GenerationResult


def generate_batch(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    *,
    mixed_adapters: bool = False,
    prefill_context: PrefillContext | None = None,
) -> list[GenerationResult]:
    """Generate answers for all ``requests``: one prefill, then decode steps until every row has ended.

    ``mixed_adapters``: every row uses its request's ``adapter`` (None = the bare base) in the same forward pass,
    via ``per_sample_adapters``; False leaves the model's adapter state as it is (e.g. a merged model).
    """
    if not requests:
        return []
    batch = DecodeBatch(model, tokenizer, mixed_adapters=mixed_adapters, prefill_context=prefill_context)
    results: dict[int, GenerationResult] = {}
    try:
        finished = batch.admit(requests)
        while True:
            results.update((id(request), result) for request, result in finished)
            if not batch.size:
                break
            finished = batch.step()
    finally:
        batch.close()
    return [results[id(request)] for request in requests]


class StreamedGeneration:
    """Runs one :func:`generate_batch` call in a background thread and yields the text of one row as it comes.

    Iterate to receive text pieces; afterwards ``result`` holds the :class:`GenerationResult`. An exception in
    the generating thread is re-raised by the iterator.
    """

    _DONE = object()

    def __init__(self, model: Any, tokenizer: Any, request: GenerationRequest, *, mixed_adapters: bool = False) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self.result: GenerationResult | None = None
        self._error: BaseException | None = None
        user_callback = request.on_text

        def on_text(piece: str) -> None:
            if user_callback is not None:
                user_callback(piece)
            self._queue.put(piece)

        request.on_text = on_text
        self._thread = threading.Thread(
            target=self._run, args=(model, tokenizer, request, mixed_adapters), name="road-vlm-generate", daemon=True
        )
        self._thread.start()

    def _run(self, model: Any, tokenizer: Any, request: GenerationRequest, mixed_adapters: bool) -> None:
        try:
            (self.result,) = generate_batch(model, tokenizer, [request], mixed_adapters=mixed_adapters)
        except BaseException as err:  # re-raised in the consuming thread
            self._error = err
        finally:
            self._queue.put(self._DONE)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                break
            yield item
        self._thread.join()
        if self._error is not None:
            raise self._error

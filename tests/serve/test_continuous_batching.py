"""Continuous batching: rows join a running batch between decode steps and leave when done, each with its own
adapter, image and settings, and still get exactly the answer they get alone."""

from __future__ import annotations

import threading

import pytest

from road_vlm.data.images import load_image
from road_vlm.generation import DecodeBatch, GenerationRequest, SamplingParams
from road_vlm.serve import BatchScheduler


def _request(engine, adapter, question, image=None, max_new=12, **sampling):
    prompt = engine.prepare(adapter, [], question, image)
    return GenerationRequest(prompt, adapter=adapter, sampling=SamplingParams(max_new_tokens=max_new, **sampling))


def _alone(engine, adapter, question, image=None, max_new=12):
    (result,) = engine.generate([_request(engine, adapter, question, image, max_new)])
    return result


def _run(engine, batch, finished):
    done = {}
    while True:
        done.update((id(request), result) for request, result in finished)
        if not batch.size:
            return done
        finished = engine.step(batch)


def test_requests_joining_mid_batch_answer_as_they_do_alone(engine, image_path):
    image = load_image(image_path)
    first = [_request(engine, "road4", "Describe the image briefly.", max_new=20),
             _request(engine, None, "What is in the image?", image, max_new=20)]
    later = [_request(engine, "road1proj", "What is in the image?", image, max_new=9),  # its own projector
             _request(engine, "lora", "Hi", max_new=9)]
    last = _request(engine, "road4", "What is in the image?", image, max_new=5)
    batch = engine.open_batch()
    try:
        finished = engine.admit(batch, first)
        for _ in range(3):
            finished += engine.step(batch)
        finished += engine.admit(batch, later)  # joins rows already 4 tokens in, with a longer cache
        assert batch.size == 4
        for _ in range(2):
            finished += engine.step(batch)
        finished += engine.admit(batch, [last])
        done = _run(engine, batch, finished)
    finally:
        batch.close()
    cases = [("road4", "Describe the image briefly.", None, 20), (None, "What is in the image?", image, 20),
             ("road1proj", "What is in the image?", image, 9), ("lora", "Hi", None, 9),
             ("road4", "What is in the image?", image, 5)]
    for request, (adapter, question, img, max_new) in zip([*first, *later, last], cases):
        assert done[id(request)].token_ids == _alone(engine, adapter, question, img, max_new).token_ids, adapter
    assert len({tuple(done[id(r)].token_ids) for r in first + later}) > 1  # the rows really differ


def test_a_cancelled_row_frees_its_slot_at_the_next_step_and_the_cache_shrinks(engine):
    staying = _request(engine, "road4", "Hi", max_new=15)
    leaving = _request(engine, "lora", "Describe the image briefly. " * 4, max_new=15)  # the longer prompt
    batch = engine.open_batch()
    try:
        finished = engine.admit(batch, [staying, leaving])
        finished += engine.step(batch)
        longest = batch.cache_length
        leaving.cancelled.set()
        finished += engine.step(batch)
        assert [(r is leaving, res.finish_reason) for r, res in finished] == [(True, "cancelled")]
        assert batch.size == 1 and batch.adapters == ["road4"]
        # The cache columns only the cancelled row's longer prompt used are gone.
        assert batch.cache_length == staying.prompt.num_tokens + 2 < longest
        done = _run(engine, batch, [])
    finally:
        batch.close()
    assert done[id(staying)].token_ids == _alone(engine, "road4", "Hi", max_new=15).token_ids


def test_decode_batch_needs_a_pad_token(engine):
    class NoPad:
        pad_token_id = None

    with pytest.raises(ValueError, match="pad token"):
        DecodeBatch(engine.model, NoPad(), mixed_adapters=True)


def _submit_long_then_short(engine, batching):
    """A long answer starts; a short request arrives once it is streaming. Returns (long, short, order)."""
    scheduler = BatchScheduler(engine, max_batch_size=4, batch_window_s=0.0, batching=batching)
    started = threading.Event()
    order: list[str] = []
    long = _request(engine, "road4", "Describe the image briefly.", max_new=40)
    long.on_text = lambda piece: started.set()
    short = _request(engine, "lora", "Hi", max_new=2)
    scheduler.start()
    try:
        long_future = scheduler.submit(long)
        assert started.wait(60)
        short_future = scheduler.submit(short)
        long_future.add_done_callback(lambda _f: order.append("long"))
        short_future.add_done_callback(lambda _f: order.append("short"))
        long_result, short_result = long_future.result(120), short_future.result(120)
    finally:
        scheduler.close()
    assert scheduler.pending == 0
    return long_result, short_result, order


def test_continuous_batching_answers_a_short_request_before_a_long_one_ends(engine):
    long_result, short_result, order = _submit_long_then_short(engine, "continuous")
    assert long_result.completion_tokens == 40, "the long answer ended early: the test no longer covers the case"
    assert order == ["short", "long"]
    assert short_result.token_ids == _alone(engine, "lora", "Hi", max_new=2).token_ids
    assert long_result.token_ids == _alone(engine, "road4", "Describe the image briefly.", max_new=40).token_ids

    _, _, static_order = _submit_long_then_short(engine, "static")
    assert static_order == ["long", "short"]  # static batching: the short one waits for the whole batch


def test_scheduler_refuses_an_unknown_batching_policy(engine):
    with pytest.raises(ValueError, match="batching must be one of"):
        BatchScheduler(engine, batching="dynamic")


def test_a_burst_joins_within_the_prefill_budget_a_few_rows_per_step(engine):
    adapters = ["road4", "lora", None, "road1proj", "road4"]
    requests = [_request(engine, adapter, "Hi", max_new=6) for adapter in adapters]
    tokens = requests[0].prompt.num_tokens
    assert all(r.prompt.num_tokens == tokens for r in requests)
    scheduler = BatchScheduler(engine, max_batch_size=8, batch_window_s=0.5, max_prefill_tokens=2 * tokens)
    before = len(engine.stats.recent)
    scheduler.start()
    try:
        futures = [scheduler.submit(r) for r in requests]  # all inside the batch window: one burst
        results = [f.result(120) for f in futures]
    finally:
        scheduler.close()
    # Two rows per prefill (the budget), in arrival order, each admission between decode steps of the others.
    joined = [record.adapters for record in list(engine.stats.recent)[before:]]
    assert joined == [adapters[0:2], adapters[2:4], adapters[4:5]]
    for adapter, result in zip(adapters, results):
        assert result.token_ids == _alone(engine, adapter, "Hi", max_new=6).token_ids, adapter


def test_a_prompt_longer_than_the_prefill_budget_still_joins_alone(engine):
    long = _request(engine, "road4", "Describe the image briefly. " * 3, max_new=3)
    short = _request(engine, "lora", "Hi", max_new=3)
    scheduler = BatchScheduler(engine, max_batch_size=4, batch_window_s=0.5, max_prefill_tokens=1)
    before = len(engine.stats.recent)
    scheduler.start()
    try:
        futures = [scheduler.submit(long), scheduler.submit(short)]
        assert [f.result(120).completion_tokens for f in futures] == [3, 3]
    finally:
        scheduler.close()
    assert [record.adapters for record in list(engine.stats.recent)[before:]] == [["road4"], ["lora"]]
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        BatchScheduler(engine, max_prefill_tokens=0)

"""Per-row sampling settings: each changes what it should, a seeded row answers the same alone, in a mixed batch and
when it joins a running batch, and no row's settings leak into its neighbours."""

from __future__ import annotations

import pytest
import torch

from road_vlm.generation import DecodeBatch, GenerationRequest, SamplingParams, generate_batch
from road_vlm.generation.sampling import RowSampler

EOS = 2


def _choose(params: SamplingParams, logits: list[float], prompt: list[int] = (), generated: list[int] = ()) -> int:
    sampler = RowSampler(params, list(prompt), {EOS})
    for token in generated:
        sampler.record(token)
    return sampler.choose(torch.tensor(logits))


def test_repetition_penalty_divides_the_logits_of_tokens_already_seen():
    logits = [0.0, 2.0, -5.0, 1.8]  # token 1 leads token 3 narrowly; token 1 is in the prompt
    assert _choose(SamplingParams(), logits, prompt=[1]) == 1
    assert _choose(SamplingParams(repetition_penalty=1.5), logits, prompt=[1]) == 3
    assert _choose(SamplingParams(repetition_penalty=1.5), logits, prompt=[0]) == 1  # only seen tokens


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = [0.0, 1.0, -5.0, 0.5]
    assert _choose(SamplingParams(presence_penalty=0.6), logits, generated=[1]) == 3
    assert _choose(SamplingParams(presence_penalty=0.4), logits, generated=[1, 1, 1]) == 1  # once, not per count
    assert _choose(SamplingParams(frequency_penalty=0.2), logits, generated=[1]) == 1
    assert _choose(SamplingParams(frequency_penalty=0.2), logits, generated=[1, 1, 1]) == 3  # per occurrence
    assert _choose(SamplingParams(presence_penalty=2.0), logits, prompt=[1]) == 1  # the prompt does not count


def test_logit_bias_min_tokens_top_k_and_min_p():
    logits = [0.0, 1.0, 3.0, 2.9]  # EOS (2) is the most likely
    assert _choose(SamplingParams(logit_bias=((0, 100.0),)), logits) == 0
    assert _choose(SamplingParams(min_tokens=1, max_new_tokens=4), logits) == 3  # EOS masked before 1 token
    assert _choose(SamplingParams(min_tokens=1, max_new_tokens=4), logits, generated=[3]) == EOS
    # top_k=1 and min_p=1 leave only the most likely token, whatever the temperature and seed.
    for seed in range(5):
        assert _choose(SamplingParams(temperature=2.0, top_k=1, seed=seed), logits) == EOS
        assert _choose(SamplingParams(temperature=2.0, min_p=1.0, seed=seed), logits) == EOS
    flat = [0.0] * 64
    draws = {_choose(SamplingParams(temperature=1.0, seed=seed, top_k=3), [*flat[:61], 5.0, 5.0, 5.0])
             for seed in range(20)}
    assert draws <= {61, 62, 63} and len(draws) > 1


def _request(engine, question: str, **sampling) -> GenerationRequest:
    prompt = engine.prepare(None, [], question, None)
    return GenerationRequest(prompt, sampling=SamplingParams(**{"max_new_tokens": 8, **sampling}))


def _tokens(results) -> list[tuple[list[int], str]]:
    return [(r.token_ids, r.finish_reason) for r in results]


# One row of each kind; every row must answer in the mixed batch exactly as it does alone.
ROWS = [
    ("Describe the image briefly.", {}),
    ("What is in the image?", dict(temperature=1.5, seed=7)),
    ("What is in the image?", dict(temperature=1.5, seed=8, top_k=5, min_p=0.05)),
    ("Describe the image briefly.", dict(logit_bias=((5, 100.0),))),
    ("Describe the image briefly.", dict(repetition_penalty=1.8, presence_penalty=1.0, frequency_penalty=0.5)),
    ("Describe the image briefly.", dict(logit_bias=((EOS, 100.0),), min_tokens=3)),
    ("What is in the image?", dict(temperature=1.0, top_p=0.9)),  # unseeded: only checked for its bounds
]


def test_row_settings_do_not_leak_into_neighbours_in_a_mixed_batch(engine):
    model, tokenizer = engine.model, engine.processor.tokenizer
    alone = [generate_batch(model, tokenizer, [_request(engine, q, **s)])[0] for q, s in ROWS]
    mixed = generate_batch(model, tokenizer, [_request(engine, q, **s) for q, s in ROWS])
    assert _tokens(mixed[:-1]) == _tokens(alone[:-1])
    assert mixed[3].token_ids == [5] * 8  # the bias owns its row ...
    assert alone[0].token_ids != [5] * 8  # ... and only its row
    assert 0 < mixed[6].completion_tokens <= 8
    assert mixed[5].completion_tokens == 3 and mixed[5].finish_reason == "stop"  # EOS as soon as allowed
    assert mixed[1].token_ids != alone[0].token_ids  # the seeded row really samples
    # The same seed gives the same answer again; another seed (checked over several) does not always.
    again = generate_batch(model, tokenizer, [_request(engine, "What is in the image?", temperature=1.5, seed=7)])
    assert again[0].token_ids == alone[1].token_ids
    others = {tuple(generate_batch(model, tokenizer, [_request(engine, "What is in the image?", temperature=1.5,
                                                                 seed=s)])[0].token_ids) for s in range(20, 24)}
    assert len(others | {tuple(alone[1].token_ids)}) > 1


def test_a_seeded_row_joining_a_running_batch_answers_as_it_does_alone(engine):
    model, tokenizer = engine.model, engine.processor.tokenizer
    seeded = dict(temperature=1.5, seed=1234)
    (expected,) = generate_batch(model, tokenizer, [_request(engine, "What is in the image?", **seeded)])
    batch = DecodeBatch(model, tokenizer, mixed_adapters=False)
    results = {}
    try:
        first = _request(engine, "Describe the image briefly.", temperature=1.0, max_new_tokens=12)
        late = _request(engine, "What is in the image?", **seeded)
        finished = batch.admit([first])
        for _ in range(3):
            finished += batch.step()
        finished += batch.admit([late])
        for _ in range(40):  # bounded: every row ends within max_new_tokens steps
            results.update((id(r), res) for r, res in finished)
            if not batch.size:
                break
            finished = batch.step()
    finally:
        batch.close()
    assert results[id(late)].token_ids == expected.token_ids


def test_logprobs_are_the_models_and_name_the_chosen_token(engine):
    model, tokenizer = engine.model, engine.processor.tokenizer
    (greedy,) = generate_batch(model, tokenizer, [_request(engine, "What is in the image?", logprobs=3)])
    assert len(greedy.logprobs) == greedy.completion_tokens
    for entry, token in zip(greedy.logprobs, greedy.token_ids):
        assert entry.token == token and entry.logprob <= 0.0 and len(entry.top) == 3
        assert entry.top[0] == (token, pytest.approx(entry.logprob))  # greedy: the chosen token is the best
    # Scoring: the prompt's log-probabilities equal a plain forward's, no token generated.
    request = _request(engine, "What is in the image?", max_new_tokens=0, prompt_logprobs=1)
    (scored,) = generate_batch(model, tokenizer, [request])
    ids = request.prompt.input_ids
    assert scored.completion_tokens == 0 and scored.finish_reason == "length"
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    assert scored.prompt_logprobs[0] is None
    for j, entry in enumerate(scored.prompt_logprobs[1:], start=1):
        assert entry.token == ids[j]
        assert entry.logprob == pytest.approx(float(reference[j - 1, ids[j]]), abs=1e-4)

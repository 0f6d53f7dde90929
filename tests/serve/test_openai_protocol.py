"""The OpenAI protocol over the real server (uvicorn on loopback): refuse-never-ignore, system messages, length,
per-row settings through HTTP, /v1/completions scoring, structured output, and the operations endpoints."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

EOS = 2
NO_EOS = {str(EOS): -100}  # answers that run to their token limit


def _chat(url: str, text: str = "Describe the image briefly.", *, model: str = "road4", system: str | None = None,
          **fields) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}]
    return httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": messages, **fields}, timeout=120)


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("field, value", [
    ("top_kk", 3), ("repetition_penalti", 1.1), ("reasoning_effort", "low"), ("audio", {"voice": "x"}),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}), ("ignore_eos", True),
])
def test_a_field_the_server_does_not_implement_is_a_400_naming_it(api_server, field, value):
    response = _chat(api_server, **{field: value, "max_tokens": 2})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter" and field in error["message"]


def test_nested_unknown_fields_and_declared_but_unsupported_values_are_refused(api_server):
    for fields, param in [({"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
                           "stream_options.continuous_usage_stats"),
                          ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
                          ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}},
                           "response_format.json_schema.x")]:
        response = _chat(api_server, max_tokens=2, **fields)
        assert response.status_code == 400, fields
        assert response.json()["error"]["param"] == param
    completion = httpx.post(f"{api_server}/v1/completions", json={"model": "base", "prompt": "a", "suffix": "b"},
                            timeout=60)
    assert completion.status_code == 400 and completion.json()["error"]["code"] == "unsupported_parameter"


def test_informational_fields_are_accepted_and_change_nothing(api_server):
    plain = _ok(_chat(api_server, max_tokens=6))
    informed = _ok(_chat(api_server, max_tokens=6, user="u1", metadata={"k": "v"}, store=False,
                         parallel_tool_calls=False, tool_choice="none", tools=[]))
    assert informed["choices"][0]["message"] == plain["choices"][0]["message"]


def test_a_system_message_replaces_the_template_system_text_and_tokenize_shows_it(api_server):
    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}]
    shown = _ok(httpx.post(f"{api_server}/tokenize", json={"model": "road4", "messages": messages}, timeout=60))
    assert shown["prompt"] == "You are a pirate. USER: Hi ASSISTANT:"
    default = _ok(httpx.post(f"{api_server}/tokenize", json={"model": "road4", "messages": messages[1:]},
                             timeout=60))
    assert default["prompt"].startswith("A chat between a curious user") and default["count"] > shown["count"]
    assert shown["max_model_len"] == 1024
    # The answer is the one to exactly that prompt, sent as raw token ids to /v1/completions.
    chat = _ok(_chat(api_server, "Hi", system="You are a pirate.", max_tokens=6))
    raw = _ok(httpx.post(f"{api_server}/v1/completions", json={"model": "road4", "prompt": shown["tokens"],
                                                               "max_tokens": 6}, timeout=60))
    assert chat["choices"][0]["message"]["content"] == raw["choices"][0]["text"]
    text = _ok(httpx.post(f"{api_server}/detokenize", json={"model": "road4", "tokens": shown["tokens"]},
                          timeout=60))
    assert text["prompt"].endswith("You are a pirate. USER: Hi ASSISTANT:")


def test_without_max_tokens_an_answer_runs_to_the_cap_or_the_end_of_the_context(api_server, api_tokens_cap):
    capped = _ok(_chat(api_server, logit_bias=NO_EOS))
    assert capped["usage"]["completion_tokens"] == api_tokens_cap
    assert capped["choices"][0]["finish_reason"] == "length"
    long_prompt = [5] * 1000  # the context holds 1024 tokens: 24 are left
    rest = _ok(httpx.post(f"{api_server}/v1/completions", json={"model": "base", "prompt": long_prompt,
                                                                "logit_bias": NO_EOS}, timeout=120))
    assert rest["usage"]["completion_tokens"] == 24 and rest["choices"][0]["finish_reason"] == "length"
    over = _chat(api_server, max_completion_tokens=api_tokens_cap + 1)
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_completion_tokens"
    mismatch = _chat(api_server, max_tokens=3, max_completion_tokens=4)
    assert mismatch.status_code == 400
    assert _ok(_chat(api_server, max_completion_tokens=3, logit_bias=NO_EOS))["usage"]["completion_tokens"] == 3


def test_concurrent_requests_keep_their_own_settings_in_one_batch(api_server):
    cases = [dict(max_tokens=8), dict(max_tokens=8, temperature=1.5, seed=3),
             dict(max_tokens=8, logit_bias={"5": 100}), dict(max_tokens=8, temperature=1.2, top_k=4, seed=9),
             dict(max_tokens=8, repetition_penalty=1.9, presence_penalty=1.5, frequency_penalty=1.0),
             dict(max_tokens=8, min_tokens=4, logit_bias={str(EOS): 100})]
    alone = [_ok(_chat(api_server, **c))["choices"][0]["message"]["content"] for c in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = [_ok(f.result())["choices"][0]["message"]["content"]
                    for f in [pool.submit(_chat, api_server, **c) for c in cases]]
    assert together == alone
    assert len(set(alone)) == len(alone)  # every setting changed its own answer


def test_n_choices_are_rows_with_consecutive_seeds(api_server):
    both = _ok(_chat(api_server, max_tokens=8, temperature=1.5, seed=100, n=2))
    first = _ok(_chat(api_server, max_tokens=8, temperature=1.5, seed=100))
    second = _ok(_chat(api_server, max_tokens=8, temperature=1.5, seed=101))
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in both["choices"]] == [
        first["choices"][0]["message"]["content"], second["choices"][0]["message"]["content"]]
    assert both["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    with httpx.stream("POST", f"{api_server}/v1/chat/completions", timeout=120, json={
            "model": "road4", "messages": [{"role": "user", "content": "Describe the image briefly."}],
            "max_tokens": 8, "temperature": 1.5, "seed": 100, "n": 2, "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = ["".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"][0]["index"] == i)
                for i in range(2)]
    assert streamed == [c["message"]["content"] for c in both["choices"]]


def test_completions_echo_logprobs_score_the_prompt_as_the_model_does(api_server, engine):
    ids = engine.processor.tokenizer("The red square is left of the circle", add_special_tokens=False)["input_ids"]
    scored = _ok(httpx.post(f"{api_server}/v1/completions", timeout=60, json={
        "model": "base", "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}))
    choice = scored["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) and logprobs["token_logprobs"][0] is None
    assert choice["text"] == engine.processor.tokenizer.decode(ids) and scored["usage"]["completion_tokens"] == 0
    with torch.no_grad():  # exactly the ids sent: no BOS in front
        reference = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    for j in range(1, len(ids)):
        assert logprobs["token_logprobs"][j] == pytest.approx(float(reference[j - 1, ids[j]]), abs=1e-4)
        best = max(logprobs["top_logprobs"][j].values())
        assert (best == logprobs["token_logprobs"][j]) == (int(reference[j - 1].argmax()) == ids[j])
    # A text prompt gets BOS; max_tokens 1 adds one generated token after the echoed prompt.
    text = _ok(httpx.post(f"{api_server}/v1/completions", timeout=60, json={
        "model": "base", "prompt": "The red square", "echo": True, "logprobs": 2, "max_tokens": 1}))
    entries = text["choices"][0]["logprobs"]
    bos = engine.processor.tokenizer.bos_token_id
    assert text["usage"]["prompt_tokens"] == len(engine.processor.tokenizer("The red square")["input_ids"])
    assert len(entries["tokens"]) == text["usage"]["prompt_tokens"] + 1 and bos is not None
    assert all(len(top) >= 2 for top in entries["top_logprobs"][1:])
    bad = httpx.post(f"{api_server}/v1/completions", json={"model": "base", "prompt": [10**6]}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_response_format_constrains_every_row_and_a_bad_schema_is_a_400(api_server):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    body = _ok(_chat(api_server, max_tokens=40, temperature=1.0, seed=5, n=3, response_format={
        "type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}))
    for choice in body["choices"]:
        value = json.loads(choice["message"]["content"])
        assert value["answer"] in ("yes", "no") and isinstance(value["sure"], bool), value
        assert choice["finish_reason"] == "stop"
    anything = _ok(_chat(api_server, max_tokens=20, response_format={"type": "json_object"}))
    assert anything["choices"][0]["message"]["content"].startswith("{")
    bad = _chat(api_server, max_tokens=4, response_format={"type": "json_schema",
                                                           "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json_schema"


def test_chat_logprobs_name_each_generated_token(api_server):
    body = _ok(_chat(api_server, max_tokens=5, logprobs=True, top_logprobs=3, logit_bias=NO_EOS))
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 5
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3 and entry["logprob"] <= 0
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])  # greedy picks the best
    assert _chat(api_server, max_tokens=2, top_logprobs=2).status_code == 400  # needs logprobs: true


def test_operations_endpoints(api_server):
    _ok(_chat(api_server, max_tokens=3))
    assert httpx.post(f"{api_server}/v1/chat/completions", json={"model": "nope", "messages": []},
                      timeout=60).status_code == 400
    health = httpx.get(f"{api_server}/health", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = _ok(httpx.get(f"{api_server}/v1/models", timeout=60))
    assert {m["id"]: m["max_model_len"] for m in models["data"]}["road4"] == 1024
    metrics = httpx.get(f"{api_server}/metrics", timeout=60)
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for needle in ['road_vlm_requests_total{endpoint="/v1/chat/completions",model="road4",status="200"}',
                   'road_vlm_requests_total{endpoint="/v1/chat/completions",model="unknown",status="400"}',
                   'road_vlm_prompt_tokens_total{model="road4"}', 'road_vlm_generation_tokens_total{model="road4"}',
                   "road_vlm_queue_depth 0.0", "road_vlm_running_rows 0.0",
                   "road_vlm_time_to_first_token_seconds_count", "road_vlm_inter_token_latency_seconds_bucket"]:
        assert needle in text, needle
    count = next(line for line in text.splitlines()
                 if line.startswith("road_vlm_time_to_first_token_seconds_count"))
    assert float(count.split()[-1]) >= 1

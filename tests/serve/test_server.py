"""The OpenAI-compatible server: mixed-adapter batches, streaming, and 4xx answers that leave it running."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from road_vlm.model import load_vlm
from road_vlm.generation import GenerationRequest, SamplingParams, generate_batch
from road_vlm.serve.messages import ImagePolicy
from road_vlm.serve.server import create_app

LOCAL = "http://127.0.0.1"  # the Host the server accepts (it refuses others: DNS rebinding)
from road_vlm.serve import AdapterLoadError, BatchScheduler, QueueFullError, ServingEngine


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _ask(model: str, text: str, image_url: str | None = None, **extra) -> dict:
    content: list[dict] = [{"type": "text", "text": text}]
    if image_url:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def _reference_answer(base_dir, adapter_dir, question, image_path, max_new_tokens=6) -> str:
    """The adapter alone: its own load_vlm model (adapter active, projector in the base), batch of one."""
    from road_vlm.data.images import load_image
    from road_vlm.generation import prepare_prompt

    model, processor, fmt = load_vlm(base_dir, adapter_dir)
    image = load_image(image_path) if image_path else None
    prompt = prepare_prompt(model, processor, fmt, [], question, image)
    request = GenerationRequest(prompt, sampling=SamplingParams(max_new_tokens=max_new_tokens))
    return generate_batch(model, processor.tokenizer, [request])[0].text


def test_models_lists_the_base_and_every_adapter(engine):
    with TestClient(create_app(engine), base_url=LOCAL) as client:
        body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["base", "road4", "road1proj", "lora"]


def test_concurrent_requests_for_different_adapters_run_as_one_batch_and_match_each_adapter_alone(
    engine, tiny_llava_dir, adapter_dirs, image_path
):
    url = _data_url(image_path)
    cases = [("road4", "What is in the image?", True), ("road1proj", "What is in the image?", True),
             ("lora", "Describe the image briefly.", False), ("base", "What is in the image?", True)]
    # The batch closes as soon as all four requests are in (max_batch_size), long before the window ends.
    app = create_app(engine, max_batch_size=len(cases), batch_window_s=30.0)
    before = engine.stats.batches
    with TestClient(app, base_url=LOCAL) as client:
        with ThreadPoolExecutor(len(cases)) as pool:
            futures = [pool.submit(client.post, "/v1/chat/completions",
                                   json=_ask(model, q, url if has_image else None)) for model, q, has_image in cases]
            responses = [f.result() for f in futures]
        stats = client.get("/v1/stats").json()
    assert [r.status_code for r in responses] == [200] * len(cases)
    assert engine.stats.batches == before + 1
    last = stats["recent_batches"][-1]
    assert sorted(a or "base" for a in last["adapters"]) == sorted(m for m, _, _ in cases)
    assert last["distinct_adapters"] == len(cases)

    answers = {model: r.json()["choices"][0]["message"]["content"] for (model, _, _), r in zip(cases, responses)}
    for model, question, has_image in cases:
        adapter_dir = None if model == "base" else adapter_dirs[model]
        expected = _reference_answer(tiny_llava_dir, adapter_dir, question, image_path if has_image else None)
        assert answers[model] == expected, model
    # Not all rows answer alike, so the equality above is not vacuous. (Greedy text from a random tiny model can
    # coincide for two adapters; that each adapter changes the logits is pinned by the merge tests.)
    assert len(set(answers.values())) > 1


def test_streaming_sends_chunks_then_done_and_matches_the_plain_answer(engine, image_path):
    body = _ask("road1proj", "What is in the image?", _data_url(image_path), max_tokens=8)
    with TestClient(create_app(engine), base_url=LOCAL) as client:
        plain = client.post("/v1/chat/completions", json=body).json()
        with client.stream("POST", "/v1/chat/completions",
                           json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert sum(1 for p in pieces if p) > 1
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]

    # A stop string (OpenAI's `stop`) cuts both the plain and the streamed answer in the same place.
    answer = plain["choices"][0]["message"]["content"]
    stop = answer[len(answer) // 2:][:3]
    with TestClient(create_app(engine), base_url=LOCAL) as client:
        cut = client.post("/v1/chat/completions", json={**body, "stop": stop}).json()
        with client.stream("POST", "/v1/chat/completions", json={**body, "stop": [stop], "stream": True}) as response:
            cut_events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    cut_chunks = [json.loads(e) for e in cut_events[:-1]]
    assert cut["choices"][0]["message"]["content"] == answer[:answer.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in cut_chunks) == answer[:answer.find(stop)]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"] == 8


def test_bad_requests_get_4xx_json_errors_and_the_server_keeps_running(engine, image_path, tmp_path):
    not_image = tmp_path / "fake.png"
    not_image.write_text("plain text")
    garbage = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
    long_text = "Describe the image briefly. " * 400
    cases = [
        (b"{not json", 400, None),
        (json.dumps({"model": "road4"}), 400, "messages"),
        (json.dumps({"model": "road4", "messages": "hi"}), 400, "messages"),
        (json.dumps(_ask("nope", "hi")), 404, "model_not_found"),
        (json.dumps(_ask("road4", "hi", garbage)), 400, "invalid_image"),
        (json.dumps(_ask("road4", "hi", "data:image/png;base64,@@@")), 400, "invalid_image"),
        (json.dumps(_ask("road4", "hi", str(not_image))), 400, "--allow-local-images"),
        (json.dumps(_ask("road4", "hi", "https://example.com/cat.png")), 400, "remote image URLs"),
        (json.dumps(_ask("road4", long_text)), 400, "context_length_exceeded"),
        (json.dumps(_ask("road4", "hi", temperature=-1)), 400, "temperature"),
        (json.dumps(_ask("road4", "hi", n=17)), 400, "n"),
        (json.dumps(_ask("road4", "hi", best_of_typo=3)), 400, "unsupported_parameter"),
        (json.dumps(_ask("road4", "hi", tools=[{"type": "function", "function": {"name": "f"}}])), 400,
         "unsupported_parameter"),
        (json.dumps(_ask("road4", "hi", stop=["a", "b", "c", "d", "e"])), 400, "stop"),
        (json.dumps(_ask("road4", "hi", stop="x" * 65)), 400, "stop"),
        (json.dumps({"model": "road4", "messages": [{"role": "assistant", "content": "x"}]}), 400, "user"),
        (json.dumps({"model": "road4", "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "text", "text": "c"},
                                         {"type": "image_url", "image_url": {"url": _data_url(image_path)}}]}]}),
         400, "first user message"),
        (json.dumps({"model": "road4", "messages": [{"role": "user", "content": "hi"},
                                                    {"role": "system", "content": "You are a pirate."}]}), 400,
         "system message must come before"),
    ]
    with TestClient(create_app(engine), base_url=LOCAL) as client:
        for body, status, needle in cases:
            response = client.post("/v1/chat/completions", content=body,
                                   headers={"content-type": "application/json"})
            assert response.status_code == status, (body[:80], response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"]
            if needle:
                assert needle in json.dumps(error), (needle, error)
        ok = client.post("/v1/chat/completions", json=_ask("road4", "Describe the image briefly."))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] > 0


def test_local_images_only_when_allowed(engine, image_path):
    with TestClient(create_app(engine, images=ImagePolicy(allow_local_images=True)), base_url=LOCAL) as client:
        response = client.post("/v1/chat/completions", json=_ask("road4", "What is in the image?", str(image_path)))
        missing = client.post("/v1/chat/completions", json=_ask("road4", "hi", "/no/such/image.png"))
    assert response.status_code == 200
    assert missing.status_code == 400 and "image file not found" in missing.json()["error"]["message"]


def test_full_queue_answers_429_and_the_server_recovers(engine):
    entered, release = threading.Event(), threading.Event()
    original = engine.admit

    def blocking_admit(batch, requests):
        entered.set()
        release.wait(60)
        return original(batch, requests)

    engine.admit = blocking_admit
    try:
        app = create_app(engine, max_queue=1, max_batch_size=1, batch_window_s=0.0)
        with TestClient(app, base_url=LOCAL) as client:
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(client.post, "/v1/chat/completions", json=_ask("road4", "hi"))
                assert entered.wait(60)
                busy = client.post("/v1/chat/completions", json=_ask("lora", "hi"))
                release.set()
                assert first.result().status_code == 200
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
            assert client.post("/v1/chat/completions", json=_ask("lora", "hi")).status_code == 200
    finally:
        release.set()
        del engine.admit


def test_scheduler_refuses_beyond_max_queue_and_reports_generation_errors(engine):
    class Failing:
        def open_batch(self):
            return engine.open_batch()

        def admit(self, batch, requests):
            raise RuntimeError("boom")

    scheduler = BatchScheduler(Failing(), max_queue=2, batch_window_s=0.0)  # type: ignore[arg-type]
    scheduler.start()
    try:
        prompt = engine.prepare(None, [], "hi", None)
        future = scheduler.submit(GenerationRequest(prompt))
        with pytest.raises(RuntimeError, match="boom"):
            future.result(timeout=60)
        assert scheduler.pending == 0  # a failed batch frees its slots
    finally:
        scheduler.close()
    with pytest.raises(RuntimeError, match="not running"):
        scheduler.submit(GenerationRequest(prompt))
    full = BatchScheduler(engine, max_queue=1)
    full._pending = 1  # as if one request were running
    full.start()
    try:
        with pytest.raises(QueueFullError, match="max_queue=1"):
            full.submit(GenerationRequest(prompt))
    finally:
        full.close()


def test_adapter_for_another_base_is_refused_with_its_name(tiny_llava_dir, adapter_dirs, tmp_path):
    wrong = tmp_path / "wrong_base"
    shutil.copytree(adapter_dirs["road4"], wrong)
    tensors = load_file(wrong / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = torch.cat([tensors[key], tensors[key]])  # as if trained on a wider model
    save_file(tensors, wrong / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError) as info:
        ServingEngine.load(tiny_llava_dir, {"ok": adapter_dirs["lora"], "other": wrong})
    message = str(info.value)
    assert "'other'" in message and str(wrong) in message and "shape" in message


@pytest.mark.parametrize("damage, says", [("wider", "shape"), ("nan", "NaN"), ("missing", "missing"),
                                          ("corrupt", "cannot read")])
def test_adapter_whose_projector_does_not_fit_is_refused_with_its_name(tiny_llava_dir, adapter_dirs, tmp_path,
                                                                        damage, says):
    wrong = tmp_path / "wrong_projector"
    shutil.copytree(adapter_dirs["road1proj"], wrong)
    file = wrong / "projector.safetensors"
    tensors = load_file(file)
    key = sorted(tensors)[0]
    if damage == "wider":
        tensors[key] = torch.cat([tensors[key], tensors[key]])
    elif damage == "nan":
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    elif damage == "missing":
        del tensors[key]
    save_file(tensors, file)
    if damage == "corrupt":
        file.write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterLoadError) as info:
        ServingEngine.load(tiny_llava_dir, {"ok": adapter_dirs["lora"], "other": wrong})
    message = str(info.value)
    assert "'other'" in message and str(file) in message and says in message


def test_unknown_adapter_and_name_clash_are_refused(tiny_llava_dir, adapter_dirs, engine):
    from road_vlm.serve import UnknownAdapterError

    with pytest.raises(UnknownAdapterError, match="available: base, road4"):
        engine.resolve("missing")
    with pytest.raises(AdapterLoadError, match="also the base model's name"):
        ServingEngine.load(tiny_llava_dir, {"base": adapter_dirs["road4"]}, base_name="base")


def test_api_key_is_required_when_configured(engine):
    with TestClient(create_app(engine, api_key="s3cret"), base_url=LOCAL) as client:
        missing = client.get("/v1/models")
        wrong = client.post("/v1/chat/completions", json=_ask("road4", "hi"),
                            headers={"Authorization": "Bearer nope"})
        ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        health = client.get("/health")
    assert missing.status_code == wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert ok.status_code == 200 and health.status_code == 200

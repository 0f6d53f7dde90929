"""Per-request composition in the server: ``model: "a+b"`` equals the composed adapter directory served alone."""

from __future__ import annotations

from fastapi.testclient import TestClient

from road_vlm.adapters.inject import registry
from road_vlm.data.images import load_image
from road_vlm.generation import GenerationRequest, SamplingParams
from road_vlm.serve.server import create_app
from road_vlm.serve import ServingEngine

LOCAL = "http://127.0.0.1"


def test_a_plus_b_in_a_mixed_batch_equals_the_composed_adapter_alone(tiny_llava_dir, composable, image_path):
    engine = ServingEngine.load(tiny_llava_dir, composable, base_name="base")
    image = load_image(image_path)
    sampling = SamplingParams(max_new_tokens=8)

    def request(model: str, with_image: bool = True) -> GenerationRequest:
        adapter = engine.resolve(model)
        prompt = engine.prepare(adapter, [], "What is in the image?", image if with_image else None)
        return GenerationRequest(prompt, adapter=adapter, sampling=sampling)

    models = ["right+left", "left", "left_right", "base", "mid", "left+right"]
    results = engine.generate([request(m) for m in models])
    texts = dict(zip(models, (r.text for r in results)))
    assert engine.resolve("right+left") == engine.resolve("left+right") == "left+right"  # one composition per set
    assert texts["right+left"] == texts["left+right"] == texts["left_right"]
    alone = ServingEngine.load(tiny_llava_dir, {"left_right": composable["left_right"]}, base_name="base")
    solo = alone.generate([GenerationRequest(alone.prepare("left_right", [], "What is in the image?", image),
                                             adapter="left_right", sampling=sampling)])[0].text
    assert texts["left_right"] == solo
    assert len(set(texts.values())) > 1  # the rows really differ, so the equalities above are not vacuous


def test_compositions_are_bounded_and_bad_ones_are_clear_http_errors(tiny_llava_dir, composable):
    engine = ServingEngine.load(tiny_llava_dir, composable, base_name="base")
    engine.max_composed = 1
    for model in ("left+mid", "left+right"):
        adapter = engine.resolve(model)
        prompt = engine.prepare(adapter, [], "Hi", None)
        engine.generate([GenerationRequest(prompt, adapter=adapter, sampling=SamplingParams(max_new_tokens=2))])
    assert "left+right" in registry(engine.model).configs and "left+mid" not in registry(engine.model).configs

    def ask(model: str):
        return client.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})

    with TestClient(create_app(engine), base_url=LOCAL) as client:
        ok = ask("mid+left")
        assert ok.status_code == 200, ok.text
        cases = [("left+left", 400, "named twice"), ("left+left_right", 400, "each trained the projector"),
                 ("right+left_right", 400, "overlap: layer"),
                 ("left+nope", 404, "not loaded"), ("left+mid+right+left+mid", 400, "at most 4")]
        for model, status, text in cases:
            response = ask(model)
            assert response.status_code == status, (model, response.text)
            assert text in response.json()["error"]["message"], (model, response.text)
        assert ask("left").status_code == 200  # still serving


def test_compose_command_writes_a_loadable_adapter_or_says_why_not(composable, tmp_path, capsys):
    from road_vlm.adapters import read_adapter_config
    from road_vlm.cli import main

    out = tmp_path / "left_mid"
    assert main(["compose", str(composable["left"]), str(composable["mid"]), "--output", str(out)]) == 0
    assert read_adapter_config(out).pair_subset == "1,2/3" and (out / "projector.safetensors").is_file()
    assert main(["compose", str(composable["right"]), str(composable["left_right"]), "--output",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "road-vlm compose: error:" in err and "overlap: layer" in err
    assert not (tmp_path / "bad").exists()

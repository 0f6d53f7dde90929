"""LLaVA-1.5 from its parts and from the original LLaVA layout, on tiny models written in the real layouts:
a CLIPModel directory (openai/clip-vit-large-patch14-336 layout, text tower included), a Llama directory
(Vicuna layout: no <image>, no pad token), LLaVA's stage-1 ``mm_projector.bin`` (a pickle with
``model.mm_projector.{0,2}`` keys) and an original LLaVA checkpoint (``LlavaLlamaForCausalLM`` weights in
``pytorch_model-*.bin`` shards with an index, ``mm_*`` config fields)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from road_vlm.convert import ConversionError, build_base, convert_llava

from convert_helpers import IMAGE, PATCH, TEXT_HIDDEN, VISION_HIDDEN


def _reference_logits(parts: dict[str, Path], input_ids: torch.Tensor, pixel_values: torch.Tensor,
                      image_token_id: int) -> torch.Tensor:
    """LLaVA-1.5's forward assembled by hand from the parts: CLIP's penultimate layer without CLS ->
    Linear-GELU-Linear with mm_projector.bin's tensors -> written over the image positions of Vicuna's input
    embeddings -> Vicuna."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    clip = CLIPVisionModel.from_pretrained(parts["clip"]).eval()
    llama = LlamaForCausalLM.from_pretrained(parts["vicuna"]).eval()
    mm = torch.load(parts["projector"], weights_only=True)
    with torch.no_grad():
        features = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = torch.nn.functional.gelu(features @ mm["model.mm_projector.0.weight"].T + mm["model.mm_projector.0.bias"])
        features = features @ mm["model.mm_projector.2.weight"].T + mm["model.mm_projector.2.bias"]
        is_image = input_ids == image_token_id
        embeds = llama.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        embeds[is_image] = features.reshape(-1, TEXT_HIDDEN)
        return llama(inputs_embeds=embeds).logits


def _inputs(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    from road_vlm.generation import prepare_prompt

    model, processor, fmt = loaded
    image = Image.new("RGB", (40, 28), (200, 30, 30))
    prompt = prepare_prompt(model, processor, fmt, [], "What color is the shape?", image)
    return torch.tensor([prompt.input_ids]), prompt.pixel_values


@pytest.fixture(scope="module")
def built(parts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base(parts["clip"], parts["vicuna"], tmp_path_factory.mktemp("built") / "llava",
                      projector=parts["projector"], dtype="float32")


def test_build_base_writes_the_llava_hf_layout(built: Path, parts: dict[str, Path]):
    from transformers import AutoTokenizer

    text_vocab = len(AutoTokenizer.from_pretrained(parts["vicuna"]))
    config = json.loads((built / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_token_index"] == text_vocab and config["pad_token_id"] == text_vocab + 1
    assert config["text_config"]["vocab_size"] % 64 == 0 and config["text_config"]["vocab_size"] >= text_vocab + 2
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert json.loads((built / "prompt_format.json").read_text())["template"] == "vicuna_v1"
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [text_vocab, text_vocab + 1]
    assert tokenizer.pad_token == "<pad>"


def test_built_base_logits_equal_the_hand_assembled_forward(built: Path, parts: dict[str, Path]):
    from road_vlm.model import load_vlm

    loaded = load_vlm(built)
    model = loaded.model
    input_ids, pixel_values = _inputs(loaded)
    assert int((input_ids == model.config.image_token_id).sum()) == (IMAGE // PATCH) ** 2
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    reference = _reference_logits(parts, input_ids, pixel_values, model.config.image_token_id)
    text_vocab = model.config.image_token_id
    torch.testing.assert_close(logits[..., :text_vocab], reference, rtol=1e-5, atol=1e-5)
    # New rows (<image>, <pad>, padding) are drawn near the old embeddings' mean, not zeros or copies.
    embed = model.get_input_embeddings().weight
    new, old = embed[text_vocab:], embed[:text_vocab]
    assert torch.allclose(new.mean(0), old.mean(0), atol=0.05) and new.std() < old.std()
    assert not torch.equal(new[0], new[1])


def test_original_llava_checkpoint_converts_to_the_same_model(built: Path, parts: dict[str, Path], tmp_path: Path):
    from safetensors.torch import load_file

    converted = convert_llava(parts["original"], parts["clip"], tmp_path / "converted", dtype="float32")
    a, b = load_file(str(built / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert json.loads((converted / "config.json").read_text())["image_token_index"] == \
        json.loads((built / "config.json").read_text())["image_token_index"]


def test_a_vision_tower_inside_the_original_checkpoint_is_used(built: Path, parts: dict[str, Path], tmp_path: Path):
    import shutil

    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    # The checkpoint carries its tower (on-disk CLIP names under model.vision_tower.vision_tower.); the CLIP dir
    # passed only gives the config and image processor: its random weights must not be used.
    original = tmp_path / "with-tower"
    shutil.copytree(parts["original"], original)
    clip_state = load_file(str(parts["clip"] / "model.safetensors"))
    tower = {f"model.vision_tower.vision_tower.{k}": v for k, v in clip_state.items() if k.startswith("vision_model.")}
    index = json.loads((original / "pytorch_model.bin.index.json").read_text())
    shard = original / "pytorch_model-00002-of-00002.bin"
    torch.save({**torch.load(shard, weights_only=True), **tower}, shard)
    index["weight_map"].update({k: shard.name for k in tower})
    (original / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    other_clip = tmp_path / "other-clip"
    shutil.copytree(parts["clip"], other_clip)
    torch.manual_seed(7)
    randomised = CLIPVisionModel(CLIPVisionModel.from_pretrained(parts["clip"]).config)
    randomised.save_pretrained(other_clip)
    assert not torch.equal(randomised.state_dict()["embeddings.patch_embedding.weight"],
                           CLIPVisionModel.from_pretrained(parts["clip"]).state_dict()["embeddings.patch_embedding.weight"])

    converted = convert_llava(original, other_clip, tmp_path / "converted", dtype="float32")
    a, b = load_file(str(built / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_without_a_projector_file_the_projector_is_initialised_for_stage_1(parts: dict[str, Path], tmp_path: Path):
    from road_vlm.model import load_vlm

    a = build_base(parts["clip"], parts["vicuna"], tmp_path / "a", dtype="float32", seed=3)
    b = build_base(parts["clip"], parts["vicuna"], tmp_path / "b", dtype="float32", seed=3)
    proj_a = load_vlm(a).model.model.multi_modal_projector.linear_1.weight
    proj_b = load_vlm(b).model.model.multi_modal_projector.linear_1.weight
    torch.testing.assert_close(proj_a, proj_b, rtol=0, atol=0)  # seeded
    bound = 1 / VISION_HIDDEN ** 0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert proj_a.abs().max() <= bound and proj_a.abs().max() > 0.5 * bound


def test_bad_parts_are_clear_errors(parts: dict[str, Path], tmp_path: Path):
    wrong = tmp_path / "wrong_projector.bin"
    mm = torch.load(parts["projector"], weights_only=True)
    mm["model.mm_projector.0.weight"] = torch.zeros(TEXT_HIDDEN, VISION_HIDDEN + 1)
    torch.save(mm, wrong)
    with pytest.raises(ConversionError, match=r"wrong_projector\.bin: linear_1\.weight has shape \(48, 33\)"):
        build_base(parts["clip"], parts["vicuna"], tmp_path / "out", projector=wrong, dtype="float32")
    assert not (tmp_path / "out").exists()

    class Evil:  # a pickle that is more than tensors is refused by weights_only loading
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.bin"
    torch.save({"model.mm_projector.0.weight": Evil()}, evil)
    with pytest.raises(ConversionError, match="not a weights-only PyTorch file"):
        build_base(parts["clip"], parts["vicuna"], tmp_path / "out", projector=evil, dtype="float32")
    with pytest.raises(ConversionError, match="no mm_\\* fields"):
        convert_llava(parts["vicuna"], parts["clip"], tmp_path / "out2")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "f").write_text("x")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        build_base(parts["clip"], parts["vicuna"], tmp_path / "exists", dtype="float32")


def test_build_base_cli_then_chat_answers(parts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture):
    from PIL import Image

    from road_vlm.cli import main

    out = tmp_path / "cli-llava"
    assert main(["build-base", "--vision-tower", str(parts["clip"]), "--language-model", str(parts["vicuna"]),
                 "--projector", str(parts["projector"]), "--output", str(out), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    image = tmp_path / "red.png"
    Image.new("RGB", (30, 30), (220, 20, 20)).save(image)
    assert main(["chat", "--model", str(out), "--image", str(image), "--prompt", "What color is the shape?",
                 "--max-new-tokens", "4", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(answer, dict) and answer
    assert main(["build-base", "--vision-tower", str(parts["clip"]), "--language-model", str(parts["vicuna"]),
                 "--output", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err

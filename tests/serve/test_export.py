"""Merge to a standalone checkpoint (plain transformers loads it) and export RoAd adapters to PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from road_vlm.model import load_base, load_vlm
from road_vlm.outputs import OutputExistsError
from road_vlm.serve.export import ExportError, export_peft, merge_checkpoint


def _inputs(model) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image_ids = torch.full((1, 16), model.config.image_token_id)
    text = torch.randint(3, 300, (1, 9), generator=generator)
    input_ids = torch.cat([torch.tensor([[1]]), image_ids, text], dim=1)
    return {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=generator)}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("adapter", ["road1proj", "lora", "hybrid"])
def test_merged_checkpoint_loads_in_plain_transformers_with_the_same_logits(
    tiny_llava_dir, adapter_dirs, tmp_path, serve_cli, adapter
):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "merged"
    args = serve_cli.parse_args(["merge", "--model", str(tiny_llava_dir), "--adapter", str(adapter_dirs[adapter]),
                                 "--output", str(out)])
    assert args.func(args) == 0
    assert (out / "model.safetensors").is_file() and (out / "prompt_format.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "processor_config.json").is_file()
    assert not list(out.glob("*.bin"))

    reference = load_vlm(tiny_llava_dir, adapter_dirs[adapter]).model
    plain = LlavaForConditionalGeneration.from_pretrained(out, use_safetensors=True).eval()
    AutoProcessor.from_pretrained(out)  # the processor files are complete
    inputs = _inputs(plain)
    torch.testing.assert_close(_logits(plain, inputs), _logits(reference, inputs), atol=1e-4, rtol=1e-4)
    base, _ = load_base(tiny_llava_dir)
    assert not torch.allclose(_logits(base, inputs), _logits(plain, inputs), atol=1e-3)


def test_merge_refuses_to_overwrite_a_non_empty_output(tiny_llava_dir, adapter_dirs, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        merge_checkpoint(tiny_llava_dir, adapter_dirs["road4"], out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("adapter", ["road4", "road1proj", "lora"])
def test_peft_export_loads_in_peft_with_the_same_logits(tiny_llava_dir, adapter_dirs, tmp_path, serve_cli, adapter):
    from peft import PeftModel

    out = tmp_path / "peft"
    args = serve_cli.parse_args(["export", "--format", "peft", "--adapter", str(adapter_dirs[adapter]),
                                 "--output", str(out), "--base-model", str(tiny_llava_dir)])
    assert args.func(args) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LORA" if adapter == "lora" else "ROAD")
    assert config["base_model_name_or_path"] == str(tiny_llava_dir)
    assert config["modules_to_save"] == (["multi_modal_projector"] if adapter == "road1proj" else None)

    base, _ = load_base(tiny_llava_dir)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    reference = load_vlm(tiny_llava_dir, adapter_dirs[adapter]).model
    inputs = _inputs(reference)
    torch.testing.assert_close(_logits(peft_model, inputs), _logits(reference, inputs), atol=1e-5, rtol=1e-5)


def test_peft_export_refuses_the_hybrid_and_says_why(adapter_dirs, tmp_path, serve_cli, capsys):
    with pytest.raises(ExportError, match="road1_lora hybrid .* is not expressible in PEFT"):
        export_peft(adapter_dirs["hybrid"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    args = serve_cli.parse_args(["export", "--format", "peft", "--adapter", str(adapter_dirs["hybrid"]),
                                 "--output", str(tmp_path / "out")])
    assert args.func(args) == 2
    assert "not expressible in PEFT" in capsys.readouterr().err

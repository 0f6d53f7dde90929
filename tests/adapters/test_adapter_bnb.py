"""Adapters on a bitsandbytes-quantized base: what the loader quantizes, adapters on NF4/int8 linears, mixed
batches, merge refusal and ``--dequantize``, the recorded base, and PEFT's RoAd on the same 4-bit base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from road_vlm.adapters import (  # noqa: E402
    AdapterConfig,
    AdapterStateError,
    add_adapter,
    adapted_layers,
    merge_adapter,
    per_sample_adapters,
    refresh_coefficients,
    save_adapter,
    set_active_adapter,
)
from road_vlm.model import load_base, load_vlm  # noqa: E402
from road_vlm.quantization import Quantization, QuantizationError, check_quantized, quantized_linears  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")  # bnb says fp32 inputs are cast for int8 matmuls

IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100], [1, 41, 51, 61, 71, 81, 91, 101], [1, 42, 52, 62, 72, 82, 92, 3]])


def _perturb(model: nn.Module) -> None:
    """Move every adapter away from its identity init (fixed seed), so adapters change the outputs."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".road_" in name or ".lora_B." in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    refresh_coefficients(model)  # in-place edits in eval mode: the documented call


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _language_model_linears(model: nn.Module) -> set[str]:
    return {n.removesuffix(".base_layer") for n, m in model.model.language_model.named_modules()
            if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_exactly_the_language_model_linears_are_quantized(tiny_llava_dir: Path, method: str):
    model, _ = load_base(tiny_llava_dir, quantization=method)
    lm_linears = {f"model.language_model.{n}" for n in _language_model_linears(model)}
    assert len(lm_linears) == 14
    assert quantized_linears(model) == {n: method for n in lm_linears}
    for module in (model.model.vision_tower, model.model.multi_modal_projector, model.lm_head):
        for p in module.parameters():
            assert p.dtype == torch.float32, "vision tower, projector and lm_head stay in the compute dtype"
    assert torch.isfinite(_logits(model)).all()


def test_a_skip_list_that_misses_the_vision_tower_is_caught(tiny_llava_dir: Path):
    """transformers matches llm_int8_skip_modules from a name's start: "vision_tower" (LLaVA's own name) misses
    transformers 5's model.vision_tower and quietly quantizes it. The loader's check says so."""
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, quantization_config=config,
                                                          device_map="cpu", dtype=torch.float32)
    vision = [n for n in quantized_linears(model) if n.startswith("model.vision_tower.")]
    assert len(vision) == 12
    with pytest.raises(QuantizationError, match=r"^tiny loaded with quantization=nf4: 14 layer\(s\) outside the "
                                                r"language model are quantized \(e\.g\. model\.multi_modal_projector"):
        check_quantized(model, Quantization("nf4"), "tiny")


def test_unknown_quantization_is_an_error():
    with pytest.raises(QuantizationError, match="unknown quantization 'int4'"):
        Quantization("int4")


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_new_adapters_leave_the_quantized_model_unchanged_and_trained_ones_change_it(tiny_llava_dir, method):
    model, _ = load_base(tiny_llava_dir, quantization=method)
    base = _logits(model)
    for name, variant in (("road4", "road4"), ("hybrid", "road1_lora"), ("lora", "lora")):
        add_adapter(model, AdapterConfig(variant=variant, group_size=16, lora_r=4), name)
        torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    assert all(type(layer).__name__ == "BnbAdaptedLinear" for layer in adapted_layers(model).values())
    _perturb(model)
    for name in ("road4", "hybrid", "lora"):
        set_active_adapter(model, name)
        assert (_logits(model) - base).abs().max() > 1e-2


def test_mixed_batch_on_a_4bit_base_equals_each_row_alone(tiny_llava_dir: Path):
    model, _ = load_base(tiny_llava_dir, quantization="nf4")
    add_adapter(model, AdapterConfig(variant="road4", group_size=16), "road4")
    add_adapter(model, AdapterConfig(variant="road1_lora", group_size=16, lora_r=4), "hybrid")
    add_adapter(model, AdapterConfig(variant="road2", group_size=16, pair_subset="1/2"), "subset")
    _perturb(model)
    rows = ["road4", "hybrid", "subset"]
    alone = []
    for i, name in enumerate(rows):
        set_active_adapter(model, name)
        alone.append(_logits(model, IDS[i:i + 1]))
    set_active_adapter(model, None)
    base_row = _logits(model, IDS[1:2])
    with per_sample_adapters(model, rows):
        mixed = _logits(model)
    with per_sample_adapters(model, ["road4", None, "subset"]):
        with_base = _logits(model)
    for i in range(3):
        torch.testing.assert_close(mixed[i:i + 1], alone[i], rtol=0, atol=1e-5)
    torch.testing.assert_close(with_base[1:2], base_row, rtol=0, atol=1e-5)


def test_merge_into_a_quantized_base_is_refused_before_any_weight_changes(tiny_llava_dir: Path):
    model, _ = load_base(tiny_llava_dir, quantization="nf4")
    add_adapter(model, AdapterConfig(variant="road4", group_size=16))
    _perturb(model)
    before = _logits(model)
    with pytest.raises(AdapterStateError, match=r"cannot merge .* nf4 base layer.*road-vlm merge --dequantize"):
        merge_adapter(model)
    assert all(layer.merged is None for layer in adapted_layers(model).values())
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


@pytest.fixture(scope="module")
def nf4_adapter(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A RoAd4 adapter (with projector) saved from an NF4 base, and its logits on IDS."""
    model, _ = load_base(tiny_llava_dir, quantization="nf4")
    add_adapter(model, AdapterConfig(variant="road4", group_size=16, train_projector=True))
    _perturb(model)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(1.5)
    out = save_adapter(model, tmp_path_factory.mktemp("nf4") / "adapter")
    return out, _logits(model)


def test_the_adapter_records_its_quantized_base_and_the_loader_picks_it_up(tiny_llava_dir: Path, nf4_adapter):
    adapter, trained = nf4_adapter
    loaded = load_vlm(tiny_llava_dir, adapter)
    assert set(quantized_linears(loaded.model).values()) == {"nf4"}
    torch.testing.assert_close(_logits(loaded.model), trained, rtol=0, atol=0)
    plain = load_vlm(tiny_llava_dir, adapter, quantization="none")  # an explicit choice wins
    assert not quantized_linears(plain.model)


def test_dequantize_merge_writes_a_plain_checkpoint_with_the_quantized_models_logits(tiny_llava_dir, nf4_adapter,
                                                                                    tmp_path: Path):
    from road_vlm.serve.export import merge_checkpoint

    adapter, trained = nf4_adapter
    with pytest.raises(AdapterStateError, match="--dequantize"):
        merge_checkpoint(tiny_llava_dir, adapter, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = merge_checkpoint(tiny_llava_dir, adapter, tmp_path / "merged", dtype="float32", dequantize=True)
    merged = load_vlm(out)
    assert not quantized_linears(merged.model)
    assert "quantization_config" not in (out / "config.json").read_text()
    torch.testing.assert_close(_logits(merged.model), trained, rtol=0, atol=1e-4)


def test_peft_road_on_the_same_4bit_base_loads_the_exported_adapter_with_equal_logits(tiny_llava_dir, nf4_adapter,
                                                                                     tmp_path: Path):
    from peft import PeftModel

    from road_vlm.serve.export import export_peft

    adapter, _ = nf4_adapter
    exported = export_peft(adapter, tmp_path / "peft")
    base, _ = load_base(tiny_llava_dir, quantization="nf4")
    peft_model = PeftModel.from_pretrained(base, exported).eval()
    peft_layer = peft_model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    assert type(peft_layer).__module__ == "peft.tuners.road.bnb"  # PEFT's own bitsandbytes RoAd layer
    loaded = load_vlm(tiny_llava_dir, adapter)
    # The 4-bit matmul is the same kernel on both sides; only the rotation's arithmetic order may differ.
    torch.testing.assert_close(_logits(peft_model), _logits(loaded.model), rtol=0, atol=1e-4)

"""The adapter engine on a CUDA device: bf16/fp16 training steps, mixed-adapter batches, merge, generation.

Marked ``cuda``: skipped where no GPU is present (CI), run by ``scripts/gpu_check.sh`` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from road_vlm.adapters import (
    AdapterConfig,
    add_adapter,
    merge_adapter,
    per_sample_adapters,
    set_active_adapter,
    unmerge_adapter,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
VARIANTS = ["road1", "road2", "road4", "road1_lora"]


def _on_cuda(inputs: dict) -> dict:
    return {k: v.to(CUDA) for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_training_step_gives_finite_gradients_to_every_adapter_parameter(adx, variant, dtype):
    model = adx.build_tiny(dtype=dtype).to(CUDA)
    add_adapter(model, AdapterConfig(variant=variant, group_size=adx.GROUP, lora_r=4, lora_alpha=8,
                                     train_projector=True))
    adx.randomize_adapter(model, "default", seed=1)
    model.train()
    inputs = _on_cuda(adx.make_inputs(batch=2, seed=1))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    logits = model(**inputs).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                             inputs["input_ids"][:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_cuda_forward_equals_cpu_forward_in_float32(adx):
    model = adx.build_tiny()
    add_adapter(model, AdapterConfig(variant="road1_lora", group_size=adx.GROUP, lora_r=4, lora_alpha=8))
    adx.randomize_adapter(model, "default", seed=2)
    inputs = adx.make_inputs(batch=3, seed=2)
    with torch.no_grad():
        cpu = model(**inputs).logits
        gpu = model.to(CUDA)(**_on_cuda(inputs)).logits.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_adapter_batch_on_cuda_equals_each_row_alone(adx, dtype):
    model = adx.build_tiny(dtype=dtype).to(CUDA)
    names = ["a", "b", "c"]
    for i, (name, variant) in enumerate(zip(names, ["road4", "road1", "road1_lora"])):
        add_adapter(model, AdapterConfig(variant=variant, group_size=adx.GROUP, lora_r=4, lora_alpha=8), name=name)
        adx.randomize_adapter(model, name, seed=10 + i)
    rows = ["a", None, "c", "b", "a"]
    inputs = _on_cuda(adx.make_inputs(batch=len(rows), seed=3))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    atol = 2e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        with per_sample_adapters(model, rows):
            mixed = model(**inputs).logits
        for i, name in enumerate(rows):
            set_active_adapter(model, name)
            alone = model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits
            torch.testing.assert_close(mixed[i:i + 1].float(), alone.float(), rtol=0, atol=atol, msg=f"row {i}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_and_unmerge_on_cuda(adx, variant):
    model = adx.build_tiny().to(CUDA)
    add_adapter(model, AdapterConfig(variant=variant, group_size=adx.GROUP, lora_r=4, lora_alpha=8))
    adx.randomize_adapter(model, "default", seed=4)
    inputs = _on_cuda(adx.make_inputs(batch=2, seed=4))
    with torch.no_grad():
        unmerged = model(**inputs).logits
        base_weight = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
        merge_adapter(model, "default")
        torch.testing.assert_close(model(**inputs).logits, unmerged, rtol=0, atol=1e-4)
        unmerge_adapter(model)
        torch.testing.assert_close(model(**inputs).logits, unmerged, rtol=0, atol=1e-4)
        for name, weight in base_weight.items():
            torch.testing.assert_close(model.get_parameter(name), weight, rtol=0, atol=1e-5, msg=name)


def test_mixed_adapter_greedy_generation_on_cuda_equals_each_row_alone(adx):
    model = adx.build_tiny().to(CUDA)
    for i, name in enumerate(["a", "b"]):
        add_adapter(model, AdapterConfig(variant="road4", group_size=adx.GROUP), name=name)
        adx.randomize_adapter(model, name, seed=20 + i)
    rows = ["a", "b", None]
    inputs = _on_cuda(adx.make_inputs(batch=len(rows), seed=5))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=adx.PAD_TOKEN, eos_token_id=None)
    with torch.no_grad():
        with per_sample_adapters(model, rows):
            mixed = model.generate(**inputs, **kwargs)
        for i, name in enumerate(rows):
            set_active_adapter(model, name)
            alone = model.generate(**{k: v[i:i + 1] for k, v in inputs.items()}, **kwargs)
            assert mixed[i].tolist() == alone[0].tolist(), f"row {i} ({name})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mixed_batch_layer_replays_in_a_cuda_graph_as_it_runs_eagerly(dtype):
    """What a graph-captured decode step needs of each adapted layer: its mixed-batch forward (the fused rotation
    where triton is installed) holds no host sync, and replays on new inputs in the captured buffer equal eager."""
    from road_vlm.adapters.layer import AdaptedLinear

    torch.manual_seed(0)
    layer = AdaptedLinear(torch.nn.Linear(64, 96).to(CUDA, dtype), "proj").eval()
    for i, variant in enumerate(["road4", "road1"]):
        layer.add(f"a{i}", AdapterConfig(variant=variant, group_size=8, target_modules=["proj"]))
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "road_" in name:
                param.add_(0.2 * torch.randn_like(param))
    layer.build_mixed_tables(["a0", None, "a1", "a0"], dtype=dtype)
    static_x = torch.randn(4, 1, 64, device=CUDA, dtype=dtype)
    with torch.no_grad():
        side = torch.cuda.Stream()  # warm-up (the tables' per-shape gathers) on a side stream, then capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            torch.testing.assert_close(static_y, layer(static_x))
        base = layer.base_layer(static_x)
        torch.testing.assert_close(static_y[1], base[1], rtol=0, atol=0)  # the base row is the bare layer's output
        assert not torch.equal(static_y[0], base[0])  # and the adapted rows are rotated

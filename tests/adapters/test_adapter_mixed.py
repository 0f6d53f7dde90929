"""Mixed-adapter batches: every row picks its own adapter (or none), in forward() and generate()."""

from __future__ import annotations

import pytest
import torch

from road_vlm.adapters import (
    AdapterConfig,
    AdapterStateError,
    adapted_layers,
    add_adapter,
    per_sample_adapters,
    refresh_coefficients,
    set_active_adapter,
)

MIX = {"r4": "road4", "r1": "road1", "hy": "road1_lora", "lo": "lora"}


def _mixed_model(adx):
    model = adx.build_tiny()
    for i, (name, variant) in enumerate(MIX.items()):
        rank = 2 + 2 * i  # different ranks: the gathered LoRA matmul pads them
        add_adapter(model, AdapterConfig(variant=variant, group_size=adx.GROUP, lora_r=rank, lora_alpha=rank),
                    name=name)
        adx.randomize_adapter(model, name, seed=20 + i)
    # An adapter with another group size and on a subset of layers: rows using it get identity elsewhere.
    add_adapter(model, AdapterConfig(variant="road2", group_size=8, target_modules=["o_proj", "down_proj"]), name="g8")
    adx.randomize_adapter(model, "g8", seed=30)
    return model


NAMES = ["r4", None, "hy", "lo", "g8", "r1", "r4"]


def test_mixed_forward_equals_each_row_alone(adx):
    model = _mixed_model(adx)
    inputs = adx.make_inputs(batch=len(NAMES), seed=3)
    with torch.no_grad():
        with per_sample_adapters(model, NAMES):
            mixed = model(**inputs).logits
        for i, name in enumerate(NAMES):
            set_active_adapter(model, name)
            alone = model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=2e-6, msg=f"row {i} ({name})")
    # the context leaves no trace
    assert all(layer._mixed is None for layer in adapted_layers(model).values())


def _left_padded(adx, lengths, seed=4):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, adx.IMAGE_TOKEN - 1, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), adx.PAD_TOKEN)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return rows, ids, mask


GEN = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0)


def test_mixed_generate_equals_each_row_alone_with_left_padding(adx):
    model = _mixed_model(adx)
    names = ["hy", "r4", None, "lo", "g8"]
    rows, ids, mask = _left_padded(adx, [4, 7, 5, 6, 3])
    with torch.no_grad():
        with per_sample_adapters(model, names):
            batched = model.generate(input_ids=ids, attention_mask=mask, **GEN)[:, ids.shape[1]:]
        for i, name in enumerate(names):
            set_active_adapter(model, name)
            one = torch.ones(1, len(rows[i]), dtype=torch.long)
            alone = model.generate(input_ids=rows[i][None], attention_mask=one,
                                   **GEN)[:, len(rows[i]):]
            assert torch.equal(batched[i], alone[0]), f"row {i} ({name})"
    # Different adapters really produce different continuations for the same prompt.
    same = ids[1:2].repeat(len(MIX) + 1, 1)
    with torch.no_grad(), per_sample_adapters(model, list(MIX) + [None]):
        outs = model.generate(input_ids=same, attention_mask=mask[1:2].repeat(len(MIX) + 1, 1), **GEN)
    assert len({tuple(o.tolist()) for o in outs}) > 1


def test_beam_search_with_num_return_sequences_repeats_names(adx):
    # Beam search expands every row num_beams times (repeat_interleave): the layer sees 2 * len(names) rows.
    model = _mixed_model(adx)
    _, ids, mask = _left_padded(adx, [5, 5])
    names = ["r4", "lo"]
    beam = dict(GEN, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        with per_sample_adapters(model, names):
            both = model.generate(input_ids=ids, attention_mask=mask, **beam)
        for i, name in enumerate(names):
            set_active_adapter(model, name)
            alone = model.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **beam)
            assert torch.equal(both[2 * i:2 * i + 2], alone), f"row {i} ({name})"


def test_mixed_batch_errors(adx):
    model = _mixed_model(adx)
    inputs = adx.make_inputs(batch=3, with_image=False)
    with pytest.raises(AdapterStateError, match=r"unknown adapter\(s\) \['nope'\]"):
        with per_sample_adapters(model, ["r4", "nope"]):
            pass
    with pytest.raises(AdapterStateError, match=r"got 2 adapter names but the layer sees a batch of 3 rows"):
        with torch.no_grad(), per_sample_adapters(model, ["r4", "r1"]):
            model(**inputs)
    model.train()
    with pytest.raises(AdapterStateError, match="inference-only"):
        with per_sample_adapters(model, ["r4"] * 3):
            pass
    model.eval()
    with pytest.raises(AdapterStateError, match="cannot be nested"):
        with per_sample_adapters(model, ["r4"] * 3), per_sample_adapters(model, ["r1"] * 3):
            pass


def test_tables_follow_parameter_updates_between_blocks(adx):
    model = _mixed_model(adx)
    inputs = adx.make_inputs(batch=2, with_image=False)
    with torch.no_grad():
        with per_sample_adapters(model, ["r4", "hy"]):
            first = model(**inputs).logits
        model.train()
        for layer in adapted_layers(model).values():
            layer.road_theta["r4"].mul_(-1.0)  # in-place, like an optimizer step while training
        model.eval()  # writes the banks from the stepped parameters
        with per_sample_adapters(model, ["r4", "hy"]):
            second = model(**inputs).logits
        # An in-place edit in eval mode is seen after the documented call.
        for layer in adapted_layers(model).values():
            layer.road_alpha["hy"].mul_(1.5)
        refresh_coefficients(model, "hy")
        with per_sample_adapters(model, ["r4", "hy"]):
            third = model(**inputs).logits
        set_active_adapter(model, "hy")
        hy_alone = model(**{k: v[1:] for k, v in inputs.items()}).logits
        set_active_adapter(model, "r4")
        alone = model(**{k: v[:1] for k, v in inputs.items()}).logits
    assert torch.equal(first[1], second[1])
    assert not torch.allclose(first[0], second[0], atol=1e-4)
    torch.testing.assert_close(second[:1], alone, rtol=0, atol=2e-6)
    assert torch.equal(third[0], second[0]) and not torch.allclose(third[1], second[1], atol=1e-4)
    torch.testing.assert_close(third[1:], hy_alone, rtol=0, atol=2e-6)


def test_tables_are_stacked_once_and_follow_added_adapters_and_swapped_storage(adx):
    model = _mixed_model(adx)
    inputs = adx.make_inputs(batch=2, with_image=False)
    layer = next(iter(adapted_layers(model).values()))

    def tables():
        return [t for _, _, t, _ in layer._mixed.rotations]

    with torch.no_grad():
        with per_sample_adapters(model, ["r4", "r1"]):
            first = tables()
        with per_sample_adapters(model, ["r1", None]):  # another row set: the same stacked tables, not a rebuild
            assert tables()[0] is first[0]
        # An adapter added after a block is in the next one, and mixed rows still equal each row alone.
        add_adapter(model, AdapterConfig(variant="road4", group_size=adx.GROUP), name="new")
        adx.randomize_adapter(model, "new", seed=40)
        with per_sample_adapters(model, ["new", "r4"]):
            mixed = model(**inputs).logits
        # Storage swapped under a parameter by Module._apply (what Module.to does) is seen too.
        swapped = {id(layer.road_theta["r4"]) for layer in adapted_layers(model).values()}
        model._apply(lambda t: -t if id(t) in swapped else t)
        with per_sample_adapters(model, ["new", "r4"]):
            replaced = model(**inputs).logits
        assert not torch.allclose(mixed[1], replaced[1], atol=1e-4)
        for i, name in enumerate(["new", "r4"]):
            set_active_adapter(model, name)
            alone = model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits
            torch.testing.assert_close(replaced[i:i + 1], alone, rtol=0, atol=2e-6, msg=name)

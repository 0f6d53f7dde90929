"""Deterministic epoch order, modality grouping and the (step, micro-step, rank) split."""

from __future__ import annotations

import random

import pytest

from road_vlm.data.sampler import BatchLayout, epoch_order, modality_grouped_order, rank_micro_batches, steps_per_epoch


def _lengths(n_image: int, n_text: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out = [rng.randint(5, 200) for _ in range(n_image)] + [-rng.randint(5, 200) for _ in range(n_text)]
    rng.shuffle(out)
    return out


def test_order_is_a_padded_permutation_and_deterministic():
    layout = BatchLayout(world_size=2, micro_batch=3, grad_accum=2)
    order = epoch_order(50, layout, seed=1, epoch=0)
    assert len(order) == steps_per_epoch(50, layout) * layout.global_batch == 60
    assert sorted(set(order)) == list(range(50))
    assert order == epoch_order(50, layout, seed=1, epoch=0)
    assert order != epoch_order(50, layout, seed=1, epoch=1)


def test_rank_batches_partition_each_step_and_resume_mid_epoch():
    layout = BatchLayout(world_size=2, micro_batch=3, grad_accum=2)
    order = epoch_order(50, layout, seed=0, epoch=0)
    per_rank = [rank_micro_batches(order, layout, r) for r in range(2)]
    assert all(len(b) == 5 * 2 for b in per_rank)
    for step in range(5):
        got = [i for r in range(2) for b in per_rank[r][step * 2:(step + 1) * 2] for i in b]
        assert sorted(got) == sorted(order[step * 12:(step + 1) * 12])
    assert rank_micro_batches(order, layout, 1, start_step=3) == per_rank[1][6:]


def test_modality_grouping_keeps_image_and_text_megabatches_apart():
    lengths = _lengths(70, 30)
    layout = BatchLayout(world_size=2, micro_batch=4, grad_accum=1)
    order = modality_grouped_order(lengths, layout, __import__("torch").Generator().manual_seed(0))
    assert sorted(order) == list(range(100))
    mega = layout.global_batch
    full = len(order) // mega * mega - mega  # the last full-size slot may be the mixed leftover megabatch
    for start in range(0, full, mega):
        signs = {lengths[i] > 0 for i in order[start:start + mega]}
        assert len(signs) == 1, f"megabatch at {start} mixes modalities"
    # The balanced split: per-rank chunks of a megabatch differ in total length by at most one sample's length.
    first = order[:mega]
    totals = [sum(abs(lengths[i]) for i in first[c * 4:(c + 1) * 4]) for c in range(2)]
    assert abs(totals[0] - totals[1]) <= max(abs(lengths[i]) for i in first)

def test_single_modality_falls_back_to_length_grouping_and_zero_is_rejected():
    layout = BatchLayout(world_size=1, micro_batch=4, grad_accum=1)
    order = epoch_order(10, layout, seed=0, epoch=0, modality_lengths=[3] * 10)
    assert sorted(set(order)) == list(range(10))
    with pytest.raises(ValueError, match="non-zero"):
        epoch_order(3, layout, seed=0, epoch=0, modality_lengths=[1, 0, -1])


def test_micro_steps_with_images_is_the_union_over_ranks_and_follows_resume():
    from road_vlm.data.sampler import micro_steps_with_images

    layout = BatchLayout(world_size=2, micro_batch=2, grad_accum=2)
    has_image = [i % 5 == 0 for i in range(40)]  # sparse images: many micro-batches are all text
    order = epoch_order(40, layout, seed=1, epoch=0)
    flags = micro_steps_with_images(order, layout, has_image)
    per_rank = [rank_micro_batches(order, layout, rank) for rank in range(2)]
    assert len(flags) == len(per_rank[0])
    assert flags == [any(has_image[i] for rank in range(2) for i in per_rank[rank][k]) for k in range(len(flags))]
    # The case it exists for occurs here: one rank all text while the other has an image.
    assert any(any(has_image[i] for i in per_rank[0][k]) != any(has_image[i] for i in per_rank[1][k])
               for k in range(len(flags)))
    assert micro_steps_with_images(order, layout, has_image, start_step=3) == flags[3 * layout.grad_accum:]

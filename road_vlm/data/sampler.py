"""Deterministic per-epoch sample order and its split into (step, micro-step, rank) batches.

The whole epoch's order is a pure function of (seed, epoch, dataset lengths, batch layout), so resuming at step N
reproduces exactly the batches an uninterrupted run would have seen. The order is padded (wrapping around, like
``DistributedSampler``) to a whole number of global batches, so every rank runs the same number of micro-steps.

Layout: global batch ``G = world_size * micro_batch * grad_accum``. Within optimizer step ``s``, micro-step ``m``
of rank ``r`` takes ``order[s*G + (m*world_size + r)*micro_batch :][:micro_batch]``. This is the layout HF +
accelerate produce (consecutive batches go to consecutive ranks), so LLaVA's modality-grouped megabatches
(``world_size * grad_accum`` chunks of ``micro_batch``) land on the same ranks and micro-steps as in LLaVA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchLayout:
    world_size: int
    micro_batch: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum


def _split_to_even_chunks(indices: list[int], lengths: list[int], num_chunks: int) -> list[list[int]]:
    """Greedy split into chunks of equal size and roughly equal total length (LLaVA's split_to_even_chunks)."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for index in indices:
        shortest = min((c for c in range(num_chunks) if len(chunks[c]) < per_chunk), key=lambda c: totals[c])
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
    return chunks


def _length_grouped(sizes: list[int], pool: list[int], batch: int, chunks: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffle ``pool``, cut it into megabatches, sort each by size (desc), split into balanced chunks."""
    perm = [pool[i] for i in torch.randperm(len(pool), generator=gen).tolist()]
    mega = batch * chunks
    out = []
    for start in range(0, len(perm), mega):
        megabatch = sorted(perm[start:start + mega], key=lambda i: sizes[i], reverse=True)
        out.append([i for chunk in _split_to_even_chunks(megabatch, sizes, chunks) for i in chunk])
    return out


def modality_grouped_order(lengths: list[int], layout: BatchLayout, gen: torch.Generator) -> list[int]:
    """LLaVA's ``get_modality_length_grouped_indices``: image and text-only samples never share a megabatch
    (except one final mixed megabatch of leftovers); megabatches are shuffled together."""
    if any(x == 0 for x in lengths):
        raise ValueError("modality lengths must be non-zero (positive: image samples, negative: text-only)")
    chunks = layout.world_size * layout.grad_accum
    sizes = [abs(x) for x in lengths]
    image_pool = [i for i, x in enumerate(lengths) if x > 0]
    text_pool = [i for i, x in enumerate(lengths) if x < 0]
    if not image_pool or not text_pool:
        return [i for mb in _length_grouped(sizes, list(range(len(lengths))), layout.micro_batch, chunks, gen)
                for i in mb]
    mega = layout.micro_batch * chunks
    image_mbs = _length_grouped(sizes, image_pool, layout.micro_batch, chunks, gen)
    text_mbs = _length_grouped(sizes, text_pool, layout.micro_batch, chunks, gen)
    leftovers = []
    full = []
    for mbs in (image_mbs, text_mbs):
        if mbs and len(mbs[-1]) < mega:
            leftovers += mbs.pop()
        full += mbs
    shuffled = [full[i] for i in torch.randperm(len(full), generator=gen).tolist()]
    if leftovers:
        shuffled.append(sorted(leftovers))
    return [i for mb in shuffled for i in mb]


def task_grouped_order(tasks: list[int], layout: BatchLayout, gen: torch.Generator) -> list[int]:
    """Co-training (``train/composition.py``): every micro-batch holds one task's samples. Each task's samples are
    shuffled and cut into micro-batches (its last one completed by wrapping around within the task); then the
    micro-batches of all tasks are shuffled together."""
    b = layout.micro_batch
    chunks: list[list[int]] = []
    for task in sorted(set(tasks)):
        pool = [i for i, t in enumerate(tasks) if t == task]
        perm = [pool[i] for i in torch.randperm(len(pool), generator=gen).tolist()]
        perm = [perm[i % len(perm)] for i in range(-(-len(perm) // b) * b)]
        chunks += [perm[start:start + b] for start in range(0, len(perm), b)]
    return [i for c in torch.randperm(len(chunks), generator=gen).tolist() for i in chunks[c]]


def task_grouped_length(tasks: list[int], micro_batch: int) -> int:
    """Samples in one epoch of ``task_grouped_order`` before padding to the global batch."""
    return sum(-(-tasks.count(task) // micro_batch) * micro_batch for task in set(tasks))


def epoch_order(
    num_samples: int,
    layout: BatchLayout,
    *,
    seed: int,
    epoch: int,
    modality_lengths: list[int] | None = None,
    tasks: list[int] | None = None,
) -> list[int]:
    """All sample indices of one epoch in training order, padded to a multiple of the global batch (whole
    micro-batches are repeated, so a task-grouped order keeps one task per micro-batch)."""
    if num_samples <= 0:
        raise ValueError("cannot order an empty dataset")
    gen = torch.Generator()
    gen.manual_seed(seed * 100_003 + epoch)  # its own generator: data order never consumes the model's RNG
    if modality_lengths is not None and tasks is not None:
        raise ValueError("an order is grouped by modality or by task, not both")
    if tasks is not None:
        if len(tasks) != num_samples:
            raise ValueError("tasks must have one entry per sample")
        order = task_grouped_order(tasks, layout, gen)
    elif modality_lengths is not None:
        if len(modality_lengths) != num_samples:
            raise ValueError("modality_lengths must have one entry per sample")
        order = modality_grouped_order(modality_lengths, layout, gen)
    else:
        order = torch.randperm(num_samples, generator=gen).tolist()
    remainder = len(order) % layout.global_batch
    if remainder:
        pad = layout.global_batch - remainder
        order += [order[i % len(order)] for i in range(pad)]
    return order


def steps_per_epoch(num_samples: int, layout: BatchLayout) -> int:
    """Optimizer steps in one epoch (the last global batch is completed by wrapping around)."""
    return -(-num_samples // layout.global_batch)


def rank_micro_batches(order: list[int], layout: BatchLayout, rank: int, *, start_step: int = 0) -> list[list[int]]:
    """This rank's micro-batches from optimizer step ``start_step`` to the end of the epoch, in order."""
    if not 0 <= rank < layout.world_size:
        raise ValueError(f"rank {rank} out of range for world size {layout.world_size}")
    g, b, w = layout.global_batch, layout.micro_batch, layout.world_size
    out = []
    for step in range(start_step, len(order) // g):
        for micro in range(layout.grad_accum):
            start = step * g + (micro * w + rank) * b
            out.append(order[start:start + b])
    return out


def micro_steps_with_images(
    order: list[int], layout: BatchLayout, has_image: list[bool], *, start_step: int = 0
) -> list[bool]:
    """For each micro-step from ``start_step`` to the end of the epoch: does *any* rank's micro-batch hold an image?

    The same list on every rank, computed from the epoch order alone (no collective). Under ZeRO-3 a rank whose
    micro-batch is all text must still run the vision tower when another rank's has images, because each module's
    parameters are all-gathered collectively when it runs.
    """
    g, w, b = layout.global_batch, layout.world_size, layout.micro_batch
    out = []
    for step in range(start_step, len(order) // g):
        for micro in range(layout.grad_accum):
            start = step * g + micro * w * b  # ranks' slices of this micro-step are contiguous (see the layout)
            out.append(any(has_image[i] for i in order[start:start + w * b]))
    return out

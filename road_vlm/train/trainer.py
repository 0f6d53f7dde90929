"""The training loop: base model + adapter -> DeepSpeed engine -> steps, checkpoints, resume, reports.

Order of work (everything that can fail on bad input happens before the first optimizer step, so a typo or a
broken sample never costs trained steps):

1. ``prepare_output``: process group (deepspeed / torchrun / plain python), seeds, resume decision
2. ``load_model``: DeepSpeed config with "auto" filled; base model + processor + adapter (``model_setup``: under
   zero.Init for ZeRO-3; a group_size that does not divide a layer's d_out fails here, naming the layer)
3. ``load_data``: parse and validate every sample, check every image file exists (``data_setup``; tokenised on
   access)
4. ``initialize_engine``: optimizer (LLaVA's 4 groups), warmup+cosine schedule, ``deepspeed.initialize``, resume
   (engine/optimizer/scheduler/RNG state; data order is a function of seed and step)
5. ``run_steps``: train, log, save (a composed run, ``compose:``, switches its adapters per micro-batch and saves
   each part plus their composition: ``composition.py``); ``finish``: verify the saved adapter, summary.json,
   loss.png
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from road_vlm.data.collator import SupervisedCollator
from road_vlm.data.dataset import LazySupervisedDataset
from road_vlm.data.indexing import summarize_drops
from road_vlm.data.sampler import (
    BatchLayout,
    epoch_order,
    micro_steps_with_images,
    rank_micro_batches,
    steps_per_epoch,
    task_grouped_length,
)
from road_vlm.train.checkpoint import (
    TMP_PREFIX,
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from road_vlm.train.config import ConfigError, TrainingConfig
from road_vlm.train.composition import Composition, feature_anchor_loss
from road_vlm.train.data_setup import DATA_CACHE, TaskDatasets, build_dataset
from road_vlm.train.distributed import DistInfo, all_reduce_sum, barrier, first_error, init_distributed
from road_vlm.train.ds_config import (
    build_deepspeed_config,
    offloads_optimizer,
    partition_stats,
    read_deepspeed_json,
    zero_stage,
)
from road_vlm.train.loss import compute_loss, model_forward
from road_vlm.train.model_setup import ADAPTER_NAME, load_model_with_adapter, model_dtype, text_hidden_size
from road_vlm.train.optim import build_optimizer, build_scheduler, param_groups, warmup_steps
from road_vlm.train.reporting import Reporter, format_summary, peak_memory_bytes, plot_loss, write_summary
from road_vlm.train.stand_in import install_stand_in

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _require_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise ConfigError("output.report_to=wandb needs the wandb package (pip install wandb)") from err


@dataclass
class TrainingRun:
    """What the steps of one run share, filled in as ``train`` goes."""

    config: TrainingConfig
    dist: DistInfo
    output_dir: Path
    setup_start: float
    resume_from: Path | None = None
    ds_config: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    processor: Any = None
    dataset: LazySupervisedDataset | TaskDatasets | None = None
    composition: Composition | None = None  # a composed run's adapters (compose section), else None
    engine: Any = None
    scheduler: Any = None
    layout: BatchLayout | None = None
    per_epoch: int = 0
    total_steps: int = 0
    state: TrainerState | None = None
    collator: SupervisedCollator | None = None
    pixel_dtype: torch.dtype = torch.float32
    report: dict[str, Any] = field(default_factory=dict)  # summary.json parts gathered on the way

    @property
    def stage(self) -> int:
        return zero_stage(self.ds_config)


def train(config: TrainingConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the summary (also written to summary.json)."""
    run = TrainingRun(config=config, dist=init_distributed(), output_dir=Path(config.output.dir),
                      setup_start=time.perf_counter())
    prepare_output(run)
    load_model(run)
    load_data(run)
    initialize_engine(run)
    run_steps(run)
    return finish(run)


def prepare_output(run: TrainingRun) -> None:
    """Seeds, the output folder, the resume decision; leftovers of an interrupted run are removed."""
    config, dist, output_dir = run.config, run.dist, run.output_dir
    if dist.is_main:
        logger.info("world size %d, device %s", dist.world_size, dist.device)
    seed_everything(config.train.seed)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    run.resume_from = first_error(dist, resolve_resume, config.train.resume, output_dir)
    if dist.is_main:
        for leftover in output_dir.glob(f"{TMP_PREFIX}*"):
            logger.warning("removing %s: a checkpoint save that was interrupted", leftover)
            shutil.rmtree(leftover)
        if (output_dir / DATA_CACHE).exists():  # indexed shards of an earlier run: always rebuilt
            shutil.rmtree(output_dir / DATA_CACHE)
    barrier()


def load_model(run: TrainingRun) -> None:
    """The DeepSpeed config ("auto" filled), then the base with its adapter."""
    config, dist = run.config, run.dist
    raw_ds = first_error(dist, read_deepspeed_json, config.deepspeed.config)
    if config.output.report_to == "wandb":
        first_error(dist, _require_wandb)
    run.ds_config = first_error(dist, build_deepspeed_config, raw_ds, config, world_size=dist.world_size,
                                 hidden_size=text_hidden_size(config.model.name_or_path),
                                 source=config.deepspeed.config)
    # ZeRO-0/1/2 keep a full model copy per rank, loaded straight onto the accelerator. ZeRO-3 constructs and loads
    # the base inside zero.Init, so no rank ever holds all of it (13B in bf16 would be 26 GB per rank otherwise).
    run.model, run.processor, run.composition = first_error(dist, load_model_with_adapter, config, dist.device,
                                            zero3_config=run.ds_config if run.stage == 3 else None)
    base_load = {**partition_stats(run.model), **peak_memory_bytes(dist.device)}  # peaks so far: the load
    if dist.is_main and base_load["zero3_partitioned"]:
        logger.info("base loaded partitioned: this rank holds %s of %s elements", f"{base_load['local_elements']:,}",
                    f"{base_load['total_elements']:,}")
    run.report["base_load"] = base_load


def load_data(run: TrainingRun) -> None:
    """Validate and index the data file before the first step; the time and the peak host memory so far are
    reported (scripts/bench_data.py)."""
    start = time.perf_counter()
    run.dataset = build_dataset(run.config, run.processor, run.model, run.dist)
    run.report["data_load"] = {"seconds": time.perf_counter() - start, **peak_memory_bytes(torch.device("cpu"))}
    if run.dist.is_main:
        logger.info("data: %s", summarize_drops(run.dataset.stats))


def initialize_engine(run: TrainingRun) -> None:
    """Optimizer (LLaVA's groups), schedule, ``deepspeed.initialize``, then the resumed state if any."""
    import deepspeed

    from road_vlm.adapters import trainable_parameters

    config, dist, t = run.config, run.dist, run.config.train
    trainable, total = trainable_parameters(run.model)
    run.report.update(trainable_parameters=trainable, total_parameters=total,
                      trainable_percent=100.0 * trainable / total)
    run.layout = layout = BatchLayout(dist.world_size, t.per_device_batch_size, t.gradient_accumulation_steps)
    tasks = getattr(run.dataset, "task_of", None)
    epoch_size = len(run.dataset) if tasks is None else task_grouped_length(tasks, layout.micro_batch)
    run.per_epoch = steps_per_epoch(epoch_size, layout)
    run.total_steps = t.max_steps if t.max_steps > 0 else run.per_epoch * t.num_epochs
    warmup = warmup_steps(t.warmup_ratio, run.total_steps)
    groups = param_groups(run.model, learning_rate=t.learning_rate, projector_lr=t.projector_lr,
                          weight_decay=t.weight_decay)
    optimizer = build_optimizer(groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                cpu_offload=offloads_optimizer(run.ds_config))
    scheduler = build_scheduler(optimizer, kind=t.lr_scheduler, warmup=warmup, total_steps=run.total_steps)
    run.engine, _, _, run.scheduler = deepspeed.initialize(
        model=run.model, optimizer=optimizer, lr_scheduler=scheduler, config=run.ds_config
    )
    install_stand_in(run.engine.module)  # after initialize: it must run inside ZeRO-3's per-forward module trace
    if dist.is_main:
        logger.info(
            "trainable parameters %s / %s (%.4f%%); %d samples, global batch %d, %d steps (%d per epoch), warmup %d",
            f"{trainable:,}", f"{total:,}", 100.0 * trainable / total, len(run.dataset), layout.global_batch,
            run.total_steps, run.per_epoch, warmup,
        )

    run.state = TrainerState(max_steps=run.total_steps, steps_per_epoch=run.per_epoch,
                             global_batch=layout.global_batch, world_size=dist.world_size)
    if run.resume_from is not None:
        state = load_checkpoint(run.engine, run.resume_from, dist)
        if state.global_batch != layout.global_batch or state.steps_per_epoch != run.per_epoch:
            raise ConfigError(
                f"cannot resume {run.resume_from}: it used global batch {state.global_batch} with "
                f"{state.steps_per_epoch} steps/epoch, this run has {layout.global_batch} with {run.per_epoch}; "
                "keep the data and batch settings"
            )
        state.max_steps = run.total_steps
        run.state = state
        if dist.is_main:
            logger.info("resumed from %s at step %d", run.resume_from, state.global_step)
    run.pixel_dtype = next(run.engine.module.model.vision_tower.parameters()).dtype
    run.collator = SupervisedCollator(pad_token_id=run.processor.tokenizer.pad_token_id,
                                      max_length=config.data.max_length)


def _save(run: TrainingRun) -> None:
    parts = run.composition.parts if run.composition is not None else None
    save_checkpoint(engine=run.engine, model=run.engine.module, config=run.config, state=run.state,
                    output_dir=run.output_dir, dist=run.dist, adapter_name=ADAPTER_NAME, parts=parts)


def _micro_step_loss(run: TrainingRun, batch: dict[str, Any], indices: list[int], *, micro: int,
                     run_vision: bool) -> torch.Tensor:
    """One micro-batch's loss; a composed run first switches its adapters for the batch's task."""
    config, composition = run.config, run.composition
    kwargs = dict(pixel_dtype=run.pixel_dtype, train_projector=config.adapter.train_projector, run_vision=run_vision)
    if composition is None:
        return compute_loss(run.engine, batch, **kwargs)
    task = run.dataset.task_of[indices[0]] if isinstance(run.dataset, TaskDatasets) else 0
    anchor = None
    if config.compose.feature_anchor_weight:
        anchor = feature_anchor_loss(run.engine.module, composition, task,
                                     lambda b: model_forward(run.engine, b, hidden_states=True, **kwargs), batch,
                                     config.compose.feature_anchor_layers)
    composition.route(run.engine.module, task, step=run.state.global_step, micro=micro, rank=run.dist.rank)
    loss = compute_loss(run.engine, batch, **kwargs)
    return loss if anchor is None else loss + config.compose.feature_anchor_weight * anchor


def run_steps(run: TrainingRun) -> None:
    """The optimizer steps from the current one to the last, with logging and checkpoints."""
    config, dist, t, state, layout = run.config, run.dist, run.config.train, run.state, run.layout
    dataset, per_epoch, total_steps = run.dataset, run.per_epoch, run.total_steps
    reporter = Reporter(output_dir=run.output_dir, report_to=config.output.report_to, total_steps=total_steps,
                        initial_step=state.global_step, enabled=dist.is_main, run_config=config.to_dict())
    start_time = time.perf_counter()
    start_step = state.global_step
    last_saved = state.global_step if run.resume_from is not None else -1
    skipped_local = truncated_local = 0
    seconds_to_first_step = None
    try:
        while state.global_step < total_steps:
            epoch, step_in_epoch = divmod(state.global_step, per_epoch)
            order = epoch_order(
                len(dataset), layout, seed=t.seed, epoch=epoch,
                modality_lengths=dataset.modality_lengths if config.data.group_by_modality_length else None,
                tasks=getattr(dataset, "task_of", None),
            )
            batches = rank_micro_batches(order, layout, dist.rank, start_step=step_in_epoch)
            # ZeRO-3: which micro-steps have an image on some rank (then every rank runs the vision tower).
            vision_steps = (micro_steps_with_images(order, layout, dataset.has_image, start_step=step_in_epoch)
                            if run.stage == 3 else [False] * len(batches))
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=batches, collate_fn=run.collator, num_workers=config.data.num_workers,
                # A private generator: creating loader iterators must not draw from the global torch RNG.
                generator=torch.Generator().manual_seed(t.seed),
            )
            batch_iter = iter(loader)
            index_iter = iter(batches)
            vision_iter = iter(vision_steps)
            for _ in range(step_in_epoch, per_epoch):
                if state.global_step >= total_steps:
                    break
                step_start = time.perf_counter()
                losses = []
                for micro in range(layout.grad_accum):
                    batch = next(batch_iter)
                    skipped_local += batch["num_skipped"]
                    truncated_local += batch["num_truncated"]
                    loss = _micro_step_loss(run, batch, next(index_iter), micro=micro, run_vision=next(vision_iter))
                    run.engine.backward(loss)
                    run.engine.step()
                    losses.append(float(loss.detach()))
                loss_sum, = all_reduce_sum([sum(losses) / len(losses)], dist.device)
                state.global_step += 1
                if seconds_to_first_step is None:
                    seconds_to_first_step = time.perf_counter() - run.setup_start
                state.samples_seen += layout.global_batch
                state.epoch = state.global_step / per_epoch
                state.learning_rate = float(run.scheduler.get_last_lr()[0])
                mean_loss = loss_sum / dist.world_size
                state.loss_history.append({"step": state.global_step, "loss": mean_loss, "lr": state.learning_rate})
                if state.global_step % t.logging_steps == 0 or state.global_step == total_steps:
                    elapsed = time.perf_counter() - step_start
                    reporter.log(state.global_step, {
                        "loss": mean_loss, "lr": state.learning_rate, "epoch": state.epoch,
                        "samples_per_second": layout.global_batch / max(elapsed, 1e-9),
                    })
                if state.global_step % t.save_steps == 0 or state.global_step == total_steps:
                    skipped, truncated = all_reduce_sum([float(skipped_local), float(truncated_local)], dist.device)
                    state.skipped_samples += int(skipped)
                    state.truncated_samples += int(truncated)
                    skipped_local = truncated_local = 0
                    _save(run)
                    last_saved = state.global_step
    finally:
        reporter.close()

    if last_saved != state.global_step:  # e.g. resumed from the final checkpoint: nothing new to train
        _save(run)
    run.report.update(steps_this_run=state.global_step - start_step, train_seconds=time.perf_counter() - start_time,
                      seconds_to_first_step=seconds_to_first_step)


def finish(run: TrainingRun) -> dict[str, Any]:
    """Reload the final adapter and compare (``train.verify_final_adapter``); summary.json, loss.png."""
    config, dist, state, output_dir = run.config, run.dist, run.state, run.output_dir
    final = output_dir / f"checkpoint-{state.global_step}"
    reload_check = None
    if run.composition is not None:
        run.composition.compose_all(run.engine.module)  # what the saved (composed) adapter computes
    if config.train.verify_final_adapter:
        from road_vlm.train.verify import verify_saved_adapter

        reload_check = verify_saved_adapter(
            engine=run.engine, dataset=run.dataset, collator=run.collator, checkpoint=final,
            base_model=config.model.name_or_path, dtype=model_dtype(config), pixel_dtype=run.pixel_dtype,
            output_dir=output_dir, dist=dist,
        )
        if dist.is_main:
            logger.info("reloaded %s with load_vlm: max |logit diff| = %.3g on sample %s", final,
                        reload_check["max_abs_diff"], reload_check["sample_id"])
    history = state.loss_history
    report = run.report
    summary = {
        "global_step": state.global_step,
        "steps_this_run": report["steps_this_run"],
        "samples_seen": state.samples_seen,
        "epoch": state.epoch,
        "train_seconds": report["train_seconds"],
        "resumed_from": str(run.resume_from) if run.resume_from is not None else None,
        "trainable_parameters": report["trainable_parameters"],
        "total_parameters": report["total_parameters"],
        "trainable_percent": report["trainable_percent"],
        "first_loss": history[0]["loss"] if history else float("nan"),
        "last_loss": history[-1]["loss"] if history else float("nan"),
        "peak_memory": peak_memory_bytes(dist.device),
        "world_size": dist.world_size,
        "global_batch": run.layout.global_batch,
        "zero_stage": run.stage,
        "base_load": report["base_load"],
        "data_load": report["data_load"],
        "seconds_to_first_step": report["seconds_to_first_step"],
        "skipped_samples": state.skipped_samples,
        "truncated_samples": state.truncated_samples,
        "data": run.dataset.stats.to_dict(),
        "final_checkpoint": str(final),
        "reload_check": reload_check,
        "checkpoints": [str(p) for _, p in list_checkpoints(output_dir)] if dist.is_main else [],
    }
    if dist.is_main:
        shutil.rmtree(output_dir / DATA_CACHE, ignore_errors=True)  # ranks hold mmaps; unlinked files stay readable
        plot_loss(history, output_dir / "loss.png")
        write_summary(output_dir / "summary.json", summary)
        print(format_summary(summary), flush=True)
    barrier()
    return summary

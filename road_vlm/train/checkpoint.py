"""Atomic training checkpoints and resume.

``<output.dir>/checkpoint-<step>/`` holds:

- ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``projector.safetensors``): ``save_adapter``
- ``prompt_format.json``: how prompts/images were built (read by chat/eval)
- ``config.yaml``: the resolved training config
- ``trainer_state.json``: step, epoch, samples seen, loss/lr history
- ``deepspeed/``: DeepSpeed engine, optimizer (ZeRO partitions) and LR scheduler state (frozen base weights
  excluded, so a 7B checkpoint is megabytes, not 14 GB)
- ``rng_state_<rank>.safetensors``: every rank's python / numpy / torch / accelerator RNG state
- ``road_vlm_manifest.json``: size and SHA-256 of every other file, written last

DeepSpeed's ``load_checkpoint`` unpickles its files (``torch.load(weights_only=False)``), and unpickling runs
code. So resume loads only checkpoints this package wrote: before DeepSpeed reads anything, every file must be
listed in the manifest with its size and digest, and nothing unlisted may be there. Everything road_vlm reads
itself is safetensors or JSON.

Every rank writes into ``.tmp-checkpoint-<step>/``; after a barrier rank 0 renames it to ``checkpoint-<step>``.
A rename is atomic, so a ``checkpoint-*`` directory is always complete and a run killed mid-save leaves the
previous checkpoint untouched. The output directory must be on a filesystem shared by all nodes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from road_vlm.adapters import save_adapter
from road_vlm.data.template import PromptFormat
from road_vlm.outputs import file_sha256
from road_vlm.train.composition import save_parts
from road_vlm.train.config import TrainingConfig
from road_vlm.train.distributed import DistInfo, barrier
from road_vlm.filenames import TRAINER_STATE, CHECKPOINT_MANIFEST

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
ENGINE_TAG = "deepspeed"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from."""


@dataclass
class TrainerState:
    """Progress that is saved with each checkpoint and restored on resume."""

    global_step: int = 0
    epoch: float = 0.0
    samples_seen: int = 0
    max_steps: int = 0
    steps_per_epoch: int = 0
    global_batch: int = 0
    world_size: int = 1
    learning_rate: float = 0.0
    skipped_samples: int = 0
    truncated_samples: int = 0  # text cut at max_length (tokenised on access, so counted as training sees them)
    loss_history: list[dict[str, float]] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        (directory / TRAINER_STATE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> TrainerState:
        path = directory / TRAINER_STATE
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError as err:
            raise CheckpointError(f"{directory}: not a road_vlm checkpoint (no {TRAINER_STATE})") from err
        except (json.JSONDecodeError, TypeError) as err:
            raise CheckpointError(f"{path}: unreadable trainer state: {err}") from err


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``checkpoint-<step>`` with a trainer state), oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """Which checkpoint to resume from: ``auto`` (newest complete one, if any), ``never``, or a path."""
    if resume == "never":
        existing = list_checkpoints(output_dir)
        if existing:
            raise CheckpointError(
                f"{output_dir} already holds {existing[-1][1].name}; with train.resume=never it would be overwritten. "
                "Use train.resume=auto to continue it, or choose a new output.dir"
            )
        return None
    if resume == "auto":
        path = latest_checkpoint(output_dir)
    else:
        path = Path(resume)
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(f"train.resume={resume}: not a checkpoint directory (no {TRAINER_STATE})")
    if path is not None:
        verify_manifest(path)  # fail before the model loads; load_checkpoint checks again right before use
    return path


# ---------------------------------------------------------------------------------------------- RNG state


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": json.dumps([py[0], list(py[1]), py[2]]),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                             float(np_state[4])]),
    }
    return tensors, meta


def save_rng_state(directory: Path, rank: int) -> None:
    tensors, meta = _rng_state()
    save_file(tensors, str(directory / f"rng_state_{rank}.safetensors"), metadata=meta)


def load_rng_state(directory: Path, rank: int) -> None:
    """Restore this rank's RNG state (safetensors + JSON metadata: no pickle)."""
    from safetensors import safe_open

    path = directory / f"rng_state_{rank}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} missing: the checkpoint was written by a run with fewer processes")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, state, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------- manifest


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKPOINT_MANIFEST)


def write_manifest(directory: Path) -> Path:
    """Record size and SHA-256 of every file under ``directory`` (call when everything else is written)."""
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _files(directory)}
    path = directory / CHECKPOINT_MANIFEST
    path.write_text(json.dumps({"format": "road_vlm checkpoint", "version": 1, "files": files}, indent=1) + "\n")
    return path


def verify_manifest(directory: Path) -> None:
    """Refuse a checkpoint this package did not write, or one changed since: DeepSpeed will unpickle its files."""
    path = directory / CHECKPOINT_MANIFEST
    hint = ("DeepSpeed unpickles checkpoint files, which can run code, so road_vlm resumes only from checkpoints "
            "it wrote; move it out of the output directory or choose a new output.dir")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CHECKPOINT_MANIFEST} (not written by road_vlm, or by a version without "
                              f"manifests). {hint}")
    try:
        listed = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err}). {hint}") from err
    present = {p.relative_to(directory).as_posix(): p for p in _files(directory)}
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise CheckpointError(f"{directory}: file(s) not in the manifest: {', '.join(unlisted[:3])}. {hint}")
    for name, entry in listed.items():
        file = present.get(name)
        if file is None:
            raise CheckpointError(f"{directory}: {name} is in the manifest but missing. {hint}")
        if file.stat().st_size != entry["bytes"] or file_sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{directory}: {name} differs from the manifest (modified after saving). {hint}")


# ---------------------------------------------------------------------------------------------- save / load


def exclude_quantized_state(model: Any) -> None:
    """Keep the quantized layers' packed weights and quantization constants (frozen base state, reloaded with the
    base like every frozen weight) out of DeepSpeed's module checkpoint: its ``exclude_frozen_parameters`` drops
    frozen *parameters* only, which would keep the NF4 block scales (~100 MB for 7B) in every checkpoint."""
    from road_vlm.adapters.bnb import quantization_kind

    def drop(module: Any, state_dict: dict, prefix: str, _metadata: Any) -> None:
        # Looked up at save time: adapters wrap the layers after this is installed, renaming them.
        layers = tuple(f"{prefix}{name}." for name, m in module.named_modules() if quantization_kind(m) is not None)
        for key in [k for k in state_dict if k.startswith(layers)]:
            del state_dict[key]

    model.register_state_dict_post_hook(drop)


def save_checkpoint(
    *,
    engine: Any,
    model: Any,
    config: TrainingConfig,
    state: TrainerState,
    output_dir: Path,
    dist: DistInfo,
    adapter_name: str = "default",
    parts: Sequence[str] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically. Collective: every rank must call it.

    ``parts``: a composed run's adapters (``composition.py``): each is saved under ``parts/<name>/`` and their
    composition at the top, in place of ``adapter_name``."""
    step = state.global_step
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{TMP_PREFIX}{step}"
    if dist.is_main and tmp.exists():
        shutil.rmtree(tmp)  # leftover of a run killed mid-save
    barrier()
    if dist.is_main:
        tmp.mkdir(parents=True)
    barrier()
    prompt_format = PromptFormat(config.data.template, config.data.image_aspect_ratio, config.data.max_length)
    if parts is None:
        save_adapter(model, tmp, adapter_name)  # gathers ZeRO-3 shards on every rank, writes on rank 0
    else:
        save_parts(model, tmp, parts, dist.is_main, prompt_format)
    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, exclude_frozen_parameters=True)
    save_rng_state(tmp, dist.rank)
    if dist.is_main:
        prompt_format.save(tmp)
        config.save(tmp / "config.yaml")
        state.save(tmp)
    barrier()  # every rank's files are written
    if dist.is_main:
        write_manifest(tmp)
        if final.exists():  # same step saved by an earlier (interrupted) run: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _rotate(output_dir, config.train.save_total_limit)
    barrier()
    return final


def _rotate(output_dir: Path, limit: int | None) -> None:
    if limit is None:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[:-limit]:
        logger.info("save_total_limit=%d: removing %s", limit, path)
        shutil.rmtree(path)


def load_checkpoint(engine: Any, directory: Path, dist: DistInfo) -> TrainerState:
    """Restore engine/optimizer/scheduler state, this rank's RNG state, and return the trainer state."""
    verify_manifest(directory)  # again, right before DeepSpeed unpickles (the model load took minutes)
    state = TrainerState.load(directory)
    if state.world_size != dist.world_size:
        raise CheckpointError(
            f"{directory} was written by {state.world_size} process(es) but this run has {dist.world_size}; "
            "resume with the same number of processes (ZeRO optimizer partitions and data order depend on it)"
        )
    load_path, _ = engine.load_checkpoint(
        str(directory), tag=ENGINE_TAG, load_module_strict=False,
        load_optimizer_states=True, load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise CheckpointError(f"{directory}: DeepSpeed found no engine state under '{ENGINE_TAG}/'")
    load_rng_state(directory, dist.rank)
    return state

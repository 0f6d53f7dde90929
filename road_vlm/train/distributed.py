"""Process-group setup that works the same under ``deepspeed``, ``torchrun`` and plain ``python``."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def set_single_process_defaults() -> None:
    """Env defaults so a plain ``python scripts/train.py`` is a world of one (launchers set these themselves)."""
    if "RANK" not in os.environ:
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ["RANK"] = "0"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    if not torch.cuda.is_available():
        # Without CUDA, DeepSpeed's CPU accelerator (gloo) runs the same code path on CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo/ccl on CPU) and pick the device."""
    set_single_process_defaults()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    if on_cpu:
        _remove_stale_build_locks()
    if not torch.distributed.is_initialized():
        backend = accel.communication_backend_name()
        if on_cpu and backend == "ccl":
            try:  # oneCCL is optional on CPU; gloo always works
                import oneccl_bindings_for_pytorch  # noqa: F401
            except ImportError:
                backend = "gloo"
        deepspeed.init_distributed(dist_backend=backend)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cpu:
        device = torch.device("cpu")
        _limit_cpu_threads()
        _unlink_cpu_allreduce_segment(rank)
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(local_rank))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


STALE_BUILD_LOCK_S = 15 * 60


def _remove_stale_build_locks() -> None:
    """Remove JIT-build locks of DeepSpeed's CPU ops that a killed process left behind.

    Every process that loads a JIT op holds ``<torch_extensions>/<op>/lock`` while ninja checks the build; one
    killed in that window leaves the file, and every later run waits on it forever. A CPU op builds in about a
    minute, so a lock untouched for 15 minutes is left over.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > STALE_BUILD_LOCK_S:
            logger.warning("removing %s: a build lock untouched for %.0f minutes, left by a killed process", lock,
                           age / 60)
            lock.unlink(missing_ok=True)


def cpu_allreduce_segment(rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for ``rank`` (its shm.cpp names it so)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_cpu_allreduce_segment(rank: int) -> None:
    """Remove this rank's DeepSpeed CPU all-reduce segment from /dev/shm once every rank has mapped it.

    DeepSpeed never unlinks it (64 MiB per rank per run, in RAM): a few hundred CPU runs fill /dev/shm and the
    machine starts swapping. Once every rank has opened every segment (its initialisation waits for that; the
    barrier makes it true for all ranks), the name is no longer needed and the mappings outlive the unlink, so
    nothing is left behind even when a rank is killed.
    """
    if not hasattr(os, "getuid"):
        return
    barrier()
    cpu_allreduce_segment(rank).unlink(missing_ok=True)


def _limit_cpu_threads() -> None:
    """Share the cores between the processes of this node unless the user chose OMP_NUM_THREADS.

    Every process defaulting to all cores oversubscribes the CPU, and gloo spin-waits on top of that.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE", "1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, int(local))))


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks (float64, so sums of counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def first_error(dist: DistInfo, fn, *args, **kwargs):
    """Run ``fn``; if it raises on any rank, raise on every rank (no rank is left waiting in a collective)."""
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised below
        error = err
    flags = all_reduce_sum([1.0 if error is not None else 0.0], dist.device)
    if error is not None:
        raise error
    if flags[0] > 0:
        raise RuntimeError("another rank failed during setup (see its error above)")
    return result


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank (e.g. an error message, so all ranks fail together)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]

"""Rank-0 observability: tqdm progress bar, TensorBoard / wandb scalars, ``loss.png`` and ``summary.json``."""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

ReportTo = Literal["tensorboard", "wandb", "none"]  # where rank 0 sends the training scalars


class Reporter:
    """Progress bar + metric sinks; every method is a no-op on ranks other than 0."""

    def __init__(
        self,
        *,
        output_dir: Path,
        report_to: str,
        total_steps: int,
        initial_step: int,
        enabled: bool,
        run_config: dict[str, Any],
    ) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self._bar = None
        self._writer = None
        self._wandb = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True,
                         file=sys.stderr)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run logged after its last checkpoint, so curves do not overlap.
            self._writer = SummaryWriter(log_dir=str(output_dir / "runs"), purge_step=initial_step + 1)
        elif report_to == "wandb":
            import wandb

            self._wandb = wandb.init(project="road_vlm", dir=str(output_dir), config=run_config, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                samples_s=f"{metrics.get('samples_per_second', 0.0):.1f}", refresh=False,
            )
            self._bar.update(step - self._bar.n)
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


def peak_memory_bytes(device: torch.device) -> dict[str, int]:
    """Peak accelerator memory (allocated by torch) and this process's peak resident set size."""
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["device_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def plot_loss(history: list[dict[str, float]], path: Path) -> Path | None:
    """Write the training loss curve (nothing to plot: no file)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("road_vlm training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable end-of-run summary."""
    gib = 1024 ** 3
    lines = [
        "training finished",
        f"  steps: {summary['global_step']}  samples seen: {summary['samples_seen']}  "
        f"time: {summary['train_seconds']:.1f}s",
        f"  trainable parameters: {summary['trainable_parameters']:,} / {summary['total_parameters']:,} "
        f"({summary['trainable_percent']:.4f}%)",
        f"  loss: first {summary['first_loss']:.4f} -> last {summary['last_loss']:.4f}",
    ]
    mem = summary["peak_memory"]
    if "device_peak_allocated_bytes" in mem:
        lines.append(f"  peak device memory (rank 0): {mem['device_peak_allocated_bytes'] / gib:.2f} GiB")
    lines.append(f"  peak host RSS (rank 0): {mem['host_peak_rss_bytes'] / gib:.2f} GiB")
    data = summary["data"]
    lines.append(f"  data: {data['num_samples']}/{data['num_records']} samples used, {data['num_dropped']} dropped, "
                 f"{summary['truncated_samples']} text-truncated, {summary['skipped_samples']} skipped (unreadable "
                 "image, or nothing left to supervise after truncation)")
    lines.append(f"  final checkpoint: {summary['final_checkpoint']}")
    return "\n".join(lines)

"""Helpers for training tests: demo-like configs pointing at the tiny model, and training subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def demo_config(tiny_llava_dir: Path, data_path: Path, output_dir: Path, **sections: dict) -> dict:
    """configs/demo.yaml re-pointed at the session's tiny model and data, with section overrides merged in."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["model"].update(name_or_path=str(tiny_llava_dir))
    config["data"].update(path=str(data_path))
    config["output"].update(dir=str(output_dir), report_to="none")
    config["deepspeed"]["config"] = str(REPO / "configs" / "deepspeed" / "zero2.json")
    for name, values in sections.items():
        config[name].update(values)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_command(config_path: Path, *overrides: str, num_processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_processes),
            "--master_port", str(_free_port()), str(REPO / "scripts" / "train.py"), "--config", str(config_path),
            *overrides]


def leftover_allreduce_segments(cmd: list[str]) -> list[Path]:
    """DeepSpeed CPU all-reduce segments in /dev/shm left by the run ``cmd`` launched (named by its master port)."""
    port = cmd[cmd.index("--master_port") + 1]
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def python_command(config_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(config_path), *overrides]


def run_training(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout)

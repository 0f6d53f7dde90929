"""Shared fixtures: one tiny LLaVA-1.5 checkpoint (real HF format, real tokenizer) per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# DeepSpeed picks its accelerator at import time; the suite always runs on the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA-1.5 checkpoint whose tokenizer covers the synthetic data's vocabulary."""
    from road_vlm.demo.synthetic import tokenizer_corpus
    from road_vlm.demo.tiny_base import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "base", corpus=tokenizer_corpus())


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Tiny models are dominated by per-op overhead; with 2 threads on a busy 2-core machine a forward pass
    can take 30x longer than with one."""
    import torch

    torch.set_num_threads(1)

"""Fixtures for training tests: synthetic LLaVA data (the tiny model comes from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``instruct.json`` + images from the synthetic generator (mixed image / text-only samples)."""
    from road_vlm.demo.synthetic import generate_training_data

    root = generate_training_data(tmp_path_factory.mktemp("synthetic"), num_samples=240, num_pretrain=0)
    return root / "instruct.json"


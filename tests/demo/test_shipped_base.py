"""The demo's shipped tiny base: its files match their manifest, it loads through the normal loader, and a
rebuilt base can be shipped the same way."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from road_vlm.demo.pipeline import DemoSettings, Workdir, run_demo
from road_vlm.demo.shipped_base import (MANIFEST, SHIPPED_BASE, ShippedBaseError, file_digests, read_manifest,
                                        ship_base, verify_shipped_base)


def test_the_shipped_base_matches_its_manifest_and_loads_through_the_normal_loader():
    manifest = verify_shipped_base()
    # The manifest says how it was built: the settings of the base stage, the code, the libraries, every file.
    assert manifest["settings"]["base"] == DemoSettings().base_settings()
    assert manifest["settings"]["data"] == DemoSettings().stage_settings()["data"]
    assert manifest["code_version"] and manifest["libraries"]["torch"] and manifest["date"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert all(len(digest) == 64 for digest in manifest["files"].values())

    from road_vlm.model import load_vlm

    loaded = load_vlm(SHIPPED_BASE)
    model, processor = loaded.model, loaded.processor
    tokens = processor.tokenizer("USER: Is there a circle in the image? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size and torch.isfinite(logits).all()


def test_a_changed_missing_or_extra_file_is_named(tmp_path: Path):
    copy = tmp_path / "base"
    shutil.copytree(SHIPPED_BASE, copy)
    verify_shipped_base(copy)
    with (copy / "config.json").open("a") as handle:
        handle.write(" ")
    (copy / "tokenizer.json").unlink()
    (copy / "stray.bin").write_bytes(b"x")
    with pytest.raises(ShippedBaseError, match="missing tokenizer.json; unexpected stray.bin; changed config.json"):
        verify_shipped_base(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(ShippedBaseError, match="--rebuild-base"):
        verify_shipped_base(copy)


def test_the_demo_uses_the_shipped_base_unless_told_to_rebuild(tmp_path: Path):
    small = DemoSettings(num_train=24, num_eval=2)
    summary = run_demo(tmp_path / "shipped", small, until="base")
    assert summary["stages_reused"] == []
    assert file_digests(Workdir(tmp_path / "shipped").base) == read_manifest()["files"]

    # --rebuild-base: the pretraining path, at a token size, gives a base that can be shipped and verified.
    rebuilt = DemoSettings(num_train=24, num_eval=2, rebuild_base=True, text_steps=2, caption_steps=2)
    work = Workdir(tmp_path / "rebuilt")
    run_demo(work.root, rebuilt, until="base")
    assert file_digests(work.base) != read_manifest()["files"]
    settings = {"data": rebuilt.stage_settings()["data"], "base": rebuilt.base_settings()}
    manifest = ship_base(work.base, settings, tmp_path / "shipped-again")
    assert verify_shipped_base(tmp_path / "shipped-again") == manifest
    assert manifest["settings"]["base"]["text_steps"] == 2


def test_pretraining_steps_without_rebuild_base_are_refused_not_ignored(capsys):
    from road_vlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--text-steps", "5"])
    assert exit_info.value.code == 2 and "need --rebuild-base" in capsys.readouterr().err

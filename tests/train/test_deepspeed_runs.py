"""End-to-end: 2-process ``deepspeed`` runs of configs/demo.yaml (ZeRO-2, ZeRO-3), SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
from safetensors.torch import load_file

from road_vlm.train.precision import supported_training_dtypes
from train_helpers import (REPO, deepspeed_command, demo_config, leftover_allreduce_segments, python_command,
                           run_training, train_env, write_config)

pytestmark = pytest.mark.slow

STEPS = 24
SAVE = 4
TRAIN = {"max_steps": STEPS, "save_steps": SAVE, "per_device_batch_size": 4, "learning_rate": 0.05,
         "projector_lr": 0.01, "seed": 3}


def _run(tiny_llava_dir: Path, data: Path, out: Path, zero: str) -> subprocess.CompletedProcess:
    config = demo_config(tiny_llava_dir, data, out, train=TRAIN,
                         deepspeed={"config": str(REPO / "configs" / "deepspeed" / f"{zero}.json")})
    path = write_config(out.parent / f"{out.name}.yaml", config)
    cmd = deepspeed_command(path)
    result = run_training(cmd)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert not leftover_allreduce_segments(cmd), "the run left DeepSpeed's shared-memory segments in /dev/shm"
    return result


@pytest.fixture(scope="module")
def zero2_run(tiny_llava_dir: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zero2") / "run"
    _run(tiny_llava_dir, synthetic_data, out, "zero2")
    return out


def _supervised_loss(model, processor, data: Path, n: int = 24) -> float:
    """Mean loss of the first ``n`` training samples (fixed set) under ``model``."""
    from road_vlm.data.collator import SupervisedCollator
    from road_vlm.data.config import DataConfig
    from road_vlm.data.dataset import LazySupervisedDataset
    from road_vlm.data.indexing import Tokenization
    from road_vlm.model import num_image_tokens
    from road_vlm.train.loss import compute_loss

    class _Engine:  # compute_loss expects an engine-like callable with .device
        device = torch.device("cpu")

        def __call__(self, **kw):
            return model(**kw)

    tok = processor.tokenizer
    ds = LazySupervisedDataset(DataConfig(path=str(data), max_length=256),
                               Tokenization(tok, num_image_tokens(processor), model.config.image_token_id),
                               processor.image_processor)
    collate = SupervisedCollator(pad_token_id=tok.pad_token_id)
    losses = []
    with torch.no_grad():
        for i in range(n):
            losses.append(float(compute_loss(_Engine(), collate([ds[i]]), pixel_dtype=torch.float32)))
    return sum(losses) / len(losses)


def _check_run(out: Path, tiny_llava_dir: Path, data: Path, zero_stage: int) -> None:
    from road_vlm.model import load_vlm

    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["world_size"] == 2 and summary["zero_stage"] == zero_stage
    # ZeRO-3 builds and loads the base inside zero.Init: each rank only ever holds its partition of it.
    load = summary["base_load"]
    assert load["zero3_partitioned"] is (zero_stage == 3)
    if zero_stage == 3:
        assert 0 < load["local_elements"] <= 0.51 * load["total_elements"]
    for step in (SAVE, 2 * SAVE, STEPS):
        ckpt = out / f"checkpoint-{step}"
        for name in ("adapter_config.json", "adapter_model.safetensors", "projector.safetensors",
                     "prompt_format.json", "config.yaml", "trainer_state.json", "rng_state_0.safetensors",
                     "rng_state_1.safetensors"):
            assert (ckpt / name).is_file(), f"{ckpt} lacks {name}"
        assert (ckpt / "deepspeed").is_dir()
    assert not list(out.glob(".tmp-checkpoint-*"))
    assert (out / "loss.png").is_file()
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["loss_history"]] == list(range(1, STEPS + 1))

    # The saved adapter reloads through the one model loader with the trained model's logits.
    assert summary["reload_check"]["max_abs_diff"] < 1e-5
    check = load_file(str(out / "reload_check.safetensors"))
    final = out / f"checkpoint-{STEPS}"
    loaded = load_vlm(tiny_llava_dir, final)
    assert loaded.prompt_format.max_length == 256
    with torch.no_grad():
        logits = loaded.model(input_ids=check["input_ids"], attention_mask=check["attention_mask"],
                              pixel_values=check.get("pixel_values")).logits
    torch.testing.assert_close(logits, check["trained"], rtol=0, atol=1e-5)

    # Pure RoAd adapters are also PEFT adapters: PEFT loads the checkpoint and agrees on a text-only input
    # (the trained projector, which PEFT does not load, plays no part there).
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    text_ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    peft_model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir), final).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=text_ids).logits, loaded.model(input_ids=text_ids).logits,
                                   rtol=0, atol=1e-4)
        base = load_vlm(tiny_llava_dir)
        assert not torch.allclose(base.model(input_ids=text_ids).logits, loaded.model(input_ids=text_ids).logits,
                                  atol=1e-3)  # the comparison above is not vacuous: the adapter changes outputs

    # Training lowered the loss on a fixed set of training samples.
    before = _supervised_loss(base.model, base.processor, data)
    after = _supervised_loss(loaded.model, loaded.processor, data)
    assert after < before - 0.05, (before, after)


def test_zero2_two_processes_trains_saves_and_reloads(zero2_run: Path, tiny_llava_dir: Path, synthetic_data: Path):
    _check_run(zero2_run, tiny_llava_dir, synthetic_data, zero_stage=2)


def test_zero3_two_processes_trains_saves_and_reloads(tiny_llava_dir: Path, synthetic_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    _run(tiny_llava_dir, synthetic_data, out, "zero3")
    _check_run(out, tiny_llava_dir, synthetic_data, zero_stage=3)


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(
    zero2_run: Path, tiny_llava_dir: Path, synthetic_data: Path, tmp_path: Path
):
    out = tmp_path / "run"
    config = demo_config(tiny_llava_dir, synthetic_data, out, train=TRAIN)
    path = write_config(tmp_path / "run.yaml", config)
    cmd = deepspeed_command(path)
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / f"checkpoint-{SAVE}").is_dir():
            assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both training processes, mid-run
        proc.wait()
    assert not (out / f"checkpoint-{STEPS}").exists(), "the run finished before it was killed"
    assert not (out / "summary.json").exists()
    # Unlinked once every rank had mapped them, so a killed run leaves no 64 MiB segments in RAM either.
    assert not leftover_allreduce_segments(cmd)

    result = run_training(deepspeed_command(path, "train.resume=auto"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["global_step"] == STEPS
    for name in ("adapter_model.safetensors", "projector.safetensors"):
        resumed = load_file(str(out / f"checkpoint-{STEPS}" / name))
        reference = load_file(str(zero2_run / f"checkpoint-{STEPS}" / name))
        assert resumed.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)
    resumed_history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["loss_history"]
    reference_history = json.loads((zero2_run / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["loss_history"]
    assert [h["step"] for h in resumed_history] == list(range(1, STEPS + 1))
    for a, b in zip(resumed_history, reference_history):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["lr"] - b["lr"]) < 1e-12


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_on_cpu_runs_and_its_adapter_reloads(precision: str, tiny_llava_dir: Path,
                                                                    synthetic_data: Path, tmp_path: Path):
    # A property of the processor, not of road_vlm: ask the CPU accelerator the training subprocess uses.
    supported = supported_training_dtypes(CPU_Accelerator())
    if {"bf16": torch.bfloat16, "fp16": torch.float16}[precision] not in supported:
        pytest.skip(f"DeepSpeed's CPU accelerator cannot train in {precision} on this CPU (it supports {supported}); "
                    "tests/train/test_commands.py checks that road-vlm train refuses it up front")
    out = tmp_path / "run"
    config = demo_config(tiny_llava_dir, synthetic_data, out, train={**TRAIN, "max_steps": 6, "save_steps": 6,
                                                                     precision: True})
    result = run_training(python_command(write_config(tmp_path / "run.yaml", config)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    losses = [h["loss"] for h in json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["loss_history"]]
    assert len(losses) == 6 and all(np.isfinite(losses))
    # The reloaded adapter (load_vlm in the same dtype) gives the trained model's logits up to half precision.
    assert summary["reload_check"]["max_abs_diff"] < 0.05

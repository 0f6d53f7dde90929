"""The paper's pipeline end to end on tiny parts, with the shipped recipes (paths and sizes overridden):
build-base without a projector -> stage 1 (configs/llava15_7b_pretrain.yaml: projector only, plain template) ->
build-base with the stage-1 projector -> stage 2 (configs/llava15_7b_road4.yaml: RoAd4 + projector)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from road_vlm.convert import build_base

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _train(recipe: str, *overrides: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    common = ["train.bf16=false", "train.per_device_batch_size=4", "train.gradient_accumulation_steps=1",
              "data.num_workers=0", "data.image_folder=null", "output.report_to=none",
              "deepspeed.config=configs/deepspeed/zero2.json", "train.verify_final_adapter=true"]
    result = subprocess.run([sys.executable, "scripts/train.py", "--config", f"configs/{recipe}", *common, *overrides],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("output.dir="))
    return json.loads((Path(out) / "summary.json").read_text())


def test_stage1_trains_only_the_projector_and_feeds_stage2(parts: dict[str, Path], tmp_path: Path):
    from road_vlm.demo.synthetic import generate_training_data
    from road_vlm.model import load_vlm

    data = generate_training_data(tmp_path / "data", num_samples=24, num_pretrain=24)
    init = build_base(parts["clip"], parts["vicuna"], tmp_path / "stage1-init", dtype="float32")

    stage1 = tmp_path / "stage1"
    summary = _train("llava15_7b_pretrain.yaml", f"model.name_or_path={init}", f"data.path={data / 'pretrain.json'}",
                     f"output.dir={stage1}", "train.max_steps=5", "train.save_steps=5")
    projector_size = sum(p.numel() for p in load_vlm(init).model.model.multi_modal_projector.parameters())
    assert summary["trainable_parameters"] == projector_size  # nothing but the projector trains
    assert summary["data"]["num_samples"] == 24
    # The trained model's logits equal base + saved projector: every other weight is untouched.
    assert summary["reload_check"]["max_abs_diff"] == 0.0
    checkpoint = stage1 / "checkpoint-5"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["variant"] == "none"
    assert json.loads((checkpoint / "prompt_format.json").read_text())["template"] == "plain"
    trained = load_file(str(checkpoint / "projector.safetensors"))
    before = load_vlm(init).model.model.multi_modal_projector.state_dict()
    assert all(not torch.equal(trained[f"model.multi_modal_projector.{k}"], v) for k, v in before.items())

    # Stage 2 starts from Vicuna + CLIP + the stage-1 projector, assembled again.
    base = build_base(parts["clip"], parts["vicuna"], tmp_path / "base", projector=checkpoint, dtype="float32")
    built, first = load_vlm(base).model.state_dict(), load_vlm(init).model.state_dict()
    assert built.keys() == first.keys()
    for key, value in built.items():
        if key.startswith("model.multi_modal_projector."):
            torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
        else:
            torch.testing.assert_close(value, first[key], rtol=0, atol=0, msg=key)

    stage2 = tmp_path / "stage2"
    summary = _train("llava15_7b_road4.yaml", f"model.name_or_path={base}", f"data.path={data / 'instruct.json'}",
                     f"output.dir={stage2}", "train.max_steps=3", "train.save_steps=3", "adapter.group_size=8",
                     "train.learning_rate=0.01")
    assert summary["global_step"] == 3 and summary["reload_check"]["max_abs_diff"] < 1e-5
    loaded = load_vlm(base, stage2 / "checkpoint-3")
    assert loaded.prompt_format.template == "vicuna_v1"

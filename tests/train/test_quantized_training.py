"""Training on an NF4 / int8 base: what changes (adapter + projector) and what does not (the quantized weights),
the reload check, eval and chat on the recorded base, ZeRO-3 refused, and (slow) ZeRO-2 with 2 processes plus an
exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from train_helpers import REPO, deepspeed_command, demo_config, run_training, write_config

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

STEPS = 8
TRAIN = {"max_steps": STEPS, "save_steps": 4, "per_device_batch_size": 4, "learning_rate": 0.05,
         "projector_lr": 0.01, "seed": 3, "gradient_checkpointing": True}


def _frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized weight with its quantization constants (bnb's own state-dict entries), copied."""
    from road_vlm.adapters.bnb import quantization_kind

    out = {}
    for name, module in model.named_modules():
        if quantization_kind(module) is not None:
            for key, value in module.state_dict().items():
                if isinstance(value, torch.Tensor):
                    out[f"{name}.{key}"] = value.detach().clone()
    return out


def _fixed_batch_loss(run) -> float:
    """Loss on the first 8 training samples. Train mode, no grad: in eval mode bitsandbytes may repack 4-bit
    weights for the CPU (on CPUs with AVX512-BF16), which would make the bit-identity check below hardware-bound."""
    from road_vlm.data.collator import SupervisedCollator
    from road_vlm.train.loss import compute_loss

    class _Engine:  # compute_loss takes an engine-like callable with .device
        device = torch.device("cpu")

        def __call__(self, **kwargs):
            return run.model(**kwargs)

    batch = SupervisedCollator(pad_token_id=run.processor.tokenizer.pad_token_id)([run.dataset[i] for i in range(8)])
    with torch.no_grad():
        return float(compute_loss(_Engine(), batch, pixel_dtype=torch.float32))


def _train_in_process(config_dict: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """One process, in this process (so the trained model can be inspected), through the trainer's own stages."""
    import socket

    from road_vlm.train import trainer
    from road_vlm.train.config import config_from_dict
    from road_vlm.train.distributed import init_distributed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": port}.items():
        monkeypatch.setenv(key, value)
    config = config_from_dict(config_dict, source=str(tmp_path / "run.yaml"))
    run = trainer.TrainingRun(config=config, dist=init_distributed(), output_dir=Path(config.output.dir),
                              setup_start=0.0)
    # The 1-process group stays up for the next test (DeepSpeed keeps its own handle on it).
    trainer.prepare_output(run)
    trainer.load_model(run)
    frozen = _frozen_state(run.model)
    params = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.is_floating_point()}
    trainer.load_data(run)
    loss_before = _fixed_batch_loss(run)
    trainer.initialize_engine(run)
    trainer.run_steps(run)
    result = {"frozen_before": frozen, "frozen_after": _frozen_state(run.model), "params_before": params,
              "params_after": {n: p.detach().clone() for n, p in run.model.named_parameters()},
              "loss_before": loss_before, "loss_after": _fixed_batch_loss(run)}
    result["summary"] = trainer.finish(run)
    return result


@pytest.mark.parametrize("method,variant", [("nf4", "road4"), ("nf4", "road1_lora"), ("int8", "road4"),
                                            ("int8", "road1_lora")])
def test_training_on_a_quantized_base_changes_only_adapter_and_projector(
    method: str, variant: str, tiny_llava_dir: Path, synthetic_data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    out = tmp_path / "run"
    config = demo_config(tiny_llava_dir, synthetic_data, out, train=TRAIN, model={"quantization": method},
                         adapter={"variant": variant, "lora_r": 4})
    result = _train_in_process(config, tmp_path, monkeypatch)
    assert result["loss_after"] < result["loss_before"] - 0.05, (result["loss_before"], result["loss_after"])

    frozen, after = result["frozen_before"], result["frozen_after"]
    assert after.keys() == frozen.keys() and len(after) >= 14
    for key, value in frozen.items():
        assert torch.equal(after[key], value), f"{key} changed in training"
    before = result["params_before"]
    changed = {n for n, p in result["params_after"].items() if n in before and not torch.equal(p, before[n])}
    assert all((".road_" in n or ".lora_" in n or "multi_modal_projector" in n) for n in changed), changed
    assert any("multi_modal_projector" in n for n in changed) and any(".road_" in n for n in changed)

    # The adapter records its base; the reload check ran on that same quantized base.
    final = out / f"checkpoint-{STEPS}"
    with safe_open(str(final / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata()["road_vlm.base_quantization"] == method
    assert result["summary"]["reload_check"]["max_abs_diff"] < 1e-5
    # Checkpoints hold the trained state only: no packed weights or quantization constants.
    module_state = torch.load(final / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module_state and all((".road_" in k or ".lora_" in k or "multi_modal_projector" in k) for k in module_state)


def test_eval_and_chat_run_on_the_quantized_base_the_checkpoint_records(
    tiny_llava_dir: Path, synthetic_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
):
    from road_vlm.cli import main
    from road_vlm.demo.synthetic import generate_eval_data
    from road_vlm.eval.api import evaluate

    out = tmp_path / "run"
    config = demo_config(tiny_llava_dir, synthetic_data, out, model={"quantization": "nf4"},
                         train={**TRAIN, "max_steps": 2, "save_steps": 2})
    _train_in_process(config, tmp_path, monkeypatch)
    final = out / "checkpoint-2"

    capsys.readouterr()
    image = next(synthetic_data.parent.rglob("*.png"))
    assert main(["chat", "--model", str(tiny_llava_dir), "--adapter", str(final), "--image", str(image),
                 "--prompt", "What is in the image?", "--max-new-tokens", "4", "--json"]) == 0
    assert "answer" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    data_root = generate_eval_data(tmp_path / "eval", num_per_benchmark=4)
    results = evaluate(tiny_llava_dir, [None, final], "gqa,pope", data_root, tmp_path / "results", batch_size=4,
                       max_new_tokens=4, progress=False)
    assert list(results["rows"]) == ["base", "checkpoint-2"]
    assert all(set(row) == {"gqa", "pope"} for row in results["rows"].values())


def test_the_loaders_pick_the_recorded_quantization(tiny_llava_dir: Path, tmp_path: Path):
    """chat, eval and serving load the base the adapter was trained on unless told otherwise."""
    from road_vlm.adapters import AdapterConfig, add_adapter, save_adapter
    from road_vlm.model import load_base, recorded_quantization
    from road_vlm.quantization import Quantization, quantized_linears
    from road_vlm.serve import ServingEngine

    for method in ("nf4", "int8"):
        model, _ = load_base(tiny_llava_dir, quantization=method)
        add_adapter(model, AdapterConfig(variant="road4", group_size=16))
        save_adapter(model, tmp_path / method)
    plain, _ = load_base(tiny_llava_dir)
    add_adapter(plain, AdapterConfig(variant="road4", group_size=16))
    save_adapter(plain, tmp_path / "plain")
    assert recorded_quantization(tmp_path / "nf4") == Quantization("nf4", double_quant=True)
    assert recorded_quantization(tmp_path / "plain") is None
    with pytest.raises(ValueError, match="differently quantized bases"):
        recorded_quantization(tmp_path / "nf4", tmp_path / "int8")
    engine = ServingEngine.load(tiny_llava_dir, {"a": tmp_path / "int8"})
    assert set(quantized_linears(engine.model).values()) == {"int8"}


def test_zero3_with_a_quantized_base_is_refused_naming_the_reason(tiny_llava_dir: Path, synthetic_data: Path,
                                                                 tmp_path: Path):
    from road_vlm.train.config import config_from_dict
    from road_vlm.train.ds_config import DeepSpeedConfigError, build_deepspeed_config, read_deepspeed_json

    zero3 = REPO / "configs" / "deepspeed" / "zero3.json"
    config = config_from_dict(demo_config(tiny_llava_dir, synthetic_data, tmp_path / "run",
                                          model={"quantization": "nf4"}))
    with pytest.raises(DeepSpeedConfigError, match=r"zero3\.json: ZeRO-3 cannot train on a quantized base "
                                                    r"\(model\.quantization=nf4\).*Use ZeRO-2"):
        build_deepspeed_config(read_deepspeed_json(zero3), config, world_size=2, hidden_size=64, source=str(zero3))


def test_half_precision_on_a_quantized_base_keeps_the_norms_in_fp32(tiny_llava_dir: Path, synthetic_data: Path,
                                                                   tmp_path: Path):
    from road_vlm.train.config import config_from_dict
    from road_vlm.train.ds_config import build_deepspeed_config, read_deepspeed_json
    from road_vlm.train.model_setup import load_model_with_adapter

    zero2 = REPO / "configs" / "deepspeed" / "zero2.json"
    config = config_from_dict(demo_config(tiny_llava_dir, synthetic_data, tmp_path / "run",
                                          model={"quantization": "nf4"}, train={"bf16": True}))
    ds = build_deepspeed_config(read_deepspeed_json(zero2), config, world_size=1, hidden_size=64)
    assert ds["data_types"]["keep_in_fp32_modules"] == ["language_model.*norm"]
    model, _, _ = load_model_with_adapter(config)
    lm = model.model.language_model
    assert lm.norm.weight.dtype == torch.float32 and lm.layers[0].input_layernorm.weight.dtype == torch.float32
    assert lm.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert lm.layers[0].self_attn.q_proj.base_layer.compute_dtype == torch.bfloat16


@pytest.mark.slow
def test_zero2_two_processes_on_an_nf4_base_trains_and_resumes_exactly(tiny_llava_dir: Path, synthetic_data: Path,
                                                                      tmp_path: Path):
    out = tmp_path / "run"
    config = demo_config(tiny_llava_dir, synthetic_data, out, model={"quantization": "nf4"},
                         train={**TRAIN, "gradient_checkpointing": False})
    path = write_config(tmp_path / "run.yaml", config)
    result = run_training(deepspeed_command(path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["global_step"] == STEPS
    assert summary["reload_check"]["max_abs_diff"] < 1e-5

    # Resume from the middle checkpoint of a copy of the run: the last checkpoint comes out identical.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / f"checkpoint-{STEPS}")
    (resumed / "summary.json").unlink()
    config["output"]["dir"] = str(resumed)
    result = run_training(deepspeed_command(write_config(tmp_path / "resumed.yaml", config)))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"].endswith("checkpoint-4")
    for name in ("adapter_model.safetensors", "projector.safetensors"):
        a = load_file(str(resumed / f"checkpoint-{STEPS}" / name))
        b = load_file(str(out / f"checkpoint-{STEPS}" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    history = [json.loads((d / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["loss_history"]
               for d in (resumed, out)]
    assert history[0] == history[1]

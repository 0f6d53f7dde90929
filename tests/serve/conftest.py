"""Serving fixtures: adapters with random (non-identity) parameters on the session's tiny LLaVA, and one engine."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

# group_size 8 divides every tiny d_out (64, 128); LoRA rank 4 keeps the files small.
ADAPTERS = {
    "road4": dict(variant="road4", train_projector=False, seed=1),
    "road1proj": dict(variant="road1", train_projector=True, seed=2),  # also trains the projector
    "lora": dict(variant="lora", train_projector=False, seed=3),
    "hybrid": dict(variant="road1_lora", train_projector=False, seed=4),
}


def make_adapter(base: Path, out: Path, *, variant: str, train_projector: bool, seed: int,
                 pair_subset: str | None = None) -> Path:
    """add_adapter on the tiny base, randomise its parameters (so adapters really differ), save_adapter."""
    from road_vlm.adapters import AdapterConfig, adapted_layers, add_adapter, save_adapter
    from road_vlm.data.template import PromptFormat
    from road_vlm.model import load_base

    model, _ = load_base(base)
    name = "default"
    config = AdapterConfig(variant=variant, group_size=8, lora_r=4, lora_alpha=8.0, train_projector=train_projector,
                           pair_subset=pair_subset)
    add_adapter(model, config, name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for param in layer.adapter_parameters(name).values():
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
        if train_projector:
            for param in model.model.multi_modal_projector.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    save_adapter(model, out, name)
    PromptFormat().save(out)
    return out


@pytest.fixture(scope="session")
def adapter_dirs(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_adapters")
    return {name: make_adapter(tiny_llava_dir, root / name, **spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="session")
def composable(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """road4 adapters on pair subsets 1/3 (with a projector), 2/3 and 3/3, and left+right composed offline."""
    from road_vlm.adapters.compose import compose_dirs

    root = tmp_path_factory.mktemp("composable")
    dirs = {
        "left": make_adapter(tiny_llava_dir, root / "left", variant="road4", train_projector=True, seed=11,
                             pair_subset="1/3"),
        "mid": make_adapter(tiny_llava_dir, root / "mid", variant="road4", train_projector=False, seed=12,
                            pair_subset="2/3"),
        "right": make_adapter(tiny_llava_dir, root / "right", variant="road4", train_projector=False, seed=13,
                              pair_subset="3/3"),
    }
    dirs["left_right"] = compose_dirs([dirs["left"], dirs["right"]], root / "left_right")
    return dirs


@pytest.fixture(scope="session")
def engine(tiny_llava_dir: Path, adapter_dirs: dict[str, Path]):
    """One base + road4, road1proj and lora adapters, shared by the server tests."""
    from road_vlm.serve import ServingEngine

    served = {name: adapter_dirs[name] for name in ("road4", "road1proj", "lora")}
    return ServingEngine.load(tiny_llava_dir, served, base_name="base")


@pytest.fixture(scope="session")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-square image (so LLaVA's pad preprocessing matters)."""
    path = tmp_path_factory.mktemp("serve_images") / "red_green.png"
    image = Image.new("RGB", (48, 32), (200, 20, 20))
    image.paste((20, 180, 40), (24, 0, 48, 32))
    image.save(path)
    return path


@pytest.fixture(scope="session")
def serve_cli() -> argparse.ArgumentParser:
    """A parser with only the serving subcommands (what road_vlm/cli.py builds from register())."""
    from road_vlm.serve.commands import register

    parser = argparse.ArgumentParser(prog="road-vlm")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture(scope="session")
def run_server() -> Callable[..., AbstractContextManager[str]]:
    """``with run_server(app) as url``: the app on a real uvicorn server on a free loopback port."""

    @contextmanager
    def serve(app) -> Iterator[str]:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                pytest.fail("uvicorn did not start")
            time.sleep(0.05)
        host, port = sock.getsockname()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.should_exit = True
            thread.join(30)
            sock.close()

    return serve


@pytest.fixture(scope="session")
def api_tokens_cap() -> int:
    """The api_server's --max-tokens-cap: what an answer without max_tokens gets at most."""
    return 64


@pytest.fixture(scope="module")
def api_server(engine, run_server, api_tokens_cap) -> Iterator[str]:
    """The OpenAI-compatible server on the shared engine (base "base", adapters road4, road1proj, lora), on a
    loopback port. Per module: a running server keeps the engine's adapter tables entered, so it must close
    before another module builds its own app on the same engine."""
    from road_vlm.serve.server import create_app

    with run_server(create_app(engine, max_tokens_cap=api_tokens_cap, max_batch_size=8)) as url:
        yield url


@pytest.fixture(scope="session")
def board_outputs(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``outputs/`` folder as a user has it: a real training run (4 steps, checkpoints at 2 and 4, the
    trainer's own files) and ``road-vlm eval`` results for the base and both checkpoints."""
    import os
    import subprocess
    import sys

    import yaml

    from road_vlm.demo.synthetic import generate_eval_data, generate_training_data
    from road_vlm.eval.api import evaluate

    repo = Path(__file__).resolve().parents[2]
    root = tmp_path_factory.mktemp("board")
    data = generate_training_data(root / "data", num_samples=40, num_pretrain=0) / "instruct.json"
    outputs = root / "outputs"
    config = yaml.safe_load((repo / "configs" / "demo.yaml").read_text())
    config["model"]["name_or_path"] = str(tiny_llava_dir)
    config["data"]["path"] = str(data)
    config["output"].update(dir=str(outputs / "road4-run"), report_to="none")
    config["deepspeed"]["config"] = str(repo / "configs" / "deepspeed" / "zero2.json")
    config["train"].update(max_steps=4, save_steps=2, per_device_batch_size=2, verify_final_adapter=False,
                           gradient_checkpointing=False)
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(repo / "scripts" / "train.py"), "--config", str(config_path)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    eval_data = generate_eval_data(root / "eval-data", num_per_benchmark=4)
    evaluate(model=tiny_llava_dir, adapters=[None, outputs / "road4-run"], data_root=eval_data,
             output=outputs / "road4-eval", batch_size=4, max_new_tokens=4, progress=False)
    return outputs

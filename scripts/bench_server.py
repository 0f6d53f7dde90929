#!/usr/bin/env python
"""Load generator for the real server: static vs continuous batching, base-only vs many adapters.

For each batching policy (``--batching``) and each adapter count (``--adapters``; 0 = every request asks for
the bare base), a fresh ``road-vlm serve`` process is started on a loopback port with a tiny LLaVA base and
that many RoAd4 adapters (random, non-identity parameters). The same seeded workload is then replayed against
each server:

- ``--requests`` chat completions with Poisson arrivals at ``--rate`` per second;
- each names a random adapter (or the base), asks a question of 1 to 8 sentences, wants 4 to 128 tokens
  (greedy, so every server generates the same tokens), and a quarter of them send an image (data URL);
- each is streamed (``stream: true``), one client thread per request.

Reported per run (JSON): throughput (completion tokens / seconds from the first arrival to the last answer),
time to first token (first streamed text after sending; p50/p95), inter-token latency (gaps between streamed
pieces; p50/p95), rejected requests (429), and the continuous/static ratios. Everything stays on loopback and is
bounded (request count, per-request timeout, queue size).

    python scripts/bench_server.py                  # 4 servers
    python scripts/bench_server.py --quick          # smoke run (seconds of load per server)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import REPO

SENTENCE = "Describe the image briefly."
MAX_TOKENS = (4, 8, 16, 32, 64, 128)


@dataclass
class Sent:
    """One request of the workload and what the client saw."""

    arrival: float  # seconds after the run started
    model: str
    question: str
    max_tokens: int
    image: bool
    first_piece: float | None = None
    pieces: list[float] = field(default_factory=list)
    done: float | None = None
    completion_tokens: int = 0
    status: int | None = None
    error: str | None = None


def make_workload(args: argparse.Namespace, adapters: int) -> list[Sent]:
    rng = random.Random(args.seed)
    t = 0.0
    workload = []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        model = "base" if adapters == 0 else f"a{rng.randrange(adapters)}"
        workload.append(Sent(arrival=t, model=model, question=" ".join([SENTENCE] * rng.randint(1, 8)),
                             max_tokens=rng.choice(MAX_TOKENS), image=rng.random() < 0.25))
    return workload


def build_assets(workdir: Path, adapters: int, args: argparse.Namespace) -> tuple[Path, dict[str, Path], str]:
    """The base (tiny architecture at ``--hidden-size`` x ``--num-layers``), ``adapters`` RoAd4 adapter
    directories and an image data URL."""
    import torch
    from PIL import Image

    from road_vlm.adapters import AdapterConfig, adapted_layers, add_adapter, delete_adapter, save_adapter
    from road_vlm.data.template import PromptFormat
    from road_vlm.model import load_base
    from road_vlm.demo.tiny_base import build_tiny_llava

    base = build_tiny_llava(workdir / "base", hidden_size=args.hidden_size, num_layers=args.num_layers)
    model, _ = load_base(base)
    dirs = {}
    for i in range(adapters):
        name = f"a{i}"
        add_adapter(model, AdapterConfig(variant="road4", group_size=8), name)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in adapted_layers(model).values():
                for param in layer.adapter_parameters(name).values():
                    param.add_(torch.randn(param.shape, generator=generator) * 0.3)
        dirs[name] = save_adapter(model, workdir / "adapters" / name, name)
        PromptFormat().save(dirs[name])
        delete_adapter(model, name)
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(buffer, format="PNG")
    return base, dirs, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base: Path, adapters: dict[str, Path], batching: str, args: argparse.Namespace,
                 log: Path) -> tuple[Any, str]:
    import httpx

    port = _free_port()
    command = [sys.executable, "-m", "road_vlm.cli", "serve", "--model", str(base), "--base-name", "base",
               "--port", str(port), "--batching", batching, "--max-batch-size", str(args.max_batch_size),
               "--max-queue", str(args.requests + 1), "--max-tokens", str(max(MAX_TOKENS)), "--max-tokens-cap", str(max(MAX_TOKENS))]
    if adapters:
        command += ["--adapters", *(f"{name}={path}" for name, path in adapters.items())]
    # One torch thread: the client threads share these cores, and the tiny model gains nothing from more.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    with log.open("w") as sink:  # a file, not a pipe: a full pipe would block the server's logging
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not answer /health within 180 s")


def _ask(url: str, sent: Sent, image_url: str, start: float, timeout: float) -> None:
    import httpx

    content: Any = sent.question
    if sent.image:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": sent.question}]
    body = {"model": sent.model, "messages": [{"role": "user", "content": content}], "max_tokens": sent.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as response:
            sent.status = response.status_code
            if response.status_code != 200:
                response.read()
                return
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                now = time.perf_counter() - start
                if chunk.get("usage"):
                    sent.completion_tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    if sent.first_piece is None:
                        sent.first_piece = now
                    sent.pieces.append(now)
        sent.done = time.perf_counter() - start
    except httpx.HTTPError as err:
        sent.error = f"{type(err).__name__}: {err}"


def replay(url: str, workload: list[Sent], image_url: str, timeout: float) -> float:
    """Send every request at its arrival time; returns the run's wall time."""
    start = time.perf_counter()
    threads = []
    for sent in workload:
        delay = sent.arrival - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=_ask, args=(url, sent, image_url, start, timeout), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(timeout)
    return time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarise(workload: list[Sent], wall: float) -> dict[str, Any]:
    ok = [s for s in workload if s.status == 200 and s.done is not None and s.error is None]
    ttft = [s.first_piece - s.arrival for s in ok if s.first_piece is not None]
    gaps = [b - a for s in ok for a, b in zip(s.pieces, s.pieces[1:])]
    tokens = sum(s.completion_tokens for s in ok)
    makespan = max((s.done for s in ok), default=wall) - min(s.arrival for s in workload)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    return {
        "requests": len(workload), "completed": len(ok), "rejected_429": sum(s.status == 429 for s in workload),
        "errors": sorted({s.error or f"HTTP {s.status}" for s in workload if s not in ok})[:5],
        "completion_tokens": tokens, "seconds": round(makespan, 2),
        "tokens_per_s": round(tokens / makespan, 1) if makespan > 0 else None,
        "ttft_ms_p50": ms(_percentile(ttft, 50)), "ttft_ms_p95": ms(_percentile(ttft, 95)),
        "itl_ms_p50": ms(_percentile(gaps, 50)), "itl_ms_p95": ms(_percentile(gaps, 95)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 32], help="adapter counts (0 = base only)")
    parser.add_argument("--batching", nargs="+", default=["static", "continuous"], choices=["static", "continuous"])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--rate", type=float, default=5.0, help="mean arrivals per second (Poisson)")
    parser.add_argument("--hidden-size", type=int, default=384,
                        help="language model width: large enough that a decode step costs more than HTTP handling")
    parser.add_argument("--num-layers", type=int, default=6, help="language model layers")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 12 requests, adapters 0 and 4, the 64-wide 2-layer tiny model")
    parser.add_argument("--output", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.adapters, args.hidden_size, args.num_layers = 12, [0, 4], 64, 2
    if args.requests < 1 or args.rate <= 0 or args.max_batch_size < 1 or min(args.adapters) < 0:
        parser.error("--requests, --rate and --max-batch-size must be positive, --adapters non-negative")

    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base, all_adapters, image_url = build_assets(Path(tmp), max(args.adapters), args)
        for adapters in args.adapters:
            served = {name: path for name, path in all_adapters.items() if int(name[1:]) < adapters}
            for batching in args.batching:
                workload = make_workload(args, adapters)
                process, url = start_server(base, served, batching, args, Path(tmp) / "server.log")
                try:
                    replay(url, workload[:2], image_url, args.timeout)  # warm-up: first-call costs out of the run
                    workload = make_workload(args, adapters)
                    wall = replay(url, workload, image_url, args.timeout)
                finally:
                    process.terminate()
                    process.wait(30)
                key = f"{batching}-{'base' if adapters == 0 else f'{adapters}_adapters'}"
                runs[key] = summarise(workload, wall)
                print(f"{key}: {json.dumps(runs[key])}", file=sys.stderr, flush=True)

    ratios = {}
    for adapters in args.adapters:
        suffix = "base" if adapters == 0 else f"{adapters}_adapters"
        static, continuous = runs.get(f"static-{suffix}"), runs.get(f"continuous-{suffix}")
        if static and continuous and static["ttft_ms_p95"] and static["tokens_per_s"]:
            ratios[suffix] = {
                "ttft_p95_continuous_over_static": round(continuous["ttft_ms_p95"] / static["ttft_ms_p95"], 3),
                "throughput_continuous_over_static": round(continuous["tokens_per_s"] / static["tokens_per_s"], 3),
            }
    import torch

    report = {
        "setup": {"model": f"tiny LLaVA architecture (road_vlm.demo.tiny_base), hidden {args.hidden_size}, {args.num_layers} "
                           "layers, fp32, CPU, 1 torch thread in the server",
                  "requests": args.requests, "rate_per_s": args.rate, "max_batch_size": args.max_batch_size,
                  "max_tokens_choices": list(MAX_TOKENS), "image_share": 0.25, "seed": args.seed,
                  "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "runs": runs,
        "continuous_vs_static": ratios,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every benchmark script's quick mode runs (smoke: no timing assertions), so none can rot. bench_adapters,
bench_train and bench_serving run through scripts/gpu_check.sh --dry-run (tests/test_gpu_check.py), bench_compose in
tests/test_bench_compose.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(*args: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    return json.loads(out[out.index("{"):])  # DeepSpeed may print a line before the report


def test_bench_memory_quick_reports_every_zero_stage_and_the_estimates():
    report = _run("scripts/bench_memory.py", "--quick")
    assert set(report["runs"]) == {"zero2", "zero3", "zero3_offload"}
    assert not any("error" in run for run in report["runs"].values()), report["runs"]
    assert report["runs"]["zero3"]["base_partitioned_at_load"] and not report["runs"]["zero2"]["base_partitioned_at_load"]
    estimate = report["estimate_8_gpus_road4"]["llava-1.5-13b"]
    assert estimate["zero3_gib"] < estimate["zero2_gib"]


def test_bench_numerics_quick_compares_dtypes_and_batch_sizes():
    report = _run("scripts/bench_numerics.py", "--num-per-benchmark", "2", "--dtypes", "float32", "bfloat16",
                  "--batch-sizes", "1", "2", "--max-new-tokens", "3")
    assert set(report["runs"]) == {"float32-b1", "float32-b2", "bfloat16-b1", "bfloat16-b2"}
    total = report["runs"]["float32-b1"]["identical_to_reference"].split("/")[1]
    assert report["runs"]["float32-b1"]["identical_to_reference"] == f"{total}/{total}"


def test_repro_strided_linear_quick_runs_standalone():
    report = _run("scripts/repro_strided_linear.py", "--quick")
    assert {(r["dtype"], r["requires_grad"], r["input"]) for r in report["rows"]} == {
        (d, g, i) for d in ("bfloat16", "float32") for g in (True, False) for i in ("strided", "contiguous")}


def test_bench_server_quick_drives_real_servers_with_both_batching_policies():
    report = _run("scripts/bench_server.py", "--quick")
    assert set(report["runs"]) == {f"{p}-{a}" for p in ("static", "continuous") for a in ("base", "4_adapters")}
    for key, run in report["runs"].items():
        assert run["completed"] == run["requests"] and not run["errors"], key
        assert run["ttft_ms_p95"] is not None and run["tokens_per_s"] > 0, key
    # Greedy and the same seeded workload: both policies generate exactly the same tokens.
    for adapters in ("base", "4_adapters"):
        assert (report["runs"][f"static-{adapters}"]["completion_tokens"]
                == report["runs"][f"continuous-{adapters}"]["completion_tokens"])


def test_bench_adapter_switch_quick_reports_the_cost_of_a_row_set_change():
    report = _run("scripts/bench_adapter_switch.py", "--quick")
    assert report["adapted_layers"] == 4 * 7 and report["adapters_in_batch"] == 2
    assert report["enter_exit_ms"] > 0 and report["forward_ms"] > 0


def test_single_gpu_estimate_ranks_the_bases_and_finds_a_micro_batch_for_13b_nf4():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "scripts" / "bench_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {base: bench.single_gpu_estimate("llava-1.5-13b", base, micro_batch=16) for base in ("bf16", "int8", "nf4")}
    assert rows["nf4"]["model_states_gib"] < rows["int8"]["model_states_gib"] < rows["bf16"]["model_states_gib"]
    assert rows["bf16"]["model_states_gib"] > 24  # 13B's frozen bf16 weights alone overflow a 24 GB card
    assert rows["nf4"]["largest_micro_batch_within_24_gib"] >= 1

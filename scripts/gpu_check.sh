#!/usr/bin/env bash
# One prepared GPU check: everything road_vlm wants measured on a real GPU, in one call with a hard time budget,
# so a short GPU window is never spent on setup. Under 8 minutes on one H100/H200-class GPU.
#
#   bash scripts/gpu_check.sh              # on a GPU machine -> benchmarks/results/<date>-<gpu>.{json,md}
#   bash scripts/gpu_check.sh --dry-run    # any machine: every stage at smoke size on the CPU (CI runs this)
#   make gpu-check                         # the same as the first line
#
# Options: --out DIR (where the report goes; default benchmarks/results, or a temp dir with --dry-run),
#          --budget SECONDS (whole-script limit, default 450). Environment: PYTHON (default python3: on a GPU
#          machine, the interpreter that has CUDA torch). Nothing is downloaded: wheels in .whl/ (if any) are
#          installed offline first, for packages the machine lacks.
#
# Stages (each with its own timeout; a stage that fails or times out is recorded and the next one runs):
#   1. environment   torch / CUDA / GPU facts
#   2. cuda-tests    tests/adapters/test_cuda.py: bf16/fp16 forward+backward, mixed batches, merge, generation
#   3. adapters      scripts/bench_adapters.py at LLaVA-1.5-7B layer shapes (4096x4096, 4096x11008), bf16
#   3b. adapters-graphs  the same forward timings as CUDA-graph replays (no merge; GPU only: skipped by --dry-run)
#   4. train         scripts/bench_train.py --preset 7b with a few layers: step time, memory per method (road4 on a
#                    bf16 base next to road4_nf4, the same adapter on a 4-bit NF4 base; needs bitsandbytes)
#   5. serving       scripts/bench_serving.py --preset 7b with a few layers: tokens/s, 1 and 32 adapters
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT=""
BUDGET=450
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
PYTHON="${PYTHON:-python3}"
START=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    OUT="${OUT:-$WORK/results}"
else
    DEVICE=cuda
    OUT="${OUT:-benchmarks/results}"
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check.sh: no CUDA device visible to $PYTHON (use --dry-run on a CPU machine)" >&2; exit 1; }
fi
mkdir -p "$OUT" "$WORK/stages"

# run_stage NAME TIMEOUT_S COMMAND...: stdout -> stages/NAME.out, stderr -> stages/NAME.err, status -> NAME.status
run_stage() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -le 10 ]; then
        echo "skipped: whole-script budget of ${BUDGET}s spent" >"$WORK/stages/$name.status"
        echo "[gpu_check] $name: skipped (budget spent)"; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    echo "[gpu_check] $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$WORK/stages/$name.out" 2>"$WORK/stages/$name.err"
    local rc=$?
    local secs=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then echo "ok ${secs}s" >"$WORK/stages/$name.status"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "timed out after ${secs}s" >"$WORK/stages/$name.status"
    else echo "failed (exit $rc) after ${secs}s" >"$WORK/stages/$name.status"; fi
    echo "[gpu_check] $name: $(cat "$WORK/stages/$name.status")"
    [ $rc -eq 0 ] || tail -n 15 "$WORK/stages/$name.err" | sed 's/^/    /'
}

run_stage environment 60 "$PYTHON" - <<'EOF'
import json, platform, torch
info = {"torch": torch.__version__, "python": platform.python_version(), "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
for name in ("transformers", "peft", "safetensors", "accelerate", "deepspeed"):
    try:
        info[name] = __import__(name).__version__
    except ImportError:
        info[name] = None
print(json.dumps(info))
EOF

if [ "$DRY_RUN" = 1 ]; then
    run_stage cuda-tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/adapters/test_cuda.py
    run_stage adapters 120 "$PYTHON" scripts/bench_adapters.py --quick --adapters 1,4
    echo "skipped: needs a GPU (CUDA graphs)" >"$WORK/stages/adapters-graphs.status"
    run_stage train 180 "$PYTHON" scripts/bench_train.py --preset tiny --methods road4 road4_nf4 --steps 1 --warmup 0 \
        --batch-size 2 --seq-len 32
    run_stage serving 180 "$PYTHON" scripts/bench_serving.py --preset tiny --adapters 1 2 --batch-size 2 \
        --new-tokens 2 --prompt-len 8 --repeats 1 --systems road_vlm_road4 --profile
else
    run_stage cuda-tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/adapters/test_cuda.py
    run_stage adapters 120 "$PYTHON" scripts/bench_adapters.py --device cuda --dtype bfloat16 --rounds 3
    run_stage adapters-graphs 120 "$PYTHON" scripts/bench_adapters.py --device cuda --dtype bfloat16 --rounds 3 \
        --cuda-graphs --no-merge
    run_stage train 180 "$PYTHON" scripts/bench_train.py --preset 7b --num-layers 4 --steps 3 --warmup 1
    run_stage serving 200 "$PYTHON" scripts/bench_serving.py --preset 7b --num-layers 4 --adapters 1 32 --repeats 2 \
        --profile
fi

"$PYTHON" scripts/gpu_report.py --stages "$WORK/stages" --out "$OUT" --seconds $(($(date +%s) - START)) \
    $([ "$DRY_RUN" = 1 ] && echo --dry-run)

#!/usr/bin/env bash
# Prepared GPU check, under 6 minutes on one H100 (a 350 s budget the steps' timeouts are cut to). Every result row goes to
# $OUT/results.md the moment it is measured (default $OUT: ./gpu_check_out), eager rows first, torch.compile
# last, so a run cut short keeps everything it measured:
#   1. environment: python3, torch, GPU, Triton, and that lightning_ste imports from this checkout (else stop);
#   2. Triton vs eager quantized ReLU on the GPU, bit for bit (bits 1-8, every STE and alpha_grad, ceil and
#      nearest, float32/16/bf16, contiguous and channels_last, level boundaries, NaN/inf): at most 75 s;
#   3. one ReLU site forward + backward: torch.relu, eager formula, Triton (256x64x56x56 float16): 15 s;
#   4. Lightning fit of the ImageNet recipe model (Classifier resnet18) on generated 224x224 data, batch 256,
#      16-mixed, channels_last, cuDNN benchmark: float, A4, W1A4 through the real callbacks, 20 s of steps
#      each: img/s and max_memory_allocated (at most 3 x 45 s);
#   5. torch.profiler top-10 kernel table of A4 steps -> $OUT/profile_A4.txt: 30 s;
#   6. torch.compile rows of benchmarks/bench_resnet18.py (fp32 eager vs W1A4 compiled) in the time left,
#      table -> $OUT/compile.md; skipped when less than 10 s remain, and cut (not failed) at the budget.
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: the same steps on the CPU, tiny sizes (logic check)
#
# Exit status: non-zero when a step fails (later steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
export OUT="${OUT:-$REPO/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package, whatever is installed
export PYTHONWARNINGS=ignore
export PY=python3
DRY=()
BUDGET=350
FIT_SECONDS=20
SLOW=1
if [ "${1:-}" = "--dry-run" ]; then
    DRY=(--dry-run)
    export TRITON_INTERPRET=1  # Triton kernels on CPU tensors
    BUDGET=1200 FIT_SECONDS=3 SLOW=4  # a slow shared CPU: same steps, longer limits
fi
status=0
step() {  # step <timeout seconds> <title> <command...>: run, record the outcome, never stop the script
    local limit=$(($1 * SLOW)) title=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "| $title | skipped: the ${BUDGET} s budget is spent |" | tee -a "$OUT/results.md"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout "$limit" bash -c '"$@"' step "$@"  # bash -c: a step may be an exported function
    local rc=$?
    if [ "$rc" -eq 124 ] && [ "${SOFT:-0}" = 1 ]; then
        echo "| $title | cut at the budget after ${limit} s (not a failure) |" | tee -a "$OUT/results.md"
    elif [ "$rc" -ne 0 ]; then
        status=1
        echo "| $title | FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", timed out after ${limit} s")) |" | tee -a "$OUT/results.md"
    fi
}

{
    echo "# gpu_check $(date -u +%FT%TZ) ${DRY[*]}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} | tee -a "$OUT/results.md"
if ! timeout 60 $PY benchmarks/gpu_check.py env "${DRY[@]}"; then
    echo "environment check failed: not running the rest" | tee -a "$OUT/results.md"
    exit 1
fi
echo "| check | what | result | |" | tee -a "$OUT/results.md"
echo "|---|---|---|---|" | tee -a "$OUT/results.md"
step 75 "Triton vs eager bit-exactness" $PY benchmarks/gpu_check.py exact "${DRY[@]}"
step 15 "ReLU site timing" $PY benchmarks/gpu_check.py relu "${DRY[@]}"
for config in float A4 W1A4; do
    step 45 "Lightning fit $config" $PY benchmarks/gpu_check.py fit --config "$config" --seconds "$FIT_SECONDS" "${DRY[@]}"
done
step 30 "profiler A4" $PY benchmarks/gpu_check.py profile "${DRY[@]}"
# ---- issue 12 (helper D's block): FSDPStrategy 2-step fit, layers built in configure_model, both callbacks.
# Lightning refuses FSDP on the CPU, so this is where it is checked; it runs before the compile rows, which take
# whatever budget is left. benchmarks/fsdp_check.py writes its own row.
step 40 "FSDP fit" $PY benchmarks/fsdp_check.py "${DRY[@]}"
# ---- end of the issue 12 block
compile_rows() {  # bench_resnet18's table (printed at its end) into $OUT/compile.md
    $PY benchmarks/bench_resnet18.py "$@" >"$OUT/compile.md" 2>"$OUT/compile.err"
    local rc=$?
    { echo; echo '```'; cat "$OUT/compile.md"; echo '```'; } | tee -a "$OUT/results.md"
    return $rc
}
export -f compile_rows
if [ ${#DRY[@]} -eq 0 ]; then
    SOFT=1 step 300 "torch.compile rows" compile_rows --device cuda --only "W1A4 compiled" --rounds 2 --steps 5 --warmup 2
else
    SOFT=1 step 75 "torch.compile rows (dry run)" compile_rows --only "A4 compiled" --batch 2 --size 32 --rounds 1 \
        --steps 1 --warmup 1 --threads 1
fi
echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL) in ${SECONDS} s; rows in $OUT/results.md" | tee -a "$OUT/results.md"
exit $status

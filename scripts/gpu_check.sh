#!/usr/bin/env bash
# The checks that need one CUDA GPU, in about 8 minutes; one summary table at the end, exit 1 on any failure.
#
#   1. pytest -m gpu: the mamba_ssm kernels against the PyTorch reference (forward, prefill + step,
#      gradients; tests/test_mixers.py) and fla's Gated DeltaNet kernels (tests/test_gated_deltanet.py).
#      A mamba_ssm test that is skipped (kernels not installed) counts as a failure.
#   2. A short bf16 distill of SmolLM2-135M (its logits stage, from a 50% hybrid converted once) under each
#      accelerate config of recipes/accelerate/ with one process: ddp, fsdp, zero2, zero3. Tokens/s from
#      the stage's summary.json, peak GPU memory from torch.cuda.max_memory_allocated in that process.
#   3. Decode speed at an 8k context, student vs teacher (ssmify eval --tasks speed, bf16).
#
#   scripts/gpu_check.sh [--teacher DIR] [--train FILE] [--out DIR]
#
# Needs: pip install -e '.[gpu,deepspeed]'; the SmolLM2-135M-Instruct folder and a text file (defaults:
# ssmify.assets' cached copies, ~/.cache/ssmify). Each step has its own time limit (STEP_TIMEOUT_* below).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python}
OUT=runs/gpu-check
TEACHER=""
TRAIN=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --teacher) TEACHER=$2; shift 2 ;;
        --train) TRAIN=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
STEP_TIMEOUT_TESTS=120  # the caps add up to 460 s (under 8 minutes); typical runs take less
STEP_TIMEOUT_CONVERT=45
STEP_TIMEOUT_DISTILL=55  # each of the four configs
STEP_TIMEOUT_DECODE=75
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the probe script runs from $OUT

rm -rf "$OUT"
mkdir -p "$OUT"
ROWS=()
FAILED=0
START=$SECONDS

row() {  # row CHECK STATUS DETAIL
    ROWS+=("$(printf '| %-28s | %-4s | %s |' "$1" "$2" "$3")")
    if [[ $2 != ok ]]; then FAILED=1; fi
    echo "[gpu_check $((SECONDS - START))s] $1: $2 $3"
}

last_line() {  # the last non-empty line of a log, for the table
    grep -v '^\s*$' "$1" | tail -n 1 | cut -c 1-110
}

# 0. The GPU and the assets.
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    row "cuda" FAIL "torch sees no CUDA device"
    printf '%s\n' "${ROWS[@]}"
    exit 1
fi
GPU=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))')
if [[ -z $TEACHER ]]; then
    TEACHER=$("$PYTHON" -c 'from ssmify.assets import smollm2_teacher_dir; print(smollm2_teacher_dir())' 2>"$OUT/assets.log")
fi
if [[ -z $TRAIN ]]; then
    TRAIN=$("$PYTHON" -c 'from ssmify.assets import wikipedia_text; print(wikipedia_text()[0])' 2>>"$OUT/assets.log")
fi

# 1. Kernel parity.
timeout "$STEP_TIMEOUT_TESTS" "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider \
    tests/test_mixers.py tests/test_gated_deltanet.py >"$OUT/pytest.log" 2>&1
code=$?
summary=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$OUT/pytest.log" | tail -n 1)
if [[ $code -ne 0 ]]; then
    row "pytest -m gpu" FAIL "exit $code: ${summary:-$(last_line "$OUT/pytest.log")}"
elif grep -q 'SKIPPED.*test_mixers' "$OUT/pytest.log"; then
    row "pytest -m gpu" FAIL "mamba_ssm tests skipped (pip install 'ssmify[gpu]'): $summary"
else
    row "pytest -m gpu" ok "$summary"
fi

# 2. Short bf16 distills, one per accelerate config.
if [[ ! -f $TEACHER/config.json || ! -f $TRAIN ]]; then
    row "distill (all configs)" FAIL "no teacher ($TEACHER) or text ($TRAIN); pass --teacher and --train"
else
    STUDENT=$OUT/student
    if timeout "$STEP_TIMEOUT_CONVERT" "$PYTHON" -m ssmify convert "$TEACHER" --out "$STUDENT" \
        --keep-attention 0.5 >"$OUT/convert.log" 2>&1; then
        cat >"$OUT/recipe.yaml" <<EOF
teacher: $TEACHER
student: {path: $STUDENT}
data: {train: [$TRAIN], validation_fraction: 0.02, seq_len: 1024, cache_dir: $OUT/token-cache}
output_dir: $OUT/distill
teacher_dtype: bfloat16
stages:
  - {name: logits, tokens: 196608, micro_batch_size: 4, global_batch_tokens: 8192, lr: 3.0e-4,
     eval_tokens: 8192, checkpoint_every: 12}
EOF
        cat >"$OUT/distill_probe.py" <<'EOF'
"""`ssmify distill ARGS`, then this process's peak GPU memory into $PEAK_FILE (for gpu_check.sh)."""
import json, os, sys

import torch

from ssmify.cli import main

code = main(["distill", *sys.argv[1:]])
with open(os.environ["PEAK_FILE"], "w") as handle:
    json.dump({"peak_bytes": torch.cuda.max_memory_allocated()}, handle)
sys.exit(code)
EOF
        for config in ddp fsdp zero2 zero3; do
            run=$OUT/distill-$config
            PEAK_FILE=$OUT/peak-$config.json timeout "$STEP_TIMEOUT_DISTILL" "$PYTHON" -m accelerate.commands.launch \
                --config_file "recipes/accelerate/$config.yaml" --num_processes 1 --mixed_precision bf16 \
                "$OUT/distill_probe.py" "$OUT/recipe.yaml" --set "output_dir=$run" >"$OUT/distill-$config.log" 2>&1
            code=$?
            if [[ $code -eq 0 && -f $run/1-logits/summary.json && -f $OUT/peak-$config.json ]]; then
                detail=$("$PYTHON" - "$run/1-logits/summary.json" "$OUT/peak-$config.json" <<'EOF'
import json, sys
summary, peak = (json.load(open(path)) for path in sys.argv[1:])
print(f"{summary['tokens_per_s']:.0f} tok/s (whole stage), peak {peak['peak_bytes'] / 2**30:.2f} GiB, "
      f"val KL {summary['val_loss_first']:.3f} -> {summary['val_loss_last']:.3f}")
EOF
)
                row "distill bf16 $config" ok "$detail"
            else
                row "distill bf16 $config" FAIL "exit $code: $(last_line "$OUT/distill-$config.log")"
            fi
        done
    else
        row "distill (all configs)" FAIL "convert failed: $(last_line "$OUT/convert.log")"
        STUDENT=""
    fi

    # 3. Decode speed at 8k.
    if [[ -n $STUDENT ]]; then
        if timeout "$STEP_TIMEOUT_DECODE" "$PYTHON" -m ssmify eval "$STUDENT" --teacher "$TEACHER" --tasks speed \
            --speed-lengths 8192 --device cuda --dtype bfloat16 --out "$OUT/speed" >"$OUT/speed.log" 2>&1; then
            detail=$("$PYTHON" - "$OUT/speed/report.json" <<'EOF'
import json, sys
point = json.load(open(sys.argv[1]))["speed"]["points"][0]
print(f"student {point['decode_tokens_per_s']:.1f} tok/s, teacher {point['teacher_decode_tokens_per_s']:.1f} "
      f"tok/s ({point['decode_speedup']:.2f}x) at {point['length']}")
EOF
)
            if [[ -n $detail ]]; then row "decode 8k student/teacher" ok "$detail"; else row "decode 8k student/teacher" FAIL "no 8192 point in $OUT/speed/report.json"; fi
        else
            row "decode 8k student/teacher" FAIL "$(last_line "$OUT/speed.log")"
        fi
    fi
fi

echo
echo "gpu_check on $GPU, $((SECONDS - START)) s (logs in $OUT)"
echo "| check                        | ok?  | result |"
echo "|------------------------------|------|--------|"
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"

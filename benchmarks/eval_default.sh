#!/usr/bin/env bash
# `tropd eval` on the embedded default's teacher and on its distilled student: the four-domain table for each,
# written to benchmarks/results/eval_{teacher,student}.{json,md}. Trains the default first if RUN has no checkpoint.
#   bash benchmarks/eval_default.sh [RUN_DIR]      (default RUN_DIR: runs/default)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/default}
[ -f "$RUN/checkpoints/latest" ] || tropd train --run-dir "$RUN"
STUDENT="$RUN/checkpoints/$(cat "$RUN/checkpoints/latest")"
ARGS=(--tasks math,code,if,mcq --n 2 --limit 8 --max-new-tokens 128 --temperature 0.7 --seed 0)
mkdir -p benchmarks/results
tropd eval --model smollm2 "${ARGS[@]}" --json benchmarks/results/eval_teacher.json | tee benchmarks/results/eval_teacher.md
tropd eval --model "$STUDENT" "${ARGS[@]}" --json benchmarks/results/eval_student.json | tee benchmarks/results/eval_student.md

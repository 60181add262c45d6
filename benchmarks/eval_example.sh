#!/usr/bin/env bash
# The README's `tropd eval` example, timed and checked: the default's teacher (SmolLM2-135M-Instruct) on the four
# suites, 8 problems x 2 samples each, answers of at most 128 tokens. These are benchmarks/eval_default.sh's
# settings, so the scores must equal benchmarks/results/eval_teacher.json (CPU runs are deterministic); the
# script says whether they do.
# Measured (2 CPU cores shared with a test job): 5 min 11 s wall; math 77 s, code 93 s, if 78 s, mcq 63 s. The old example (--n 4 --limit 16 --max-new-tokens 256)
# took 263 s for math alone and had not finished code after 9 minutes: about 15 minutes in all.
#   bash benchmarks/eval_example.sh [OUT_JSON]      (default: ${TMPDIR:-/tmp}/tropd_eval_example.json)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${TMPDIR:-/tmp}/tropd_eval_example.json}
start=$(date +%s)
tropd eval --model smollm2 --tasks math,code,if,mcq --n 2 --limit 8 --max-new-tokens 128 --json "$OUT"
echo "wall time: $(( $(date +%s) - start )) s"
python3 - "$OUT" benchmarks/results/eval_teacher.json <<'EOF'
import json, sys

got, ref = (json.load(open(p))["tasks"] for p in sys.argv[1:3])
keys = ("avg@n", "pass@1", "pass@2", "problems", "samples", "mean_response_tokens", "truncation_rate")
diff = [f"{t} {k}: {got.get(t, {}).get(k)} (reference {ref[t][k]})" for t in ref for k in keys
        if got.get(t, {}).get(k) != ref[t][k]]
print("scores equal benchmarks/results/eval_teacher.json" if not diff else
      "differs from benchmarks/results/eval_teacher.json (another torch build or CPU?):\n  " + "\n  ".join(diff))
EOF

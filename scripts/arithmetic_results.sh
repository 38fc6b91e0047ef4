#!/usr/bin/env bash
# Reproduces the table of docs/RESULTS.md: the paper's arithmetic comparison in miniature, on the CPU, from the
# demo's base model (assets/arithmetic_base). Every run uses iteration_train.py's arithmetic defaults (the demo's
# settings: 1-3 digit sums, training questions of 2-3 digits, the same questions, the same step schedule) plus the
# flags of its row; extra flags given to this script (e.g. --n_iters 8) apply to every run. Runs are resumable: rerun
# the script after an interruption.
#
#   bash scripts/arithmetic_results.sh                 # ~50 min on 2 cores (two runs at a time, one core each)
#   OUT=runs/results JOBS=1 bash scripts/arithmetic_results.sh --n_iters 6
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/results}
JOBS=${JOBS:-2}
PY=${PYTHON:-python}
mkdir -p "$OUT"
# Every run's steps follow its kept count (epoch mode: kept * epochs / 40). The gold baselines keep all 900 questions
# (67, 78, 90, 101, 112 steps); STaR with rationalization keeps nearly all of them, so it trains for about as long.
# label | flags
RUNS=(
  "star_rationalize|"
  "star_no_rationalize|--no-rationalize"
  "star_verify|--verify_rationales"
  "direct_gold|--direct --gold"
  "seed_only_gold|--gold"
)

run_one() {
  local label=$1 flags=$2; shift 2
  # one core per run: two single-threaded runs finish sooner than two runs sharing both cores
  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false" \
    $PY iteration_train.py --no-progress --out-dir "$OUT/$label" $flags "$@" > "$OUT/$label.log" 2>&1 \
    && echo "done: $label" || { echo "FAILED: $label (see $OUT/$label.log)"; return 1; }
}

pids=()
for entry in "${RUNS[@]}"; do
  label=${entry%%|*}; flags=${entry#*|}
  run_one "$label" "$flags" "$@" &
  pids+=($!)
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done

$PY scripts/compare_runs.py --base "$OUT/star_rationalize" \
  "STaR, rationalization=$OUT/star_rationalize" \
  "STaR, rationalization, --verify_rationales=$OUT/star_verify" \
  "STaR, no rationalization=$OUT/star_no_rationalize" \
  "direct: gold answers (--direct --gold)=$OUT/direct_gold" \
  "seed-only: gold scratchpads, same questions (--gold)=$OUT/seed_only_gold" \
  | tee "$OUT/comparison.md"
exit $status

#!/usr/bin/env bash
# Makes the demo's base model (assets/arithmetic_base) in three stages of scripts/pretrain_arithmetic_base.py, ~55 min
# on one CPU core.
#   1. from scratch: the scratchpad format, the addition table and a little 2- and 3-digit skill;
#   2. more 2- and 3-digit problems (new ones: another seed) at a lower learning rate: 2-digit sums about half right,
#      3-digit ones at chance (the session-5 base);
#   3. mostly 3-digit problems at lr 1e-3 on a 6,000-step schedule, stopped at step 1,300: there the model has just
#      begun to get 3-digit sums right (between steps 1,000 and 1,500 held-out 3-digit accuracy goes 15% -> 88%), a
#      base in the middle of learning, where STaR has something to improve on every digit count.
# One XLA thread on one pinned core makes the run bit-for-bit reproducible: unpinned, XLA's CPU runtime sees every core
# and reduces some sums in another order (other bits, and stage 3 stops in the middle of a fast change, so other
# accuracies too). PIN="" turns it off.
#
#   bash scripts/make_arithmetic_base.sh                      # writes assets/arithmetic_base
#   OUT=/tmp/base_rerun bash scripts/make_arithmetic_base.sh  # the reproducibility check
#   STAGE2=/tmp/stage2 OUT=/tmp/b bash scripts/make_arithmetic_base.sh  # reuses a stage with a checkpoint (or STAGE1=)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-assets/arithmetic_base}
WORK=$(mktemp -d)
STAGE1=${STAGE1:-$WORK/stage1}
STAGE2=${STAGE2:-$WORK/stage2}
PY=${PYTHON:-python}
if [ -z "${PIN+x}" ]; then PIN=$(command -v taskset >/dev/null && echo "taskset -c 0" || true); fi
export XLA_FLAGS="${XLA_FLAGS:---xla_cpu_multi_thread_eigen=false}"
if [ -f "$STAGE2/meta.json" ]; then
  echo "stage 2: reusing $STAGE2"
else
  if [ -f "$STAGE1/meta.json" ]; then
    echo "stage 1: reusing $STAGE1"
  else
    $PIN $PY scripts/pretrain_arithmetic_base.py --out "$STAGE1"
  fi
  $PIN $PY scripts/pretrain_arithmetic_base.py --init "$STAGE1" --seed 2345 --digits 1,2,3 \
    --n-per-digit 3000,3000,1500 --steps 1000 --lr 1e-3 --warmup 20 --out "$STAGE2"
fi
$PIN $PY scripts/pretrain_arithmetic_base.py --init "$STAGE2" --seed 3456 --digits 1,2,3 --n-per-digit 2000,2000,16000 \
  --n-facts 2000 --steps 1300 --anneal-steps 6000 --lr 1e-3 --warmup 20 --out "$OUT"

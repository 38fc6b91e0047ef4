#!/usr/bin/env bash
# Makes the demo's base model (assets/arithmetic_base) in two stages of scripts/pretrain_arithmetic_base.py, ~35 min
# on one CPU core. Stage 1 learns the scratchpad format, the addition table and a little 2- and 3-digit skill from
# scratch; stage 2 continues it on more 2- and 3-digit problems (new ones: another seed) at a lower learning rate,
# until 2-digit sums are about half right: a base in the middle of learning, where STaR has something to improve.
# One XLA thread on one pinned core makes the run bit-for-bit reproducible: unpinned, XLA's CPU runtime sees every core
# and reduces some sums in another order (same accuracy within a question or two, other bits). PIN="" turns it off.
#
#   bash scripts/make_arithmetic_base.sh                      # writes assets/arithmetic_base
#   OUT=/tmp/base_rerun bash scripts/make_arithmetic_base.sh  # the reproducibility check
#   STAGE1=/tmp/stage1 OUT=/tmp/b bash scripts/make_arithmetic_base.sh  # reuses /tmp/stage1 if it holds a checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-assets/arithmetic_base}
STAGE1=${STAGE1:-$(mktemp -d)/stage1}
PY=${PYTHON:-python}
if [ -z "${PIN+x}" ]; then PIN=$(command -v taskset >/dev/null && echo "taskset -c 0" || true); fi
export XLA_FLAGS="${XLA_FLAGS:---xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1}"
if [ -f "$STAGE1/meta.json" ]; then
  echo "stage 1: reusing $STAGE1"
else
  $PIN $PY scripts/pretrain_arithmetic_base.py --out "$STAGE1"
fi
$PIN $PY scripts/pretrain_arithmetic_base.py --init "$STAGE1" --seed 2345 --digits 1,2,3 --n-per-digit 3000,3000,1500 \
  --steps 1000 --lr 1e-3 --warmup 20 --out "$OUT"

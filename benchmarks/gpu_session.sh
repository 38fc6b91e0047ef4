#!/usr/bin/env bash
# Every GPU check and timing of this project in one call, most important first, each part capped so one hang or
# out-of-memory cannot eat the others' time. Written for the device machine (one H100/H200, jax + torch +
# transformers installed, no dm-haiku/jmp/TensorFlow): carry the dm-haiku and jmp wheels in .whl/ (see
# BENCHMARKS.md). Output: $OUT/gpu_session.log (everything) and the markdown rows on stdout.
#
#   bash benchmarks/gpu_session.sh              # ~8 minutes on an H200
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/gpu_session.log"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
if ! python3 -c "import haiku" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "dm-haiku/jmp wheels missing in .whl/"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
START=$(date +%s)

part() {  # part NAME CAP_SECONDS COMMAND...: runs one part under a time cap, logs its status and seconds
  local name=$1 cap=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name (cap ${cap}s, at +$((t0 - START))s)" | tee -a "$LOG"
  timeout "$cap" "$@" 2>&1 | tee -a "$LOG" | grep -E '^(\||PASS|FAIL|#)'
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import jax, torch, transformers, haiku; print('jax', jax.__version__, jax.devices()[0].device_kind, \
'| torch', torch.__version__, '| transformers', transformers.__version__, '| dm-haiku', haiku.__version__)"
} 2>&1 | tee -a "$LOG"

part "oracle checks on the GPU" 150 python3 benchmarks/gpu_check.py
part "sampling, GPT-J-6B shapes, ours vs HF" 270 python3 benchmarks/sample.py --gpu --repeats 2
part "training 1.4B, ours, cudnn + remat dots" 120 python3 benchmarks/train.py --gpu
part "training 1.4B, HF baseline" 100 python3 benchmarks/train.py --gpu --hf --remat none
part "training 1.4B, ours, cudnn, no remat" 100 python3 benchmarks/train.py --gpu --remat none
part "training 1.4B, ours, xla attention + remat dots" 100 python3 benchmarks/train.py --gpu --attention xla
part "sampling with a shared 600-token prefix, batch 64, ours only" 100 \
  python3 benchmarks/sample.py --gpu --batch 64 --prefix-len 600 --prompt-len 150 --skip-hf --repeats 2
echo "=== total $(( $(date +%s) - START ))s" | tee -a "$LOG"

#!/usr/bin/env bash
# The GPU benchmarks of issue 8 in one script (~8 minutes on an H100), for a lent single-GPU
# machine that has JAX, Flax, optax and PyTorch but no internet: the pinned flax/optax/ml_collections
# travel as wheels in .whl/ (see benchmarks/RESULTS.md for how they were fetched). Logs go to $OUT
# (default /tmp/out).
#
#   bash benchmarks/gpu.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # JAX and PyTorch share the card in one process
LOG="$OUT/gpu.log"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$LOG"
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, 'torch', torch.__version__, jax.devices())" 2>&1 | tee -a "$LOG"
B=benchmarks/train_bench.py
run() { echo "=== $*" | tee -a "$LOG"; timeout "${LIMIT:-240}" python3 "$@" 2>&1 | grep -v "^W0\|^I0\|Warning" | tee -a "$LOG"; }
# segjax's CPU XLA flags on this machine's jaxlib (an unknown flag value would abort at start-up)
echo "=== CPU flags" | tee -a "$LOG"
JAX_PLATFORMS=cpu python3 -c "import os, segjax, jax; print(os.environ.get('XLA_FLAGS')); \
print('cpu ok', float(jax.numpy.ones(4).sum()))" 2>&1 | tee -a "$LOG"
# The targets: bf16 against AMP + channels_last + torch.compile at 512^2 (batch 16, and
# 32: the target allows any batch >= 16) and 256^2, MFU against the measured peak; then float32
LIMIT=240 run $B --size 512 --batch 16 --dtype bfloat16 --compile --no_eager --peak --steps 20 --pipelined 20 \
  --json "$OUT/train.jsonl"
LIMIT=200 run $B --size 512 --batch 32 --dtype bfloat16 --compile --no_eager --peak --steps 15 --pipelined 10 \
  --json "$OUT/train.jsonl"
LIMIT=150 run $B --size 256 --batch 32 --dtype bfloat16 --compile --no_eager --steps 20 --pipelined 20 \
  --json "$OUT/train.jsonl"
LIMIT=120 run $B --size 512 --batch 16 --dtype float32 --steps 15 --json "$OUT/train.jsonl"
echo "=== summary" | tee -a "$LOG"
grep -h "^===\|cpu ok\|^forward FLOPs\|^segjax\|^torch\|^pipelined\|speedup" "$LOG"

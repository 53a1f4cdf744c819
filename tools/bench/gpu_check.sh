#!/usr/bin/env bash
# The GPU check of issue 14 in one script: the CUDA tests, then the training-throughput
# benchmark (ours against the plain PyTorch reference) at 0.1B and 0.4B in bf16 at sequence
# length 4096. Figures go to $OUT (default ./gpu_check): one JSON per benchmark and log.txt.
#
#   bash tools/bench/gpu_check.sh           # on a GPU machine (CUDA PyTorch image)
#   bash tools/bench/gpu_check.sh --cpu     # the same steps on a CPU with tiny sizes
#
# What the GPU image lacks (deepspeed, megatron-core, pydantic and its core) is installed
# from the wheels in $WHEELS (default .whl/, Python 3.12 wheels) into /tmp/site; the
# training path needs neither ray nor mlflow.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_check}; WHEELS=${WHEELS:-.whl}; PY=${PY:-python3}
mkdir -p "$OUT"; LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 SPARSITY_SCALING_CACHE=${SPARSITY_SCALING_CACHE:-/tmp/gpu_check_cache}
if ! $PY -c "import deepspeed, megatron.core, pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME COMMAND...: run it, keep its output, log its status and tail
  local name=$1; shift; local start=$SECONDS
  "$@" > "$OUT/$name.out" 2>&1; local rc=$?
  { echo "=== $name: exit $rc, $((SECONDS - start)) s"; grep -v "Warning\|warn(" "$OUT/$name.out" | tail -n "${TAIL:-12}"; } | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU";
  $PY -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1; } | tee "$LOG"
bench() { step "$1" $PY tools/bench/train_throughput.py "${@:2}" --json "$OUT/$1.json"; }

if [ "${1:-}" = "--cpu" ]; then
  TAIL=3 step cuda_tests $PY -m pytest -q tests/test_cuda.py
  bench throughput_tiny configs/models/tiny.yaml --steps 5 --warmup 2
else
  TAIL=20 step cuda_tests $PY -m pytest -q -x tests/test_cuda.py
  # one GPU: a global batch of 8 sequences of 4096 tokens, micro-batches sized to fit 80 GB
  bench throughput_0.1b configs/models/0.1b.yaml --steps 10 --warmup 3 \
    --set train.batch_tokens=32768 --set train.micro_batch_size=4
  bench throughput_0.4b configs/models/0.4b.yaml --steps 10 --warmup 3 \
    --set train.batch_tokens=32768 --set train.micro_batch_size=2
  # does the 1.2B config's micro-batch (4 x 4096) fit one GPU? (peak memory, or an OOM)
  bench throughput_1.2b configs/models/1.2b.yaml --steps 3 --warmup 1 --set train.batch_tokens=16384
fi

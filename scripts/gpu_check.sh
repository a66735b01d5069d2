#!/usr/bin/env bash
# `make gpu-check`: the project's checks that need a GPU, with the figures written to OUT_DIR
# (default docs/gpu/). On a machine without CUDA it says so and exits 0.
#   1. the device-parametrised tests on cuda (tests/test_devices.py and friends: `-k cuda`)
#   2. both models compiled end to end (Predictor(compile=True): encode + decode(K) as CUDA graphs,
#      one timing, not composed), fp32 and bf16, K = 256, batch 1: every dtype, batch size and K
#      compiles graphs of its own, most of this step's time, so only the README table's figure
#      (GPU_CHECK_COMPILED_ARGS widens it)
#   3. spd bench --device cuda, fp32 and bf16 in one run, eager: K from 1 to 4096, images/s at batch 1
#      and 8, the training step at batch 1 and 6 (416x544, K = 256), cast counts
#   4. 50 bf16 training steps of the full v15 preset at 416x544 on synthetic 480x640 rooms,
#      with torchrun on every visible GPU
# Uses .venv/bin/python when it exists, else python3 (a GPU image with torch preinstalled).
# Each step runs under its own time limit (seconds: GPU_CHECK_LIMITS="tests compiled eager train",
# default fits one 10-minute lease call), so a slow step costs its own figures, not the others'.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-docs/gpu}"
PY="${GPU_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: no CUDA device present on this machine; nothing to check (run it on a GPU machine)."
  exit 0
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"
GPUS="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
status=0
step_done() {  # $1: the step's exit status (124: its time limit)
  [ "$1" -eq 124 ] && echo "gpu-check: this step hit its time limit (GPU_CHECK_LIMITS)"
  [ "$1" -eq 0 ] || status=1
}
read -r LIMIT_TESTS LIMIT_COMPILED LIMIT_EAGER LIMIT_TRAIN <<<"${GPU_CHECK_LIMITS:-100 220 170 70}"
COMPILED_ARGS="${GPU_CHECK_COMPILED_ARGS:---k 256 --batch 1}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT_DIR/gpu.txt"

echo "== 1. cuda tests"
timeout "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/test_devices.py 2>&1 | tee "$OUT_DIR/tests_cuda.log" | tail -15
step_done "${PIPESTATUS[0]}"

echo "== 2. bench, both models compiled end to end (CUDA graphs)"
timeout "$LIMIT_COMPILED" "$PY" -m spd.cli bench --device cuda --dtype fp32,bf16 $COMPILED_ARGS --repeat 20 --compile \
  --no-train-step --json "$OUT_DIR/bench_cuda_compiled.json" --plot "$OUT_DIR/bench_cuda_compiled.png" 2>&1 \
  | grep -v Warning | tee "$OUT_DIR/bench_cuda_compiled.txt"
step_done "${PIPESTATUS[0]}"

echo "== 3. bench, eager"
timeout "$LIMIT_EAGER" "$PY" -m spd.cli bench --device cuda --dtype fp32,bf16 --k 1,16,64,256,1024,4096 --repeat 20 --batch 1,8 \
  --train-batch 1,6 --json "$OUT_DIR/bench_cuda.json" --plot "$OUT_DIR/bench_cuda.png" 2>&1 \
  | grep -v Warning | tee "$OUT_DIR/bench_cuda.txt"
step_done "${PIPESTATUS[0]}"

echo "== 4. 50-step bf16 training of v15 at 416x544, $GPUS GPU(s)"
"$PY" -m spd.cli synth --out "$WORK/synth" --n-train 320 --n-test 8 --size 480x640 --holes --workers 16 >/dev/null || status=1
start=$(date +%s)
timeout "$LIMIT_TRAIN" "$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m spd.cli train --config v15_nyu \
  --data-root "$WORK/synth" --out "$WORK/run" --max-steps 50 --set amp=bf16 --set log_every=10 \
  --set eval.limit=8 --set eval.every_steps=0 --set data.workers=6 --set ckpt_every=1000 2>&1 | grep -v Warning | tail -5
step_done "${PIPESTATUS[0]}"
echo "wall seconds (incl. start-up and final eval): $(( $(date +%s) - start ))" | tee "$OUT_DIR/train_v15_bf16.txt"
cp "$WORK/run/metrics.jsonl" "$OUT_DIR/train_v15_bf16_metrics.jsonl" 2>/dev/null || status=1
echo "gpu-check: figures in $OUT_DIR (status $status)"
exit $status

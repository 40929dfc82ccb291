#!/usr/bin/env bash
# One call on a CUDA machine: environment, model-side tests on CUDA (float32 and bfloat16), executor parity
# without pytest (float32/bfloat16/float16, tiny models and the default model), then `drllm bench` in
# bfloat16 and float32 — and one summary table at the end. Every stage runs even if an earlier one failed;
# everything is tee'd to $OUT/gpu_check.log (OUT defaults to ./gpu_check_out). Needs only python3 with torch
# and transformers (no network, no server packages; pytest and hypothesis are used when present).
# Budget: under 4 minutes in all (the stages' timeouts add up to 240 s).
#
#   OUT=/some/dir bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
PY=${PYTHON:-python3}
MODEL=${MODEL:-weights/base/SmolLM2-135M-Instruct}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu only to try the script itself
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1  # unbuffered: a stage killed by its timeout
# still leaves what it printed
SUMMARY=()
T_START=$(date +%s)

stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo -e "\n===== $name (limit ${limit}s) =====" | tee -a "$LOG"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG" "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status="TIMEOUT"
  [ "$rc" != 0 ] && [ "$status" = ok ] && status="FAIL (rc $rc)"
  SUMMARY+=("$(printf '%-28s %-14s %5ss' "$name" "$status" "$dt")")
}

have() { $PY -c "import $1" >/dev/null 2>&1; }

stage env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY - <<'EOF'
import platform, torch, transformers
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__)
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA',
      'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())
for m in ('pytest', 'hypothesis', 'fastapi'):
    try:
        __import__(m); print(m, 'present')
    except ImportError:
        print(m, 'absent')
EOF
ls -la $MODEL 2>&1 | head -5"

# model-side tests on CUDA: no server packages needed (test_routers needs hypothesis)
TESTS="tests/test_executor.py tests/test_fast_paths.py"
have hypothesis && TESTS="$TESTS tests/test_routers.py"
if have pytest; then
  stage pytest-$DEVICE-float32 60 env DRLLM_TEST_DEVICE=$DEVICE DRLLM_TEST_DTYPE=float32 \
    $PY -m pytest -p no:cacheprovider -x $TESTS
  stage pytest-$DEVICE-bfloat16 40 env DRLLM_TEST_DEVICE=$DEVICE DRLLM_TEST_DTYPE=bfloat16 \
    $PY -m pytest -p no:cacheprovider tests/test_executor.py tests/test_fast_paths.py
else
  SUMMARY+=("$(printf '%-28s %-14s' pytest 'absent: skipped')")
fi

stage parity-$DEVICE 45 $PY bench/gpu_parity.py --device $DEVICE --dtypes float32 bfloat16 float16 --default-model "$MODEL"

stage bench-bfloat16 45 $PY -c "from cli.main import main; raise SystemExit(main(['bench', '--model', '$MODEL',
  '--device', '$DEVICE', '--dtype', 'bfloat16', '--batch', '1', '8', '32', '--rounds', '3', '--new-tokens', '32']))"

stage bench-float32 30 $PY -c "from cli.main import main; raise SystemExit(main(['bench', '--model', '$MODEL',
  '--device', '$DEVICE', '--dtype', 'float32', '--batch', '1', '8', '--rounds', '2', '--new-tokens', '32']))"

{
  echo -e "\n===== summary ($(( $(date +%s) - T_START ))s in all) ====="
  grep -m1 "^device" "$OUT/env.txt" 2>/dev/null
  printf '%-28s %-14s %6s\n' stage status time
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  echo
  grep -h "^parity:" "$OUT"/parity-$DEVICE.txt 2>/dev/null
  grep -h -E "passed|failed" "$OUT"/pytest-*.txt 2>/dev/null | tail -n 2
  for f in "$OUT"/bench-*.txt; do
    [ -f "$f" ] || continue
    echo "--- $(basename "$f" .txt)"
    grep -E "^(batch|config|transformers generate|executor|router overhead)" "$f"
  done
} | tee -a "$LOG"

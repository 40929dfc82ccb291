#!/usr/bin/env bash
# The shipped routers' whole offline pipeline on one CUDA GPU, in one call: MCTS search batched across
# examples (hundreds of plans of different examples per forward), router training, calibration of the
# guard and the budget rule, and evaluation on dev data. Every stage resumes where it stopped and writes
# under $RUN. The same commands run on a CPU (DRLLM_DEVICE=cpu), only slower.
#
#   scripts/gpu_pipeline.sh RUN_DIR [ARC_DIR]
#
# Env: DRLLM (the drllm command; default `.venv/bin/drllm`, or `python3 -m cli`), SIMS (plan
# evaluations per example, default 48), ROWS (executor rows per forward, default 1024), GROUP (examples
# searched in lockstep, default 512), STAGES (default "search train calibrate eval"), VARIANTS (router
# training variants, default "cw": effective-number class weights; "uniform": uniform ones), METHOD (the
# search: "mcts", default, or "static": bisection along ORDER, the static skip order as a comma list or a
# router checkpoint, skipping at most MAX_SKIP blocks, default 8; static searches use no math task data,
# whose full-depth answers are almost all wrong), ARC_SETS (default "Easy Challenge"), MODEL (the base
# model: HF directory, .gguf file, hub id or "default"), THREADS (CPU threads, default 8 on CUDA, else
# the cores). The first stage that fails stops the pipeline with its exit status.
# Measured on one H200 (float32 with TF32 matmuls): the search of 6,787 examples x 40 plan evaluations
# took 287 s (947 plan evaluations/s, 42 s per 1,000 examples).
set -euo pipefail
RUN=${1:?usage: gpu_pipeline.sh RUN_DIR [ARC_DIR]}
ARC=${2:-../shared/data/arc}
DRLLM=${DRLLM:-.venv/bin/drllm}
DEV=${DRLLM_DEVICE:-cuda}
SIMS=${SIMS:-48}
ROWS=${ROWS:-1024}
GROUP=${GROUP:-512}
STAGES=${STAGES:-search train calibrate eval}
VARIANTS=${VARIANTS:-cw}
METHOD=${METHOD:-mcts}
MAX_SKIP=${MAX_SKIP:-8}
ARC_SETS=${ARC_SETS:-Easy Challenge}
MATH_TRAIN="math:levels=1-5,n=200,split=train,seed=0"
MATH_FID="math:levels=1-5,n=60,split=train,seed=0"
MODEL=${MODEL:-default}
if [ "$DEV" = cpu ]; then THREADS=${THREADS:-$(nproc)}; else THREADS=${THREADS:-8}; fi
COMMON=(--model "$MODEL" --device "$DEV" --dtype float32 --threads "$THREADS")
mkdir -p "$RUN"
stamp() { echo "[$(date +%H:%M:%S)] $*"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

ARC_TRAIN=()
for s in $ARC_SETS; do ARC_TRAIN+=(--data "arc:$ARC/ARC-$s-Train.jsonl"); done
SEARCH=(--simulations "$SIMS" --data "$MATH_TRAIN")
ORDER_ARGS=(--order-from "$RUN/search.jsonl")
if [ "$METHOD" = static ]; then
  SEARCH=(--method static --order "${ORDER:?METHOD=static needs ORDER}" --max-skip "$MAX_SKIP")
  ORDER_ARGS=(--order "$ORDER")
fi

if has search; then
  stamp "search ($METHOD): ARC $ARC_SETS train, fidelity prompts (train split)"
  $DRLLM search "${COMMON[@]}" "${ARC_TRAIN[@]}" "${SEARCH[@]}" \
    --fidelity everyday --fidelity "arc:$ARC/ARC-Easy-Train.jsonl" --fidelity "$MATH_FID" \
    --split train --rows "$ROWS" --group "$GROUP" --gen-batch 256 \
    --answers "$RUN/answers.jsonl" --out "$RUN/search.jsonl"
  $DRLLM search-summary "$RUN/search.jsonl" > "$RUN/search_summary.json"
  stamp "search done: $(wc -l < "$RUN/search.jsonl") records"
fi
for V in $VARIANTS; do
  CK="$RUN/routers-$V"
  if has train; then
    beta=0.999; [ "$V" = uniform ] && beta=0
    stamp "train $V"
    $DRLLM train "${COMMON[@]}" --search "$RUN/search.jsonl" --beta "$beta" --epochs 5 --batch-size 256 --lr 3e-3 \
      --out "$CK" --default
  fi
  if has calibrate; then
    stamp "calibrate $V"
    $DRLLM calibrate "${COMMON[@]}" --routers "$CK" "${ARC_TRAIN[@]}" --fidelity everyday --fidelity "arc:$ARC/ARC-Easy-Train.jsonl" \
      --fidelity "$MATH_FID" --split calib --answers "$RUN/answers-calib.jsonl" --rows "$ROWS" --batch 256 \
      "${ORDER_ARGS[@]}" \
      --gen-batch 256 --threshold 0.4 --threshold 0.5 --threshold 0.6 --threshold 0.7 --threshold 0.8 \
      --threshold 0.9 --threshold 0.95 --write > "$RUN/calibrate-$V.json"
  fi
  if has eval; then
    stamp "eval $V"
    $DRLLM eval "${COMMON[@]}" --routers "$CK" --data "arc:$ARC/ARC-Easy-Dev.jsonl" \
      --data "arc:$ARC/ARC-Challenge-Dev.jsonl" --data "math:levels=1-5,n=40,split=heldout,seed=0" \
      --data "compare:n=200,seed=0" --fidelity everyday --fidelity "arc:$ARC/ARC-Easy-Dev.jsonl" \
      --fidelity "math:levels=1-5,n=20,split=heldout,seed=0" --split heldout \
      --answers "$RUN/answers-heldout.jsonl" --rows "$ROWS" --batch 256 --gen-batch 256 \
      --budget none --budget 0.9 --budget 0.8 --budget 0.6 --out "$RUN/eval-$V" > "$RUN/eval-$V.log"
  fi
done
stamp "pipeline done"

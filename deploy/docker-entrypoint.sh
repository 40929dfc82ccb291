#!/bin/sh
# Container entry point: `drllm serve --host 0.0.0.0`, every other option from its DRLLM_* environment
# variable; arguments given to the container are appended (e.g. `docker run drllm:latest --max-batch-size 32`).
#
# The default base model is baked into the image under DRLLM_BAKED_BASE (/opt/drllm/base). The base-model
# cache DRLLM_BASE_CACHE (/cache/base) is normally a volume -- it keeps the user's converted GGUF models across
# container restarts -- so a symlink to each baked model is placed in it: `--model default` then finds the
# converted model there and never downloads. Existing real directories in the cache are left alone; links
# are refreshed on every start, so they always point into the running image.
set -eu

baked="${DRLLM_BAKED_BASE:-/opt/drllm/base}"
cache="${DRLLM_BASE_CACHE:-/cache/base}"

if [ -d "$baked" ] && [ "$baked" != "$cache" ]; then
    if mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ]; then
        for src in "$baked"/*/; do
            [ -d "$src" ] || continue
            src="${src%/}"
            dst="$cache/$(basename "$src")"
            if [ -L "$dst" ] || [ ! -e "$dst" ]; then
                ln -sfn "$src" "$dst"
            fi
        done
    else
        echo "drllm-entrypoint: warning: $cache is not writable by uid $(id -u); the baked default model" \
             "cannot be linked there (give the volume to uid $(id -u), or use a named volume)" >&2
    fi
fi

exec drllm serve --host "${DRLLM_HOST:-0.0.0.0}" "$@"

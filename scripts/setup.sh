#!/usr/bin/env bash
# Install what is missing: torch 2.13.0 first (CPU wheel on CPU machines), then the rest.
# Usage: bash scripts/setup.sh [requirements file]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -r "${1:-requirements.txt}"

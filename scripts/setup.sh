#!/usr/bin/env bash
# Install what is missing: torch 2.13.0 first (CPU wheel on CPU machines), then the rest.
# With CSSBENCH_INPLACE_ABN=1 also build inplace-abn 1.1.0 (optional compiled norm layers, ~1-2 min).
# Usage: bash scripts/setup.sh [requirements file]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -r "${1:-requirements.txt}"
if [[ ${CSSBENCH_INPLACE_ABN:-} == 1 ]] && ! "$PY" -c "import inplace_abn" 2>/dev/null; then
  # Built against the installed torch, hence no build isolation; setuptools_scm is its build dependency.
  "$PY" -m pip install -q setuptools_scm
  SETUPTOOLS_SCM_PRETEND_VERSION=1.1.0 "$PY" -m pip install -q --no-build-isolation inplace-abn==1.1.0
fi

#!/usr/bin/env bash
# Run first on a new GPU machine (about 8 minutes on one GPU): environment, nccl + DDP, the demo
# through torchrun, training/evaluation/data speed in bf16 and fp16, and the projected wall time of
# VOC 15-1. Prints a table and writes gpu_check.json (--json PATH). --device cpu: small sizes, minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"

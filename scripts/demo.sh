#!/usr/bin/env bash
# The CPU demo: all 6 steps of VOC-like 15-1 (overlapped) on the synthetic shapes set, with a
# small ResNet-18 so it finishes in minutes on a laptop CPU. Installs what is missing first.
#   bash scripts/demo.sh            # fine-tuning (forgets)
#   METHOD=MiB bash scripts/demo.sh # any method; extra flags are passed on to run.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
METHOD=${METHOD:-FT}
exec "${PYTHON:-python3}" run.py --dataset shapes --task 15-1 --overlap --method "$METHOD" --step all \
  --name "demo-${METHOD}" --device cpu $(cat scripts/demo_flags.txt) "$@"

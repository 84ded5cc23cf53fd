#!/usr/bin/env bash
# LSKD on VOC 10-1 overlapped; hyper-parameters and sources in scripts/README.md.
# Step 0 has no LSKD recipe: it trains as PLOP's (lr 0.01, 30 epochs).
source "$(dirname "$0")/../lib.sh"
run_steps voc 10-1 LSKD 24 --overlap --lr 0.01 0.001 --epochs 30 20 "$@"

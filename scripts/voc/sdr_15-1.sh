#!/usr/bin/env bash
# SDR on VOC 15-1 overlapped; hyper-parameters and sources in scripts/README.md.
# No reference script: SDR preset, 30 epochs, MiB's recipe.
source "$(dirname "$0")/../lib.sh"
run_steps voc 15-1 SDR 24 --overlap --lr 0.01 0.001 --epochs 30 "$@"

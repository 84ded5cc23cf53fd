#!/usr/bin/env bash
# LGKD on VOC 19-1 overlapped; hyper-parameters and sources in scripts/README.md.
source "$(dirname "$0")/../lib.sh"
run_steps voc 19-1 LGKD 24 --overlap --lr 0.01 0.001 --epochs 30 "$@"

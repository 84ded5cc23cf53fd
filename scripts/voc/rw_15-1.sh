#!/usr/bin/env bash
# RW on VOC 15-1 overlapped; hyper-parameters and sources in scripts/README.md.
source "$(dirname "$0")/../lib.sh"
run_steps voc 15-1 RW 24 --overlap --lr 0.01 0.001 --epochs 30 "$@"

#!/usr/bin/env bash
# DKD on VOC 10-1 overlapped; hyper-parameters and sources in scripts/README.md.
source "$(dirname "$0")/../lib.sh"
run_steps voc 10-1 DKD 32 --overlap --lr 0.001 0.0001 --epochs 60 "$@"

#!/usr/bin/env bash
# SDR on VOC 19-1 overlapped; hyper-parameters and sources in scripts/README.md.
source "$(dirname "$0")/../lib.sh"
run_steps voc 19-1 SDR 8 --overlap --lr 0.001 0.0001 --epochs 30 "$@"

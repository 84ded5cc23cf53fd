#!/usr/bin/env bash
# MiB on VOC 15-1 overlapped; hyper-parameters and sources in scripts/README.md.
# --loss_kd 100 instead of the preset's 10: the author's 15-1 value (MiB#43).
source "$(dirname "$0")/../lib.sh"
run_steps voc 15-1 MiB 24 --overlap --lr 0.01 0.001 --epochs 30 --loss_kd 100 "$@"

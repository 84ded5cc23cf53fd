#!/usr/bin/env bash
# LSKD on VOC 15-1 overlapped; hyper-parameters and sources in scripts/README.md.
# No published 15-1 flags: the 10-1 README recipe; step 0 as PLOP's.
source "$(dirname "$0")/../lib.sh"
run_steps voc 15-1 LSKD 24 --overlap --lr 0.01 0.001 --epochs 30 20 "$@"

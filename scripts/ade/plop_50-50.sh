#!/usr/bin/env bash
# PLOP on ADE20K 50-50 overlapped; hyper-parameters and sources in scripts/README.md.
source "$(dirname "$0")/../lib.sh"
run_steps ade 50-50 PLOP 24 --overlap --lr 0.01 0.001 --epochs 60 "$@"

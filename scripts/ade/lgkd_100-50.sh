#!/usr/bin/env bash
# LGKD on ADE20K 100-50 overlapped; hyper-parameters and sources in scripts/README.md.
source "$(dirname "$0")/../lib.sh"
run_steps ade 100-50 LGKD 12 --overlap --lr 0.02 0.002 --epochs 60 "$@"

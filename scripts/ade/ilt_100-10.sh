#!/usr/bin/env bash
# ILT on ADE20K 100-10 overlapped; hyper-parameters and sources in scripts/README.md.
source "$(dirname "$0")/../lib.sh"
run_steps ade 100-10 ILT 24 --overlap --lr 0.01 0.001 --epochs 60 "$@"

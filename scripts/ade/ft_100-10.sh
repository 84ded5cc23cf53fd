#!/usr/bin/env bash
# FT on ADE20K 100-10 overlapped; hyper-parameters and sources in scripts/README.md.
source "$(dirname "$0")/../lib.sh"
run_steps ade 100-10 FT 24 --overlap --lr 0.01 0.001 --epochs 60 "$@"

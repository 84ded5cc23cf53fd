#!/usr/bin/env bash
# MiB on ADE20K 100-50 overlapped; hyper-parameters and sources in scripts/README.md.
source "$(dirname "$0")/../lib.sh"
run_steps ade 100-50 MiB 24 --overlap --lr 0.01 0.001 --epochs 60 "$@"

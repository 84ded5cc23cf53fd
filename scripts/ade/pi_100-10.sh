#!/usr/bin/env bash
# PI on ADE20K 100-10 overlapped; hyper-parameters and sources in scripts/README.md.
source "$(dirname "$0")/../lib.sh"
run_steps ade 100-10 PI 24 --overlap --lr 0.01 0.001 --epochs 60 "$@"

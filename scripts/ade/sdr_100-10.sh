#!/usr/bin/env bash
# SDR on ADE20K 100-10 overlapped; hyper-parameters and sources in scripts/README.md.
# No reference script: SDR README values.
source "$(dirname "$0")/../lib.sh"
run_steps ade 100-10 SDR 4 --overlap --lr 0.01 0.001 --epochs 60 "$@"

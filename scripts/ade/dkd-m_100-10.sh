#!/usr/bin/env bash
# DKD-M on ADE20K 100-10 overlapped; hyper-parameters and sources in scripts/README.md.
# The reference warms the lr up over the first 20% of iterations; this runs plain poly.
source "$(dirname "$0")/../lib.sh"
run_steps ade 100-10 DKD-M 24 --overlap --lr 0.0025 0.00025 --epochs 100 "$@"

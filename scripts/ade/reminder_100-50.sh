#!/usr/bin/env bash
# REMINDER on ADE20K 100-50 overlapped; hyper-parameters and sources in scripts/README.md.
# Step 0 as in 100-10 (the reference reuses that model), step 1 at lr 0.0008.
source "$(dirname "$0")/../lib.sh"
run_steps ade 100-50 REMINDER 10 --overlap --lr 0.01 0.0008 --epochs 60 70 "$@"

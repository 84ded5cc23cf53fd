#!/usr/bin/env bash
# Install the test requirements if missing and run the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
exec "${PYTHON:-python3}" -m pytest -q tests "$@"

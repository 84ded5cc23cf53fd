#!/usr/bin/env bash
# Download ADE20K (SceneParsing 150, the MIT scene-parsing benchmark release) into:
#
#   <dest>/ADEChallengeData2016/{images,annotations}/{training,validation}
#
# Usage: bash data/download_ade.sh [DEST]   (DEST defaults to ./data/ade; then pass --data_root DEST)
# Needs about 1 GB of disk; the archive is deleted after extraction.
set -euo pipefail

DEST="${1:-data/ade}"
mkdir -p "$DEST"
cd "$DEST"

URL=http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip
if command -v wget >/dev/null; then wget -c -O ADEChallengeData2016.zip "$URL"
else curl -L -C - -o ADEChallengeData2016.zip "$URL"; fi
unzip -q -o ADEChallengeData2016.zip
rm -f ADEChallengeData2016.zip

echo "ADE20K ready in $(pwd)/ADEChallengeData2016: pass --data_root $(pwd)"

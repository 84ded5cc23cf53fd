#!/usr/bin/env bash
# Download Pascal VOC 2012 with the augmented labels (SBD, 10 582 training images) into the
# devkit layout this project reads:
#
#   <dest>/VOC2012/JPEGImages/*.jpg
#   <dest>/VOC2012/SegmentationClassAug/*.png
#   <dest>/VOC2012/ImageSets/Segmentation/{train_aug,val}.txt
#
# Usage: bash data/download_voc.sh [DEST]   (DEST defaults to ./data/voc; then pass --data_root DEST)
# Needs about 4 GB of disk; the archives are deleted after extraction.
set -euo pipefail

DEST="${1:-data/voc}"
mkdir -p "$DEST"
cd "$DEST"

fetch() {  # url file: resume-friendly download
    if command -v wget >/dev/null; then wget -c -O "$2" "$1"; else curl -L -C - -o "$2" "$1"; fi
}

# 1. The official VOC 2012 train/val release (images, SegmentationClass, ImageSets).
fetch http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar VOCtrainval_11-May-2012.tar
tar -xf VOCtrainval_11-May-2012.tar
rm -rf VOC2012
mv VOCdevkit/VOC2012 VOC2012
rmdir VOCdevkit 2>/dev/null || true

# 2. The augmented labels and the train_aug list, from the same host as MiB's download script.
fetch http://cs.jhu.edu/~cxliu/data/SegmentationClassAug.zip SegmentationClassAug.zip
fetch http://cs.jhu.edu/~cxliu/data/list.zip list.zip
unzip -q -o SegmentationClassAug.zip -d VOC2012
unzip -q -o list.zip
# list/train_aug.txt lines read "/JPEGImages/x.jpg /SegmentationClassAug/x.png": keep the ids.
sed -E 's#^/JPEGImages/([^ ]+)\.jpg.*#\1#' list/train_aug.txt > VOC2012/ImageSets/Segmentation/train_aug.txt
rm -rf list __MACOSX VOC2012/__MACOSX
rm -f VOCtrainval_11-May-2012.tar SegmentationClassAug.zip list.zip

echo "VOC 2012 ready in $(pwd)/VOC2012: pass --data_root $(pwd)"

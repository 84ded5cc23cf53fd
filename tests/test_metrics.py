import math

import torch

from metrics import ConfusionMatrix, incremental_scores, segmentation_scores


def test_confusion_matrix_counts_and_ignores_255():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    m = ConfusionMatrix(3)
    m.update(pred, gt)
    expected = torch.tensor([[1, 1, 0],   # gt 0: pred 0, pred 1
                             [1, 2, 0],   # gt 1: pred 1, 1, 0
                             [1, 0, 1]])  # gt 2: pred 2, 0 (the 255 pixel is skipped)
    assert torch.equal(m.mat, expected)


def test_ious_on_crafted_matrix():
    mat = torch.tensor([[50, 10, 0, 0],
                        [5, 20, 5, 0],
                        [0, 0, 0, 0],    # class 2 absent from the ground truth
                        [0, 0, 10, 30]])
    s = segmentation_scores(mat)
    iou0 = 50 / (60 + 55 - 50)
    iou1 = 20 / (30 + 30 - 20)
    iou3 = 30 / (40 + 30 - 30)
    assert math.isclose(s["class_iou"][0], iou0)
    assert math.isclose(s["class_iou"][1], iou1)
    assert math.isnan(s["class_iou"][2])
    assert math.isclose(s["class_iou"][3], iou3)
    assert math.isclose(s["miou"], (iou0 + iou1 + iou3) / 3)
    assert math.isclose(s["overall_acc"], 100 / 130)


def test_old_new_all_hiou():
    iou = [0.9, 0.8, 0.7, 0.2, float("nan"), 0.4]
    r = incremental_scores(iou, base_classes=[0, 1, 2], later_classes=[3, 4, 5])
    old, new = 0.8, 0.3
    assert math.isclose(r["miou_old"], old)
    assert math.isclose(r["miou_new"], new)
    assert math.isclose(r["miou_all"], (0.9 + 0.8 + 0.7 + 0.2 + 0.4) / 5)
    assert math.isclose(r["hiou"], 2 * old * new / (old + new))


def test_step0_has_no_new():
    r = incremental_scores([0.5, 0.7], [0, 1], [])
    assert math.isclose(r["miou_old"], 0.6) and math.isnan(r["miou_new"]) and math.isnan(r["hiou"])


def test_eval_shards_cover_every_image_once():
    from dataset.loaders import ShardSampler

    size, world = 11, 4  # not a multiple: DistributedSampler would pad and count images twice
    shards = [list(ShardSampler(size, rank, world)) for rank in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(size))
    assert [len(s) for s in shards] == [3, 3, 3, 2]

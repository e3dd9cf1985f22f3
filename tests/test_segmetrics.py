"""ConfusionMatrix: mIoU, mAcc, aAcc against a hand-computed matrix, with ignore pixels and
classes absent from prediction and ground truth (left out of the means, as mmseg)."""

from __future__ import annotations

import math

import pytest
import torch

from stitchops.train.segmetrics import ConfusionMatrix


def test_scores_match_a_hand_computed_matrix():
    # 4 classes; class 3 appears nowhere; 255 is ignored wherever the prediction is.
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    cm = ConfusionMatrix(4)
    cm.update(pred[None], target[None])
    # matrix[t, p]: t0 → p0 1, p1 1; t1 → p1 2; t2 → p2 1, p0 1
    assert cm.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    s = cm.scores()
    iou = [1 / (2 + 2 - 1), 2 / (2 + 3 - 2), 1 / (2 + 1 - 1)]
    assert s["IoU"][:3] == pytest.approx(iou) and math.isnan(s["IoU"][3])
    assert s["mIoU"] == pytest.approx(sum(iou) / 3)
    assert s["Acc"][:3] == pytest.approx([0.5, 1.0, 0.5]) and math.isnan(s["Acc"][3])
    assert s["mAcc"] == pytest.approx(2 / 3)
    assert s["aAcc"] == pytest.approx(4 / 6)


def test_batches_accumulate_and_a_class_only_predicted_counts():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]))
    cm.update(torch.tensor([[2, 0]]), torch.tensor([[0, 0]]))
    s = cm.scores()
    assert cm.matrix[0].tolist() == [3, 0, 1]
    assert s["IoU"][0] == pytest.approx(3 / 4) and s["IoU"][2] == 0.0  # predicted, never true
    assert math.isnan(s["IoU"][1]) and s["mIoU"] == pytest.approx(3 / 8)
    cm.all_reduce()  # no process group: unchanged
    assert cm.matrix[0].tolist() == [3, 0, 1]


def test_bad_labels_are_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"label 7, outside 0\.\.2 and not the ignore index 255"):
        cm.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 7]]))
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    assert cm.matrix.sum() == 0  # nothing counted

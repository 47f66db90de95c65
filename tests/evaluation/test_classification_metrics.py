"""Classification metrics on hand-computed cases: confusion matrix, accuracy, balanced accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from edmcli.evaluation.metrics.classification import (
    accuracy,
    balanced_accuracy,
    classification_metrics,
    confusion_matrix,
)


def test_confusion_matrix_accuracy_balanced_accuracy():
    pred, target = [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]
    np.testing.assert_array_equal(confusion_matrix(pred, target), [[1, 0], [1, 3]])
    assert accuracy(pred, target) == pytest.approx(4 / 5)
    assert balanced_accuracy(pred, target) == pytest.approx((1 / 1 + 3 / 4) / 2)
    # Always answering the majority class: accuracy flatters, balanced accuracy does not.
    assert accuracy([1] * 5, target) == pytest.approx(0.8)
    assert balanced_accuracy([1] * 5, target) == pytest.approx(0.5)
    # A class absent from the ground truth has no recall: only present classes count.
    assert balanced_accuracy([1, 0, 1], [1, 1, 1]) == pytest.approx(2 / 3)
    m = classification_metrics(pred, target)
    assert m["correct"].tolist() == [1, 0, 1, 1, 1] and m["accuracy"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="outside 0..1"):
        accuracy([0, 2], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])

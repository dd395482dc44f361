"""Detection/fuzzing metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from neuroscribe.score.core import auroc, balanced_accuracy, f1_score


def test_auroc_hand_computed() -> None:
    # positives 0.9, 0.4; negatives 0.5, 0.1, 0.4
    # pairs: 0.9 beats all 3; 0.4 beats 0.1, ties 0.4, loses to 0.5 -> (3 + 1 + 0.5) / 6 = 0.75
    assert auroc([0.9, 0.4, 0.5, 0.1, 0.4], [True, True, False, False, False]) == 0.75


def test_auroc_extremes_and_undefined() -> None:
    assert auroc([1, 2], [False, True]) == 1.0
    assert auroc([2, 1], [False, True]) == 0.0
    assert math.isnan(auroc([1, 2], [True, True]))


def test_balanced_accuracy_hand_computed() -> None:
    # labels T T T F ; predicted T F T T -> TPR 2/3, TNR 0/1 -> (2/3 + 0) / 2 = 1/3
    assert balanced_accuracy([True, False, True, True],
                             [True, True, True, False]) == pytest.approx(1 / 3)
    assert math.isnan(balanced_accuracy([True], [True]))


def test_f1_hand_computed() -> None:
    # TP 2, FP 1, FN 1 -> 4 / (4 + 1 + 1) = 2/3
    assert f1_score([True, True, True, False],
                    [True, True, False, True]) == pytest.approx(2 / 3)
    assert f1_score([False, False], [True, True]) == 0.0
    assert math.isnan(f1_score([False], [False]))

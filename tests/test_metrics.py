import math

import pytest
import torch

from lorabooth.evaluation.metrics import (
    cosine_matrix,
    diversity,
    mean_pairwise,
    mean_pairwise_within,
    summarise,
    text_alignment,
)


def test_identical_sets_score_one_and_orthogonal_zero():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert mean_pairwise(x, x) == pytest.approx(1.0)
    assert mean_pairwise(x, torch.tensor([[0.0, 3.0]])) == pytest.approx(0.0)
    assert cosine_matrix(x, -x).tolist() == [[-1.0, -1.0], [-1.0, -1.0]]


def test_leave_one_out_excludes_self_pairs():
    x = torch.eye(3)  # mutually orthogonal: only self-pairs would be 1
    assert mean_pairwise_within(x) == pytest.approx(0.0)
    assert mean_pairwise(x, x) == pytest.approx(1 / 3)  # with self-pairs
    assert math.isnan(mean_pairwise_within(x[:1]))


def test_text_alignment_pairs_row_with_row():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert text_alignment(img, img) == pytest.approx(1.0)
    assert text_alignment(img, img.flip(0)) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        text_alignment(img, img[:1])


def test_diversity():
    same = torch.ones(4, 3)
    assert diversity(same) == pytest.approx(0.0, abs=1e-6)
    assert diversity(torch.eye(4)) == pytest.approx(1.0)


def test_summarise():
    s = summarise([1.0, 3.0, float("nan")])
    assert s == {"mean": 2.0, "std": 1.0, "n": 2}
    assert summarise([])["n"] == 0

"""Query diversity: the cosine measures tell collapsed queries from ignored images."""

import pytest
import torch

from lavis_lite.evaluation.query_diversity import query_similarity


def test_identical_queries_give_cosine_one():
    torch.manual_seed(0)
    per_image = torch.randn(8, 1, 64).expand(8, 4, 64)  # every query of an image says the same
    within, across = query_similarity(per_image)
    assert within == pytest.approx(1.0, abs=1e-5) and abs(across) < 0.3


def test_queries_that_ignore_the_image_give_cosine_one_across_images():
    torch.manual_seed(0)
    per_query = torch.randn(1, 4, 64).expand(8, 4, 64)  # the image does not matter
    within, across = query_similarity(per_query)
    assert across == pytest.approx(1.0, abs=1e-5) and abs(within) < 0.3


def test_orthogonal_queries_give_cosine_zero():
    queries = torch.eye(4)[None].expand(3, 4, 4) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    within, _ = query_similarity(queries)
    assert within == pytest.approx(0.0, abs=1e-6)


def test_cosine_is_the_mean_over_pairs_of_distinct_queries():
    # one image, three queries: cosines (q0, q1) = 1, (q0, q2) = 0, (q1, q2) = 0 -> mean 1/3
    queries = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]]).expand(2, 3, 2)
    within, _ = query_similarity(queries)
    assert within == pytest.approx(1 / 3, abs=1e-6)

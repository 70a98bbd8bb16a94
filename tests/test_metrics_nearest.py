import pytest
import torch

from memsafe.metrics import distance_ratio, memorized_fraction, mq_counts, mq_scores, nearest_neighbours


def test_identical_image_has_ratio_zero_and_is_memorized():
    train = torch.rand(20, 1, 8, 8) * 2 - 1
    samples = train[[3, 7]].clone()
    found = nearest_neighbours(samples, train, k=5)
    assert found.indices[:, 0].tolist() == [3, 7]
    assert found.sq_dists[:, 0].tolist() == [0.0, 0.0]
    ratios = distance_ratio(found)
    assert ratios.tolist() == [0.0, 0.0]
    assert memorized_fraction(ratios) == 1.0
    assert mq_scores(found).tolist() == [0.0, 0.0]


def test_far_image_is_not_memorized():
    train = torch.zeros(10, 4)
    train[:, 0] = torch.arange(10).float()  # points on a line, 1 apart
    far = torch.tensor([[4.5, 30.0, 0.0, 0.0]])  # equidistant-ish from 4 and 5, far from both
    ratio = distance_ratio(nearest_neighbours(far, train, k=2))
    assert ratio.item() == pytest.approx(1.0)
    assert memorized_fraction(ratio) == 0.0


def test_hand_computed_ratio_and_mq():
    train = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    query = torch.tensor([[1.0, 0.0]])  # distances 1, 2, sqrt(26)
    found = nearest_neighbours(query, train, k=3)
    assert found.indices[0].tolist() == [0, 1, 2]
    assert found.sq_dists[0].tolist() == pytest.approx([1.0, 4.0, 26.0])
    assert distance_ratio(found).item() == pytest.approx(0.5)
    assert mq_scores(found, k=3).item() == pytest.approx(1.0 / ((1 + 4 + 26) / 3))
    assert mq_scores(found, k=2).item() == pytest.approx(1.0 / 2.5)
    # 0.5 is above the 1/3 convention, but below a looser threshold.
    assert memorized_fraction(distance_ratio(found)) == 0.0
    assert memorized_fraction(distance_ratio(found), threshold=0.6) == 1.0


def test_chunked_search_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(300, 3, 4, 4, generator=generator)
    samples = torch.randn(70, 3, 4, 4, generator=generator)
    found = nearest_neighbours(samples, train, k=7, query_chunk=16, reference_chunk=37)
    brute = torch.cdist(samples.flatten(1).double(), train.flatten(1).double()).pow(2)
    expected, expected_idx = brute.topk(7, dim=1, largest=False)
    assert torch.allclose(found.sq_dists, expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(found.indices, expected_idx)


def test_mq_counts_follow_thresholds():
    scores = torch.tensor([0.0, 0.1, 0.25, 0.55, 0.95])
    counts = mq_counts(scores)
    assert counts["v_15"] == 2
    assert counts["v_30"] == 3
    assert counts["v_60"] == 4
    assert counts["v_90"] == 4
    assert list(counts) == ["v_15", "v_20", "v_30", "v_40", "v_50", "v_60", "v_70", "v_80", "v_90"]


def test_fewer_than_two_references_is_refused():
    found = nearest_neighbours(torch.zeros(1, 4), torch.ones(1, 4), k=50)
    with pytest.raises(ValueError, match="two reference"):
        distance_ratio(found)

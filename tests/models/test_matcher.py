"""Hungarian matching of queries to segments: optimal on hand-built costs, the cost's sign and terms by hand, equal
to HF transformers' Mask2Former matcher with the same random points."""

from __future__ import annotations

import itertools

import pytest
import torch

from maskworks.models.universal import HungarianMatcher, assign, pairwise_mask_costs


def test_assign_is_optimal_on_hand_built_costs():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = assign(cost)
    best = min(itertools.permutations(range(3)), key=lambda p: sum(cost[i, p[i]] for i in range(3)))
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == list(best) == [1, 0, 2]  # total 5, greedy gives 6
    # more queries than targets: every target matched once, the cheapest queries
    rows, cols = assign(torch.tensor([[5.0, 5.0], [1.0, 9.0], [9.0, 1.0], [0.5, 0.5]]))
    assert sorted(zip(rows.tolist(), cols.tolist())) in ([(1, 0), (2, 1)], [(1, 0), (3, 1)], [(2, 1), (3, 0)])
    assert float(torch.tensor([[5.0, 5.0], [1.0, 9.0], [9.0, 1.0], [0.5, 0.5]])[rows, cols].sum()) == 1.5
    # a NaN cost is matched only when nothing else can be
    rows, cols = assign(torch.tensor([[float("nan"), 1.0], [2.0, 3.0]]))
    assert cols.tolist() == [1, 0]


def test_pairwise_costs_by_hand():
    pred = torch.tensor([[10.0, -10.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bce, dice = pairwise_mask_costs(pred, target)
    assert bce[0, 0] < 1e-4 and bce[0, 1] == pytest.approx(10.0, abs=1e-3)
    assert bce[1, 0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    # dice of the perfect pair: 1 - (2 * 1 + 1) / (1 + 1 + 1) ~ 0; of the swapped pair: 1 - 1 / 3
    assert dice[0, 0] == pytest.approx(0.0, abs=1e-4) and dice[0, 1] == pytest.approx(2 / 3, abs=1e-4)


def test_matcher_prefers_the_likely_class_and_the_right_mask():
    """Two targets; query 2 is the perfect one for target 0, query 0 for target 1 (higher probability of the
    target's class = lower cost)."""
    h = w = 8
    t0 = torch.zeros(h, w)
    t0[:, :4] = 1
    t1 = 1 - t0
    masks = torch.stack([t1, t0 * 0, t0]) * 20 - 10  # logits: query 0 ~ t1, query 1 empty, query 2 ~ t0
    logits = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [5.0, 0.0, 0.0]])  # K = 2 classes + no object
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.stack([t0, t1])}]
    torch.manual_seed(0)
    ((rows, cols),) = HungarianMatcher(num_points=256)(logits[None], masks[None], targets)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}
    # an image without targets matches nothing
    ((rows, cols),) = HungarianMatcher(num_points=16)(
        logits[None], masks[None], [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, h, w)}]
    )
    assert rows.numel() == cols.numel() == 0


def test_equals_hf_mask2former_matcher():
    hf = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    torch.manual_seed(0)
    b, q, k, points = 2, 10, 4, 500
    logits = torch.randn(b, q, k + 1)
    masks = torch.randn(b, q, 12, 16)
    targets = [
        {"labels": torch.tensor([0, 3, 1]), "masks": (torch.rand(3, 48, 64) > 0.5).float()},
        {"labels": torch.tensor([2, 2, 0, 1, 3]), "masks": (torch.rand(5, 48, 64) > 0.5).float()},
    ]
    ref = hf.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=points)
    torch.manual_seed(7)
    expected = ref(masks, logits, [t["masks"] for t in targets], [t["labels"] for t in targets])
    torch.manual_seed(7)
    got = HungarianMatcher(2.0, 5.0, 5.0, num_points=points)(logits, masks, targets)
    for (er, ec), (gr, gc) in zip(expected, got):
        assert torch.equal(er, gr) and torch.equal(ec, gc)


def test_options_are_validated():
    with pytest.raises(ValueError, match="cost_dice"):
        HungarianMatcher(cost_dice=-1)
    with pytest.raises(ValueError, match="all be 0"):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError, match="num_points"):
        HungarianMatcher(num_points=0)
    with pytest.raises(ValueError, match="batch size"):
        HungarianMatcher()(torch.randn(2, 3, 4), torch.randn(2, 3, 8, 8), [{}])

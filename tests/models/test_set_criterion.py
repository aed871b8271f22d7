"""Mask2Former's set loss: equal to HF transformers' Mask2FormerLoss (with auxiliary layers, same random points),
zero for a perfect prediction, the no-object weight by hand, a batch without segments."""

from __future__ import annotations

import math

import pytest
import torch

from maskworks.models.universal import SetCriterion


def _targets(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"labels": torch.tensor([0, 3, 1]), "masks": (torch.rand(3, 40, 48, generator=g) > 0.5).float()},
        {"labels": torch.tensor([2, 0]), "masks": (torch.rand(2, 36, 44, generator=g) > 0.5).float()},
    ]


def test_equals_hf_mask2former_loss_with_auxiliary_layers():
    hf = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    from transformers import Mask2FormerConfig

    k, q, points = 4, 8, 300
    config = Mask2FormerConfig(
        num_labels=k, no_object_weight=0.1, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
        train_num_points=points, oversample_ratio=3.0, importance_sample_ratio=0.75,
    )  # fmt: skip
    ref = hf.Mask2FormerLoss(config, weight_dict={})
    torch.manual_seed(0)
    layers = [(torch.randn(2, q, k + 1), torch.randn(2, q, 10, 12)) for _ in range(3)]
    targets = _targets()
    torch.manual_seed(5)
    expected = ref(
        layers[-1][1], layers[-1][0], [t["masks"] for t in targets], [t["labels"] for t in targets],
        [{"masks_queries_logits": m, "class_queries_logits": c} for c, m in layers[:-1]],
    )  # fmt: skip
    torch.manual_seed(5)
    outputs = {
        "pred_logits": layers[-1][0],
        "pred_masks": layers[-1][1],
        "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in layers[:-1]],
    }
    got = SetCriterion(k, num_points=points)(outputs, targets)
    weights = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    names = {"loss_ce": "loss_cross_entropy", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}
    assert len(got) == 9
    for key, value in got.items():
        base = key[:-2] if key[-2:] in ("_0", "_1") else key
        suffix = key[len(base) :]
        torch.testing.assert_close(value, weights[base] * expected[names[base] + suffix], rtol=1e-5, atol=1e-6)


def test_perfect_prediction_has_zero_loss():
    """Targets on the predictions' canvas (the padded batch), the right class and mask for the matched queries and
    confident no-object for the rest: the class loss vanishes, the point losses are those of bilinear reads across
    mask edges only (none for two half-planes)."""
    import torch.nn.functional as F

    targets = [{**t, "masks": F.pad(t["masks"], (0, 48 - t["masks"].shape[-1], 0, 40 - t["masks"].shape[-2]))}
               for t in _targets()]  # fmt: skip
    q, k = 5, 4
    logits = torch.full((2, q, k + 1), -30.0)
    masks = torch.full((2, q, 40, 48), -30.0)
    logits[:, :, k] = 30.0  # unmatched queries: confidently "no object"
    for b, t in enumerate(targets):
        for j, (label, m) in enumerate(zip(t["labels"], t["masks"])):
            logits[b, j] = -30.0
            logits[b, j, label] = 30.0
            h, w = m.shape
            masks[b, j, :h, :w] = m * 60 - 30
    losses = SetCriterion(k, num_points=500)({"pred_logits": logits, "pred_masks": masks}, targets)
    assert losses["loss_ce"] < 1e-6
    # random 0/1 masks are all edges, where bilinear reads give soft targets against +-30 logits: only the class
    # loss is exactly zero there
    # smooth masks (two half-planes) are read exactly almost everywhere: near-zero mask losses
    half = torch.zeros(40, 48)
    half[:, :24] = 1
    smooth = [{"labels": torch.tensor([1, 2]), "masks": torch.stack([half, 1 - half])}]
    logits1 = torch.full((1, 3, k + 1), -30.0)
    logits1[0, :, k] = 30.0
    logits1[0, 0], logits1[0, 1] = -30.0, -30.0
    logits1[0, 0, 1], logits1[0, 1, 2] = 30.0, 30.0
    masks1 = torch.stack([half * 16 - 8, (1 - half) * 16 - 8, torch.full_like(half, -8.0)])[None]  # unsaturated
    # uniform points (no importance sampling, which seeks out exactly the edge points): only the ~2 % of points
    # within a pixel of the edge read soft targets
    uniform = SetCriterion(k, num_points=2000, oversample_ratio=1.0, importance_sample_ratio=0.0)
    torch.manual_seed(0)
    exact = uniform({"pred_logits": logits1, "pred_masks": masks1}, smooth)
    torch.manual_seed(0)
    random = uniform({"pred_logits": torch.randn_like(logits1), "pred_masks": torch.randn_like(masks1)}, smooth)
    assert exact["loss_ce"] < 1e-6 and exact["loss_dice"] < 0.05 * random["loss_dice"]
    assert exact["loss_mask"] < 0.1 * random["loss_mask"]


def test_no_object_weight_by_hand():
    """One segment of class 0, two queries: query 0 (logits [2, 0, 0], its mask right) is matched, query 1 (uniform
    logits, its mask the complement) is no-object: loss_ce = (CE_0 + 0.1 * CE_1) / (1 + 0.1)."""
    target = torch.zeros(8, 8)
    target[:, :4] = 1
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    masks = torch.stack([target * 20 - 10, (1 - target) * 20 - 10])[None]
    crit = SetCriterion(2, num_points=64, class_weight=1.0)
    losses = crit({"pred_logits": logits, "pred_masks": masks}, [{"labels": torch.tensor([0]), "masks": target[None]}])
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    ce1 = math.log(3)
    assert losses["loss_ce"].item() == pytest.approx((ce0 + 0.1 * ce1) / 1.1, rel=1e-6)


def test_batch_without_segments_and_validation():
    crit = SetCriterion(3, num_points=16)
    logits = torch.randn(1, 4, 4, requires_grad=True)
    masks = torch.randn(1, 4, 8, 8, requires_grad=True)
    losses = crit(
        {"pred_logits": logits, "pred_masks": masks},
        [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)}],
    )
    assert losses["loss_mask"] == 0 and losses["loss_ce"] > 0
    sum(losses.values()).backward()
    assert masks.grad is not None and logits.grad is not None
    with pytest.raises(ValueError, match="no_object_weight"):
        SetCriterion(3, no_object_weight=2.0)
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(0)

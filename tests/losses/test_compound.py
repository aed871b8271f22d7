"""Compound loss specs and deep supervision."""

import pytest
import torch
import torch.nn.functional as F

from maskworks.losses.compound import DeepSupervisionLoss, build_loss, parse_loss_spec


def data(k=3, shape=(2, 8, 6)):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape[0], k, *shape[1:], generator=g, requires_grad=True)
    target = torch.randint(0, k, shape, generator=g)
    target[0, :2] = 255
    return logits, target


def test_parse():
    assert parse_loss_spec("ce+0.5*dice") == [(1.0, "ce"), (0.5, "dice")]
    assert parse_loss_spec(" focal + lovasz ") == [(1.0, "focal"), (1.0, "lovasz")]
    assert parse_loss_spec(["ce", (2, "dice")]) == [(1.0, "ce"), (2.0, "dice")]
    with pytest.raises(ValueError, match="unknown loss 'dicee'"):
        parse_loss_spec("ce+dicee")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_loss_spec("ce+0.5 dice")


def test_weighted_sum_and_class_weights():
    logits, target = data()
    w = torch.tensor([1.0, 2.0, 0.5])
    loss = build_loss("ce+0.5*ce", class_weights=w)
    expected = 1.5 * F.cross_entropy(logits, target, weight=w, ignore_index=255)
    torch.testing.assert_close(loss(logits, target), expected)


def test_deep_supervision_resizes_the_target_nearest():
    logits, target = data(shape=(2, 8, 6))
    aux = torch.randn(2, 3, 4, 3)
    loss = build_loss("ce", aux_weight=0.25)
    small = target[:, ::2, ::2]  # nearest downsampling by 2 picks the top-left pixel of each 2x2 cell
    expected = F.cross_entropy(logits, target, ignore_index=255) + 0.25 * F.cross_entropy(aux, small, ignore_index=255)
    torch.testing.assert_close(loss({"out": logits, "aux": [aux]}, target), expected)
    with pytest.raises(ValueError, match="2 auxiliary outputs but 1"):
        DeepSupervisionLoss(torch.nn.CrossEntropyLoss(ignore_index=255), aux_weights=[0.4])(
            {"out": logits, "aux": [aux, aux]}, target
        )


def test_options_are_checked():
    with pytest.raises(ValueError, match="does not take"):
        build_loss("ce", options={"ce": {"gamma": 2.0}})
    with pytest.raises(ValueError, match="unknown losses"):
        build_loss("ce", options={"nope": {}})


def test_ce_plus_dice_equals_its_parts_and_cli_names_resolve():
    from maskworks.losses import LOSS_NAMES, CrossEntropyLoss, DiceLoss

    logits, target = data()
    w = torch.tensor([1.0, 2.0, 0.5])
    loss = build_loss("ce+0.5*dice", class_weights=w)
    expected = CrossEntropyLoss(weight=w)(logits, target) + 0.5 * DiceLoss(weight=w)(logits, target)
    torch.testing.assert_close(loss(logits, target), expected)
    for name in LOSS_NAMES:  # every short name builds and gives a finite value with ignore pixels present
        if name == "lovasz_hinge":  # binary only: one logit channel, targets 0/1
            value = build_loss(name)(logits[:, :1], torch.where(target == 255, target, target.clamp(max=1)))
        else:
            value = build_loss(name)(logits, target)
        assert torch.isfinite(value), name

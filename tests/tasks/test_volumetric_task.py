"""VolumetricTask: Dice + CE with deep supervision, per-case Dice, mirroring TTA, learning on synthetic volumes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import maskworks
from maskworks.data import SyntheticVolumes, nnunet_augmentation
from maskworks.tasks import VolumetricEvaluator, build_task
from maskworks.tasks.volumetric import DiceCELoss, dice_ce_loss, mirror_tta

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dice_ce_hand_values_and_deep_supervision_weights():
    target = torch.tensor([[[[0, 1], [1, 255]]]])  # (1, D=1, 2, 2), one ignored voxel
    perfect = torch.nn.functional.one_hot(target.clamp(max=1), 2).movedim(-1, 1).float() * 40
    assert dice_ce_loss(perfect, target) < 1e-6
    flat = torch.zeros(1, 2, 1, 2, 2)  # softmax 0.5 everywhere: CE = log 2; Dice(fg) = 2*0.5*2 / (1.5 + 2)
    fg = (2 * 1.0 + 1e-5) / (1.5 + 2 + 1e-5)
    assert dice_ce_loss(flat, target).item() == pytest.approx(math.log(2) + 1 - fg, abs=1e-6)
    loss = DiceCELoss()
    big = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    big[:, :2] = 1
    out = {
        "out": torch.zeros(1, 2, 4, 4, 4, requires_grad=True),
        "aux": [torch.zeros(1, 2, 2, 2, 2, requires_grad=True), torch.zeros(1, 2, 1, 1, 1, requires_grad=True)],
    }
    value = loss(out, big)
    value.backward()
    assert out["aux"][1].grad is None or out["aux"][1].grad.abs().sum() == 0  # the lowest resolution: weight 0
    assert out["aux"][0].grad.abs().sum() > 0
    half = dice_ce_loss(out["out"], big) * (1 / 1.5) + dice_ce_loss(out["aux"][0], big[:, ::2, ::2, ::2]) * (0.5 / 1.5)
    assert value.item() == pytest.approx(half.item(), rel=1e-6)


def test_per_case_dice_skips_absent_classes():
    ev = VolumetricEvaluator(3, class_names=["bg", "a", "b"])
    target = torch.zeros(2, 1, 2, 2, dtype=torch.long)
    target[0, 0, 0, 0] = 1  # case 0: class a, one voxel; no class b anywhere in case 0
    logits = torch.zeros(2, 3, 1, 2, 2)
    logits[0, 1, 0, 0, :] = 5  # predicts a on two voxels: Dice 2*1/(2+1)
    logits[1, 2, 0, 1, 1] = 5  # case 1: predicts b where there is none: Dice 0; a absent in both: skipped
    ev.update(logits, {"mask": target})
    r = ev.compute()
    assert r["dice_per_class"] == pytest.approx([2 / 3, 0.0]) and r["dice"] == pytest.approx(1 / 3)
    assert r["class_names"] == ["a", "b"] and r["cases"] == 2


def test_mirror_tta_is_exact_for_a_flip_equivariant_model_and_averages_otherwise():
    conv = torch.nn.Conv3d(1, 2, 1)
    x = torch.randn(1, 1, 4, 5, 6)
    torch.testing.assert_close(mirror_tta(conv)(x), conv(x))
    ramp = lambda v: v * torch.arange(v.shape[-1], dtype=v.dtype)  # noqa: E731 - not flip-equivariant along W
    expected = (ramp(x) + ramp(x.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(mirror_tta(ramp, axes=(2,))(x), expected)


def test_sliding_window_validation_covers_whole_volumes():
    task = build_task("volumetric", patch_size=(8, 16, 16), num_classes=3)
    model = maskworks.create_model("dynunet", num_classes=3, filters=[4, 4, 8, 8], kernel_size=[3] * 4,
                                   strides=[1, 2, 2, 2]).eval()  # fmt: skip
    with pytest.raises(ValueError, match="pools to a single voxel"):
        maskworks.create_model("dynunet", num_classes=3, filters=[4] * 5).eval()(torch.randn(1, 1, 8, 16, 16))
    sample = SyntheticVolumes(1, size=(12, 20, 28), split="val")[0]
    batch = task.collate([sample])
    logits = task.forward(model, batch)
    assert logits.shape == (1, 3, 12, 20, 28)
    with torch.no_grad():
        torch.testing.assert_close(task.predict_volume(model, batch["image"]), logits)
    [label] = task.postprocess(logits)
    assert label.shape == (12, 20, 28) and label.dtype == np.int64


def test_dynunet_learns_synthetic_volumes():
    """nnU-Net's pipeline at test size: patches with foreground oversampling and augmentation, Dice + CE with deep
    supervision, sliding-window validation; blobs reach a Dice of 0.8."""
    torch.manual_seed(0)
    size = (16, 32, 32)
    train = SyntheticVolumes(16, size=size, num_classes=2, noise_std=0.3,
                             transform=nnunet_augmentation((16, 32, 32)))  # fmt: skip
    val = SyntheticVolumes(3, size=size, num_classes=2, noise_std=0.3, split="val")
    model = maskworks.create_model("dynunet", num_classes=2, filters=[8, 16, 24, 32], deep_supervision=True,
                                   kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2])  # fmt: skip
    task = build_task("volumetric", patch_size=size, num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=True, collate_fn=task.collate)
    model.train()
    for _epoch in range(8):
        for batch in loader:
            loss = task.training_step(model, batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    ev = task.evaluator()
    for i in range(len(val)):
        batch = task.collate([val[i]])
        ev.update(task.forward(model, batch), batch)
    result = ev.compute()
    assert result["dice"] >= 0.8, result

"""Conv-BatchNorm folding: exact on every registered semantic model, and safe where folding would be wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks import create_model
from maskworks.inference import FusionReport, fuse_conv_bn, prepare_for_inference
from maskworks.testing import TINY_SEMANTIC, randomize_norms, semantic_models_to_test

TINY = TINY_SEMANTIC
SEMANTIC = semantic_models_to_test()


def test_every_semantic_model_has_a_tiny_config():
    assert sorted(TINY) == sorted(SEMANTIC)


@pytest.mark.parametrize("name", SEMANTIC)
def test_fused_logits_equal_the_original(name):
    torch.manual_seed(0)
    model = randomize_norms(create_model(name, num_classes=3, **TINY[name]), seed=1, perturb=0.05)
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fused = fuse_conv_bn(model)
    report = fused.conv_bn_fusion
    assert report.num_fused > 0 and report.num_fused + report.num_left == n_norms
    remaining = sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert remaining == report.num_left
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    scale = ref.abs().max()
    # float32 rounding of the folded weights, relative to the largest logit: 1e-5 on Intel, up to 8e-5 on AMD EPYC
    assert (out - ref).abs().max() <= 2e-4 * scale, (name, ((out - ref).abs().max() / scale).item())


def test_original_is_untouched_and_training_mode_is_refused():
    torch.manual_seed(0)
    model = randomize_norms(create_model("unet_vanilla", num_classes=2, features=(8, 16)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fused = fuse_conv_bn(model)
    assert fused is not model and fused.conv_bn_fusion.num_fused == n_norms == 10
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_norms
    assert fuse_conv_bn(model, inplace=True) is model and not any(
        isinstance(m, nn.BatchNorm2d) for m in model.modules()
    )
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_bn(create_model("unet_vanilla", num_classes=2, features=(8, 16)).train())


class StdConv(nn.Conv2d):
    """Weight standardisation: the weight used is computed at run time."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Tricky(nn.Module):
    """Pairs that look fusable by name or position but are not, and one that is only by data flow."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)  # conv1's output also skips ahead
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)  # in-place ReLU in between
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # bn3 normalises conv4's output instead
        self.conv4, self.bn4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # bn4 normalises conv3's output
        self.conv5, self.bn5 = StdConv(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn6 = nn.BatchNorm2d(4)  # before a convolution
        self.conv6 = nn.Conv2d(4, 2, 1)
        self.seq = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU())

    def forward(self, x):
        a = self.conv1(x)
        y = self.bn1(a) + a
        y = self.bn2(F.relu_(self.conv2(y)))
        y = self.bn4(self.conv3(y)) + self.bn3(self.conv4(y))
        y = self.bn6(self.bn5(self.conv5(y)))
        return self.seq(self.conv6(y))


def test_only_true_conv_bn_pairs_are_folded():
    torch.manual_seed(0)
    model = randomize_norms(Tricky(), seed=3)
    fused = fuse_conv_bn(model, torch.randn(1, 3, 16, 16))
    report = fused.conv_bn_fusion
    assert isinstance(report, FusionReport)
    assert report.fused == {"bn3": "conv4", "bn4": "conv3", "seq.1": "seq.0"}
    assert set(report.left) == {"bn1", "bn2", "bn5", "bn6"}
    assert "used elsewhere" in report.left["bn1"]
    assert "not the output of a Conv2d" in report.left["bn2"] and "not the output" in report.left["bn6"]
    assert "StdConv" in report.left["bn5"]
    x = torch.randn(2, 3, 20, 24)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_prepare_for_inference_copies_fuses_and_converts():
    torch.manual_seed(0)
    model = randomize_norms(create_model("unet_vanilla", num_classes=2, features=(8, 16))).train()
    ready = prepare_for_inference(model)
    assert model.training and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original as it was
    assert not ready.training and ready.conv_bn_fusion.num_fused == 10
    conv = next(m for m in ready.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(
            ready(x.contiguous(memory_format=torch.channels_last)), model.eval()(x), atol=1e-5, rtol=1e-5
        )

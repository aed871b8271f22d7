"""FPN: the generic FeaturePyramid neck (torchvision parity) and the smp-compatible FPN model."""

import pytest
import torch
import torch.nn as nn

import maskworks.models.semantic.fpn  # noqa: F401  (registers "fpn")
from maskworks import create_model
from maskworks.convert import load_weights
from maskworks.layers.fpn import FeaturePyramid, FPNDecoder, MergeBlock
from maskworks.models.semantic.fpn import FPN
from maskworks.testing import count_parameters, randomize_norms

smp = pytest.importorskip("segmentation_models_pytorch")

SMP_FPN_RESNET34_PARAMS = 23_155_651  # smp.FPN("resnet34", classes=3)


# --------------------------------------------------------------------------- generic neck
def test_feature_pyramid_shapes():
    chs = (16, 24, 40, 64)
    neck = FeaturePyramid(chs, out_channels=32).eval()
    feats = [torch.randn(2, c, 64 // 2**i, 96 // 2**i) for i, c in enumerate(chs)]
    with torch.no_grad():
        outs = neck(feats)
    assert [o.shape for o in outs] == [(2, 32, 64 // 2**i, 96 // 2**i) for i in range(4)]
    assert len(neck.lateral_convs) == len(neck.output_convs) == 4
    assert [m[0].kernel_size for m in neck.output_convs] == [(3, 3)] * 4


def test_feature_pyramid_odd_sizes_and_top_down_flow():
    neck = FeaturePyramid((8, 8, 8), out_channels=8).eval()
    feats = [torch.randn(1, 8, s, s + 2) for s in (17, 9, 5)]  # non-halving sizes (odd inputs)
    with torch.no_grad():
        outs = neck(feats)
        assert [o.shape[-2:] for o in outs] == [(17, 19), (9, 11), (5, 7)]
        changed = neck([feats[0], feats[1], feats[2] + 1.0])
    # the coarsest map reaches every finer level (top-down), a finer one never reaches a coarser
    assert not torch.allclose(changed[0], outs[0]) and not torch.allclose(changed[1], outs[1])
    with torch.no_grad():
        changed = neck([feats[0] + 1.0, feats[1], feats[2]])
    assert torch.equal(changed[1], outs[1]) and torch.equal(changed[2], outs[2])


def test_feature_pyramid_matches_torchvision():
    tv_ops = pytest.importorskip("torchvision.ops")
    chs = (8, 16, 32, 64)
    ref = tv_ops.FeaturePyramidNetwork(list(chs), 16).eval()
    neck = FeaturePyramid(chs, out_channels=16).eval()
    renamed = {
        k.replace("inner_blocks", "lateral_convs").replace("layer_blocks", "output_convs"): v
        for k, v in ref.state_dict().items()
    }
    neck.load_state_dict(renamed, strict=True)
    feats = [torch.randn(2, c, 48 // 2**i, 40 // 2**i) for i, c in enumerate(chs)]
    with torch.no_grad():
        expected = list(ref({str(i): f for i, f in enumerate(feats)}).values())
        for ours, theirs in zip(neck(feats), expected):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_feature_pyramid_with_norm_and_errors():
    neck = FeaturePyramid((8, 16), out_channels=8, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU)
    assert isinstance(neck.lateral_convs[0][1], nn.BatchNorm2d) and neck.lateral_convs[0][0].bias is None
    assert [o.shape[1] for o in neck([torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)])] == [8, 8]
    with pytest.raises(ValueError, match="in_channels must be a non-empty"):
        FeaturePyramid(())
    with pytest.raises(ValueError, match="upsample_mode"):
        FeaturePyramid((8,), upsample_mode="cubic")
    with pytest.raises(ValueError, match="expected 2 feature maps, got 1"):
        neck([torch.randn(1, 8, 4, 4)])


# --------------------------------------------------------------------------- smp-compatible model
def test_smp_parity_resnet34():
    ref = randomize_norms(smp.FPN("resnet34", encoder_weights=None, classes=3), group_norm=True)
    ours = create_model("fpn", encoder="resnet34", num_classes=3).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert count_parameters(ours) == count_parameters(ref) == SMP_FPN_RESNET34_PARAMS
    result = load_weights(ours, ref.state_dict(), source="auto", strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_smp_parity_cat_merge_small():
    kw = {"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32, "decoder_merge_policy": "cat"}
    ref = randomize_norms(smp.FPN("resnet18", encoder_weights=None, classes=2, in_channels=1, **kw), group_norm=True)
    ours = FPN("resnet18", num_classes=2, in_channels=1, **kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert count_parameters(ours) == count_parameters(ref)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def _small(**kw) -> FPN:
    return FPN("resnet18", decoder_pyramid_channels=32, decoder_segmentation_channels=32, **kw)


@pytest.mark.parametrize("size", [(65, 97), (64, 64), (33, 31)])
def test_output_size_equals_input(size):
    model = _small(num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 3, *size)


def test_padding_does_not_leak_into_output():
    # the model pads 33 x 47 to 64 x 64 itself: the same as padding by hand and cropping
    model = _small().eval()
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(nn.functional.pad(x, (0, 17, 0, 31)))[..., :33, :47])


def test_batch_size_one_train_step():
    model = _small(num_classes=2).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(torch.randn(1, 3, 33, 47))
    assert out.shape == (1, 2, 33, 47)
    nn.functional.cross_entropy(out, torch.randint(0, 2, (1, 33, 47))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()


def test_argument_errors():
    with pytest.raises(ValueError, match="registered backbone, got 'fpn'"):
        FPN(encoder="fpn")
    with pytest.raises(ValueError, match="multiple of 32"):
        FPN("resnet18", decoder_segmentation_channels=48)
    with pytest.raises(ValueError, match="merge_policy must be 'add' or 'cat', got 'mean'"):
        FPN("resnet18", decoder_merge_policy="mean")
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        FPN("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="at least 4 encoder maps"):
        FPNDecoder((8, 16, 32))
    with pytest.raises(ValueError, match="merge policy must be 'add' or 'cat'"):
        MergeBlock("max")
    with pytest.raises(ValueError, match="interpolation_mode must be one of .* got 'cubic'"):
        FPN("resnet18", decoder_interpolation="cubic")

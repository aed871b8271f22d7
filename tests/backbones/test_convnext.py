"""ConvNeXt V1 / V2 backbones: timm parity (keys, parameter counts, stage maps), any input size, gradients, and the
channels-first LayerNorm / GRN layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from maskworks import create_model
from maskworks.convert import load_weights
from maskworks.layers import GlobalResponseNorm, LayerNorm2d

timm = pytest.importorskip("timm")


def _timm_reference(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0).eval()


def _randomise(model: nn.Module) -> None:
    """Non-trivial values for the layer scales and GRN parameters (initialised to 1e-6 / 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or ".grn." in name:
                p.copy_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("name", ["convnext_tiny", "convnextv2_tiny", "convnextv2_atto"])
def test_matches_timm(name):
    ref = _timm_reference(name)
    _randomise(ref)
    ours = create_model(name).eval()
    ref_state = ref.state_dict()
    body = {k: v for k, v in ref_state.items() if not k.startswith("head.")}
    assert set(body) == set(ours.state_dict())  # same keys and no others, the head aside
    assert sum(p.numel() for p in ours.parameters()) == sum(v.numel() for v in body.values())
    result = load_weights(ours, ref_state, source="timm", strict=False)
    assert not result.missing_keys
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, intermediates_only=True)
        got = ours.forward_intermediates(x)
    assert len(got) == 4
    for info, e, g in zip(ours.feature_info, expected, got):
        assert g.shape == e.shape == (1, info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.forward_features(x), expected[-1], atol=1e-4, rtol=0)


def test_parameter_counts_equal_timm_without_head():
    for name in ("convnext_tiny", "convnextv2_tiny"):
        ref = timm.create_model(name, pretrained=False, num_classes=0)
        ref_count = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("head."))
        assert sum(p.numel() for p in create_model(name).parameters()) == ref_count, name


def test_feature_info_and_odd_input_size():
    model = create_model("convnextv2_atto", in_channels=1).eval()
    assert [(i["num_chs"], i["reduction"]) for i in model.feature_info] == [(40, 4), (80, 8), (160, 16), (320, 32)]
    assert model.out_channels == (1, 40, 80, 160, 320)
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(2, 1, 70, 90))
    # floored at each strided conv, as timm does: 70 -> 17 -> 8 -> 4 -> 2, 90 -> 22 -> 11 -> 5 -> 2
    assert [tuple(m.shape[-2:]) for m in maps] == [(17, 22), (8, 11), (4, 5), (2, 2)]


def test_gradients_reach_every_parameter():
    model = create_model("convnextv2_atto", drop_path_rate=0.1)
    _randomise(model)  # away from the zero-initialised GRN
    model.train()
    sum(m.square().mean() for m in model(torch.randn(2, 3, 64, 64))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    rates = [b.drop_path.drop_prob for s in model.stages for b in s.blocks if hasattr(b.drop_path, "drop_prob")]
    assert rates[-1] == pytest.approx(0.1) and rates == sorted(rates)


def test_layer_scale_and_v2_structure():
    v1, v2 = create_model("convnext_tiny"), create_model("convnextv2_tiny")
    block1, block2 = v1.stages[0].blocks[0], v2.stages[0].blocks[0]
    assert torch.equal(block1.gamma, torch.full((96,), 1e-6)) and block1.mlp.grn is None
    assert block2.gamma is None and isinstance(block2.mlp.grn, GlobalResponseNorm)
    with pytest.raises(ValueError, match="in_channels"):
        create_model("convnext_tiny", in_channels=0)


def test_layer_norm_2d_and_grn_match_timm():
    from timm.layers import LayerNorm2d as TimmLN2d
    from timm.layers.grn import GlobalResponseNorm as TimmGRN

    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 7)
    ours, ref = LayerNorm2d(8), TimmLN2d(8)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x))
    # per pixel: zero mean, unit variance over the channels before the affine
    plain = LayerNorm2d(8, affine=False)(x)
    torch.testing.assert_close(plain.mean(1), torch.zeros(2, 5, 7), atol=1e-5, rtol=0)
    for channels_last, inp in ((True, x.permute(0, 2, 3, 1)), (False, x)):
        grn, ref_grn = GlobalResponseNorm(8, channels_last=channels_last), TimmGRN(8, channels_last=channels_last)
        torch.testing.assert_close(grn(inp), inp)  # zero init: identity
        with torch.no_grad():
            grn.weight.normal_(), grn.bias.normal_()
        ref_grn.load_state_dict(grn.state_dict())
        torch.testing.assert_close(grn(inp), ref_grn(inp))
    # hand-computed: one channel-last pixel grid, weight 1, bias 0 -> x + x * ||x_c|| / mean_c ||x_c||
    grn = GlobalResponseNorm(2)
    with torch.no_grad():
        grn.weight.fill_(1.0)
    t = torch.tensor([[[[3.0, 1.0]], [[4.0, 0.0]]]])  # (1, 2, 1, 2): channel norms 5 and 1, mean 3
    expected = t + t * torch.tensor([5 / 3, 1 / 3])
    torch.testing.assert_close(grn(t), expected, atol=1e-5, rtol=0)


def test_unet_with_convnext_encoder():
    model = create_model("unet", encoder="convnextv2_atto", num_classes=3, decoder_channels=(64, 32, 16, 16)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 70, 90))
    assert out.shape == (1, 3, 70, 90)
    with pytest.raises(ValueError, match="one entry per encoder map"):  # 4 maps: 4 or 5 blocks, not 3
        create_model("unet", encoder="convnextv2_atto", num_classes=3, decoder_channels=(64, 32, 16))

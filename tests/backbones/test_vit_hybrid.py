"""Hybrid ViTs: R50 + ViT-B/16 timm parity (strict load), the tiny ResNetV2 hybrid against timm's building blocks,
CNN skips, backbone swap; early-convolution ViT shapes, parameter count, torchvision parity and training."""

from functools import partial

import pytest
import torch
import torch.nn as nn

from maskworks import create_model
from maskworks.backbones import vit_hybrid as vh  # registers the hybrid variants
from maskworks.backbones.vit import VisionTransformer
from maskworks.testing import randomize_norms

timm = pytest.importorskip("timm")
from timm.layers import HybridEmbed as TimmHybridEmbed  # noqa: E402
from timm.layers import StdConv2d as TimmStdConv2d  # noqa: E402
from timm.layers import StdConv2dSame as TimmStdConv2dSame  # noqa: E402
from timm.models.resnetv2 import ResNetV2 as TimmResNetV2  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer  # noqa: E402

TINY = {"img_size": 64, "patch_size": 2, "embed_dim": 64, "depth": 2, "num_heads": 2}

# perturbed weights plus non-trivial GroupNorm / LayerNorm / BatchNorm parameters and statistics, in eval mode
_randomize = partial(randomize_norms, group_norm=True, layer_norm=True, perturb=0.02)


def _timm_tiny(padding_same: bool = True, **kw) -> TimmVisionTransformer:
    """timm's hybrid built from its own internals with the architecture of ``vit_test_r50_s16``."""
    conv = partial(TimmStdConv2dSame if padding_same else TimmStdConv2d, eps=1e-8)
    backbone = TimmResNetV2(
        layers=(1, 1),
        channels=(128, 256),
        stem_chs=32,
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="same" if padding_same else "",
        conv_layer=conv,
    )
    return TimmVisionTransformer(
        **{**TINY, "num_classes": 5, **kw}, embed_layer=partial(TimmHybridEmbed, backbone=backbone)
    )


def _ours_tiny(padding_same: bool = True, **kw) -> vh.HybridVisionTransformer:
    backbone = vh.ResNetV2(
        layers=(1, 1),
        channels=(128, 256),
        stem_chs=32,
        stem_type="same" if padding_same else "",
        conv_padding="same" if padding_same else None,
    )
    return vh.HybridVisionTransformer(backbone=backbone, **{**TINY, "num_classes": 5, **kw})


# ---------------------------------------------------------------------------------------------------------------
# R50 + ViT-B/16
# ---------------------------------------------------------------------------------------------------------------


def test_vit_base_r50_s16_224_timm_parity():
    torch.manual_seed(0)
    ref = _randomize(timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=10))
    ours = create_model("vit_base_r50_s16_224", num_classes=10).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = ours.forward_features(x)
        torch.testing.assert_close(feats, ref.forward_features(x), atol=1e-4, rtol=1e-4)
        logits = ours.forward_head(feats)
        torch.testing.assert_close(logits, ref.forward_head(ref.forward_features(x)), atol=1e-4, rtol=1e-4)
    assert logits.shape == (1, 10) and feats.shape == (1, 197, 768)
    # 224 -> 14 x 14 tokens at stride 16
    assert ours.patch_embed.grid_size == (14, 14) and ours.feature_info[-1]["reduction"] == 16
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_vit_base_r50_s16_384_strict_load():
    ref = timm.create_model("vit_base_r50_s16_384", pretrained=False)
    ours = create_model("vit_base_r50_s16_384")
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.pos_embed.shape == (1, 24 * 24 + 1, 768)
    assert ours.num_classes == 1000


def test_r50_cnn_features_and_feature_info():
    model = create_model("vit_base_r50_s16_224").eval()
    assert model.num_classes == 0  # timm's default: the only weights (orig_in21k) have no head
    assert model.cnn_feature_info == [
        {"num_chs": 64, "reduction": 2, "module": "patch_embed.backbone.stem.norm"},
        {"num_chs": 256, "reduction": 4, "module": "patch_embed.backbone.stages.0"},
        {"num_chs": 512, "reduction": 8, "module": "patch_embed.backbone.stages.1"},
    ]
    assert [i["reduction"] for i in model.patch_embed.backbone.feature_info] == [2, 4, 8, 16]
    assert model.patch_embed.backbone.feature_info[-1]["num_chs"] == 1024
    assert len(model.feature_info) == 12 and model.feature_info[0] == {
        "num_chs": 768,
        "reduction": 16,
        "module": "blocks.0",
    }


# ---------------------------------------------------------------------------------------------------------------
# Tiny hybrid against timm's building blocks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_same", [True, False])
def test_tiny_hybrid_timm_parity(padding_same):
    torch.manual_seed(0)
    ref = _randomize(_timm_tiny(padding_same))
    ours = _ours_tiny(padding_same).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_registered_tiny_matches_timm_keys():
    ref = _timm_tiny(num_classes=1000)
    ours = create_model("vit_test_r50_s16")
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.patch_embed.grid_size == (4, 4) and ours.patch_embed.feat_ratio() == 16


def test_tiny_hybrid_dynamic_size_timm_parity():
    # odd, non-square input: TF-SAME padding makes every stride-2 step ceil(n / 2); the patch-2 proj floors
    torch.manual_seed(0)
    ref = _randomize(_timm_tiny(dynamic_img_size=True))
    ours = _ours_tiny(dynamic_img_size=True).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        out = ours.forward_features(x)
        torch.testing.assert_close(out, ref.forward_features(x), atol=1e-5, rtol=1e-5)
    assert ours.patch_embed.dynamic_feat_size((70, 90)) == (4, 6) and out.shape == (2, 1 + 24, 64)


def test_tiny_cnn_skips_match_timm_backbone():
    torch.manual_seed(0)
    ref = _randomize(_timm_tiny())
    ours = _ours_tiny().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref_maps = ref.patch_embed.backbone.forward_intermediates(x, intermediates_only=True)
        skips = ours.forward_cnn_features(x)
        cnn_maps, vit_maps = ours.forward_hybrid(x, indices=[0, 1])
        ref_vit = ref.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert [m.shape[1:] for m in skips] == [(32, 32, 32), (128, 16, 16), (256, 8, 8)]
    for a, b, c in zip(skips, cnn_maps, ref_maps):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5)
    for a, b in zip(vit_maps, ref_vit):
        assert a.shape == (2, 64, 4, 4)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert [i["reduction"] for i in ours.cnn_feature_info] == [2, 4, 8]
    assert ours.patch_embed.keep_features is False and ours.patch_embed.last_features is None


@pytest.mark.parametrize("kernel,stride,size", [(7, 2, 33), (3, 2, 16), (3, 2, 17), (1, 2, 15), (3, 1, 9), (1, 1, 8)])
def test_std_conv_matches_timm(kernel, stride, size):
    torch.manual_seed(0)
    x = torch.randn(2, 4, size, size + 3)
    for padding, timm_cls in (("same", TimmStdConv2dSame), (None, TimmStdConv2d)):
        ref = timm_cls(4, 8, kernel, stride=stride, eps=1e-8)
        ours = vh.StdConv2d(4, 8, kernel, stride=stride, padding=padding, eps=1e-8)
        ours.load_state_dict(ref.state_dict(), strict=True)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    w = ours.standardized_weight().reshape(8, -1)
    torch.testing.assert_close(w.mean(1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.var(1, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)


def test_hybrid_trains_and_other_in_channels():
    torch.manual_seed(0)
    model = create_model("vit_test_r50_s16", in_channels=1, num_classes=3).train()
    logits = model(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert model.patch_embed.backbone.stem.conv.weight.grad.abs().sum() > 0
    assert model.pos_embed.grad is not None


def test_backbone_swap_with_registry_resnet():
    # any backbone with feature_info tokenises: token count = H * W of its last map
    model = vh.HybridVisionTransformer(
        backbone=create_model("resnet18"), img_size=64, embed_dim=32, depth=1, num_heads=2, num_classes=4
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        skips = model.forward_cnn_features(x)
    assert model.patch_embed.num_patches == 4 and tokens.shape == (2, 1 + 4, 32)
    assert [s.shape[-1] for s in skips] == [32, 16, 8, 4]  # 1/2 .. 1/16, finer than the 1/32 tokens


def test_hybrid_errors():
    with pytest.raises(ValueError, match="in_channels"):
        vh.HybridVisionTransformer(backbone=vh.ResNetV2(layers=(1,), in_channels=3), in_channels=1, **TINY)
    with pytest.raises(ValueError, match="stem_type"):
        vh.ResNetV2(stem_type="deep")
    with pytest.raises(ValueError, match="divisible by num_groups"):
        vh.GroupNormAct(48, num_groups=32)
    with pytest.raises(TypeError, match="embed_layer"):
        vh.HybridVisionTransformer(backbone=vh.ResNetV2(layers=(1,)), embed_layer=nn.Identity)
    model = create_model("vit_test_r50_s16")
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="img_size"):
        model.forward_cnn_features(torch.randn(1, 3, 48, 48))


# ---------------------------------------------------------------------------------------------------------------
# Early-convolution stem (Xiao et al. 2021)
# ---------------------------------------------------------------------------------------------------------------


def _vit_params(d: int, depth: int, n_tokens: int, num_classes: int, mlp_ratio: int = 4) -> int:
    block = 4 * d  # norm1 + norm2
    block += 3 * d * d + 3 * d + d * d + d  # qkv + proj
    block += d * mlp_ratio * d + mlp_ratio * d + mlp_ratio * d * d + d  # fc1 + fc2
    return d + n_tokens * d + depth * block + 2 * d + d * num_classes + num_classes  # cls, pos, blocks, norm, head


def _stem_params(in_ch: int, widths: tuple[int, ...], d: int) -> int:
    total, prev = 0, in_ch
    for c in widths:
        total += 9 * prev * c + 2 * c  # 3x3 conv without bias + BN affine
        prev = c
    return total + prev * d + d  # 1x1 proj with bias


@pytest.mark.parametrize(
    "name,d,depth,widths,img,classes",
    [
        ("vit_small_convstem_patch16_224", 384, 11, (48, 96, 192, 384), 224, 1000),
        ("vit_test_convstem_patch16", 64, 2, (8, 16, 32, 64), 64, 1000),
    ],
)
def test_convstem_param_count(name, d, depth, widths, img, classes):
    with torch.device("meta"):
        model = create_model(name)
    expected = _stem_params(3, widths, d) + _vit_params(d, depth, (img // 16) ** 2 + 1, classes)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.patch_embed.stem_channels == widths


def test_convstem_shapes():
    model = create_model("vit_test_convstem_patch16", num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem = model.patch_embed.proj(model.patch_embed.stem(x))
        tokens = model.forward_features(x)
        maps = model.forward_intermediates(x)
        logits = model(x)
    assert stem.shape == (2, 64, 4, 4) and tokens.shape == (2, 17, 64) and logits.shape == (2, 7)
    assert [m.shape for m in maps] == [(2, 64, 4, 4)] * 2
    # the paper's default widths for ViT-S/16: d/8, d/4, d/2, d
    assert vh.ConvStemEmbed(img_size=224, patch_size=16, embed_dim=384).stem_channels == (48, 96, 192, 384)
    kinds = [type(m) for m in model.patch_embed.stem[0]]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] and model.patch_embed.stem[0][0].stride == (2, 2)


def test_convstem_torchvision_parity():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import ConvStemConfig

    from maskworks.convert.vit_hf_tv import convert_torchvision_vit

    torch.manual_seed(0)
    ref = torchvision.models.VisionTransformer(
        image_size=64,
        patch_size=16,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        mlp_dim=256,
        num_classes=10,
        conv_stem_configs=[ConvStemConfig(c, 3, 2) for c in (8, 16, 32, 64)],
    )
    ref = _randomize(ref)
    ours = create_model("vit_test_convstem_patch16", num_classes=10).eval()
    converted, dropped = convert_torchvision_vit(ref.state_dict())
    ours.load_state_dict(converted, strict=True)
    assert dropped == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_convstem_trains():
    torch.manual_seed(0)
    model = create_model("vit_test_convstem_patch16", num_classes=4).train()
    x = torch.randn(8, 3, 64, 64)
    y = torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.patch_embed.stem[0][1].num_batches_tracked.item() == 15


def test_convstem_sizes_and_errors():
    model = vh.vit_test_convstem_patch16(dynamic_img_size=True, dynamic_img_pad=True).eval()
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 70, 50))
    assert out.shape == (1, 1 + 5 * 4, 64)
    strict = vh.vit_test_convstem_patch16(dynamic_img_size=True)
    with pytest.raises(ValueError, match="divisible"):
        strict(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match="stem_channels"):
        vh.vit_test_convstem_patch16(stem_channels=(8, 16, 32))
    with pytest.raises(ValueError, match="power of two"):
        VisionTransformer(img_size=48, patch_size=12, embed_dim=32, depth=1, num_heads=2, embed_layer=vh.ConvStemEmbed)

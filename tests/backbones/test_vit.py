"""VisionTransformer: timm parity (strict state-dict load), intermediates, pooling, registers, dynamic size,
checkpoint resampling, attention capture, parameter counts on the meta device."""

import copy
import pickle

import pytest
import torch

from maskworks import create_model, list_models
from maskworks.backbones.vit import VisionTransformer, checkpoint_filter_fn
from maskworks.convert.vit import convert_timm_vit, is_timm_vit_state_dict
from maskworks.layers.vit_layers import capture_attention, resample_abs_pos_embed

timm = pytest.importorskip("timm")
from timm.models import vision_transformer as timm_vit  # noqa: E402

NAMES = [
    "vit_base_patch16_224",
    "vit_base_patch16_384",
    "vit_base_patch32_224",
    "vit_base_patch32_384",
    "vit_base_patch8_224",
    "vit_huge_patch14_224",
    "vit_large_patch14_224",
    "vit_large_patch16_224",
    "vit_large_patch16_384",
    "vit_large_patch32_224",
    "vit_large_patch32_384",
    "vit_small_patch16_224",
    "vit_small_patch16_384",
    "vit_small_patch32_224",
    "vit_small_patch8_224",
    "vit_test_patch16",
    "vit_test_patch8",
    "vit_tiny_patch16_224",
    "vit_tiny_patch16_384",
]
SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _pair(**kw):
    """The same random weights in timm's VisionTransformer and ours, both in eval mode."""
    torch.manual_seed(0)
    ref = timm_vit.VisionTransformer(**{**SMALL, "num_classes": 5, **kw}).eval()
    ours = VisionTransformer(**{**SMALL, "num_classes": 5, **kw}).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_registered_as_backbones():
    assert set(NAMES) <= set(list_models("vit_*", kind="backbone"))


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    ours = create_model("vit_tiny_patch16_224").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_tiny_parity_with_timm(tiny_pair):
    ours, ref = tiny_pair
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-4, rtol=1e-4)


def test_tiny_forward_intermediates_match_timm(tiny_pair):
    ours, ref = tiny_pair
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        default = ours.forward_intermediates(x)
        timm_all = ref.forward_intermediates(x, intermediates_only=True)
        assert len(default) == 4 and all(f.shape == (1, 192, 14, 14) for f in default)
        for ours_map, i in zip(default, [2, 5, 8, 11]):
            torch.testing.assert_close(ours_map, timm_all[i], atol=1e-5, rtol=1e-5)
        final, normed = ours.forward_intermediates(x, indices=[1, -1], norm=True, intermediates_only=False)
        ref_final, ref_normed = ref.forward_intermediates(x, indices=[1, -1], norm=True)
        torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-5)
        for a, b in zip(normed, ref_normed):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        last2 = ours.forward_intermediates(x, indices=2, output_fmt="NLC")
        assert [f.shape for f in last2] == [(1, 196, 192)] * 2
        torch.testing.assert_close(last2[1], timm_all[11].flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert ours.feature_info[3] == {"num_chs": 192, "reduction": 16, "module": "blocks.3"}
    assert len(ours.feature_info) == 12


@pytest.mark.slow
def test_base_parity_with_timm():
    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    ours = create_model("vit_base_patch16_224").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        {"global_pool": "avg"},  # fc_norm after pooling, no final norm
        {"global_pool": "avg", "fc_norm": False},
        {"class_token": False, "no_embed_class": True, "global_pool": "avg", "reg_tokens": 4},  # reg4_gap
        {"reg_tokens": 4, "no_embed_class": True, "init_values": 1e-5},  # dinov2-reg style
        {"pre_norm": True, "qk_norm": True},
        {"global_pool": "", "num_classes": 0},
    ],
)
def test_config_parity_with_timm(kw):
    ours, ref = _pair(**kw)
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours.forward_intermediates(x, indices=[0, 1]), ref.forward_intermediates(x, [0, 1], intermediates_only=True)
        )
    assert ours.num_prefix_tokens == ref.num_prefix_tokens


def test_dynamic_img_size_matches_timm_and_caches_safely():
    ours, ref = _pair(dynamic_img_size=True)
    x = torch.randn(2, 3, 40, 64)  # 5 x 8 grid, built for 4 x 4
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
        maps = ours.forward_intermediates(x)
        assert [m.shape for m in maps] == [(2, 32, 5, 8)] * 2
        torch.testing.assert_close(maps, ref.forward_intermediates(x, intermediates_only=True))
        table = ours._resampled_pos_embed((5, 8))
        assert ours._resampled_pos_embed((5, 8)) is table  # cached in eval / no-grad
        expected = resample_abs_pos_embed(ours.pos_embed, (5, 8), old_size=(4, 4), num_prefix_tokens=1)
        torch.testing.assert_close(table, expected)
        ours.pos_embed.add_(0.5)  # in-place update (load_state_dict, optimiser step): no stale table
        ref.pos_embed.add_(0.5)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    # training: resampled with autograd every time, gradients reach pos_embed, optimiser steps are seen
    ours.train()
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    ours(x).sum().backward()
    assert ours.pos_embed.grad is not None and ours.pos_embed.grad.abs().sum() > 0
    assert not ours._pos_cache
    opt.step()
    ours.eval()
    fresh = copy.deepcopy(ours)
    fresh._pos_cache.clear()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), fresh(x))
    pickle.loads(pickle.dumps(ours))  # the cache does not block pickling
    with pytest.raises(ValueError, match="does not match img_size"):
        _pair()[0](x)


def test_dynamic_img_pad_matches_timm():
    ours, ref = _pair(dynamic_img_size=True, dynamic_img_pad=True)
    x = torch.randn(1, 3, 27, 45)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        assert ours.forward_intermediates(x)[0].shape == (1, 32, 4, 6)


def test_checkpoint_filter_fn_384_into_224_matches_timm(tiny_pair):
    ours, ref = tiny_pair
    torch.manual_seed(1)
    sd384 = timm.create_model("vit_tiny_patch16_384", pretrained=False).state_dict()
    converted = checkpoint_filter_fn(sd384, ours)
    timm_converted = timm_vit.checkpoint_filter_fn(sd384, ref)
    assert converted["pos_embed"].shape == (1, 197, 192)
    torch.testing.assert_close(converted["pos_embed"], timm_converted["pos_embed"], atol=1e-6, rtol=1e-6)
    model = copy.deepcopy(ours)
    model.load_state_dict(converted, strict=True)
    ref_model = copy.deepcopy(ref)
    ref_model.load_state_dict(timm_converted, strict=True)
    assert model.pos_embed.requires_grad
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_model(x), atol=1e-4, rtol=1e-4)


def test_checkpoint_filter_fn_patch_size_and_prefix_tokens_match_timm():
    torch.manual_seed(0)
    src = timm_vit.VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, reg_tokens=2)
    kw = {"img_size": 40, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "reg_tokens": 2}
    ours, ref = VisionTransformer(**kw), timm_vit.VisionTransformer(**kw)
    converted = checkpoint_filter_fn(src.state_dict(), ours)
    expected = timm_vit.checkpoint_filter_fn(src.state_dict(), ref)
    assert converted["patch_embed.proj.weight"].shape == (32, 3, 8, 8) and converted["pos_embed"].shape == (1, 28, 32)
    for key in ("patch_embed.proj.weight", "pos_embed"):
        torch.testing.assert_close(converted[key], expected[key], atol=1e-5, rtol=1e-5)
    ours.load_state_dict(converted, strict=True)
    # no_embed_class: the table has no prefix rows; a non-square source grid needs old_grid_size
    target = VisionTransformer(**{**kw, "no_embed_class": True})
    sd = {"pos_embed": torch.randn(1, 3 * 6, 32)}
    out = checkpoint_filter_fn(sd, target, old_grid_size=(3, 6))["pos_embed"]
    torch.testing.assert_close(
        out, resample_abs_pos_embed(sd["pos_embed"], (5, 5), old_size=(3, 6), num_prefix_tokens=0)
    )
    with pytest.raises(ValueError, match="old_size"):
        checkpoint_filter_fn(sd, target)


def test_convert_timm_vit():
    torch.manual_seed(0)
    ref = timm_vit.VisionTransformer(**SMALL, num_classes=5)
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    sd["module.pre_logits.fc.weight"] = torch.zeros(1)
    assert is_timm_vit_state_dict(sd) and not is_timm_vit_state_dict({"conv1.weight": torch.zeros(1)})
    converted, dropped = convert_timm_vit(sd)
    assert dropped == ["pre_logits.fc.weight"] and set(converted) == set(ref.state_dict())
    # another head size, one input channel, another resolution
    target = VisionTransformer(**{**SMALL, "img_size": 48}, num_classes=3, in_channels=1)
    converted, dropped = convert_timm_vit(sd, target)
    assert sorted(dropped) == ["head.bias", "head.weight", "pre_logits.fc.weight"]
    result = target.load_state_dict(converted, strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["head.bias", "head.weight"]
    torch.testing.assert_close(target.patch_embed.proj.weight, ref.patch_embed.proj.weight.sum(1, keepdim=True))


def test_capture_attention_on_model():
    model = create_model("vit_test_patch8", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model) as maps:
            captured = model(x)
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    assert len(maps) == 2 and all(m.shape == (2, 2, 17, 17) for m in maps)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 2, 17), atol=1e-5, rtol=0)
    assert all(b.attn.fused_attn for b in model.blocks)


def test_drop_path_identity_in_eval_and_backward():
    torch.manual_seed(0)
    model = create_model("vit_test_patch16", drop_path_rate=0.2, num_classes=3)
    plain = create_model("vit_test_patch16", num_classes=3)
    plain.load_state_dict(model.state_dict())
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))
    model.train().set_grad_checkpointing()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_variant_kwargs_head_and_errors():
    model = create_model("vit_test_patch8", in_channels=1, num_classes=7, img_size=48)
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 7)
    assert model.pos_embed.shape == (1, 1 + 36, 32)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    model.reset_classifier(0, global_pool="avg")
    assert model(torch.randn(1, 1, 48, 48)).shape == (1, 32)
    assert model.forward_head(model.forward_features(torch.randn(1, 1, 48, 48)), pre_logits=True).shape == (1, 32)
    with pytest.raises(ValueError, match="needs class_token"):
        VisionTransformer(**SMALL, class_token=False)
    with pytest.raises(ValueError, match="global_pool"):
        VisionTransformer(**SMALL, global_pool="mean")
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(torch.randn(1, 1, 48, 48), indices=[5])


# ViT-B/32 = patch 2,360,064 + cls/pos 39,168 + blocks 85,054,464 + norm 1,536 + head 769,000
COUNTS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
    "vit_huge_patch14_224": 632_045_800,
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_counts_on_meta_device(name):
    with torch.device("meta"):
        ours = create_model(name)
        ref = timm.create_model(name, pretrained=False, num_classes=1000)
    count = sum(p.numel() for p in ours.parameters())
    assert count == COUNTS[name] == sum(p.numel() for p in ref.parameters())
    assert ours.pos_embed.is_meta

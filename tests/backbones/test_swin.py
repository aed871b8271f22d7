"""Swin Transformer V1 backbone: timm's keys and parameter count, parity with timm, any input size, the unshifted
block is plain window attention, gradients reach every parameter, timm checkpoints load through the converter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskworks import create_model
from maskworks.backbones.swin import SwinTransformer, SwinTransformerBlock
from maskworks.convert import load_weights
from maskworks.layers.window import window_partition, window_reverse

timm = pytest.importorskip("timm")

_TINY = "swin_tiny_patch4_window7_224"


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    reference = timm.create_model(_TINY, pretrained=False, num_classes=0).eval()
    ours = create_model(_TINY).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def test_keys_and_parameter_count_match_timm(tiny_pair):
    ours, reference = tiny_pair
    assert list(ours.state_dict()) == list(reference.state_dict())
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert count == 28_288_354 - (768 * 1000 + 1000)  # timm's Swin-T with its 1000-class head, less the head
    assert ours.out_channels == (3, 96, 192, 384, 768)
    assert [f["reduction"] for f in ours.feature_info] == [4, 8, 16, 32]
    assert [f["num_chs"] for f in ours.feature_info] == [96, 192, 384, 768]


@torch.no_grad()
def test_parity_with_timm_at_224(tiny_pair):
    ours, reference = tiny_pair
    x = torch.randn(1, 3, 224, 224)
    final, expected = reference.forward_intermediates(x)
    got = ours.forward_intermediates(x)
    assert [tuple(f.shape) for f in got] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # forward_features = forward_intermediates(norm=True)[-1]: the final norm on the last map
    torch.testing.assert_close(ours.forward_features(x), final.permute(0, 3, 1, 2), atol=1e-4, rtol=0)


@torch.no_grad()
def test_swin_base_parity_with_timm_at_384():
    """Swin-B, window 12, at its 384 resolution (stage maps 96, 48, 24, 12: the last one is exactly one window)."""
    torch.manual_seed(0)
    reference = timm.create_model("swin_base_patch4_window12_384", pretrained=False, num_classes=0).eval()
    ours = create_model("swin_base_patch4_window12_384").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    # timm's without its head (the window-12 bias tables make it 135,360 larger than Swin-B/7's 87,768,224 - head)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) == 86_878_584
    x = torch.randn(1, 3, 384, 384)
    _, expected = reference.forward_intermediates(x)
    for a, b in zip(ours.forward_intermediates(x), expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_any_size(tiny_pair):
    ours, _ = tiny_pair
    # 97 x 131 is padded to 100 x 132 in the patch embedding: 25 x 33, 13 x 17, 7 x 9, 4 x 5
    x = torch.randn(1, 3, 97, 131)
    got = ours.forward_intermediates(x)
    assert [tuple(f.shape[2:]) for f in got] == [(25, 33), (13, 17), (7, 9), (4, 5)]
    # timm (windows fixed at construction, strict_img_size=False) on the padded image: the same wherever the maps
    # are larger than the window (stages 0 and 1; on smaller maps we clip the window, timm pads to it)
    reference = timm.create_model(_TINY, pretrained=False, num_classes=0, strict_img_size=False).eval()
    reference.load_state_dict(ours.state_dict())
    _, expected = reference.forward_intermediates(F.pad(x, (0, 1, 0, 3)))
    for a, b in zip(got[:2], expected[:2]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert all(torch.isfinite(f).all() for f in got)
    got = ours.forward_intermediates(torch.randn(2, 3, 33, 33))
    assert [tuple(f.shape) for f in got] == [(2, 96, 9, 9), (2, 192, 5, 5), (2, 384, 3, 3), (2, 768, 2, 2)]
    assert all(torch.isfinite(f).all() for f in got)


@torch.no_grad()
def test_clipped_window_reads_the_centre_of_the_bias_table():
    torch.manual_seed(0)
    block = SwinTransformerBlock(16, 2, window_size=7, shift_size=3).eval()
    x = block.norm1(torch.randn(1, 3, 4, 16))  # map smaller than the window: one 3 x 4 window, no shift
    attn = block.attn
    q, k, v = attn._split_heads(x.reshape(1, 12, 16))
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    table = attn.relative_position_bias_table.reshape(13, 13, 2)  # (2M-1, 2M-1, heads)
    bias = table[ys[:, None] - ys[None] + 6, xs[:, None] - xs[None] + 6].permute(2, 0, 1)
    expected = attn._merge_heads(((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(-1) @ v)  # with proj
    torch.testing.assert_close(block._attn(x), expected.reshape(1, 3, 4, 16), atol=1e-5, rtol=0)


@torch.no_grad()
def test_unshifted_block_is_plain_window_attention():
    torch.manual_seed(0)
    block = SwinTransformerBlock(32, 4, window_size=4, shift_size=0).eval()
    x = torch.randn(2, 8, 12, 32)
    windows = window_partition(block.norm1(x), 4).reshape(-1, 16, 32)
    attended = window_reverse(block.attn(windows).reshape(-1, 4, 4, 32), 4, 8, 12)
    y = x + attended
    torch.testing.assert_close(block(x), y + block.mlp(block.norm2(y)), atol=1e-5, rtol=0)
    # a shifted block differs; a model built without shift has no shifted block
    shifted = SwinTransformerBlock(32, 4, window_size=4, shift_size=2).eval()
    shifted.load_state_dict(block.state_dict())
    assert not torch.allclose(shifted(x), block(x), atol=1e-4)
    plain = SwinTransformer(16, (2, 2), (2, 2), window_size=4, shift=False)
    assert all(blk.shift_size == (0, 0) for stage in plain.layers for blk in stage.blocks)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = SwinTransformer(16, (2, 2, 2, 2), (1, 2, 2, 4), window_size=4, in_channels=2)
    features = model.forward_intermediates(torch.randn(1, 2, 37, 45))
    sum(f.square().mean() for f in features).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # the final norm only serves forward_features
    assert missing == ["norm.weight", "norm.bias"]
    model.zero_grad()
    model.forward_features(torch.randn(1, 2, 37, 45)).sum().backward()
    assert model.norm.weight.grad.abs().sum() > 0


def test_timm_checkpoint_loads_through_the_converter():
    torch.manual_seed(0)
    reference = timm.create_model(_TINY, pretrained=False)  # with its 1000-class head
    state = reference.state_dict()
    model = create_model(_TINY)
    result = load_weights(model, state, source="timm", strict=None)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["head.fc.bias", "head.fc.weight"]
    torch.testing.assert_close(model.layers[2].blocks[1].attn.qkv.weight, state["layers.2.blocks.1.attn.qkv.weight"])
    gray = create_model(_TINY, in_channels=1)
    load_weights(gray, state, source="timm")
    torch.testing.assert_close(gray.patch_embed.proj.weight, state["patch_embed.proj.weight"].sum(1, keepdim=True))


def test_mmseg_window_order_equals_hf_swin_backbone_at_any_size():
    """window_padding="mmseg" (pad to the window, then shift; windows never clipped) is HF SwinBackbone's and mmseg's
    Swin: equal maps at sizes where the timm order differs (maps not multiples of the window, maps <= window)."""
    transformers = pytest.importorskip("transformers")
    from maskworks.convert import load_weights

    torch.manual_seed(0)
    cfg = transformers.SwinConfig(
        embed_dim=16,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 2, 4],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    ref = transformers.SwinBackbone(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = SwinTransformer(16, (2, 2, 2, 2), (1, 2, 2, 4), window_size=7, out_norms=True, window_padding="mmseg")
    timm_order = SwinTransformer(16, (2, 2, 2, 2), (1, 2, 2, 4), window_size=7, out_norms=True)
    for model in (ours, timm_order):
        load_weights(model.eval(), ref.state_dict(), source="hf")
    for size in ((97, 131), (160, 160)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = ref(x).feature_maps
            for a, b in zip(ours(x), expected, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            assert max((a - b).abs().max() for a, b in zip(timm_order(x), expected)) > 1e-3  # the orders differ
    with pytest.raises(ValueError, match="window_padding"):
        SwinTransformer(16, (2,), (1,), window_padding="other")

"""Swin Transformer V2 backbone: timm's keys and parameter count, parity with timm, any input size, gradients reach
every parameter, a window-8 checkpoint runs in a window-16 model as in timm, timm checkpoints load through the
converter."""

from __future__ import annotations

import pytest
import torch

from maskworks import create_model
from maskworks.backbones.swin_v2 import SwinTransformerV2, log_spaced_coords_table
from maskworks.convert import load_weights

timm = pytest.importorskip("timm")

_W8 = "swinv2_tiny_window8_256"
_W16 = "swinv2_tiny_window16_256"


def _randomise(model: torch.nn.Module) -> None:
    """Move every norm and attention scale off timm's initial values (zero res-post-norms make blocks identities)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "logit_scale" in name or name.endswith(("q_bias", "v_bias")):
                p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def w8_pair():
    torch.manual_seed(0)
    reference = timm.create_model(_W8, pretrained=False, num_classes=0).eval()
    _randomise(reference)
    ours = create_model(_W8).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def test_keys_and_parameter_count_match_timm(w8_pair):
    ours, reference = w8_pair
    assert list(ours.state_dict()) == list(reference.state_dict())
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert count == 28_347_154 - (768 * 1000 + 1000)  # timm's SwinV2-T/8 with its 1000-class head, less the head
    assert ours.out_channels == (3, 96, 192, 384, 768)
    assert [f["reduction"] for f in ours.feature_info] == [4, 8, 16, 32]
    buffers = {n.rsplit(".", 1)[-1] for n, _ in ours.named_buffers()}
    assert buffers == {"k_bias", "relative_coords_table", "relative_position_index"}
    assert not buffers & {k.rsplit(".", 1)[-1] for k in ours.state_dict()}


@torch.no_grad()
def test_stage_maps_match_timm(w8_pair):
    ours, reference = w8_pair
    x = torch.randn(1, 3, 256, 256)
    theirs = reference.forward_intermediates(x, intermediates_only=True)
    mine = ours.forward_intermediates(x)
    assert [tuple(m.shape[1:]) for m in mine] == [(96, 64, 64), (192, 32, 32), (384, 16, 16), (768, 8, 8)]
    for a, b in zip(mine, theirs):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # the final norm, NCHW here, NHWC in timm
    assert torch.allclose(ours.forward_features(x), reference.forward_features(x).permute(0, 3, 1, 2), atol=1e-4)


@torch.no_grad()
def test_fused_and_explicit_attention_agree(w8_pair):
    ours, _ = w8_pair
    x = torch.randn(1, 3, 64, 96)
    fused = ours(x)
    for m in ours.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    try:
        explicit = ours(x)
    finally:
        for m in ours.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
    for a, b in zip(fused, explicit):
        assert torch.allclose(a, b, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize(
    ("size", "expected"),
    [((97, 131), [(25, 33), (13, 17), (7, 9), (4, 5)]), ((33, 33), [(9, 9), (5, 5), (3, 3), (2, 2)])],
)
def test_any_input_size(w8_pair, size, expected):
    ours, reference = w8_pair
    x = torch.randn(1, 3, *size)
    maps = ours(x)
    assert [tuple(m.shape[-2:]) for m in maps] == expected
    assert all(torch.isfinite(m).all() for m in maps)


@torch.no_grad()
def test_clipped_window_matches_timm_built_for_the_map(w8_pair):
    """On a 64x64 input the last stages are smaller than the window: timm built for 64 clips the window and
    normalises the position table for the clipped one; ours does so at run time."""
    ours, reference = w8_pair
    small = timm.create_model(_W8, pretrained=False, num_classes=0, img_size=64).eval()
    small.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(ours.forward_intermediates(x), small.forward_intermediates(x, intermediates_only=True)):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_coords_table_matches_timm():
    from timm.models.swin_transformer_v2 import WindowAttention

    for window, pretrained in (((8, 8), (0, 0)), ((16, 16), (12, 12)), ((5, 7), (0, 0)), ((1, 4), (0, 0))):
        attn = WindowAttention(8, window, 2, pretrained_window_size=pretrained)
        assert torch.allclose(log_spaced_coords_table(window, pretrained), attn.relative_coords_table)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = SwinTransformerV2(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
    _randomise(model)
    maps = model.forward_intermediates(torch.randn(2, 3, 70, 58), norm=True)
    sum(m.square().mean() for m in maps).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@torch.no_grad()
def test_window8_checkpoint_in_window16_model_matches_timm(w8_pair):
    _, reference = w8_pair
    state = reference.state_dict()
    theirs16 = timm.create_model(_W16, pretrained=False, num_classes=0).eval()
    from timm.models.swin_transformer_v2 import checkpoint_filter_fn

    theirs16.load_state_dict(checkpoint_filter_fn(state, theirs16), strict=True)
    ours16 = create_model(_W16).eval()
    result = load_weights(ours16, state, source="timm")
    assert not result.missing_keys
    attn = ours16.layers[0].blocks[0].attn
    assert attn.relative_coords_table.shape == (1, 31, 31, 2)  # recomputed for window 16
    x = torch.randn(1, 3, 256, 256)
    outs = ours16(x)
    for a, b in zip(outs, theirs16.forward_intermediates(x, intermediates_only=True)):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # the larger window changes the result: the test would see a window that was not enlarged
    assert not torch.allclose(outs[0], reference.forward_intermediates(x, intermediates_only=True)[0], atol=1e-3)


def test_timm_checkpoint_loads_through_the_converter(w8_pair):
    _, reference = w8_pair
    state = {**reference.state_dict(), "head.fc.weight": torch.zeros(10, 768), "head.fc.bias": torch.zeros(10)}
    gray = create_model(_W8, in_channels=1)
    result = load_weights(gray, state, source="timm")
    assert not result.missing_keys
    assert gray.patch_embed.proj.weight.shape == (96, 1, 4, 4)


def test_original_layout_is_remapped(w8_pair):
    """Checkpoints of the official release merge patches at the end of a stage (``layers.0.downsample``)."""
    from maskworks.convert.swin import convert_timm_swin

    _, reference = w8_pair
    state = reference.state_dict()
    original = {}
    for k, v in state.items():
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.", f"layers.{i - 1}.", 1)
        original[k] = v
    converted, _ = convert_timm_swin(original)
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)

"""Attention maps, CLS attention, attention rollout and overlays on the tiny ViT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import maskworks.backbones.vit  # noqa: F401  (registers the ViT variants)
from maskworks.explain.attention import (
    attention_maps,
    attention_rollout,
    cls_attention,
    overlay_attention,
    plot_head_attention,
    token_grid_size,
)
from maskworks.layers.vit_layers import Attention
from maskworks.registry import create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model("vit_test_patch8", num_classes=5, **kwargs).eval()


def _attn_modules(model):
    return [m for m in model.modules() if isinstance(m, Attention)]


def _random_maps(b, heads, t, layers, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, t, t, generator=gen, dtype=dtype).mul(2).softmax(-1) for _ in range(layers)]


# --------------------------------------------------------------------------------------------- extraction
def test_attention_maps_shapes_rows_and_restored_flags():
    model = _vit()
    mods = _attn_modules(model)
    mods[1].fused_attn = False  # a mixed configuration must come back as it was
    before = [(m.fused_attn, m.capture_attention) for m in mods]
    x = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, x)
    assert len(maps) == 2
    for a in maps:
        assert a.shape == (2, 2, 17, 17) and not a.requires_grad
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 17), atol=1e-5, rtol=0)
    assert [(m.fused_attn, m.capture_attention) for m in mods] == before
    assert all(m.attn_probs is None for m in mods)


def test_flags_restored_after_an_exception():
    model = _vit()

    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = model

        def forward(self, x):
            self.vit(x)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        attention_maps(Failing(), torch.randn(1, 3, 32, 32))
    assert all(m.fused_attn and not m.capture_attention for m in _attn_modules(model))


def test_model_outputs_unchanged_by_extraction_and_maps_are_the_models():
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)  # SDPA path
    maps, out = attention_maps(model, x, return_output=True)
    torch.testing.assert_close(out, fused, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        again = model(x)  # fused path again afterwards
    torch.testing.assert_close(again, fused, atol=0, rtol=0)
    # block 0's map recomputed by hand from its qkv weights
    with torch.no_grad():
        tokens, _ = model._embed(x)
        blk = model.blocks[0]
        qkv = blk.attn.qkv(blk.norm1(tokens)).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        expected = (qkv[0] @ qkv[1].transpose(-2, -1) * 16**-0.5).softmax(-1)
    torch.testing.assert_close(maps[0], expected, atol=1e-6, rtol=1e-5)


def test_attention_maps_can_keep_the_graph():
    model = _vit()
    maps = attention_maps(model, torch.randn(1, 3, 32, 32), detach=False)
    maps[-1][:, :, 0, 1:].sum().backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None


def test_non_vit_model_is_a_clear_error():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no maskworks Attention"):
        attention_maps(cnn, torch.randn(1, 3, 8, 8))


def test_token_grid_size():
    model = _vit(dynamic_img_size=True)
    assert token_grid_size(model, (32, 32)) == (4, 4)
    assert token_grid_size(model, (24, 40)) == (3, 5)
    maps = attention_maps(model, torch.randn(1, 3, 24, 40))
    assert attention_rollout(maps, grid_size=(3, 5)).shape == (1, 3, 5)


# --------------------------------------------------------------------------------------------- CLS attention
def test_cls_attention_prefix_tokens_and_non_square_grid():
    maps = _random_maps(2, 3, 2 + 3 * 5, 1)[0]
    cls = cls_attention(maps, grid_size=(3, 5), num_prefix_tokens=2)
    assert cls.shape == (2, 3, 3, 5)
    torch.testing.assert_close(cls.reshape(2, 3, 15), maps[:, :, 0, 2:])
    assert cls_attention(maps.mean(1), grid_size=(3, 5), num_prefix_tokens=2).shape == (2, 3, 5)
    with pytest.raises(ValueError, match="does not match"):
        cls_attention(maps, grid_size=(4, 4), num_prefix_tokens=2)
    with pytest.raises(ValueError, match="square grid"):
        cls_attention(maps, num_prefix_tokens=2)
    with pytest.raises(ValueError, match="class token"):
        cls_attention(maps, grid_size=(3, 5), num_prefix_tokens=0)


# --------------------------------------------------------------------------------------------- rollout
def test_identity_attention_gives_a_uniform_rollout():
    """Queries = keys after a per-head LayerNorm, with a huge scale: every token attends only to itself."""
    model = _vit(qk_norm=True)
    with torch.no_grad():
        for m in _attn_modules(model):
            dim = m.qkv.in_features
            m.qkv.weight[dim : 2 * dim] = m.qkv.weight[:dim]
            m.qkv.bias[dim : 2 * dim] = m.qkv.bias[:dim]
            m.scale = 1e4
    maps = attention_maps(model, torch.randn(2, 3, 32, 32))
    for a in maps:
        torch.testing.assert_close(a, torch.eye(17).expand_as(a), atol=1e-6, rtol=0)
    raw = attention_rollout(maps, normalize=None)
    torch.testing.assert_close(raw, torch.zeros(2, 4, 4), atol=1e-6, rtol=0)  # the CLS token keeps to itself
    rollout = attention_rollout(maps)
    assert torch.all(rollout == rollout.flatten(1)[:, :1, None])  # uniform map


def test_uniform_attention_gives_a_uniform_rollout():
    model = _vit()
    with torch.no_grad():
        for m in _attn_modules(model):
            dim = m.qkv.in_features
            m.qkv.weight[: 2 * dim] = 0.0  # q = k = 0: every score equal
            m.qkv.bias[: 2 * dim] = 0.0
    maps = attention_maps(model, torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(maps[0], torch.full_like(maps[0], 1 / 17))
    for fusion in ("mean", "max", "min"):
        torch.testing.assert_close(attention_rollout(maps, head_fusion=fusion), torch.ones(2, 4, 4))


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_single_layer_rollout_is_half_attention_plus_identity_row_normalised(fusion):
    (a,) = _random_maps(2, 3, 1 + 3 * 4, 1)
    fused = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[fusion]
    expected = 0.5 * (fused + torch.eye(13, dtype=a.dtype))
    expected = expected / expected.sum(-1, keepdim=True)
    raw = attention_rollout([a], head_fusion=fusion, grid_size=(3, 4), normalize=None)
    torch.testing.assert_close(raw, expected[:, 0, 1:].reshape(2, 3, 4), atol=1e-12, rtol=0)
    normed = attention_rollout([a], head_fusion=fusion, grid_size=(3, 4))
    torch.testing.assert_close(normed, raw / raw.flatten(1).amax(1)[:, None, None])
    minmax = attention_rollout([a], head_fusion=fusion, grid_size=(3, 4), normalize="minmax")
    assert torch.allclose(minmax.flatten(1).amin(1), torch.zeros(2, dtype=a.dtype))
    assert torch.allclose(minmax.flatten(1).amax(1), torch.ones(2, dtype=a.dtype))


def _reference_rollout(maps, fusion, discard_ratio, prefix=1, column_quirk=False):
    """vit-explain's algorithm re-derived per sample (not its code): fuse, discard the smallest entries of the
    flattened map except flat index 0, add I, halve, normalise, multiply; CLS row over patches / max."""
    out = []
    for s in range(maps[0].shape[0]):
        t = maps[0].shape[-1]
        result = torch.eye(t, dtype=torch.float64)
        for a in maps:
            f = {"mean": a[s].mean(0), "max": a[s].amax(0), "min": a[s].amin(0)}[fusion].clone()
            flat = f.flatten()
            order = torch.argsort(flat)[: int(t * t * discard_ratio)]
            flat[order[order != 0]] = 0.0
            f = flat.view(t, t)
            f = (f + torch.eye(t, dtype=torch.float64)) / 2
            # vit-explain divides by a.sum(dim=-1) without keepdim: entry (i, j) by the sum of row j
            f = f / f.sum(-1)[None, :] if column_quirk else f / f.sum(-1, keepdim=True)
            result = f @ result
        m = result[0, prefix:]
        out.append(m / m.max())
    return torch.stack(out)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.9])
def test_rollout_matches_the_vit_explain_rule(fusion, discard_ratio):
    maps = _random_maps(2, 4, 17, 3, seed=1)
    copies = [m.clone() for m in maps]
    ours = attention_rollout(maps, head_fusion=fusion, discard_ratio=discard_ratio)
    for m, c in zip(maps, copies):
        assert torch.equal(m, c)  # the captured maps are not modified in place (vit-explain's are)
    ref = _reference_rollout(maps, fusion, discard_ratio).view(2, 4, 4)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    if fusion == "mean" and discard_ratio == 0.0:  # rows already sum to 1: vit-explain's quirk is harmless
        quirk = _reference_rollout(maps, fusion, discard_ratio, column_quirk=True).view(2, 4, 4)
        torch.testing.assert_close(ours, quirk, atol=1e-10, rtol=1e-10)


def test_discard_never_drops_the_cls_to_cls_entry():
    t = 5  # 1 CLS + 2 x 2 patches
    a = torch.full((1, 1, t, t), 0.2, dtype=torch.float64)
    a[0, 0, 0, 0] = 1e-6  # the smallest entry of all
    a[0, 0, 0, 1:] = (1 - 1e-6) / 4
    raw = attention_rollout([a], discard_ratio=0.5, normalize=None)
    # 12 smallest of 25 are discarded: the CLS->CLS entry is among them by value but is kept
    f = a[0, 0].clone().flatten()
    order = torch.argsort(f, stable=True)[:12]
    assert 0 in order.tolist()
    f[order[order != 0]] = 0
    f = (f.view(t, t) + torch.eye(t, dtype=torch.float64)) / 2
    f = f / f.sum(-1, keepdim=True)
    torch.testing.assert_close(raw[0].flatten(), f[0, 1:], atol=1e-12, rtol=0)


def test_rollout_prefix_tokens_batch_and_errors():
    maps = _random_maps(2, 2, 2 + 3 * 5, 2)
    out = attention_rollout(maps, num_prefix_tokens=2, grid_size=(3, 5), discard_ratio=0.3)
    assert out.shape == (2, 3, 5) and out.min() >= 0 and torch.allclose(out.flatten(1).amax(1), torch.ones(2).double())
    single = attention_rollout([m[1:] for m in maps], num_prefix_tokens=2, grid_size=(3, 5), discard_ratio=0.3)
    torch.testing.assert_close(out[1:], single)  # each sample on its own (vit-explain discards in sample 0 only)
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(maps, head_fusion="median", num_prefix_tokens=2, grid_size=(3, 5))
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(maps, discard_ratio=1.0, num_prefix_tokens=2, grid_size=(3, 5))
    with pytest.raises(ValueError, match="empty"):
        attention_rollout([])
    with pytest.raises(ValueError, match="map 1"):
        attention_rollout([maps[0], maps[1][:, :, :-1, :-1]], num_prefix_tokens=2, grid_size=(3, 5))


# --------------------------------------------------------------------------------------------- overlays
def test_overlay_attention_blends_and_accepts_image_types():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    heat = torch.rand(1, 5, 7)
    out = overlay_attention(image, heat, alpha=0.4)
    assert out.shape == (40, 56, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay_attention(image, heat, alpha=0.0), image)
    full = overlay_attention(image, heat, alpha=1.0, cmap="viridis")
    assert not np.array_equal(full, image) and len(np.unique(full.reshape(-1, 3), axis=0)) > 10
    mid = overlay_attention(image, heat, alpha=0.5, cmap="viridis").astype(int)
    np.testing.assert_allclose(mid, 0.5 * image + 0.5 * full, atol=1.01)
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    np.testing.assert_array_equal(overlay_attention(chw, heat, alpha=0.4), out)
    np.testing.assert_array_equal(overlay_attention(Image.fromarray(image), heat.numpy(), alpha=0.4), out)
    assert overlay_attention(image, torch.ones(3, 3)).shape == (40, 56, 3)  # constant map
    with pytest.raises(ValueError, match="alpha"):
        overlay_attention(image, heat, alpha=1.5)
    with pytest.raises(ValueError, match="2-D"):
        overlay_attention(image, torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match="colour map"):
        overlay_attention(image, heat, cmap="nope")


def test_plot_head_attention_writes_png(tmp_path):
    model = _vit()
    maps = attention_maps(model, torch.randn(1, 3, 32, 32))
    heads = cls_attention(maps[-1])[0]
    path = plot_head_attention(heads, tmp_path / "heads.png", title="last block")
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    assert plot_head_attention(heads[None], tmp_path / "over.png", image=image).exists()
    with pytest.raises(ValueError, match="heads, h, w"):
        plot_head_attention(heads[0], tmp_path / "bad.png")

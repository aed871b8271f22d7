"""ViT layers: patch embed = linear on patches, SDPA = explicit attention, timm parity of layers and of the
position-embedding utilities, MAE's sin-cos tables."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.layers.vit_layers import (
    Attention,
    Block,
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    capture_attention,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
    resample_abs_pos_embed,
    resample_patch_embed,
)

timm = pytest.importorskip("timm")
from timm import layers as timm_layers  # noqa: E402
from timm.models import vision_transformer as timm_vit  # noqa: E402


def _patches(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C * ph * pw), row-major patches flattened in (C, ph, pw) order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, ph, pw)
    return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)


# ------------------------------------------------------------------------------------------------- patch embed
@pytest.mark.parametrize(("img", "patch"), [(32, 8), (32, 16), (32, 32), ((24, 40), (4, 8))])
def test_patch_embed_is_linear_on_flattened_patches(img, patch):
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=img, patch_size=patch, in_channels=3, embed_dim=20)
    ph, pw = pe.patch_size
    x = torch.randn(2, 3, *pe.img_size)
    linear = nn.Linear(3 * ph * pw, 20)
    linear.weight.data = pe.proj.weight.reshape(20, -1)
    linear.bias.data = pe.proj.bias
    torch.testing.assert_close(pe(x), linear(_patches(x, ph, pw)), atol=1e-5, rtol=1e-5)
    assert pe.num_patches == pe.grid_size[0] * pe.grid_size[1] == pe(x).shape[1]


def test_patch_embed_token_counts_and_sizes():
    assert [PatchEmbed(224, p).num_patches for p in (32, 16, 14, 8)] == [49, 196, 256, 784]
    pe = PatchEmbed((48, 80), (8, 16), embed_dim=8)
    assert pe.grid_size == (6, 5) and pe.feat_ratio() == 16 and pe.feat_ratio(as_scalar=False) == (8, 16)
    assert pe.dynamic_feat_size((50, 81)) == (6, 5)
    assert PatchEmbed(64, 16, dynamic_img_pad=True).dynamic_feat_size((50, 81)) == (4, 6)


def test_patch_embed_matches_timm_and_pads_right_bottom():
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 16}
    ours = PatchEmbed(**kw, in_channels=3, norm_layer=nn.LayerNorm, strict_img_size=False, dynamic_img_pad=True)
    ref = timm_layers.PatchEmbed(**kw, in_chans=3, norm_layer=nn.LayerNorm, strict_img_size=False, dynamic_img_pad=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 29, 42)
    torch.testing.assert_close(ours(x), ref(x))
    padded = F.pad(x, (0, 6, 0, 3))  # right / bottom to 32 x 48
    torch.testing.assert_close(ours(x), ours(padded))
    nchw = PatchEmbed(**kw, norm_layer=nn.LayerNorm, flatten=False, strict_img_size=False)
    nchw.load_state_dict(ref.state_dict())
    y = torch.randn(2, 3, 32, 40)
    torch.testing.assert_close(nchw(y).flatten(2).transpose(1, 2), ref(y))


def test_patch_embed_size_errors():
    with pytest.raises(ValueError, match="does not match img_size"):
        PatchEmbed(32, 8)(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        PatchEmbed(32, 8, strict_img_size=False)(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="patch_size"):
        PatchEmbed(32, (8, 8, 8))


# ------------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("qk_norm", [False, True])
def test_sdpa_and_explicit_attention_agree_and_match_timm(qk_norm):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm).eval()
    ref = timm_layers.Attention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm).eval()
    ref.load_state_dict(attn.state_dict(), strict=True)
    x = torch.randn(2, 17, 32)
    fused = attn(x)
    attn.fused_attn = False
    explicit, probs = attn(x, return_attention=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref(x), atol=1e-5, rtol=1e-5)
    # the probabilities are softmax(q k^T * scale) recomputed from the qkv weights
    q, k, _ = attn.qkv(x).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    torch.testing.assert_close(probs, (q @ k.transpose(-2, -1) / 8**0.5).softmax(-1), atol=1e-6, rtol=1e-5)
    assert attn.attn_probs is None  # only stored when capture_attention is on


def test_return_attention_works_with_fused_flag_on():
    attn = Attention(16, num_heads=2).eval()
    assert attn.fused_attn
    out, probs = attn(torch.randn(1, 5, 16), return_attention=True)
    assert out.shape == (1, 5, 16) and probs.shape == (1, 2, 5, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 5))


def test_capture_attention_collects_in_order_and_restores_flags():
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(24, 3, qkv_bias=True) for _ in range(3)]).eval()
    model[1].attn.fused_attn = False  # a mixed setting must come back as it was
    x = torch.randn(2, 10, 24)
    plain = model(x)
    with capture_attention(model) as maps:
        captured = model(x)
        assert all(not b.attn.fused_attn for b in model)
    assert [b.attn.fused_attn for b in model] == [True, False, True]
    assert all(not b.attn.capture_attention and b.attn.attn_probs is None for b in model)
    assert len(maps) == 3 and all(m.shape == (2, 3, 10, 10) for m in maps)
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 3, 10), atol=1e-5, rtol=0)
    # block order: the first map is block 0's attention of its own normed input
    _, first = model[0].attn(model[0].norm1(x), return_attention=True)
    torch.testing.assert_close(maps[0], first)
    with pytest.raises(RuntimeError), capture_attention(model):
        raise RuntimeError("boom")
    assert [b.attn.fused_attn for b in model] == [True, False, True]
    with pytest.raises(ValueError, match="no maskworks Attention"):
        with capture_attention(nn.Linear(2, 2)):
            pass


# ------------------------------------------------------------------------------------------------- mlp / block
@pytest.mark.parametrize("init_values", [None, 0.1])
def test_block_matches_timm(init_values):
    torch.manual_seed(0)
    kw = {"dim": 32, "num_heads": 4, "qkv_bias": True, "init_values": init_values}
    norm = partial(nn.LayerNorm, eps=1e-6)
    ours = Block(**kw, norm_layer=norm).eval()
    ref = timm_vit.Block(**kw, norm_layer=norm).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    assert [n for n, _ in ours.named_children()] == [
        "norm1",
        "attn",
        "ls1",
        "drop_path1",
        "norm2",
        "mlp",
        "ls2",
        "drop_path2",
    ]


def test_mlp_and_layer_scale():
    mlp = Mlp(8, 32, 4)
    assert mlp.fc1.out_features == 32 and mlp.fc2.out_features == 4 and mlp(torch.randn(3, 8)).shape == (3, 4)
    ls = LayerScale(6, init_values=0.5)
    torch.testing.assert_close(ls(torch.ones(2, 6)), torch.full((2, 6), 0.5))


def test_drop_path_identity_in_eval_and_unbiased_in_training():
    dp = DropPath(0.3)
    x = torch.randn(4, 5, 6)
    assert dp.eval()(x) is x
    torch.manual_seed(0)
    y = dp.train()(torch.ones(20000, 3, 2))
    per_sample = y[:, 0, 0]
    values = torch.unique(per_sample)
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / 0.7)
    assert torch.equal(y, per_sample[:, None, None].expand_as(y))  # whole samples dropped
    assert abs(y.mean().item() - 1.0) < 0.02
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.5)


# ------------------------------------------------------------------------------------------------- pos embed
@pytest.mark.parametrize("num_prefix", [0, 1, 5])
@pytest.mark.parametrize(("old", "new"), [((7, 7), (12, 12)), ((6, 9), (4, 13)), ((14, 14), (5, 7))])
@pytest.mark.parametrize("antialias", [True, False])
def test_resample_abs_pos_embed_matches_timm(num_prefix, old, new, antialias):
    torch.manual_seed(0)
    posemb = torch.randn(1, num_prefix + old[0] * old[1], 16)
    ours = resample_abs_pos_embed(posemb, new, old_size=old, num_prefix_tokens=num_prefix, antialias=antialias)
    ref = timm_layers.resample_abs_pos_embed(
        posemb, list(new), old_size=list(old), num_prefix_tokens=num_prefix, antialias=antialias
    )
    assert ours.shape == (1, num_prefix + new[0] * new[1], 16)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(ours[:, :num_prefix], posemb[:, :num_prefix])  # prefix rows kept bit-exactly


def test_resample_abs_pos_embed_identity_constant_and_errors():
    posemb = torch.randn(1, 197, 8)
    assert resample_abs_pos_embed(posemb, (14, 14)) is posemb
    assert resample_abs_pos_embed(posemb, 24).shape == (1, 577, 8)
    const = torch.full((1, 1 + 36, 4), 0.25)
    torch.testing.assert_close(resample_abs_pos_embed(const, (9, 5), antialias=False), torch.full((1, 46, 4), 0.25))
    half = resample_abs_pos_embed(posemb.half(), (20, 20))
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="not a square number"):
        resample_abs_pos_embed(torch.randn(1, 1 + 6 * 8, 4), (10, 10))
    with pytest.raises(ValueError, match="does not match"):
        resample_abs_pos_embed(torch.randn(1, 1 + 48, 4), (10, 10), old_size=(7, 7))


@pytest.mark.parametrize(("old", "new"), [((16, 16), (8, 8)), ((8, 8), (16, 16)), ((16, 16), (12, 20))])
def test_resample_patch_embed_matches_timm(old, new):
    torch.manual_seed(0)
    weight = torch.randn(6, 3, *old)
    ours = resample_patch_embed(weight, new)
    torch.testing.assert_close(ours, timm_layers.resample_patch_embed(weight, list(new)), atol=1e-5, rtol=1e-5)
    assert ours.shape == (6, 3, *new)
    assert resample_patch_embed(weight, old) is weight


def test_resample_patch_embed_preserves_tokens_of_a_resized_patch():
    # FlexiViT: <x, w> == <resize(x), w'> when upsampling (the resize matrix has full column rank)
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 8, 8, dtype=torch.float64).float()
    patch = torch.randn(1, 3, 8, 8)
    big = F.interpolate(patch, size=(16, 16), mode="bicubic", antialias=True)
    new = resample_patch_embed(weight, (16, 16))
    torch.testing.assert_close(F.conv2d(big, new, stride=16), F.conv2d(patch, weight, stride=8), atol=1e-4, rtol=1e-4)


# MAE's util/pos_embed.py (facebookresearch/mae), transcribed; np.float is float64
def _mae_1d(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _mae_2d(embed_dim, grid_size, cls_token=False):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([_mae_1d(embed_dim // 2, grid[0]), _mae_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize(("dim", "grid", "cls"), [(64, 14, True), (32, 5, False), (768, 14, True)])
def test_2d_sincos_equals_mae(dim, grid, cls):
    ours = get_2d_sincos_pos_embed(dim, grid, cls_token=cls)
    np.testing.assert_array_equal(ours, _mae_2d(dim, grid, cls))
    assert ours.shape == (grid * grid + cls, dim)


def test_2d_sincos_equals_hf_vit_mae():
    mae = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    ours = get_2d_sincos_pos_embed(64, 6, cls_token=True)
    if hasattr(mae, "get_2d_sincos_pos_embed"):  # transformers 4.x
        np.testing.assert_allclose(ours, mae.get_2d_sincos_pos_embed(64, 6, add_cls_token=True), atol=1e-12)
    elif hasattr(mae, "build_2d_sinusoidal_position_embedding"):  # 5.x: canonical layout + MAE half swap
        ref = mae.build_2d_sinusoidal_position_embedding(6, 6, embed_dim=64, cls_token=True, dtype=torch.float64)
        ref = torch.cat([ref[..., 32:], ref[..., :32]], dim=-1).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-12)
    else:
        pytest.skip("no 2-D sin-cos helper in this transformers version")


def test_sincos_formulas_non_square_and_errors():
    emb = get_1d_sincos_pos_embed(8, np.arange(5))
    assert emb.shape == (5, 8)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(emb[3, 1], np.sin(3 / 10000 ** (2 * 1 / 8)))
    assert np.abs(emb).max() <= 1.0
    grid = get_2d_sincos_pos_embed(16, (3, 5))
    assert grid.shape == (15, 16)
    # token (row 2, col 4): first half encodes the column, second half the row (MAE's layout)
    np.testing.assert_allclose(
        grid[2 * 5 + 4], np.concatenate([_mae_1d(8, np.array([4.0]))[0], _mae_1d(8, np.array([2.0]))[0]])
    )
    with pytest.raises(ValueError, match="even"):
        get_1d_sincos_pos_embed(7, [0, 1])
    with pytest.raises(ValueError, match="multiple of 4"):
        get_2d_sincos_pos_embed(10, 4)

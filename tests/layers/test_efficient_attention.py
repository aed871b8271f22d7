"""Efficient attention variants: exact formulas, equivalences with full attention, masking, approximation error."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskworks.layers.efficient_attention import (
    LinearAttention,
    PerformerAttention,
    PooledKVAttention,
    WindowAttention2d,
    gaussian_orthogonal_random_matrix,
    infer_grid_size,
)
from maskworks.layers.vit_layers import Attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

VARIANTS = [
    (LinearAttention, {}),
    (WindowAttention2d, {"window_size": 3}),
    (PerformerAttention, {"num_features": 16}),
    (PooledKVAttention, {"sr_ratio": 2}),
]


def _standard(dim=16, heads=2, dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Attention(dim, num_heads=heads, qkv_bias=True, **kwargs).to(dtype).eval()


def _qkv(attn, x):
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)  # (B, h, N, d)


def _heads_out(attn, out):
    b, h, n, d = out.shape
    return attn.proj(out.transpose(1, 2).reshape(b, n, h * d))


# --------------------------------------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=lambda v: getattr(v, "__name__", ""))
def test_variants_load_standard_attention_weights_and_backprop(cls, kwargs):
    std = _standard()
    module = cls(16, num_heads=2, qkv_bias=True, **kwargs)
    result = module.load_state_dict(std.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("sr.", "norm.")) for k in result.missing_keys)  # only the pooled reduction is new
    clone = cls.from_attention(std, **kwargs)
    assert torch.equal(clone.qkv.weight, std.qkv.weight) and torch.equal(clone.proj.bias, std.proj.bias)
    x = torch.randn(2, 36, 16, requires_grad=True)
    y = clone(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert clone.qkv.weight.grad is not None


@pytest.mark.parametrize("cls,kwargs", VARIANTS, ids=lambda v: getattr(v, "__name__", ""))
def test_bad_arguments_are_value_errors(cls, kwargs):
    with pytest.raises(ValueError, match="num_heads"):
        cls(10, num_heads=3, **kwargs)


def test_argument_checks():
    with pytest.raises(ValueError, match="window_size"):
        WindowAttention2d(16, 2, window_size=0)
    with pytest.raises(ValueError, match="num_features"):
        PerformerAttention(16, 2, num_features=0)
    with pytest.raises(ValueError, match="redraw_interval"):
        PerformerAttention(16, 2, redraw_interval=0)
    with pytest.raises(ValueError, match="sr_ratio"):
        PooledKVAttention(16, 2, sr_ratio=0)
    with pytest.raises(ValueError, match="pool"):
        PooledKVAttention(16, 2, sr_ratio=2, pool="max")
    with pytest.raises(ValueError, match="square grid"):
        WindowAttention2d(16, 2)(torch.randn(1, 10, 16))
    with pytest.raises(ValueError, match="grid_size"):
        WindowAttention2d(16, 2)(torch.randn(1, 12, 16), grid_size=(3, 5))
    assert infer_grid_size(12, (3, 4)) == (3, 4) and infer_grid_size(49) == (7, 7)
    with pytest.raises(TypeError, match="qkv"):
        LinearAttention.from_attention(torch.nn.Linear(4, 4))


# --------------------------------------------------------------------------------------------- linear attention
def test_linear_attention_equals_explicit_quadratic_form_float64():
    std = _standard(dtype=torch.float64)
    lin = LinearAttention.from_attention(std, eps=1e-6)
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    q, k, v = _qkv(std, x)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    sim = phi_q @ phi_k.transpose(-2, -1)  # (B, h, N, N), the matrix linear attention never forms
    expected = _heads_out(std, (sim @ v) / (sim.sum(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(lin(x), expected, atol=1e-10, rtol=1e-10)


def test_linear_attention_float32_and_half_inputs():
    std = _standard()
    lin = LinearAttention.from_attention(std, eps=0.0)
    x = torch.randn(1, 50, 16)
    q, k, v = _qkv(std, x)
    sim = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)
    expected = _heads_out(std, (sim / sim.sum(-1, keepdim=True)) @ v)
    torch.testing.assert_close(lin(x), expected, atol=1e-5, rtol=1e-5)
    lin_bf16 = LinearAttention.from_attention(std.to(torch.bfloat16))
    y = lin_bf16(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=5e-2)


# --------------------------------------------------------------------------------------------- window attention
def _window_reference(std, x, grid, window):
    """Per-window softmax attention over the real tokens of each (border-clipped) window, by slicing."""
    b, n, c = x.shape
    h, w = grid
    q, k, v = _qkv(std, x)  # (B, heads, N, d)
    out = torch.zeros_like(q)
    idx = torch.arange(n).view(h, w)
    for i in range(0, h, window[0]):
        for j in range(0, w, window[1]):
            sel = idx[i : i + window[0], j : j + window[1]].reshape(-1)
            out[:, :, sel] = F.scaled_dot_product_attention(q[:, :, sel], k[:, :, sel], v[:, :, sel])
    return _heads_out(std, out)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("window", [(7, 9), (8, 12), (5, 5)])
def test_window_covering_the_grid_is_full_attention(fused, window):
    std = _standard()
    win = WindowAttention2d.from_attention(std, window_size=window)
    win.fused_attn = fused
    x = torch.randn(2, 7 * 9, 16)
    if window[0] >= 7 and window[1] >= 9:
        torch.testing.assert_close(win(x, grid_size=(7, 9)), std(x), atol=1e-5, rtol=1e-5)
    else:  # smaller window: differs from global attention
        assert not torch.allclose(win(x, grid_size=(7, 9)), std(x), atol=1e-3)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("grid,window", [((5, 7), (3, 3)), ((6, 6), (3, 3)), ((4, 9), (4, 2)), ((3, 3), (2, 2))])
def test_window_attention_pads_and_masks_padded_keys(fused, grid, window):
    std = _standard()
    win = WindowAttention2d.from_attention(std, window_size=window)
    win.fused_attn = fused
    x = torch.randn(2, grid[0] * grid[1], 16)
    torch.testing.assert_close(win(x, grid_size=grid), _window_reference(std, x, grid, window), atol=1e-5, rtol=1e-5)


def test_window_attention_without_mask_would_differ():
    """Sanity check of the test above: attending to the zero-padded tokens changes the border windows."""
    std = _standard()
    x = torch.randn(1, 5 * 7, 16)
    padded = torch.zeros(1, 6, 9, 16)
    padded[:, :5, :7] = x.view(1, 5, 7, 16)
    win = WindowAttention2d.from_attention(std, window_size=3)
    # the unmasked alternative, i.e. padding the grid with zero tokens before qkv and attending over everything
    unmasked = WindowAttention2d.from_attention(std, window_size=3)(padded.view(1, 54, 16), grid_size=(6, 9))
    unmasked = unmasked.view(1, 6, 9, 16)[:, :5, :7].reshape(1, 35, 16)
    assert not torch.allclose(win(x, grid_size=(5, 7)), unmasked, atol=1e-4)


def test_window_attention_is_local():
    torch.manual_seed(0)
    win = WindowAttention2d(16, 2, window_size=4).eval()
    x = torch.randn(1, 8 * 8, 16)
    y = win(x, grid_size=(8, 8)).view(1, 8, 8, 16)
    x2 = x.clone().view(1, 8, 8, 16)
    x2[:, :4, :4] += torch.randn(1, 4, 4, 16)  # perturb the top-left window only
    y2 = win(x2.reshape(1, 64, 16), grid_size=(8, 8)).view(1, 8, 8, 16)
    assert not torch.allclose(y[:, :4, :4], y2[:, :4, :4])
    torch.testing.assert_close(y[:, 4:], y2[:, 4:])
    torch.testing.assert_close(y[:, :4, 4:], y2[:, :4, 4:])


# --------------------------------------------------------------------------------------------- performer
def test_orthogonal_random_features_are_orthogonal_in_blocks():
    gen = torch.Generator().manual_seed(0)
    w = gaussian_orthogonal_random_matrix(20, 8, generator=gen)
    assert w.shape == (20, 8)
    for block in (w[:8], w[8:16]):
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-4, rtol=0)
    w2 = gaussian_orthogonal_random_matrix(20, 8, scaling="sqrt_dim", generator=gen)
    torch.testing.assert_close(w2.norm(dim=1), torch.full((20,), math.sqrt(8)))


def test_performer_error_decreases_with_more_features():
    std = _standard(dim=32, heads=2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = 0.5 * torch.randn(2, 64, 32, generator=gen, dtype=torch.float64)
    q, k, v = _qkv(std, x)
    exact = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d): compare before the output projection
    errors = []
    for m in (8, 64, 512):
        errs = []
        for seed in range(4):
            perf = PerformerAttention.from_attention(std, num_features=m, seed=seed).double()
            perf.proj = torch.nn.Identity()  # the attention output itself, (B, N, C)
            approx = perf(x).view(2, 64, 2, 16).transpose(1, 2)
            errs.append(((approx - exact).norm() / exact.norm()).item())
        errors.append(sum(errs) / len(errs))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.5 * errors[0] and errors[2] < 0.1, errors


def test_performer_features_are_seeded_saved_and_redrawn():
    a = PerformerAttention(16, 2, num_features=8, qkv_bias=True, seed=3)
    b = PerformerAttention(16, 2, num_features=8, seed=3)
    assert torch.equal(a.projection_matrix, b.projection_matrix)
    assert "projection_matrix" in a.state_dict()
    c = PerformerAttention(16, 2, num_features=8, qkv_bias=True, seed=4)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.projection_matrix, a.projection_matrix)
    std_state = _standard().state_dict()
    before = c.projection_matrix.clone()
    c.load_state_dict(std_state)  # a standard Attention's weights: features kept
    assert torch.equal(c.projection_matrix, before)

    x = torch.randn(1, 9, 16)
    r = PerformerAttention(16, 2, num_features=8, redraw_interval=2, seed=0).train()
    first = r.projection_matrix.clone()
    r(x)
    r(x)
    assert torch.equal(r.projection_matrix, first)  # two calls on the same features
    r(x)
    assert not torch.equal(r.projection_matrix, first)  # redrawn before the third
    r.eval()
    frozen = r.projection_matrix.clone()
    for _ in range(3):
        r(x)
    assert torch.equal(r.projection_matrix, frozen)  # never in eval mode
    r.redraw_features(torch.Generator().manual_seed(7))
    assert not torch.equal(r.projection_matrix, frozen)


# --------------------------------------------------------------------------------------------- pooled KV
@pytest.mark.parametrize("fused", [True, False])
def test_pooled_kv_at_ratio_one_is_full_attention(fused):
    std = _standard()
    pooled = PooledKVAttention.from_attention(std, sr_ratio=1)
    pooled.fused_attn = fused
    assert pooled.sr is None
    x = torch.randn(2, 36, 16)
    torch.testing.assert_close(pooled(x), std(x), atol=1e-6, rtol=1e-5)
    with_cls = PooledKVAttention.from_attention(std, sr_ratio=1, num_prefix_tokens=1)
    x = torch.randn(2, 37, 16)
    torch.testing.assert_close(with_cls(x), std(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pool", ["conv", "avg"])
@pytest.mark.parametrize("grid", [(6, 8), (5, 7)])
def test_pooled_kv_matches_reduced_reference(pool, grid):
    std = _standard()
    pooled = PooledKVAttention.from_attention(std, sr_ratio=2, pool=pool, num_prefix_tokens=1)
    torch.nn.init.normal_(pooled.norm.weight, 1.0, 0.1)
    x = torch.randn(2, 1 + grid[0] * grid[1], 16)
    h, w = grid
    fmap = x[:, 1:].transpose(1, 2).reshape(2, 16, h, w)
    if pool == "conv":
        red = F.conv2d(F.pad(fmap, (0, w % 2, 0, h % 2)), pooled.sr.weight, pooled.sr.bias, stride=2)
    else:  # mean of the real tokens of each 2x2 cell
        ones = torch.ones(1, 1, h, w)
        padded = (0, w % 2, 0, h % 2)
        red = F.avg_pool2d(F.pad(fmap, padded), 2) / F.avg_pool2d(F.pad(ones, padded), 2)
    assert red.shape[-2:] == (math.ceil(h / 2), math.ceil(w / 2))
    kv_tokens = torch.cat([x[:, :1], pooled.norm(red.flatten(2).transpose(1, 2))], dim=1)
    q = F.linear(x, std.qkv.weight[:16], std.qkv.bias[:16]).view(2, -1, 2, 8).transpose(1, 2)
    kv = F.linear(kv_tokens, std.qkv.weight[16:], std.qkv.bias[16:]).view(2, -1, 2, 2, 8).permute(2, 0, 3, 1, 4)
    expected = _heads_out(std, F.scaled_dot_product_attention(q, kv[0], kv[1]))
    torch.testing.assert_close(pooled(x, grid_size=grid), expected, atol=1e-5, rtol=1e-5)

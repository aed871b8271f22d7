"""Multi-scale deformable attention: equal to HF transformers' pure-PyTorch Mask2Former path (function and module,
point and box references, padding), hand-checked sampling, Deformable DETR's initialisation, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from maskworks.layers.deform_attn import MultiScaleDeformableAttention, multi_scale_deformable_attention

SHAPES = [(6, 8), (3, 4), (2, 2)]  # non-square levels


def _inputs(b=2, q=5, heads=4, d=8, points=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, heads, d, generator=g, dtype=dtype)
    # some locations outside [0, 1] to exercise the zero padding
    loc = torch.rand(b, q, heads, len(SHAPES), points, 2, generator=g, dtype=dtype) * 1.2 - 0.1
    weights = torch.rand(b, q, heads, len(SHAPES), points, generator=g, dtype=dtype)
    return value, loc, weights / weights.sum((-1, -2), keepdim=True)


def test_function_equals_hf():
    hf = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    value, loc, weights = _inputs()
    ours = multi_scale_deformable_attention(value, torch.tensor(SHAPES), loc, weights)
    ref = hf.multi_scale_deformable_attention(value, SHAPES, loc, weights)
    assert ours.shape == (2, 5, 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_sampling_by_hand():
    """One level, one head, one point: the output is the bilinear value at the location (pixel i covers
    [i / W, (i + 1) / W)), and zero-padded outside."""
    h, w = 3, 4
    grid = torch.arange(h * w, dtype=torch.float64).view(1, h * w, 1, 1)
    # x = 0.5 cells right of pixel 1's centre, y = pixel 2's centre: value (2 * 4 + 1) + 0.5 = 9.5
    x, y = (1.5 + 0.5) / w, 2.5 / h
    loc = torch.tensor([x, y], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    out = multi_scale_deformable_attention(grid, [(h, w)], loc, torch.ones(1, 1, 1, 1, 1, dtype=torch.float64))
    assert out.item() == pytest.approx(9.5)
    # half a cell beyond the right border, on row 0: halfway between pixel 3 (value 3) and the zero padding
    loc = torch.tensor([1.0, 0.5 / h], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    out = multi_scale_deformable_attention(grid, [(h, w)], loc, torch.ones(1, 1, 1, 1, 1, dtype=torch.float64))
    assert out.item() == pytest.approx(1.5)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_equals_hf(ref_dim):
    hf = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")
    torch.manual_seed(0)
    dim, heads, points = 32, 4, 3
    ref = hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(dim, heads, len(SHAPES), points).double()
    ours = MultiScaleDeformableAttention(dim, heads, len(SHAPES), points).double()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours.load_state_dict(ref.state_dict())  # the same parameter names
    s = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, 7, dim, dtype=torch.float64), torch.randn(2, s, dim, dtype=torch.float64)
    pos = torch.randn(2, 7, dim, dtype=torch.float64)
    refs = torch.rand(2, 7, len(SHAPES), ref_dim, dtype=torch.float64)
    padding = torch.rand(2, s) < 0.2
    expected, _ = ref(query, attention_mask=padding, encoder_hidden_states=value, position_embeddings=pos,
                      reference_points=refs, spatial_shapes_list=SHAPES)  # fmt: skip
    got = ours(query, value, refs, torch.tensor(SHAPES), query_pos=pos, padding_mask=padding)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_deformable_detr_initialisation():
    """Zero offset / attention weights; head h's point k starts k + 1 cells out in direction 2 pi h / heads, scaled
    onto the unit square's border; every level alike."""
    m = MultiScaleDeformableAttention(16, num_heads=4, num_levels=2, num_points=3)
    assert not m.sampling_offsets.weight.any() and not m.attention_weights.weight.any()
    assert not m.attention_weights.bias.any()
    bias = m.sampling_offsets.bias.view(4, 2, 3, 2)
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # cos, sin of 0, 90, 180, 270 degrees
    for h in range(4):
        for k in range(3):
            torch.testing.assert_close(bias[h, 0, k], dirs[h] * (k + 1), atol=1e-6, rtol=0)
            torch.testing.assert_close(bias[h, 1, k], bias[h, 0, k])
    # 8 heads: the diagonal heads land on the square's corners
    m8 = MultiScaleDeformableAttention(16, num_heads=8, num_levels=1, num_points=1)
    torch.testing.assert_close(m8.sampling_offsets.bias.view(8, 2)[1], torch.tensor([1.0, 1.0]), atol=1e-6, rtol=0)
    assert math.isclose(float(m8.sampling_offsets.bias.detach().view(8, 2)[2, 0]), 0.0, abs_tol=1e-6)


def test_gradients_and_errors():
    value, loc, weights = _inputs(b=1, q=2, heads=2, d=3, points=2)
    for t in (value, loc, weights):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, p, a: multi_scale_deformable_attention(v, SHAPES, p.clamp(0.05, 0.95), a), (value, loc, weights)
    )
    with pytest.raises(ValueError, match="spatial_shapes"):
        multi_scale_deformable_attention(value, [(6, 8), (3, 4)], loc, weights)
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(30, num_heads=4)
    with pytest.raises(ValueError, match="num_points"):
        MultiScaleDeformableAttention(32, num_points=0)
    m = MultiScaleDeformableAttention(16, 2, num_levels=3, num_points=2)
    with pytest.raises(ValueError, match="reference_points"):
        m(torch.randn(1, 2, 16), torch.randn(1, 64, 16), torch.rand(1, 2, 3, 3), SHAPES)

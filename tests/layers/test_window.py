"""Swin window layers: partition round trip, SW-MSA mask and relative index against brute force, parity with timm."""

from __future__ import annotations

import itertools

import pytest
import torch

from maskworks.layers import (
    PatchMerging,
    RelativePositionBias,
    WindowAttention,
    pad_to_window,
    relative_position_index,
    resize_relative_position_bias_table,
    shifted_window_mask,
    window_and_shift_for_size,
    window_partition,
    window_reverse,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

timm_swin = pytest.importorskip("timm.models.swin_transformer")
timm_swin_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
timm_layers = pytest.importorskip("timm.layers")


@pytest.mark.parametrize("window", [2, (4, 3)])
def test_partition_reverse_round_trip(window):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 5)
    windows = window_partition(x, window)
    mh, mw = (window, window) if isinstance(window, int) else window
    assert windows.shape == (2 * (8 // mh) * (6 // mw), mh, mw, 5)
    # the first window is the top-left block of the first image, the second its right neighbour
    torch.testing.assert_close(windows[0], x[0, :mh, :mw])
    torch.testing.assert_close(windows[1], x[0, :mh, mw : 2 * mw])
    torch.testing.assert_close(window_reverse(windows, window, 8, 6), x, rtol=0, atol=0)
    torch.testing.assert_close(window_partition(x, window), timm_swin.window_partition(x, (mh, mw)))


def test_partition_rejects_non_multiple_and_pad_fixes_it():
    x = torch.randn(1, 7, 5, 3)
    with pytest.raises(ValueError, match="multiple"):
        window_partition(x, 4)
    padded, pad = pad_to_window(x, 4)
    assert pad == (1, 3) and padded.shape == (1, 8, 8, 3)
    torch.testing.assert_close(padded[:, :7, :5], x)
    assert padded[:, 7:].abs().sum() == 0 and padded[:, :, 5:].abs().sum() == 0


def test_window_clipped_to_small_map():
    assert window_and_shift_for_size((5, 20), 7, 3) == ((5, 7), (0, 3))
    assert window_and_shift_for_size(7, 7, 3) == ((7, 7), (0, 0))


def _brute_force_mask(H, W, M, s):
    """Label every pixel of the rolled map by its origin block, tokens of a window may attend iff same label."""
    mh, mw = M
    sh, sw = s
    # pixel (i, j) of the rolled map came from ((i + sh) % H, (j + sw) % W); it lies in the wrapped part
    # iff that index wrapped around the border.
    labels = torch.zeros(H, W, dtype=torch.long)
    for i, j in itertools.product(range(H), range(W)):
        oi, oj = i + sh, j + sw
        labels[i, j] = (oi >= H) * 2 + (oj >= W)  # which side of each wrapped border the token came from
    nW = (H // mh) * (W // mw)
    mask = torch.zeros(nW, mh * mw, mh * mw)
    w = 0
    for wi in range(H // mh):
        for wj in range(W // mw):
            toks = [(wi * mh + a, wj * mw + b) for a in range(mh) for b in range(mw)]
            for p, q in itertools.product(range(len(toks)), repeat=2):
                if labels[toks[p]] != labels[toks[q]]:
                    mask[w, p, q] = -100.0
            w += 1
    return mask


@pytest.mark.parametrize("H, W, M, s", [(8, 8, (4, 4), (2, 2)), (12, 9, (4, 3), (2, 1)), (6, 6, (3, 3), (1, 1))])
def test_shifted_window_mask_matches_brute_force_and_timm(H, W, M, s):
    mask = shifted_window_mask(H, W, M, s)
    assert mask.shape == ((H // M[0]) * (W // M[1]), M[0] * M[1], M[0] * M[1])
    torch.testing.assert_close(mask, _brute_force_mask(H, W, M, s), rtol=0, atol=0)

    block = timm_swin.SwinTransformerBlock(dim=8, input_resolution=(H, W), num_heads=2, window_size=M, shift_size=s)
    torch.testing.assert_close(mask, block.attn_mask, rtol=0, atol=0)


def test_shifted_window_mask_blocks_wrapped_neighbours():
    H = W = 8
    M, s = 4, 2
    mask = shifted_window_mask(H, W, M, s)
    # original coordinates of every token of every window of the rolled map
    rows = (torch.arange(H) + s) % H
    cols = (torch.arange(W) + s) % W
    orig = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).float()  # (H, W, 2)
    orig_w = window_partition(orig[None], M).reshape(-1, M * M, 2)  # (nW, N, 2)
    dist = (orig_w[:, :, None] - orig_w[:, None, :]).abs().amax(-1)  # Chebyshev distance in the original map
    allowed = mask == 0
    # allowed pairs were genuinely close (no wrap), blocked pairs were far apart (across the wrapped border)
    assert (dist[allowed] < M).all()
    assert (dist[~allowed] > M).all()
    # the last window mixes four corners: every query sees exactly its own quarter (s * s tokens)
    assert allowed[-1].sum(-1).eq(s * s).all()
    assert allowed[0].all()  # an interior window is not masked at all
    assert torch.equal(shifted_window_mask(H, W, M, s, mask_value=float("-inf")).isinf(), ~allowed)


def test_shifted_window_mask_without_shift_is_zero():
    assert shifted_window_mask(8, 8, 4, 0).abs().sum() == 0
    with pytest.raises(ValueError):
        shifted_window_mask(8, 8, 4, 4)


@pytest.mark.parametrize("window", [3, (2, 4), (5, 3)])
def test_relative_position_index_matches_brute_force(window):
    mh, mw = (window, window) if isinstance(window, int) else window
    idx = relative_position_index(window)
    coords = [(y, x) for y in range(mh) for x in range(mw)]
    offsets = sorted({(a[0] - b[0], a[1] - b[1]) for a in coords for b in coords})
    assert len(offsets) == (2 * mh - 1) * (2 * mw - 1)
    expected = torch.tensor([[offsets.index((a[0] - b[0], a[1] - b[1])) for b in coords] for a in coords])
    assert idx.dtype == torch.int64
    torch.testing.assert_close(idx, expected, rtol=0, atol=0)
    torch.testing.assert_close(idx, timm_swin.get_relative_position_index(mh, mw), rtol=0, atol=0)


def test_relative_position_bias_module():
    torch.manual_seed(0)
    rpb = RelativePositionBias((3, 4), num_heads=2)
    assert rpb.relative_position_bias_table.shape == (5 * 7, 2)
    assert "relative_position_index" not in rpb.state_dict()
    bias = rpb()
    assert bias.shape == (2, 12, 12)
    # the diagonal is offset (0, 0) for every token
    centre = 2 * 7 + 3
    torch.testing.assert_close(
        bias.diagonal(dim1=1, dim2=2), rpb.relative_position_bias_table[centre, :, None].expand(2, 12)
    )


def _paired_attention(window=(4, 3), dim=16, heads=4):
    torch.manual_seed(0)
    ours = WindowAttention(dim, heads, window)
    ref = timm_swin.WindowAttention(dim, heads, window_size=window)
    with torch.no_grad():
        ref.relative_position_bias_table.normal_()  # a large bias so that a wrong index shows
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_window_attention_matches_timm(with_mask, fused):
    ours, ref = _paired_attention()
    H, W, M = 8, 6, (4, 3)
    x = torch.randn(2, H, W, 16)
    windows = window_partition(x, M).reshape(-1, 12, 16)  # (2 * 4, 12, 16)
    mask = shifted_window_mask(H, W, M, (2, 1)) if with_mask else None
    ref.fused_attn = fused
    ours.fused_attn = fused
    with torch.no_grad():
        expected = ref(windows, mask=mask)
        out = ours(windows, mask=mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_window_attention_sdpa_equals_explicit(with_mask):
    ours, _ = _paired_attention()
    x = torch.randn(2 * 4, 12, 16)
    mask = shifted_window_mask(8, 6, (4, 3), (2, 1)) if with_mask else None
    with torch.no_grad():
        fused = ours(x, mask=mask)
        explicit, probs = ours(x, mask=mask, return_attention=True)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-5)
    assert probs.shape == (8, 4, 12, 12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8, 4, 12))
    if with_mask:
        blocked = (mask < 0)[None, :, None].expand(2, -1, 4, -1, -1).reshape(8, 4, 12, 12)
        assert probs[blocked].max() < 1e-30  # exp(-100) relative to the allowed logits


def test_window_attention_rejects_wrong_token_count():
    attn = WindowAttention(8, 2, 3)
    with pytest.raises(ValueError, match="tokens per window"):
        attn(torch.randn(2, 8, 8))


@pytest.mark.parametrize("old, new", [(3, 5), (7, 12), (5, 3)])
def test_resize_table_bicubic_matches_timm(old, new):
    torch.manual_seed(0)
    table = torch.randn((2 * old - 1) ** 2, 3)
    out = resize_relative_position_bias_table(table, old, new)
    assert out.shape == ((2 * new - 1) ** 2, 3)
    expected = timm_layers.resize_rel_pos_bias_table_simple(table, (new, new), ((2 * new - 1) ** 2, 3))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")  # raised inside timm's interpolator
@pytest.mark.parametrize("old, new", [(3, 5), ((7, 4), (12, 6)), (5, 3)])
def test_resize_table_geometric_matches_timm(old, new):
    torch.manual_seed(0)
    (oh, ow) = (old, old) if isinstance(old, int) else old
    (nh, nw) = (new, new) if isinstance(new, int) else new
    table = torch.randn((2 * oh - 1) * (2 * ow - 1), 3)
    out = resize_relative_position_bias_table(table, old, new, mode="geometric")
    dst = (2 * nh - 1) * (2 * nw - 1)
    assert out.shape == (dst, 3)
    expected = timm_layers.resize_rel_pos_bias_table(table, (nh, nw), (dst, 3), old_window_size=(oh, ow))
    # timm places the sample positions in float32, ours in float64
    torch.testing.assert_close(out, expected, rtol=0, atol=5e-5)


def test_resize_same_window_is_identity_and_set_window_size():
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, 3)
    table = attn.relative_position_bias_table.detach().clone()
    assert resize_relative_position_bias_table(table, 3, 3) is table
    attn.set_window_size(5)
    assert attn.relative_position_bias_table.shape == (81, 2)
    assert attn.relative_position_index.shape == (25, 25)
    assert attn(torch.randn(3, 25, 8)).shape == (3, 25, 8)
    with pytest.raises(ValueError):
        resize_relative_position_bias_table(table, 4, 5)


@pytest.mark.parametrize("H, W", [(8, 6), (7, 5), (6, 9)])
@pytest.mark.parametrize("order", ["v1", "v2"])
def test_patch_merging_matches_timm(H, W, order):
    torch.manual_seed(0)
    ours = PatchMerging(6, order=order)
    ref = (timm_swin.PatchMerging if order == "v1" else timm_swin_v2.PatchMerging)(6)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, H, W, 6)
    out = ours(x)
    assert out.shape == (2, (H + 1) // 2, (W + 1) // 2, 12)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-5)


def test_patch_merging_channel_order():
    merge = PatchMerging(1, out_dim=4, norm_layer=lambda c: torch.nn.Identity())
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.eye(4))
    x = torch.arange(4.0).reshape(1, 2, 2, 1)  # [[0, 1], [2, 3]]
    # x(0,0), x(1,0), x(0,1), x(1,1)
    assert merge(x).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]

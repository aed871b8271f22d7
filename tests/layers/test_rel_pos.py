"""Decomposed relative position attention: the SDPA path with head groups equals the explicit computation, and the
table lookup equals segment_anything's (MViTv2's rule) for equal and unequal query / key sizes."""

from __future__ import annotations

import pytest
import torch

from maskworks.layers import RelPosAttention, get_rel_pos
from maskworks.layers import rel_pos as rel_pos_module


def _explicit(attn: RelPosAttention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    heads, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4).reshape(3, b * heads, h * w, d)
    q, k, v = qkv.unbind(0)
    logits = (q * d**-0.5) @ k.transpose(-2, -1)
    r_h, r_w = get_rel_pos(h, h, attn.rel_pos_h), get_rel_pos(w, w, attn.rel_pos_w)
    for i in range(h * w):  # one query at a time, straight from the definition
        qi = q[:, i]  # (B * heads, d)
        yi, xi = divmod(i, w)
        bias_h = qi @ r_h[yi].t()  # (B * heads, k_h)
        bias_w = qi @ r_w[xi].t()  # (B * heads, k_w)
        logits[:, i] += (bias_h[:, :, None] + bias_w[:, None, :]).reshape(-1, h * w)
    out = logits.softmax(-1) @ v  # (B * heads, N, d)
    return attn.proj(out.reshape(b, heads, h, w, d).permute(0, 2, 3, 1, 4).reshape(b, h, w, c))


@pytest.mark.parametrize("budget", [None, 1])
def test_sdpa_path_equals_explicit(monkeypatch, budget):
    if budget is not None:  # one head per group
        monkeypatch.setattr(rel_pos_module, "_BIAS_BUDGET", budget)
    torch.manual_seed(0)
    attn = RelPosAttention(32, num_heads=4, use_rel_pos=True, rel_pos_zero_init=False, input_size=(5, 6)).eval()
    x = torch.randn(2, 5, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _explicit(attn, x), atol=1e-5, rtol=0)


def test_table_lookup_equals_segment_anything():
    sa = pytest.importorskip("segment_anything.modeling.image_encoder")
    torch.manual_seed(1)
    for q_size, k_size, rows in ((7, 7, 13), (4, 8, 15), (8, 4, 15), (6, 6, 9)):  # last: a table to resize
        table = torch.randn(rows, 5)
        torch.testing.assert_close(get_rel_pos(q_size, k_size, table), sa.get_rel_pos(q_size, k_size, table))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="input_size"):
        RelPosAttention(8, 2, use_rel_pos=True)
    with pytest.raises(ValueError, match="num_heads=3 must divide dim=8"):
        RelPosAttention(8, 3)

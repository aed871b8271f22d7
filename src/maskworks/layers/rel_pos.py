"""Decomposed relative position embeddings (Li et al., "MViTv2: Improved Multiscale Vision Transformers for
Classification and Detection", CVPR 2022), as used by ViTDet (Li et al., ECCV 2022) and SAM's image encoder.

The bias of query ``(i_h, i_w)`` towards key ``(j_h, j_w)`` is ``q . R_h[i_h - j_h] + q . R_w[i_w - j_w]``: one
learned table per axis, ``2 * size - 1`` rows of ``head_dim``, instead of one entry per pair of positions. A table
made for another size is resized linearly along its rows; when query and key grids differ in size the relative
coordinates are rescaled to the larger one (MViTv2's rule).

:class:`RelPosAttention` adds that bias to multi-head self-attention over a ``(B, H, W, C)`` map and runs it through
``F.scaled_dot_product_attention`` with the bias as its additive mask (several times faster on CPU than the
explicit ``softmax(q k^T + bias) v``); for large maps the heads go through in groups so the ``N x N`` bias never
exceeds a fixed memory budget.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RelPosAttention", "decomposed_rel_pos_bias", "get_rel_pos"]

# The additive bias of one group of heads is kept under this many elements (64 MB in float32: one head of a 64 x 64
# grid). Smaller, reused buffers measured faster on CPU than one large bias (fewer page faults, better caching).
_BIAS_BUDGET = 67108864


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """The table rows for every (query, key) pair of one axis: ``(q_size, k_size, C)``.

    Args:
        q_size: query positions along the axis.
        k_size: key positions along the axis.
        rel_pos: the table ``(L, C)``; resized linearly to ``2 * max(q_size, k_size) - 1`` rows when ``L`` differs.
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()  # (length, C)
    q_scale, k_scale = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    index = (q_coords - k_coords + (k_size - 1) * k_scale).long()  # (q_size, k_size)
    return rel_pos[index]


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The additive attention bias ``(B, q_h * q_w, k_h * k_w)`` of queries ``q`` ``(B, q_h * q_w, C)``.

    ``B`` may be batch x heads. The queries are the unscaled ones (the bias does not carry the ``C^-0.5`` factor).
    ``out``: a contiguous buffer of at least ``B * q_h * q_w * k_h * k_w`` elements to write into (reusing one buffer
    across calls spares the allocator a fresh, page-faulting block per call).
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    r_h = get_rel_pos(q_h, k_h, rel_pos_h)  # (q_h, k_h, C)
    r_w = get_rel_pos(q_w, k_w, rel_pos_w)  # (q_w, k_w, C)
    b, _, c = q.shape
    r_q = q.reshape(b, q_h, q_w, c)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, r_h.to(q.dtype))  # (B, q_h, q_w, k_h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, r_w.to(q.dtype))  # (B, q_h, q_w, k_w)
    # written into a contiguous buffer: einsum may return permuted strides, and an output that follows them would
    # make the reshape below copy the whole (N x N) bias
    numel = b * q_h * q_w * k_h * k_w
    if out is None or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        # out= has no gradient and no export / compile form: a broadcast add gives a fresh contiguous tensor
        bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, q_h, q_w, k_h, k_w)
    else:
        bias = out.view(-1)[:numel].view(b, q_h, q_w, k_h, k_w)
        torch.add(rel_h[..., :, None], rel_w[..., None, :], out=bias)
    return bias.reshape(b, q_h * q_w, k_h * k_w)


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a ``(B, H, W, C)`` map, optionally with decomposed relative positions.

    Parameters: ``qkv``, ``proj`` and, with ``use_rel_pos``, ``rel_pos_h`` ``(2 H - 1, head_dim)`` and
    ``rel_pos_w`` ``(2 W - 1, head_dim)`` (the names of SAM's and ViTDet's attention).

    Args:
        dim: channels.
        num_heads: heads.
        qkv_bias: bias of the ``qkv`` projection.
        use_rel_pos: add the decomposed relative position bias.
        rel_pos_zero_init: start the tables at zero (otherwise truncated normal, std 0.02).
        input_size: the ``(H, W)`` the tables are made for (required with ``use_rel_pos``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size (H, W) is required with use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # heads in groups so that one group's (N x N) bias stays under the budget
            group = max(1, min(self.num_heads, _BIAS_BUDGET // max(1, b * n * n)))
            buffer = q.new_empty(b * group * n * n)  # one bias buffer for all groups
            outs = []
            for start in range(0, self.num_heads, group):
                qs, ks, vs = (t[:, start : start + group] for t in (q, k, v))  # (B, g, N, d)
                g = qs.shape[1]
                bias = decomposed_rel_pos_bias(
                    qs.reshape(b * g, n, self.head_dim), self.rel_pos_h, self.rel_pos_w, (h, w), (h, w), out=buffer
                ).view(b, g, n, n)
                outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias.to(qs.dtype)))
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(b, h, w, c)  # (B, H, W, C)
        return self.proj(out)

"""Bottom-up instance grouping and overlap resolution (Q16: dense, touching and overlapping instances).

* :func:`cluster_embeddings`: pixels whose embeddings (trained with :class:`maskworks.losses.DiscriminativeLoss`)
  lie together form one instance: seeded mean-shift with a flat kernel of radius ``bandwidth``, the grouping of
  De Brabandere et al. (2017).
* :func:`center_targets` / :func:`group_by_centers`: Panoptic-DeepLab's class-agnostic instance representation
  (Cheng et al., CVPR 2020): a Gaussian heat map of instance centres plus, per pixel, the offset to its centre;
  decoding keeps the heat map's local maxima (max-pool NMS) above a threshold and gives each foreground pixel the
  id of the centre nearest to where its offset points.
* :func:`resolve_overlaps`: one id map from overlapping masks, the front instance winning each pixel.
* :func:`occlusion_order`: which of overlapping predicted masks lies in front (the paste order of
  :func:`resolve_overlaps`), decided pair by pair from the overlap itself rather than by detection score.

Id maps are ``int64``: 0 = background, instances ``1..N``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["center_targets", "cluster_embeddings", "group_by_centers", "occlusion_order", "resolve_overlaps"]


def resolve_overlaps(masks: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """An ``(H, W)`` id map from ``N`` possibly overlapping masks: where masks overlap, the one with the highest
    ``order`` wins (``order`` is a layer index or a score: higher = in front; ties go to the later mask).

    Args:
        masks: ``(N, H, W)`` bool (or values thresholded at 0.5).
        order: ``(N,)`` front-to-back key, e.g. the paint order of a scene or the detection scores.

    Returns:
        ``(H, W)`` int64: ``i + 1`` where mask ``i`` is the front-most mask covering the pixel, 0 where none does.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    if order.shape != (masks.shape[0],):
        raise ValueError(f"order must be ({masks.shape[0]},), one key per mask, got shape {tuple(order.shape)}")
    m = masks if masks.dtype == torch.bool else masks > 0.5
    ids = torch.zeros(m.shape[1:], dtype=torch.int64, device=m.device)
    if m.shape[0] == 0:
        return ids
    # paint back to front: a stable sort keeps the input order among equal keys, so the later mask is painted last
    for i in torch.sort(order, stable=True).indices.tolist():
        ids[m[i]] = i + 1
    return ids


@torch.no_grad()
def occlusion_order(
    masks: torch.Tensor,
    scores: torch.Tensor | None = None,
    mask_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """A front-to-back key for overlapping instance masks (higher = in front), for :func:`resolve_overlaps`.

    Painting by detection score lets a confident large object cover a smaller one lying on top of it. Here every
    overlapping pair ``(i, j)`` is decided from its overlap ``O = m_i & m_j``:

    * with ``mask_probs``: the instance whose mask is more confident inside ``O`` (higher mean probability) is in
      front; an occluded object's visible-mask probability is low where something covers it;
    * without (or on a tie): the instance of which ``O`` is the larger fraction is in front. An object mostly
      covered by another's mask can only have been seen if it lies on top; behind, it would be hidden.
    * a remaining tie goes to the higher score.

    The pairwise decisions become one order by counting them: key = wins - losses over the instance's overlapping
    pairs (a Copeland ranking; it reproduces any consistent layering and settles cycles by majority), with the score
    breaking ties.

    Args:
        masks: ``(N, H, W)`` bool (or probabilities thresholded at 0.5).
        scores: ``(N,)`` detection scores (tie-breaks; default all equal).
        mask_probs: ``(N, H, W)`` mask probabilities, optional.

    Returns:
        ``(N,)`` float64 key: pass it as ``order`` to :func:`resolve_overlaps`.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    n = masks.shape[0]
    if scores is None:
        scores = torch.zeros(n, device=masks.device)
    if scores.shape != (n,):
        raise ValueError(f"scores must be ({n},), one per mask, got shape {tuple(scores.shape)}")
    if mask_probs is not None and mask_probs.shape != masks.shape:
        raise ValueError(f"mask_probs must have the masks' shape {tuple(masks.shape)}, got {tuple(mask_probs.shape)}")
    m = (masks if masks.dtype == torch.bool else masks > 0.5).flatten(1).float()  # (N, HW)
    inter = m @ m.T  # (N, N) overlap areas
    area = m.sum(1).clamp(min=1)
    overlapping = (inter > 0) & ~torch.eye(n, dtype=torch.bool, device=m.device)
    # front[i, j] > 0: i in front of j; < 0: behind; 0: undecided so far
    fraction = inter / area[:, None]  # fraction[i, j] = |O| / |m_i|
    front = torch.sign(fraction - fraction.T)
    if mask_probs is not None:
        p = mask_probs.flatten(1).float()
        conf = (p * m) @ m.T / inter.clamp(min=1)  # conf[i, j]: mean probability of i inside O_ij
        by_conf = torch.sign(conf - conf.T)
        front = torch.where(by_conf != 0, by_conf, front)
    s = scores.float()
    front = torch.where(front != 0, front, torch.sign(s[:, None] - s[None, :]))
    wins = (front * overlapping).sum(1)
    # score as a tie-break strictly smaller than one win
    span = (s.max() - s.min()).clamp(min=1e-12) if n else s.new_ones(())
    return wins.double() + 0.5 * ((s - s.min()) / span).double() if n else wins.double()


def _batched(x: torch.Tensor, dims: int, name: str) -> tuple[torch.Tensor, bool]:
    if x.ndim == dims:
        return x[None], True
    if x.ndim == dims + 1:
        return x, False
    raise ValueError(f"{name} must have {dims} or {dims + 1} dimensions (batch first), got shape {tuple(x.shape)}")


@torch.no_grad()
def cluster_embeddings(
    embeddings: torch.Tensor,
    foreground: torch.Tensor,
    bandwidth: float = 1.5,
    min_pixels: int = 1,
    max_iter: int = 20,
) -> torch.Tensor:
    """Group foreground pixels by their embeddings.

    Repeatedly: the first unassigned foreground pixel (raster order) seeds a centre; the centre moves to the mean of
    the unassigned foreground embeddings within ``bandwidth`` of it until it stops (flat-kernel mean-shift, at
    most ``max_iter`` steps); those pixels become the next instance (or, fewer than ``min_pixels``, background).
    With the discriminative loss's margins (pixels within ``delta_v`` of their centre, centres over
    ``2 delta_d`` apart) any ``bandwidth`` in ``(delta_v, 2 delta_d - delta_v)`` separates the instances; the
    default is ``delta_d = 1.5``.

    Args:
        embeddings: ``(D, H, W)`` or ``(B, D, H, W)``.
        foreground: ``(H, W)`` / ``(B, H, W)`` bool: the pixels to group (e.g. the semantic head's foreground).
        bandwidth: radius of the clusters in embedding space.
        min_pixels: smaller groups are dropped to background.
        max_iter: mean-shift steps per cluster.

    Returns:
        ``(H, W)`` / ``(B, H, W)`` int64 ids: 0 background, instances ``1..N`` per image in seed order.
    """
    emb, single = _batched(embeddings, 3, "embeddings")
    fg, _ = _batched(foreground, 2, "foreground")
    if fg.shape != (emb.shape[0], *emb.shape[2:]):
        raise ValueError(f"foreground must be {(emb.shape[0], *emb.shape[2:])}, got {tuple(fg.shape)}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    out = torch.zeros(fg.shape, dtype=torch.int64, device=emb.device)
    for b in range(emb.shape[0]):
        flat_fg = fg[b].reshape(-1).bool()
        index = torch.nonzero(flat_fg).squeeze(1)  # foreground pixels, raster order
        x = emb[b].reshape(emb.shape[1], -1)[:, index].t().float()  # (P, D)
        free = torch.ones(len(index), dtype=torch.bool, device=emb.device)
        ids = torch.zeros(len(index), dtype=torch.int64, device=emb.device)
        next_id = 1
        while bool(free.any()):
            seed = int(torch.nonzero(free)[0])
            centre = x[seed]
            members = free.clone()
            for _ in range(max_iter):
                members = free & (torch.linalg.vector_norm(x - centre, dim=1) < bandwidth)
                if not bool(members.any()):
                    break
                moved = x[members].mean(0)
                if torch.equal(moved, centre):
                    break
                centre = moved
            members[seed] = True  # the seed always leaves the pool: the loop ends
            if int(members.sum()) >= min_pixels:
                ids[members] = next_id
                next_id += 1
            free &= ~members
        out[b].view(-1)[index] = ids
    return out[0] if single else out


def center_targets(
    instances: torch.Tensor, sigma: float = 8.0, ignore_index: int | None = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Panoptic-DeepLab's training targets from an instance id map.

    Args:
        instances: ``(H, W)`` integer ids (0 background, ``ignore_index`` ignored, others one instance each).
        sigma: standard deviation of each centre's Gaussian, in pixels (paper: 8).

    Returns:
        ``heatmap (1, H, W)``: per pixel the maximum over instances of ``exp(-d^2 / (2 sigma^2))``, ``d`` the
        distance to the instance's centre of mass; ``offsets (2, H, W)``: ``(dy, dx)`` from each instance pixel to
        its centre of mass, 0 elsewhere.
    """
    if instances.ndim != 2 or instances.is_floating_point():
        raise ValueError(f"instances must be an (H, W) integer id map, got {instances.dtype} {tuple(instances.shape)}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    h, w = instances.shape
    ys = torch.arange(h, dtype=torch.float32, device=instances.device)[:, None].expand(h, w)
    xs = torch.arange(w, dtype=torch.float32, device=instances.device)[None, :].expand(h, w)
    heat = torch.zeros(1, h, w, device=instances.device)
    offsets = torch.zeros(2, h, w, device=instances.device)
    for i in torch.unique(instances).tolist():
        if i == 0 or i == ignore_index:
            continue
        m = instances == i
        cy, cx = ys[m].mean(), xs[m].mean()
        heat[0] = torch.maximum(heat[0], torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2)))
        offsets[0][m] = cy - ys[m]
        offsets[1][m] = cx - xs[m]
    return heat, offsets


@torch.no_grad()
def group_by_centers(
    heatmap: torch.Tensor,
    offsets: torch.Tensor,
    foreground: torch.Tensor,
    threshold: float = 0.1,
    nms_kernel: int = 7,
    top_k: int | None = 200,
) -> torch.Tensor:
    """Panoptic-DeepLab's instance grouping.

    Centres: pixels of ``heatmap`` that equal the maximum of their ``nms_kernel`` neighbourhood and exceed
    ``threshold`` (the ``top_k`` highest). Each foreground pixel ``p`` votes for ``p + offsets[p]`` and takes the
    id of the nearest centre.

    Args:
        heatmap: ``(1, H, W)`` / ``(B, 1, H, W)`` centre scores in ``[0, 1]``.
        offsets: ``(2, H, W)`` / ``(B, 2, H, W)`` ``(dy, dx)`` from each pixel to its centre, in pixels.
        foreground: ``(H, W)`` / ``(B, H, W)`` bool: the pixels that belong to some instance.
        threshold: minimum centre score.
        nms_kernel: odd window of the max-pool peak test.
        top_k: at most this many centres per image (``None``: all).

    Returns:
        ``(H, W)`` / ``(B, H, W)`` int64 ids: 0 background (and foreground when no centre was found), instances
        ``1..K`` by decreasing centre score (centres that win no pixel are dropped and the ids stay consecutive).
    """
    heat, single = _batched(heatmap, 3, "heatmap")
    off, _ = _batched(offsets, 3, "offsets")
    fg, _ = _batched(foreground, 2, "foreground")
    b, _, h, w = heat.shape
    if heat.shape[1] != 1 or off.shape != (b, 2, h, w) or fg.shape != (b, h, w):
        raise ValueError(
            f"expected heatmap (B, 1, H, W), offsets (B, 2, H, W) and foreground (B, H, W) of one size, got "
            f"{tuple(heat.shape)}, {tuple(off.shape)}, {tuple(fg.shape)}"
        )
    if nms_kernel < 1 or nms_kernel % 2 == 0:
        raise ValueError(f"nms_kernel must be an odd int >= 1, got {nms_kernel}")
    pooled = F.max_pool2d(heat, nms_kernel, stride=1, padding=nms_kernel // 2)
    peaks = (heat == pooled) & (heat > threshold)
    ys = torch.arange(h, dtype=off.dtype, device=off.device)[:, None].expand(h, w)
    xs = torch.arange(w, dtype=off.dtype, device=off.device)[None, :].expand(h, w)
    out = torch.zeros(b, h, w, dtype=torch.int64, device=heat.device)
    for i in range(b):
        where = torch.nonzero(peaks[i, 0])  # (K, 2) y, x
        if where.numel() == 0:
            continue
        scores = heat[i, 0][where[:, 0], where[:, 1]]
        order = torch.argsort(scores, descending=True, stable=True)
        if top_k is not None:
            order = order[:top_k]
        centres = where[order].to(off.dtype)  # (K, 2)
        m = fg[i].bool()
        votes = torch.stack([ys[m] + off[i, 0][m], xs[m] + off[i, 1][m]], 1)  # (P, 2)
        nearest = torch.cdist(votes, centres).argmin(1)  # (P,) index of the centre, by score rank
        used, compact = torch.unique(nearest, return_inverse=True)  # drop centres that won nothing
        out[i][m] = compact + 1
    return out[0] if single else out

"""Bottom-up grouping: embedding clusters, Panoptic-DeepLab centres + offsets, overlap resolution."""

from __future__ import annotations

import pytest
import torch

from maskworks.ops import center_targets, cluster_embeddings, group_by_centers, occlusion_order, resolve_overlaps


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to relabelling (0 stays 0)."""
    if not torch.equal(a == 0, b == 0):
        return False
    pairs = torch.unique(torch.stack([a[a > 0], b[b > 0]]), dim=1)
    return pairs.shape[1] == len(torch.unique(a[a > 0])) == len(torch.unique(b[b > 0]))


def _three_instances():
    ids = torch.zeros(12, 14, dtype=torch.int64)
    ids[1:6, 1:6], ids[1:6, 6:12], ids[7:11, 2:13] = 1, 2, 3  # the first two touch
    return ids


def test_resolve_overlaps_front_instance_wins():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, :3, :3] = masks[1, 1:4, 1:5] = masks[2, 3:, 3:] = True
    ids = resolve_overlaps(masks, torch.tensor([2.0, 1.0, 3.0]))  # mask 2 in front, then 0, then 1
    assert ids.dtype == torch.int64 and ids.shape == (5, 6)
    assert ids[1, 1] == 1 and ids[2, 2] == 1  # 0 over 1
    assert ids[3, 3] == 3  # 2 over 1
    assert ids[3, 1] == 2 and ids[0, 5] == 0
    assert set(torch.unique(ids).tolist()) == {0, 1, 2, 3}
    # equal keys: the later mask is in front; empty input gives background
    assert resolve_overlaps(masks[:2], torch.zeros(2))[1, 1] == 2
    assert not resolve_overlaps(masks[:0], torch.zeros(0)).any()
    with pytest.raises(ValueError, match="one key per mask"):
        resolve_overlaps(masks, torch.zeros(2))


def test_cluster_embeddings_recovers_three_instances_batched():
    torch.manual_seed(0)
    ids = _three_instances()
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    emb = torch.zeros(2, 2, 12, 14)
    for k in range(3):
        m = ids == k + 1
        emb[0][:, m] = centres[k][:, None] + 0.4 * (torch.rand(2, int(m.sum())) - 0.5)  # within delta_v = 0.5
    emb[1] = emb[0].flip(-1)
    fg = torch.stack([ids > 0, (ids > 0).flip(-1)])
    out = cluster_embeddings(emb, fg)
    assert out.shape == (2, 12, 14) and out.dtype == torch.int64
    assert _same_partition(out[0], ids) and _same_partition(out[1], ids.flip(-1))
    assert set(torch.unique(out[0]).tolist()) == {0, 1, 2, 3}  # ids 1..N, background 0
    assert torch.equal(cluster_embeddings(emb[0], fg[0]), out[0])  # unbatched input
    # a too-small bandwidth splits nothing wrongly into background: min_pixels drops tiny groups
    tiny = cluster_embeddings(emb[0], fg[0], bandwidth=1e-3, min_pixels=2)
    assert (tiny[ids == 0] == 0).all()


def test_center_targets_and_group_by_centers_recover_touching_instances():
    ids = _three_instances()
    heat, offsets = center_targets(ids, sigma=2.0)
    assert heat.shape == (1, 12, 14) and offsets.shape == (2, 12, 14)
    assert heat.max() <= 1.0 and (offsets[:, ids == 0] == 0).all()
    m = ids == 1
    ys, xs = torch.nonzero(m, as_tuple=True)
    torch.testing.assert_close(offsets[0][m], ys.float().mean() - ys.float())
    # the targets decode back to the instances (batched, with a second image)
    out = group_by_centers(
        torch.stack([heat, heat]), torch.stack([offsets, offsets]), torch.stack([ids > 0] * 2), nms_kernel=3
    )
    assert _same_partition(out[0], ids) and torch.equal(out[0], out[1])
    # no centre above the threshold: everything stays background
    assert not group_by_centers(heat * 0, offsets, ids > 0).any()
    with pytest.raises(ValueError, match="odd int"):
        group_by_centers(heat, offsets, ids > 0, nms_kernel=4)


def _disk(size: int, cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_occlusion_order_recovers_a_layering():
    """Three full disks, each lying on the one before: every overlap covers more of the upper disk than of the lower
    one, so the pairwise rule (the instance mostly covered lies in front) recovers the layering although the
    scores say otherwise, and resolve_overlaps then gives the painted scene."""
    layers = [_disk(40, 20, 20, 15), _disk(40, 14, 24, 7), _disk(40, 12, 26, 3)]  # big, medium on it, small on top
    masks = torch.stack(layers)
    scores = torch.tensor([0.9, 0.5, 0.7])  # score order would bury the medium disk under the big one
    key = occlusion_order(masks, scores)
    assert key.argsort().tolist() == [0, 1, 2]
    painted = torch.zeros(40, 40, dtype=torch.int64)
    for i, m in enumerate(layers):
        painted[m] = i + 1
    assert torch.equal(resolve_overlaps(masks, key), painted)
    assert not torch.equal(resolve_overlaps(masks, scores), painted)


def test_occlusion_order_prefers_mask_confidence_and_breaks_ties_by_score():
    a = torch.zeros(1, 10, 10, dtype=torch.bool)
    a[0, :, :6] = True
    b = torch.zeros(1, 10, 10, dtype=torch.bool)
    b[0, :, 4:] = True  # same area, same overlap fraction: undecided by geometry
    masks = torch.cat([a, b])
    assert occlusion_order(masks, torch.tensor([0.2, 0.8])).argmax() == 1  # the score decides
    probs = torch.stack([a[0].float() * 0.9, b[0].float() * 0.55])
    assert occlusion_order(masks, torch.tensor([0.2, 0.8]), probs).argmax() == 0  # a is surer in the overlap
    assert occlusion_order(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0,)
    with pytest.raises(ValueError, match="scores"):
        occlusion_order(masks, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="mask_probs"):
        occlusion_order(masks, None, torch.zeros(2, 3, 3))

"""SAM automatic mask generator: the pieces (grids, crops, stability, boxes, RLE, small regions) on hand-built inputs
and against ``segment_anything.utils.amg``, and ``generate()`` with an oracle predictor that returns the true shape
under each prompt: every shape found once with exact areas and boxes, the same records as the reference generator."""

from __future__ import annotations

import logging
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

from maskworks.models.promptable.amg import (
    SamAutomaticMaskGenerator,
    area_from_rle,
    batched_mask_to_box,
    build_all_layer_point_grids,
    build_point_grid,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)

# ----------------------------------------------------------------------------------------------------------------------
# a synthetic scene and an oracle predictor
# ----------------------------------------------------------------------------------------------------------------------

H, W = 180, 200  # grid points (k + 1/2) * 200 / 8 and (k + 1/2) * 180 / 8 are never on a pixel edge
BACKGROUND = (30, 30, 30)


def _scene() -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, int, int]]]:
    """An (H, W, 3) image with five disjoint shapes of distinct colours, their masks and colours."""
    yy, xx = np.mgrid[:H, :W]

    def rect(r0, r1, c0, c1):
        return (yy >= r0) & (yy <= r1) & (xx >= c0) & (xx <= c1)

    def disc(cy, cx, r):
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    masks = [rect(20, 59, 15, 69), disc(50, 140, 25), rect(100, 159, 20, 79), disc(120, 150, 28), rect(70, 88, 95, 118)]
    colours = [(230, 40, 40), (40, 200, 60), (50, 80, 220), (240, 200, 30), (200, 60, 200)]
    assert sum(m.astype(int) for m in masks).max() == 1  # disjoint
    image = np.empty((H, W, 3), np.uint8)
    image[:] = BACKGROUND
    for m, c in zip(masks, colours):
        image[m] = c
    return image, masks, colours


class _ResizeLongestSide:
    """The coordinate part of SAM's ResizeLongestSide."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def get_preprocess_shape(self, h: int, w: int) -> tuple[int, int]:
        scale = self.target_length / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        h, w = original_size
        new_h, new_w = self.get_preprocess_shape(h, w)
        coords = np.array(coords, dtype=np.float64)
        coords[..., 0] *= new_w / w
        coords[..., 1] *= new_h / h
        return coords


class OraclePredictor:
    """SamPredictor's interface; ``predict_torch`` returns, for each point, three masks over the region (a shape, or
    the background) under the point: a sure one (logits +-10), a duplicate with a lower score, and a vague one (logits
    0.5 inside: stability 0 at offset 1). Shape masks score 0.90..0.98 (higher for earlier pixels, so every prompt has
    its own score), background masks 0.3 (the vague ones 0.99)."""

    def __init__(self, colours: list[tuple[int, int, int]]) -> None:
        self.colours = colours
        self.model = SimpleNamespace(mask_threshold=0.0, image_encoder=SimpleNamespace(img_size=1024))
        self.transform = _ResizeLongestSide(1024)
        self.device = torch.device("cpu")
        self.batch_sizes: list[int] = []
        self.reset_image()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        assert image.dtype == np.uint8 and image.shape[2] == 3
        ids = np.zeros(image.shape[:2], np.int64)
        for k, c in enumerate(self.colours, 1):
            ids[(image == c).all(-1)] = k
        self.ids = torch.from_numpy(ids)
        self.original_size = image.shape[:2]
        self.input_size = self.transform.get_preprocess_shape(*self.original_size)
        self.features = torch.zeros(1, 1, 1, 1)
        self.is_image_set = True

    def reset_image(self) -> None:
        self.ids = self.features = self.original_size = self.input_size = None
        self.is_image_set = False

    def predict_torch(
        self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True, return_logits=False
    ):
        assert self.is_image_set and boxes is None and mask_input is None and multimask_output
        assert point_coords.shape[1:] == (1, 2) and bool((point_labels == 1).all())
        b = point_coords.shape[0]
        self.batch_sizes.append(b)
        h, w = self.original_size
        in_h, in_w = self.input_size
        xy = point_coords[:, 0].double().cpu() * torch.tensor([w / in_w, h / in_h], dtype=torch.float64)
        col = xy[:, 0].floor().long().clamp(0, w - 1)
        row = xy[:, 1].floor().long().clamp(0, h - 1)
        hit = self.ids[row, col]  # (B,)
        region = self.ids[None] == hit[:, None, None]  # (B, h, w)
        sure = torch.where(region, 10.0, -10.0)
        vague = torch.where(region, 0.5, -10.0)
        masks = torch.stack([sure, sure, vague], dim=1)  # (B, 3, h, w)
        q = 0.9 + 0.08 * (1 - (row * w + col).double() / (h * w))
        shape_iou = torch.stack([q, q - 0.01, torch.full_like(q, 0.99)], dim=1)
        bg_iou = torch.tensor([0.3, 0.3, 0.99], dtype=torch.float64).expand(b, 3)
        iou = torch.where((hit > 0)[:, None], shape_iou, bg_iou).float()  # (B, 3)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, torch.zeros(()).expand(b, 3, 256, 256)


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]


def _check_found_once(records: list[dict], masks: list[np.ndarray], decode) -> None:
    assert len(records) == len(masks)
    unmatched = list(range(len(masks)))
    for rec in records:
        seg = decode(rec["segmentation"])
        k = next(i for i in unmatched if np.array_equal(seg, masks[i]))  # StopIteration: no shape matches
        unmatched.remove(k)
        assert rec["area"] == int(masks[k].sum())
        assert rec["bbox"] == _bbox(masks[k])
        x, y = rec["point_coords"][0]
        assert masks[k][int(y), int(x)]  # the prompt lies on the shape
        assert rec["stability_score"] == 1.0 and 0.9 <= rec["predicted_iou"] <= 0.98
        cx, cy, cw, ch = rec["crop_box"]
        bx, by, bw, bh = rec["bbox"]
        assert cx <= bx and cy <= by and bx + bw < cx + cw and by + bh < cy + ch
    assert not unmatched


# ----------------------------------------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------------------------------------


def test_stability_score_is_the_iou_of_the_two_thresholded_masks():
    logits = torch.tensor(
        [
            [[2.0, 0.5, -0.5], [1.5, -2.0, 0.9]],  # > 1: 2 pixels, > -1: 5 pixels
            [[1.0, 1.0, -1.0], [3.0, -3.0, 0.0]],  # strict: > 1: 1 pixel, > -1: 4 pixels
            [[-5.0, -5.0, -5.0], [-5.0, -5.0, -5.0]],  # empty at both thresholds: 0
        ]
    )  # (3, 2, 3)
    scores = calculate_stability_score(logits, 0.0, 1.0)
    assert scores.dtype == torch.float32 and torch.equal(scores, torch.tensor([2 / 5, 1 / 4, 0.0]))
    # t = 0.5, offset 0.5: > 1.0 against > 0.0
    assert torch.equal(calculate_stability_score(logits, 0.5, 0.5), torch.tensor([2 / 4, 1 / 3, 0.0]))
    # leading dims kept; offset 0 gives 1 for any non-empty mask
    assert calculate_stability_score(logits[None].expand(2, 3, 2, 3), 0.0, 0.0).tolist() == [[1.0, 1.0, 0.0]] * 2
    with pytest.raises(ValueError, match="threshold_offset"):
        calculate_stability_score(logits, 0.0, -1.0)


def test_point_grids_and_crop_boxes_equal_the_reference():
    ref = pytest.importorskip("segment_anything.utils.amg")
    for n in (1, 2, 5, 32):
        assert np.array_equal(build_point_grid(n), ref.build_point_grid(n))
    for args in ((32, 0, 1), (32, 2, 2), (10, 3, 2), (7, 1, 1)):
        ours, theirs = build_all_layer_point_grids(*args), ref.build_all_layer_point_grids(*args)
        assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    for args in (
        ((H, W), 0, 512 / 1500),
        ((H, W), 1, 512 / 1500),
        ((1500, 2250), 2, 512 / 1500),
        ((37, 1024), 3, 0.0),
        ((480, 640), 2, 0.9),
        ((1, 1), 1, 0.5),
    ):
        assert generate_crop_boxes(*args) == ref.generate_crop_boxes(*args), args
    grid = build_point_grid(2)
    assert grid.tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]  # row-major (x fast)
    assert [len(g) for g in build_all_layer_point_grids(8, 2, 2)] == [64, 16, 4]
    with pytest.raises(ValueError, match="scale_per_layer"):
        build_all_layer_point_grids(4, 3, 2)  # 4 / 2**3 points in the last layer
    with pytest.raises(ValueError, match="overlap_ratio"):
        generate_crop_boxes((10, 10), 1, 1.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_rle_round_trip_area_and_coco_encoding():
    mask_utils = pytest.importorskip("pycocotools.mask")
    hand = torch.tensor([[[0, 1, 1], [1, 1, 0]], [[1, 0, 0], [1, 1, 0]]], dtype=torch.bool)  # (2, 2, 3)
    # column-major: 0 1 | 1 1 | 1 0 -> runs 1, 4, 1; a first foreground pixel gives a leading 0
    assert mask_to_rle_pytorch(hand) == [
        {"size": [2, 3], "counts": [1, 4, 1]},
        {"size": [2, 3], "counts": [0, 2, 1, 1, 2]},
    ]
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 13, 17, generator=g) > 0.5  # (6, 13, 17)
    masks[1] = False
    masks[2] = True
    masks[3] = torch.rand(13, 17, generator=g) > 0.95
    rles = mask_to_rle_pytorch(masks)
    for m, rle in zip(masks, rles):
        decoded = rle_to_mask(rle)
        assert decoded.dtype == bool and decoded.flags.c_contiguous
        assert np.array_equal(decoded, m.numpy())
        assert area_from_rle(rle) == int(m.sum())
        coco = coco_encode_rle(rle)
        assert isinstance(coco["counts"], str) and coco["size"] == [13, 17]
        assert np.array_equal(mask_utils.decode(coco).astype(bool), m.numpy())
        assert int(mask_utils.area(coco)) == int(m.sum())
    assert area_from_rle(rles[1]) == 0 and area_from_rle(rles[2]) == 13 * 17
    assert mask_to_rle_pytorch(masks[:0]) == []
    with pytest.raises(ValueError, match="sum to H"):
        rle_to_mask({"size": [2, 2], "counts": [1, 2]})


def test_batched_mask_to_box_on_hand_built_masks():
    masks = torch.zeros(4, 5, 6, dtype=torch.bool)  # (4, 5, 6)
    masks[0, 2, 3] = True
    masks[1, 1:4, 0:5] = True
    masks[3, 0, 5] = masks[3, 4, 0] = True
    boxes = batched_mask_to_box(masks)
    assert boxes.dtype == torch.long
    assert boxes.tolist() == [[3, 2, 3, 2], [0, 1, 4, 3], [0, 0, 0, 0], [0, 0, 5, 4]]  # inclusive; empty -> zeros
    assert torch.equal(batched_mask_to_box(masks.view(2, 2, 5, 6)), boxes.view(2, 2, 4))
    assert batched_mask_to_box(masks[1]).tolist() == [0, 1, 4, 3]
    assert batched_mask_to_box(masks[:0]).shape == (0, 4)
    ref = pytest.importorskip("segment_anything.utils.amg")
    assert torch.equal(boxes, ref.batched_mask_to_box(masks))


def test_uncrop_and_crop_edge_filter():
    crop = [50, 10, 150, 100]
    boxes = torch.tensor([[0, 0, 10, 10], [30, 30, 60, 60], [40, 40, 99, 80], [0, 40, 30, 60]])  # (4, 4), crop frame
    assert uncrop_boxes_xyxy(boxes, crop)[1].tolist() == [80, 40, 110, 70]
    assert uncrop_points(torch.tensor([[1.5, 2.5]], dtype=torch.float64), crop).tolist() == [[51.5, 12.5]]
    # image 150 x 100: the crop's right and bottom edges are image edges, its left and top are not
    near = is_box_near_crop_edge(boxes, crop, [0, 0, 150, 100])
    assert near.tolist() == [True, False, False, True]
    masks = torch.ones(1, 90, 100, dtype=torch.bool)
    full = uncrop_masks(masks, crop, 100, 150)
    assert full.shape == (1, 100, 150) and int(full.sum()) == 9000 and bool(full[0, 10:, 50:].all())
    ref = pytest.importorskip("segment_anything.utils.amg")
    assert torch.equal(near, ref.is_box_near_crop_edge(boxes, crop, [0, 0, 150, 100]))


def _regions_mask() -> np.ndarray:
    m = np.zeros((14, 16), bool)
    m[1:9, 1:10] = True  # a block with two holes
    m[3:5, 3:5] = False  # hole of 4
    m[3:6, 6:9] = False  # hole of 9
    m[11, 1] = m[12, 2] = m[13, 3] = True  # a diagonal island of 3 (8-connected)
    m[10:14, 10:15] = True  # island of 20
    m[1, 14] = True  # island of 1
    return m


def test_remove_small_regions_holes_and_islands():
    m = _regions_mask()
    filled, changed = remove_small_regions(m, 5, mode="holes")
    assert changed and bool(filled[3:5, 3:5].all()) and not filled[3:6, 6:9].any()
    assert int(filled.sum()) == int(m.sum()) + 4
    cleaned, changed = remove_small_regions(m, 3, mode="islands")  # the diagonal island is one region of 3
    assert changed and not cleaned[1, 14] and bool(cleaned[11, 1] and cleaned[13, 3])
    assert int(cleaned.sum()) == int(m.sum()) - 1
    cleaned, changed = remove_small_regions(m, 21, mode="islands")  # only the 63-pixel block stays
    assert changed and int(cleaned.sum()) == 8 * 9 - 13
    unchanged, changed = remove_small_regions(m, 1, mode="islands")
    assert not changed and np.array_equal(unchanged, m)
    # all islands small: the largest is kept
    cleaned, changed = remove_small_regions(m, 1000, mode="islands")
    assert changed and int(cleaned.sum()) == 8 * 9 - 13
    with pytest.raises(ValueError, match="mode"):
        remove_small_regions(m, 5, mode="both")


def test_remove_small_regions_equals_the_reference():
    pytest.importorskip("cv2")
    ref = pytest.importorskip("segment_anything.utils.amg")
    m = _regions_mask()
    for mode in ("holes", "islands"):
        for area in (2, 3, 5, 10, 21, 1000):
            ours, ours_changed = remove_small_regions(m, area, mode=mode)
            theirs, theirs_changed = ref.remove_small_regions(m, area, mode=mode)
            assert np.array_equal(ours, theirs) and ours_changed == theirs_changed, (mode, area)


# ----------------------------------------------------------------------------------------------------------------------
# the generator with the oracle
# ----------------------------------------------------------------------------------------------------------------------


def test_generate_finds_every_shape_once(caplog):
    image, masks, colours = _scene()
    oracle = OraclePredictor(colours)
    gen = SamAutomaticMaskGenerator(None, points_per_side=8, points_per_batch=24, predictor=oracle)
    with caplog.at_level(logging.DEBUG, logger="maskworks.models.promptable.amg"):
        records = gen.generate(image)
    assert oracle.batch_sizes == [24, 24, 16] and not oracle.is_image_set
    assert set(records[0]) == {
        "segmentation",
        "area",
        "bbox",
        "predicted_iou",
        "point_coords",
        "stability_score",
        "crop_box",
    }
    _check_found_once(records, masks, lambda seg: seg)
    assert all(r["segmentation"].shape == (H, W) and r["crop_box"] == [0, 0, W, H] for r in records)
    ious = [r["predicted_iou"] for r in records]
    assert ious == sorted(ious, reverse=True)
    assert "crop 1/1" in caplog.text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_generate_with_crop_layers_and_coco_rle():
    mask_utils = pytest.importorskip("pycocotools.mask")
    image, masks, colours = _scene()
    gen = SamAutomaticMaskGenerator(
        None, points_per_side=8, crop_n_layers=1, output_mode="coco_rle", predictor=OraclePredictor(colours)
    )
    records = gen.generate(image)
    _check_found_once(records, masks, lambda seg: mask_utils.decode(seg).astype(bool))
    assert all(isinstance(r["segmentation"]["counts"], str) for r in records)
    # masks far from the inner crop edges were found in a crop too, and the smaller crop's copy wins
    crops = {tuple(r["crop_box"]) for r in records}
    assert (0, 0, W, H) not in crops and len(crops) == 4


def test_generate_uncompressed_rle_and_small_region_postprocessing():
    image, masks, colours = _scene()
    image[40, 40] = BACKGROUND  # a 1-pixel hole in rectangle 0
    image[5, 5] = colours[2]  # a 1-pixel island of rectangle 2's colour
    gen = SamAutomaticMaskGenerator(
        None,
        points_per_side=8,
        min_mask_region_area=4,
        output_mode="uncompressed_rle",
        predictor=OraclePredictor(colours),
    )
    records = gen.generate(image)
    _check_found_once(records, masks, rle_to_mask)  # the hole is filled, the island removed


def test_options_are_validated():
    oracle = OraclePredictor([])
    bad = [
        ("points_per_side", {"points_per_side": 0}),
        ("points_per_batch", {"points_per_batch": 0}),
        ("pred_iou_thresh", {"pred_iou_thresh": 1.5}),
        ("stability_score_thresh", {"stability_score_thresh": -0.1}),
        ("stability_score_offset", {"stability_score_offset": -1.0}),
        ("box_nms_thresh", {"box_nms_thresh": float("nan")}),
        ("crop_n_layers", {"crop_n_layers": -1}),
        ("crop_nms_thresh", {"crop_nms_thresh": 2}),
        ("crop_overlap_ratio", {"crop_overlap_ratio": 1.0}),
        ("crop_n_points_downscale_factor", {"crop_n_points_downscale_factor": 0}),
        ("min_mask_region_area", {"min_mask_region_area": -5}),
        ("output_mode", {"output_mode": "polygon"}),
        ("points_per_side", {"points_per_side": 4, "crop_n_layers": 3, "crop_n_points_downscale_factor": 2}),
        ("point_grids", {"points_per_side": 8, "point_grids": [build_point_grid(4)]}),
        ("point_grids", {"points_per_side": None}),
        ("point_grids", {"points_per_side": None, "point_grids": [np.zeros((3, 3))]}),
        ("point_grids", {"points_per_side": None, "point_grids": [build_point_grid(4)], "crop_n_layers": 1}),
        ("points_per_batch", {"points_per_batch": True}),
    ]
    for name, kwargs in bad:
        with pytest.raises(ValueError, match=name):
            SamAutomaticMaskGenerator(None, predictor=oracle, **kwargs)
    with pytest.raises(ValueError, match="model"):
        SamAutomaticMaskGenerator(None)
    gen = SamAutomaticMaskGenerator(None, predictor=oracle)
    with pytest.raises(ValueError, match="image"):
        gen.generate(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="image"):
        gen.generate(np.zeros((8, 8, 3), np.float32))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"points_per_side": 8, "points_per_batch": 20},
        {"points_per_side": 8, "crop_n_layers": 1, "output_mode": "coco_rle"},
        {"points_per_side": 8, "crop_n_layers": 1, "crop_n_points_downscale_factor": 2, "crop_nms_thresh": 0.5},
        {"points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.9},
        {"points_per_side": None, "point_grids": [build_point_grid(8)[::3]], "output_mode": "uncompressed_rle"},
    ],
)
def test_generate_equals_the_reference_generator(kwargs):
    sam = pytest.importorskip("segment_anything")
    image, _, colours = _scene()
    ours = SamAutomaticMaskGenerator(None, predictor=OraclePredictor(colours), **kwargs).generate(image)
    fake_model = SimpleNamespace(image_encoder=SimpleNamespace(img_size=1024), mask_threshold=0.0)
    reference = sam.SamAutomaticMaskGenerator(fake_model, **kwargs)
    reference.predictor = OraclePredictor(colours)
    theirs = reference.generate(image)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in ("area", "bbox", "crop_box", "stability_score"):
            assert a[key] == b[key], key
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-7)
        assert np.allclose(a["point_coords"], b["point_coords"], rtol=0, atol=1e-9)
        if isinstance(a["segmentation"], np.ndarray):
            assert np.array_equal(a["segmentation"], b["segmentation"])
        else:
            assert a["segmentation"] == b["segmentation"]


def test_small_region_postprocessing_equals_the_reference(monkeypatch):
    """The reference's post-processing flow (clean-up, NMS preferring unchanged masks, new RLEs and boxes) with our
    ``remove_small_regions`` in place of its OpenCV one."""
    sam = pytest.importorskip("segment_anything")
    import segment_anything.automatic_mask_generator as reference_module

    monkeypatch.setitem(sys.modules, "cv2", sys.modules.get("cv2") or ModuleType("cv2"))
    monkeypatch.setattr(reference_module, "remove_small_regions", remove_small_regions)
    image, _, colours = _scene()
    image[40, 40] = BACKGROUND
    image[5, 5] = colours[2]
    kwargs = {"points_per_side": 8, "min_mask_region_area": 4, "crop_n_layers": 1}
    ours = SamAutomaticMaskGenerator(None, predictor=OraclePredictor(colours), **kwargs).generate(image)
    fake_model = SimpleNamespace(image_encoder=SimpleNamespace(img_size=1024), mask_threshold=0.0)
    reference = sam.SamAutomaticMaskGenerator(fake_model, **kwargs)
    reference.predictor = OraclePredictor(colours)
    theirs = reference.generate(image)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert [a[k] for k in ("area", "bbox", "crop_box")] == [b[k] for k in ("area", "bbox", "crop_box")]
        assert np.array_equal(a["segmentation"], b["segmentation"])


class _Float32Prompts:
    """A predictor that hands ``predict_torch`` float32 points whatever it is given (the reference passes float64),
    so two generators sharing it see bit-identical prompts."""

    def __init__(self, predictor) -> None:
        self._predictor = predictor

    def __getattr__(self, name: str):
        return getattr(self._predictor, name)

    def predict_torch(self, point_coords, point_labels, **kwargs):
        return self._predictor.predict_torch(point_coords.float(), point_labels, **kwargs)


def test_generate_with_a_tiny_sam_end_to_end():
    """The generator builds maskworks' SamPredictor around a (random, tiny) SAM and gives the reference's records."""
    from maskworks.models.promptable.predictor import SamPredictor
    from maskworks.models.promptable.sam import build_sam

    torch.manual_seed(0)
    model = build_sam(
        image_size=256,
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        window_size=4,
        prompt_embed_dim=32,
        decoder_num_heads=2,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    ).eval()
    image, _, _ = _scene()
    # random weights: keep every mask that is not an exact duplicate
    kwargs = {
        "points_per_side": 4,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
        "box_nms_thresh": 1.0,
        "crop_n_layers": 1,
        "crop_nms_thresh": 1.0,
    }
    gen = SamAutomaticMaskGenerator(model, **kwargs)
    assert isinstance(gen.predictor, SamPredictor)
    gen.predictor = _Float32Prompts(gen.predictor)
    ours = gen.generate(image)
    assert len(ours) > 10
    assert all(r["segmentation"].shape == (H, W) and r["area"] == int(r["segmentation"].sum()) for r in ours)

    sam = pytest.importorskip("segment_anything")
    fake_model = SimpleNamespace(image_encoder=SimpleNamespace(img_size=256))
    reference = sam.SamAutomaticMaskGenerator(fake_model, **kwargs)
    reference.predictor = gen.predictor
    theirs = reference.generate(image)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        for key in ("area", "bbox", "crop_box", "predicted_iou", "stability_score", "point_coords"):
            assert a[key] == b[key], key
        assert np.array_equal(a["segmentation"], b["segmentation"])

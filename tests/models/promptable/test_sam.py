"""SAM: parity with Hugging Face ``SamModel`` and the official ``segment_anything`` on random weights, parameter
counts, checkpoint loading and the predictor's pre- / post-processing geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskworks.convert import load_weights
from maskworks.models.promptable import SamPredictor, build_sam, sam_vit_base, sam_vit_huge, sam_vit_large
from maskworks.testing import TINY_SAM, count_parameters, perturb_parameters

ATOL = 1e-4


def _tiny_sam(seed: int = 0):
    torch.manual_seed(seed)
    return perturb_parameters(build_sam(**TINY_SAM), seed=seed, scale=0.05).eval()


def _hf_config(t: dict):
    from transformers import SamConfig

    grid = t["image_size"] // 16
    return SamConfig(
        vision_config={
            "hidden_size": t["encoder_embed_dim"],
            "num_hidden_layers": t["encoder_depth"],
            "num_attention_heads": t["encoder_num_heads"],
            "window_size": t["window_size"],
            "global_attn_indexes": list(t["encoder_global_attn_indexes"]),
            "image_size": t["image_size"],
            "output_channels": t["prompt_embed_dim"],
            "mlp_dim": 4 * t["encoder_embed_dim"],
            "num_pos_feats": t["prompt_embed_dim"] // 2,
        },
        prompt_encoder_config={
            "hidden_size": t["prompt_embed_dim"],
            "image_size": t["image_size"],
            "patch_size": t["image_size"] // grid,
            "mask_input_channels": t["mask_in_chans"],
        },
        mask_decoder_config={
            "hidden_size": t["prompt_embed_dim"],
            "mlp_dim": t["decoder_mlp_dim"],
            "num_hidden_layers": 2,
            "num_attention_heads": t["decoder_num_heads"],
            "iou_head_hidden_dim": t["iou_head_hidden_dim"],
        },
    )


def _official_tiny(t: dict):
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = t["image_size"] // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=t["image_size"],
            embed_dim=t["encoder_embed_dim"],
            depth=t["encoder_depth"],
            num_heads=t["encoder_num_heads"],
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            out_chans=t["prompt_embed_dim"],
            use_rel_pos=True,
            window_size=t["window_size"],
            global_attn_indexes=t["encoder_global_attn_indexes"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=t["prompt_embed_dim"],
            image_embedding_size=(grid, grid),
            input_image_size=(t["image_size"], t["image_size"]),
            mask_in_chans=t["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=t["prompt_embed_dim"],
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=t["prompt_embed_dim"],
                num_heads=t["decoder_num_heads"],
                mlp_dim=t["decoder_mlp_dim"],
            ),
            iou_head_hidden_dim=t["iou_head_hidden_dim"],
        ),
    ).eval()


PROMPTS = {
    "points": dict(points=([[[30.0, 40.0], [200.0, 100.0], [120.0, 7.0]]], [[1, 0, 1]])),
    "box": dict(boxes=[[20.0, 30.0, 180.0, 150.0]]),
    "points+box": dict(points=([[[60.0, 70.0]]], [[1]]), boxes=[[20.0, 30.0, 180.0, 150.0]]),
    "mask": dict(points=([[[60.0, 70.0]]], [[1]]), mask=True),
}


@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("multimask", [True, False])
def test_hf_parity_tiny(prompt, multimask):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf = transformers.SamModel(_hf_config(TINY_SAM))
    perturb_parameters(hf, seed=2, scale=0.05).eval()
    ours = build_sam(**TINY_SAM).eval()
    load_weights(ours, hf.state_dict(), strict=True)  # auto-detected as "hf"
    image = torch.randn(1, 3, 256, 256)
    spec = PROMPTS[prompt]
    mask_low = torch.randn(1, 1, 64, 64) * 3 if spec.get("mask") else None
    kwargs, ours_kwargs = {}, {}
    if "points" in spec:
        coords, labels = torch.tensor(spec["points"][0]), torch.tensor(spec["points"][1])
        kwargs.update(input_points=coords[:, None], input_labels=labels[:, None])  # (B, point_batch, N, 2)
        ours_kwargs.update(point_coords=coords, point_labels=labels)
    if "boxes" in spec:
        boxes = torch.tensor(spec["boxes"])
        kwargs["input_boxes"] = boxes[None]  # (B, nb, 4)
        ours_kwargs["boxes"] = boxes
    if mask_low is not None:
        kwargs["input_masks"] = mask_low
        ours_kwargs["mask_input"] = mask_low
    with torch.no_grad():
        ref = hf(pixel_values=image, multimask_output=multimask, **kwargs)
        ref_emb = hf.get_image_embeddings(image)
        emb = ours.embed_image(image)
        low, iou = ours.decode(emb, multimask_output=multimask, **ours_kwargs)
    torch.testing.assert_close(emb, ref_emb, atol=ATOL, rtol=0)
    assert low.shape == (1, 3 if multimask else 1, 64, 64)
    torch.testing.assert_close(iou, ref.iou_scores[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(low, ref.pred_masks[:, 0], atol=ATOL, rtol=0)


def test_official_parity_and_predictor_equal_tiny():
    pytest.importorskip("segment_anything")
    from segment_anything import SamPredictor as OfficialPredictor

    torch.manual_seed(3)
    official = perturb_parameters(_official_tiny(TINY_SAM), seed=4, scale=0.05).eval()
    ours = build_sam(**TINY_SAM).eval()
    result = load_weights(ours, official.state_dict(), strict=True)  # auto-detected as "segment_anything"
    assert not result.missing_keys and not result.unexpected_keys
    # end to end on a batch of two images with different prompts (official Sam.forward semantics)
    batch = [
        {
            "image": torch.rand(3, 256, 170) * 255,
            "original_size": (300, 199),
            "point_coords": torch.tensor([[[10.0, 20.0], [100.0, 150.0]], [[50.0, 60.0], [3.0, 250.0]]]),
            "point_labels": torch.tensor([[1, 0], [1, 1]]),
        },
        {
            "image": torch.rand(3, 140, 256) * 255,
            "original_size": (140, 256),
            "boxes": torch.tensor([[5.0, 6, 90, 120]]),
        },
    ]
    with torch.no_grad():
        ref, out = official(batch, multimask_output=True), ours(batch, multimask_output=True)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o["low_res_logits"], r["low_res_logits"], atol=ATOL, rtol=0)
        torch.testing.assert_close(o["iou_predictions"], r["iou_predictions"], atol=ATOL, rtol=0)
        assert (o["masks"] != r["masks"]).float().mean() < 1e-3  # thresholding of near-equal logits
    # the predictors on a non-square uint8 image: PIL resize, coordinates, padding removal
    image = (np.random.default_rng(0).random((150, 230, 3)) * 255).astype(np.uint8)
    op, mp = OfficialPredictor(official), SamPredictor(ours)
    op.set_image(image)
    mp.set_image(image)
    torch.testing.assert_close(mp.features, op.features, atol=ATOL, rtol=0)
    point, label, box = np.array([[120.0, 40.0], [10.0, 140.0]]), np.array([1, 0]), np.array([15.0, 20.0, 200.0, 130.0])
    for kwargs in (
        {"point_coords": point, "point_labels": label},
        {"box": box},
        {"point_coords": point[:1], "point_labels": label[:1], "box": box, "multimask_output": False},
    ):
        ref_masks, ref_iou, ref_low = op.predict(return_logits=True, **kwargs)
        masks, iou, low = mp.predict(return_logits=True, **kwargs)
        assert masks.shape == ref_masks.shape and masks.shape[-2:] == (150, 230)
        np.testing.assert_allclose(masks, ref_masks, atol=ATOL)
        np.testing.assert_allclose(iou, ref_iou, atol=ATOL)
        np.testing.assert_allclose(low, ref_low, atol=ATOL)
        # feeding the low-resolution logits back as a mask prompt
        ref_again = op.predict(point_coords=point, point_labels=label, mask_input=ref_low[:1], return_logits=True)
        again = mp.predict(point_coords=point, point_labels=label, mask_input=low[:1], return_logits=True)
        np.testing.assert_allclose(again[0], ref_again[0], atol=ATOL)


def test_batched_prompts_equal_one_by_one():
    model = _tiny_sam()
    predictor = SamPredictor(model)
    predictor.set_image((np.random.default_rng(1).random((120, 200, 3)) * 255).astype(np.uint8))
    boxes = np.array([[10.0, 10.0, 90.0, 80.0], [50.0, 20.0, 190.0, 110.0], [0.0, 0.0, 199.0, 119.0]])
    masks, iou, low = predictor.predict(box=boxes, multimask_output=True)
    assert masks.shape == (3, 3, 120, 200) and iou.shape == (3, 3) and masks.dtype == bool
    for i, b in enumerate(boxes):
        m, s, lo = predictor.predict(box=b)
        np.testing.assert_allclose(s, iou[i], atol=1e-5)
        np.testing.assert_allclose(lo, low[i], atol=1e-5)
    points = np.array([[[30.0, 40.0]], [[150.0, 60.0]]])
    masks, iou, _ = predictor.predict(point_coords=points, point_labels=np.ones((2, 1)), multimask_output=False)
    assert masks.shape == (2, 1, 120, 200)


def test_parameter_counts_equal_references():
    sa = pytest.importorskip("segment_anything")
    transformers = pytest.importorskip("transformers")
    expected = {"vit_b": 93_735_472, "vit_l": 312_342_832, "vit_h": 641_090_608}
    for fn, key in ((sam_vit_base, "vit_b"), (sam_vit_large, "vit_l"), (sam_vit_huge, "vit_h")):
        with torch.device("meta"):
            ours, ref = fn(), sa.sam_model_registry[key](checkpoint=None)
        assert count_parameters(ours) == count_parameters(ref) == expected[key]
    with torch.device("meta"):
        hf = transformers.SamModel(transformers.SamConfig())  # the ViT-B configuration
    assert count_parameters(hf) == expected["vit_b"] + 256  # HF's Gaussian matrix is a parameter


def test_hf_checkpoint_detected_and_official_round_trip():
    transformers = pytest.importorskip("transformers")
    hf = transformers.SamModel(_hf_config(TINY_SAM))
    from maskworks.convert.load import _detect_source

    assert _detect_source(hf.state_dict()) == "hf"
    ours = _tiny_sam()
    # our own state dict loads back as the official layout (the same names but for mlp.fc1/fc2)
    official_layout = {
        k.replace(".mlp.fc1.", ".mlp.lin1.").replace(".mlp.fc2.", ".mlp.lin2."): v for k, v in ours.state_dict().items()
    }
    assert _detect_source(official_layout) == "segment_anything"
    fresh = build_sam(**TINY_SAM)
    load_weights(fresh, official_layout, source="segment_anything", strict=True)
    for (k, a), b in zip(ours.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_coordinate_transform_round_trips():
    model = build_sam(**TINY_SAM)
    rng = np.random.default_rng(0)
    for size in ((300, 199), (140, 256), (1, 1000), (257, 256)):
        coords = rng.random((7, 2)) * [size[1], size[0]]
        there = model.transform.apply_coords(coords, size)
        np.testing.assert_allclose(model.transform.invert_coords(there, size), coords, rtol=1e-12, atol=1e-9)
        h, w = model.transform.get_preprocess_shape(*size, 256)
        assert max(h, w) == 256
        # the corners of the image map to the corners of the resized image
        np.testing.assert_allclose(model.transform.apply_coords([[size[1], size[0]]], size), [[w, h]])
        torch.testing.assert_close(
            model.transform.apply_coords_torch(torch.tensor(coords), size), torch.tensor(there, dtype=torch.float)
        )


@pytest.mark.parametrize("size", [(90, 200), (210, 75)])
def test_masks_at_original_size_align_with_the_prompt(size):
    """An oracle decoder returns, for each point, a disc around it in the padded low-resolution frame; after the
    predictor's post-processing the mask must cover a shape drawn at the clicked place of the original image."""
    model = build_sam(**TINY_SAM).eval()
    low_side = 4 * (TINY_SAM["image_size"] // 16)
    radius_px = 20.0  # in original pixels

    def oracle_decode(
        features, point_coords=None, point_labels=None, boxes=None, mask_input=None, multimask_output=True
    ):
        scale = low_side / TINY_SAM["image_size"]  # model input frame -> low-resolution frame
        ys, xs = torch.meshgrid(torch.arange(low_side) + 0.5, torch.arange(low_side) + 0.5, indexing="ij")
        out = []
        for p in point_coords[:, 0]:
            r = radius_px * model.transform.target_length / max(size) * scale
            d = ((xs - p[0] * scale) ** 2 + (ys - p[1] * scale) ** 2).sqrt()
            out.append((r - d)[None])
        logits = torch.stack(out)  # (B, 1, h, w)
        return logits, torch.ones(logits.shape[:2])

    model.decode = oracle_decode
    predictor = SamPredictor(model)
    predictor.set_image(np.zeros((*size, 3), dtype=np.uint8))
    h, w = size
    click = np.array([[w * 0.7, h * 0.4]])
    masks, _, _ = predictor.predict(point_coords=click, point_labels=np.array([1]), multimask_output=False)
    assert masks.shape == (1, h, w)
    yy, xx = np.mgrid[:h, :w]
    dist = np.hypot(xx + 0.5 - click[0, 0], yy + 0.5 - click[0, 1])
    inside, outside = dist < radius_px - 3, dist > radius_px + 3
    assert masks[0][inside].all(), "the shape under the click must be covered"
    assert not masks[0][outside].any(), "its complement must not be"


def test_predictor_errors_are_clear():
    predictor = SamPredictor(build_sam(**TINY_SAM))
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(box=np.array([0, 0, 5, 5]))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        predictor.set_image(np.zeros((10, 10), dtype=np.uint8))
    predictor.set_image(np.zeros((10, 12, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="point_labels"):
        predictor.predict(point_coords=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="point_coords must be"):
        predictor.predict(point_coords=np.zeros((2, 3)), point_labels=np.ones(2))
    with pytest.raises(ValueError, match="box must be"):
        predictor.predict(box=np.zeros(3))
    with pytest.raises(TypeError, match="not a promptable model"):
        SamPredictor(torch.nn.Linear(2, 2))


def test_hf_parity_vit_b_at_1024():
    """The one full-size check: SAM ViT-B at 1024 px (windows padded 64 -> 70, four global blocks)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    hf = transformers.SamModel(transformers.SamConfig())
    with torch.no_grad():  # the relative tables start at zero: give them values so they count
        for name, p in hf.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.02)
    hf.eval()
    ours = sam_vit_base().eval()
    load_weights(ours, hf.state_dict(), strict=True)
    image = torch.randn(1, 3, 1024, 1024)
    coords, labels = torch.tensor([[[300.0, 420.0], [700.0, 100.0]]]), torch.tensor([[1, 0]])
    box = torch.tensor([[100.0, 200.0, 800.0, 900.0]])
    with torch.no_grad():
        ref_emb = hf.get_image_embeddings(image)
        emb = ours.embed_image(image)
        torch.testing.assert_close(emb, ref_emb, atol=ATOL, rtol=0)
        ref = hf(image_embeddings=ref_emb, input_points=coords[:, None], input_labels=labels[:, None],
                 input_boxes=box[None], multimask_output=True)  # fmt: skip
        low, iou = ours.decode(emb, coords, labels, box, multimask_output=True)
    torch.testing.assert_close(iou, ref.iou_scores[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(low, ref.pred_masks[:, 0], atol=ATOL, rtol=0)

"""SAM 2 (image mode): HF ``Sam2Model`` parity on a tiny config (image embeddings, high-resolution features, masks,
IoU and object scores for every prompt kind, single- and multi-mask), parameter counts of the four builders,
the predictor interface and the transform against HF's ``Sam2Processor``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskworks.convert.sam2 import convert_hf_sam2, is_hf_sam2_state_dict
from maskworks.models.promptable import sam2 as sam2_module
from maskworks.models.promptable.sam2 import Sam2, build_sam2
from maskworks.testing import randomize_norms

transformers = pytest.importorskip("transformers")

# A tiny SAM 2: 128-pixel inputs (32x32 tokens, so stage 3 / 4 windows of 14 / 7 are padded), four stages of
# 1-2-3-2 blocks with two global-attention blocks, a 64-wide decoder.
S, E, D = 128, 16, 64
STAGES, GLOBAL = (1, 2, 3, 2), (4, 7)
TINY = dict(
    embed_dim=E, num_heads=1, stages=STAGES, global_att_blocks=GLOBAL, image_size=S, prompt_embed_dim=D,
    decoder_num_heads=2, decoder_mlp_dim=128, iou_head_hidden_dim=32,
)  # fmt: skip


def _hf_config(
    embed_dim: int = 96,
    heads: int = 1,
    blocks: tuple[int, ...] = (1, 2, 7, 2),
    global_blocks: tuple[int, ...] = (5, 7, 9),
    windows: tuple[int, ...] = (8, 4, 14, 7),
    background: tuple[int, int] = (7, 7),
    image_size: int = 1024,
    hidden: int = 256,
    decoder: dict | None = None,
):
    from transformers import Sam2Config, Sam2MaskDecoderConfig, Sam2PromptEncoderConfig, Sam2VisionConfig
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig

    dims = [embed_dim * 2**i for i in range(4)]
    backbone = Sam2HieraDetConfig(
        hidden_size=embed_dim, num_attention_heads=heads, image_size=[image_size, image_size],
        blocks_per_stage=list(blocks), embed_dim_per_stage=dims,
        num_attention_heads_per_stage=[heads * 2**i for i in range(4)],
        window_size_per_stage=list(windows), global_attention_blocks=list(global_blocks),
        window_positional_embedding_background_size=list(background),
    )  # fmt: skip
    vision = Sam2VisionConfig(
        backbone_config=backbone, backbone_channel_list=dims[::-1], fpn_hidden_size=hidden,
        backbone_feature_sizes=[[image_size // s, image_size // s] for s in (4, 8, 16)],
    )  # fmt: skip
    prompt = Sam2PromptEncoderConfig(hidden_size=hidden, image_size=image_size, patch_size=16)
    mask = Sam2MaskDecoderConfig(hidden_size=hidden, **(decoder or {}))
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=mask)


@pytest.fixture(scope="module")
def pair():
    """HF ``Sam2Model`` with perturbed random weights and our model loaded from it, both in eval mode."""
    from transformers import Sam2Model

    torch.manual_seed(0)
    cfg = _hf_config(
        E, 1, STAGES, GLOBAL, image_size=S, hidden=D,
        decoder=dict(mlp_dim=128, num_attention_heads=2, iou_head_hidden_dim=32),
    )  # fmt: skip
    hf = Sam2Model(cfg).eval()
    randomize_norms(hf, seed=1, layer_norm=True, perturb=0.05)  # off zero pos-embeds / no-memory embedding / biases
    with torch.no_grad():  # one matrix for points and the image grid, as in every converted checkpoint
        hf.shared_image_embedding.positional_embedding.copy_(hf.prompt_encoder.shared_embedding.positional_embedding)
    state_dict = hf.state_dict()
    assert is_hf_sam2_state_dict(state_dict)
    converted, dropped = convert_hf_sam2(state_dict)
    assert dropped == ["shared_image_embedding.positional_embedding"]
    ours = build_sam2(**TINY).eval()
    ours.load_state_dict(converted, strict=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf_embeddings = hf.get_image_embeddings(x)
        features = ours.embed_image(x)
    return hf, ours, hf_embeddings, features


def _prompts(batch: int = 2, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy0 = torch.rand(batch, 2, generator=g) * S / 2
    boxes = torch.cat([xy0, xy0 + S / 4 + torch.rand(batch, 2, generator=g) * S / 4], dim=1)  # (B, 4)
    return {
        "points": torch.rand(batch, 3, 2, generator=g) * S,
        "labels": torch.tensor([[1, 0, 1], [1, 1, -1], [0, 1, 1]])[:batch],
        "boxes": boxes,
        "masks": torch.randn(batch, 1, S // 4, S // 4, generator=g) * 3,
    }


def _kwargs(kind: str, p: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """HF keyword arguments (one prompt per image) and ours for a prompt kind."""
    hf, ours = {}, {}
    if "points" in kind:
        hf.update(input_points=p["points"][:, None], input_labels=p["labels"][:, None])
        ours.update(point_coords=p["points"], point_labels=p["labels"])
    if "box" in kind:
        hf.update(input_boxes=p["boxes"][:, None])
        ours.update(boxes=p["boxes"])
    if "mask" in kind:
        hf.update(input_masks=p["masks"])
        ours.update(mask_input=p["masks"])
    return hf, ours


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_image_embeddings_match_hf(pair):
    _, _, hf_embeddings, features = pair
    s0, s1 = features["high_res_feats"]
    assert s0.shape == (2, D // 8, S // 4, S // 4) and s1.shape == (2, D // 4, S // 8, S // 8)
    assert features["image_embed"].shape == (2, D, S // 16, S // 16)
    for ref, out in zip(hf_embeddings, [s0, s1, features["image_embed"]]):
        _close(out, ref)


@pytest.mark.parametrize("multimask", [True, False], ids=["multi", "single"])
@pytest.mark.parametrize("kind", ["points", "box", "points+box", "points+mask", "mask"])
def test_decode_matches_hf(pair, kind, multimask):
    hf, ours, hf_embeddings, features = pair
    hf_kwargs, kwargs = _kwargs(kind, _prompts())
    with torch.no_grad():
        ref = hf(image_embeddings=hf_embeddings, multimask_output=multimask, **hf_kwargs)
        masks, iou, obj = ours.decode(features, multimask_output=multimask, return_object_scores=True, **kwargs)
    m = 3 if multimask else 1
    assert masks.shape == (2, m, S // 4, S // 4) and iou.shape == (2, m) and obj.shape == (2, 1)
    _close(masks, ref.pred_masks[:, 0])
    _close(iou, ref.iou_scores[:, 0])
    _close(obj, ref.object_score_logits[:, 0])


@pytest.mark.parametrize("thresh", [-1.0, 2.0], ids=["always-stable", "never-stable"])
def test_dynamic_multimask_both_branches(pair, thresh):
    """Single-mask output falls back to the best multi-mask output (by IoU) exactly when the mask is unstable."""
    hf, ours, hf_embeddings, features = pair
    hf_kwargs, kwargs = _kwargs("points", _prompts())
    old = ours.mask_decoder.dynamic_multimask_stability_thresh
    ours.mask_decoder.dynamic_multimask_stability_thresh = hf.mask_decoder.dynamic_multimask_stability_thresh = thresh
    try:
        with torch.no_grad():
            ref = hf(image_embeddings=hf_embeddings, multimask_output=False, **hf_kwargs)
            masks, iou = ours.decode(features, multimask_output=False, **kwargs)
            all_masks, all_iou, _ = ours.mask_decoder.predict_masks(
                features["image_embed"], ours.prompt_encoder.get_dense_pe(),
                *ours.prompt_encoder((kwargs["point_coords"], kwargs["point_labels"]), None, None),
                features["high_res_feats"],
            )  # fmt: skip
    finally:
        ours.mask_decoder.dynamic_multimask_stability_thresh = hf.mask_decoder.dynamic_multimask_stability_thresh = old
    _close(masks, ref.pred_masks[:, 0])
    _close(iou, ref.iou_scores[:, 0])
    if thresh < 0:
        expected = all_masks[:, :1]
    else:
        best = all_iou[:, 1:].argmax(-1) + 1
        expected = all_masks[torch.arange(2), best][:, None]
    _close(masks, expected)


def test_one_image_many_prompts_matches_hf_point_batch(pair):
    """Features of one image shared by three prompts = HF's point batch of three."""
    hf, ours, hf_embeddings, features = pair
    p = _prompts(batch=3, seed=5)
    one = {"image_embed": features["image_embed"][:1], "high_res_feats": [f[:1] for f in features["high_res_feats"]]}
    with torch.no_grad():
        ref = hf(
            image_embeddings=[e[:1] for e in hf_embeddings], input_points=p["points"][None],
            input_labels=p["labels"][None], input_boxes=p["boxes"][None],
        )  # fmt: skip
        masks, iou = ours.decode(one, point_coords=p["points"], point_labels=p["labels"], boxes=p["boxes"])
    assert masks.shape == (3, 3, S // 4, S // 4)
    _close(masks, ref.pred_masks[0])
    _close(iou, ref.iou_scores[0])


def test_full_size_mask_prompt_is_resized_as_hf(pair):
    hf, ours, hf_embeddings, features = pair
    p = _prompts()
    mask = torch.randn(2, 1, S, S, generator=torch.Generator().manual_seed(7)) * 3
    with torch.no_grad():
        ref = hf(image_embeddings=hf_embeddings, input_points=p["points"][:, None], input_labels=p["labels"][:, None],
                 input_masks=mask)  # fmt: skip
        masks, iou = ours.decode(features, point_coords=p["points"], point_labels=p["labels"], mask_input=mask)
    _close(masks, ref.pred_masks[:, 0])
    _close(iou, ref.iou_scores[:, 0])


def test_box_equals_corner_points(pair):
    """A box is SAM 2's two corner points with labels 2 and 3."""
    _, ours, _, features = pair
    p = _prompts()
    corners = p["boxes"].reshape(2, 2, 2)
    labels = torch.tensor([[2, 3]]).expand(2, -1)
    with torch.no_grad():
        a = ours.decode(features, point_coords=p["points"], point_labels=p["labels"], boxes=p["boxes"])
        b = ours.decode(
            features,
            point_coords=torch.cat([corners, p["points"]], 1),
            point_labels=torch.cat([labels, p["labels"]], 1),
        )
    for x, y in zip(a, b):
        _close(x, y)


def test_training_mode_single_mask_is_token_zero(pair):
    _, ours, _, features = pair
    p = _prompts()
    prompts = (p["points"], p["labels"])
    with torch.no_grad():
        sparse, dense = ours.prompt_encoder(prompts, None, None)
        args = (features["image_embed"], ours.prompt_encoder.get_dense_pe(), sparse, dense)
        all_masks, _, _ = ours.mask_decoder.predict_masks(*args, features["high_res_feats"])
        ours.mask_decoder.train()
        try:
            masks, _, _ = ours.mask_decoder(*args, False, features["high_res_feats"])
        finally:
            ours.mask_decoder.eval()
    _close(masks, all_masks[:, :1])


def test_parameter_counts_match_hf():
    """The four builders against HF ``Sam2Model`` with the official SAM 2.1 sizes, both on the meta device."""
    from transformers import Sam2Config, Sam2Model

    configs = {
        "sam2_hiera_tiny": _hf_config(96, 1, (1, 2, 7, 2), (5, 7, 9)),
        "sam2_hiera_small": _hf_config(96, 1, (1, 2, 11, 2), (7, 10, 13)),
        "sam2_hiera_base_plus": _hf_config(112, 2, (2, 3, 16, 3), (12, 16, 20), background=(14, 14)),
        "sam2_hiera_large": _hf_config(144, 2, (2, 6, 36, 4), (23, 33, 43), windows=(8, 4, 16, 8)),
    }
    expected = {
        "sam2_hiera_tiny": 31_440_721,
        "sam2_hiera_small": 38_538_577,
        "sam2_hiera_base_plus": 73_328_401,
        "sam2_hiera_large": 216_924_865,
    }
    with torch.device("meta"):
        assert sum(p.numel() for p in Sam2Model(Sam2Config()).parameters()) == 31_440_721  # HF's default
        for name, cfg in configs.items():
            hf_count = sum(p.numel() for p in Sam2Model(cfg).parameters())
            ours = getattr(sam2_module, name)()
            assert sum(p.numel() for p in ours.parameters()) == hf_count == expected[name], name


def test_video_model_state_dict_converts_without_memory_weights():
    """An HF ``Sam2VideoModel`` state dict (the image model plus memory modules) fills every key of ours."""
    from transformers import Sam2VideoConfig, Sam2VideoModel

    with torch.device("meta"):
        state_dict = Sam2VideoModel(Sam2VideoConfig()).state_dict()
        ours = sam2_module.sam2_hiera_tiny()
    assert is_hf_sam2_state_dict(state_dict)
    converted, dropped = convert_hf_sam2(state_dict)
    assert set(converted) == set(ours.state_dict())
    assert {k.split(".")[0] for k in dropped} == {
        "mask_downsample", "memory_attention", "memory_encoder", "memory_temporal_positional_encoding",
        "no_memory_positional_encoding", "no_object_pointer", "object_pointer_proj",
        "occlusion_spatial_embedding_parameter", "shared_image_embedding",
        "temporal_positional_encoding_projection_layer",
    }  # fmt: skip
    ours.load_state_dict(converted, strict=True, assign=True)


def test_transform_and_postprocess_match_hf_processor():
    from transformers import Sam2ImageProcessor, Sam2Processor

    side = 64
    processor = Sam2Processor(
        image_processor=Sam2ImageProcessor(size={"height": side, "width": side}, mask_size={"height": 16, "width": 16}),
        target_size=side,
    )
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    points = [[10.0, 20.0], [30.5, 7.25]]
    box = [3.0, 4.0, 40.0, 30.0]
    ref = processor(images=image, input_points=[[points]], input_labels=[[[1, 0]]], input_boxes=[[box]],
                    return_tensors="pt")  # fmt: skip
    model = build_sam2(
        embed_dim=8, stages=(1, 1, 1, 1), global_att_blocks=(), image_size=side, prompt_embed_dim=32,
        decoder_num_heads=1, decoder_mlp_dim=32, iou_head_hidden_dim=16,
    ).eval()  # fmt: skip
    tr = model.transform
    resized = tr.apply_image(image)
    assert resized.shape == (side, side, 3) and resized.dtype == np.float32
    pixel_values = model.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None])
    # HF resizes the uint8 image (re-quantised, +-1 level); we resize floats, as the official SAM2Transforms
    torch.testing.assert_close(pixel_values, ref["pixel_values"], atol=1.2 / 255 / 0.224, rtol=0)
    np.testing.assert_allclose(tr.apply_coords(np.array(points), image.shape[:2]), ref["input_points"][0, 0], rtol=1e-6)
    np.testing.assert_allclose(tr.apply_boxes(np.array([box]), image.shape[:2]), ref["input_boxes"][0], rtol=1e-6)
    torch.testing.assert_close(
        tr.apply_coords_torch(torch.tensor(points), image.shape[:2]), ref["input_points"][0, 0], rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        tr.apply_boxes_torch(torch.tensor([box]), image.shape[:2]), ref["input_boxes"][0], rtol=1e-6, atol=0
    )
    low = torch.randn(1, 3, 16, 16)
    hf_masks = processor.post_process_masks(low[None], ref["original_sizes"], binarize=False)[0]
    torch.testing.assert_close(model.postprocess_masks(low, (side, side), image.shape[:2]), hf_masks)


def test_predictor_interface_shapes():
    model = build_sam2(**{**TINY, "embed_dim": 8}).eval()
    assert isinstance(model, Sam2) and model.image_size == S and model.mask_threshold == 0.0
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    x = torch.as_tensor(model.transform.apply_image(image)).permute(2, 0, 1)[None]
    with torch.no_grad():
        features = model.embed_image(model.preprocess(x))
        coords = torch.as_tensor(model.transform.apply_coords(np.array([[[20.0, 30.0]]]), image.shape[:2]))
        low, iou = model.decode(features, point_coords=coords, point_labels=torch.ones(1, 1, dtype=torch.long))
        masks = model.postprocess_masks(low, x.shape[-2:], image.shape[:2])
        empty, _ = model.decode(features, multimask_output=False)  # no prompt at all
    assert low.shape == (1, 3, S // 4, S // 4) and iou.shape == (1, 3) and masks.shape == (1, 3, 50, 70)
    assert empty.shape == (1, 1, S // 4, S // 4)
    assert ((iou >= 0) & (iou <= 1)).all()  # sigmoid IoU head

    # the shared SamPredictor gives the same answer, from prompts in original-image pixels
    from maskworks.models.promptable import SamPredictor

    predictor = SamPredictor(model)
    predictor.set_image(image)
    p_masks, p_iou, p_low = predictor.predict(point_coords=np.array([[20.0, 30.0]]), point_labels=np.array([1]),
                                              return_logits=True)  # fmt: skip
    np.testing.assert_allclose(p_low, low[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(p_iou, iou[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(p_masks, masks[0].numpy(), atol=1e-5)
    b_masks, b_iou, _ = predictor.predict(box=np.array([[5.0, 6.0, 40.0, 45.0], [10.0, 0.0, 69.0, 49.0]]))
    assert b_masks.shape == (2, 3, 50, 70) and b_masks.dtype == bool and b_iou.shape == (2, 3)

    # the official batched forward
    with torch.no_grad():
        out = model([{"image": x[0], "original_size": image.shape[:2], "point_coords": coords,
                      "point_labels": torch.ones(1, 1, dtype=torch.long)}])  # fmt: skip
    torch.testing.assert_close(out[0]["low_res_logits"], low)
    torch.testing.assert_close(out[0]["masks"], masks > 0)


def test_registered_builders_take_overrides():
    from maskworks import create_model

    model = create_model(
        "sam2_hiera_tiny", **{k: v for k, v in TINY.items() if k not in ("stages", "global_att_blocks")}
    )
    assert isinstance(model, Sam2) and model.image_size == S
    assert len(model.image_encoder.trunk.blocks) == 1 + 2 + 7 + 2  # Hiera-T's stages, the rest overridden
    with pytest.raises(TypeError):
        sam2_module.sam2_hiera_tiny(no_such_argument=1)

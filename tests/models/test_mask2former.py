"""Mask2Former / MaskFormer: HF parity (both backbones, every decoder layer), HF post-processing parity, parameter
counts, training and the three eval outputs."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from maskworks import create_model, load_weights
from maskworks.models.universal import instance_inference, panoptic_inference, semantic_inference
from maskworks.testing import TINY_MASK2FORMER

transformers = pytest.importorskip("transformers")


def _hf_model(backbone: str):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if backbone == "resnet50":
        bcfg = ResNetConfig(out_features=stages)  # ResNet-50 (HF's default is a 2-label Swin: set it explicitly)
    else:
        bcfg = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                          out_features=stages)  # fmt: skip
    return Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=bcfg, num_labels=133))


@pytest.mark.parametrize(
    "backbone, encoder, size, hf_count",
    [
        ("resnet50", "resnet50", (96, 128), 44_036_998),
        # SwinBackbone keeps shifted windows on maps no larger than a window: parity needs every map > 7 (256 px)
        ("swin_t", "swin_tiny_patch4_window7_224", (256, 256), 47_436_800),
    ],
)
def test_hf_parity_every_layer(backbone, encoder, size, hf_count):
    torch.manual_seed(0)
    hf = _hf_model(backbone).eval()
    assert sum(p.numel() for p in hf.parameters()) == hf_count  # the reference count
    with torch.no_grad():  # non-trivial norms and biases
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ours = create_model("mask2former", encoder=encoder, num_classes=133).eval()
    result = load_weights(ours, hf.state_dict(), source="hf")
    assert result.missing_keys == []
    unused = [k for k in result.unexpected_keys if k != "criterion.empty_weight"]
    # HF's count also holds the final LayerNorm of the SwinModel inside SwinBackbone, which its forward never uses
    unused_params = sum(hf.state_dict()[k].numel() for k in unused)
    assert sum(p.numel() for p in ours.parameters()) + unused_params == hf_count
    if backbone == "resnet50":
        assert unused == []
    hf, ours = hf.double(), ours.double()
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_auxiliary_logits=True)
        out = ours.forward_raw(x)
    assert out["pred_masks"].shape == (1, 100, size[0] // 4, size[1] // 4)
    torch.testing.assert_close(out["pred_logits"], ref.class_queries_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["pred_masks"], ref.masks_queries_logits, atol=1e-4, rtol=0)
    assert len(out["aux_outputs"]) == len(ref.auxiliary_logits) == 9
    for a, b in zip(out["aux_outputs"], ref.auxiliary_logits):
        torch.testing.assert_close(a["pred_logits"], b["class_queries_logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a["pred_masks"], b["masks_queries_logits"], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------- post-processing
def _random_outputs(b=2, q=16, k=6, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, q, k + 1, generator=g)
    boost = torch.randint(0, k, (b, q), generator=g)
    logits.scatter_add_(2, boost[..., None], torch.full((b, q, 1), 6.0) * (torch.rand(b, q, 1, generator=g) > 0.3))
    coarse = torch.randn(b, q, size // 8, size // 8, generator=g) * 4
    masks = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return logits.double(), masks.double()


def _blob_masks(b, q, size, seed):
    """Mask logits of rectangles (+8 inside, -8 outside, plus noise), so segments overlap partly, as real ones do."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randn(b, q, size, size, generator=g) - 8.0
    for i in range(b):
        for j in range(q):
            y0, x0 = torch.randint(0, size - 16, (2,), generator=g).tolist()
            hh, ww = torch.randint(12, size // 2, (2,), generator=g).tolist()
            masks[i, j, y0 : y0 + hh, x0 : x0 + ww] += 16.0
    return masks.double()


def _processor():
    from transformers import Mask2FormerImageProcessor

    return Mask2FormerImageProcessor()


def _hf_view(logits, masks):
    return types.SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)


def _at_384(masks):
    # HF's post-processing always resizes mask logits to 384 x 384 first; ours resizes to the image (here 384)
    return F.interpolate(masks, size=(384, 384), mode="bilinear", align_corners=False)


def test_semantic_inference_equals_hf():
    logits, masks = _random_outputs()
    ref = _processor().post_process_semantic_segmentation(_hf_view(logits, masks), return_segmentation_scores=True)
    scores = semantic_inference(logits, _at_384(masks))
    for i in range(2):
        torch.testing.assert_close(scores[i], ref[i].segmentation_scores, atol=1e-10, rtol=0)
        assert torch.equal(scores[i].argmax(0), ref[i].segmentation)


def test_instance_inference_equals_hf():
    logits, masks = _random_outputs(seed=1)
    threshold = 0.2
    ref = _processor().post_process_instance_segmentation(
        _hf_view(logits, masks), threshold=threshold, return_binary_maps=True
    )
    up = _at_384(masks)
    for i in range(2):
        res = instance_inference(logits[i], up[i], topk=logits.shape[1])
        keep = (res["scores"] >= threshold) & res["masks"].flatten(1).any(1)
        got = sorted(
            zip(res["scores"][keep].tolist(), res["labels"][keep].tolist(), res["masks"][keep]), key=lambda t: -t[0]
        )
        info = ref[i]["segments_info"]
        want = sorted(
            ((s["score"], s["label_id"], ref[i]["segmentation"][j].bool()) for j, s in enumerate(info)),
            key=lambda t: -t[0],
        )
        assert len(got) == len(want) > 3
        for (s1, l1, m1), (s2, l2, m2) in zip(got, want):
            assert abs(s1 - s2) < 1e-6 and l1 == l2 and torch.equal(m1, m2)
        # boxes enclose the masks exactly
        for box, m in zip(res["boxes"][keep], res["masks"][keep]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_panoptic_inference_equals_hf():
    stuff = {0, 1, 2}
    logits, _ = _random_outputs(seed=2, q=20)
    masks = _blob_masks(2, 20, 96, seed=3)
    ref = _processor().post_process_panoptic_segmentation(
        _hf_view(logits, masks), threshold=0.8, overlap_mask_area_threshold=0.8, label_ids_to_fuse=stuff
    )
    up = _at_384(masks)
    things = [c for c in range(6) if c not in stuff]
    collisions = 0
    for i in range(2):
        id_map, info = panoptic_inference(logits[i], up[i], things, 0.8, 0.8, reference="hf")
        hf_map = ref[i]["segmentation"].to(torch.int32)
        assert len(info) >= 3
        assert sorted(s["id"] for s in info) == list(range(1, len(info) + 1))  # ours: unique ids 1..n
        # Same segments, same pixels, same classes. The ids differ where HF's compute_segments reuses a number: after
        # fusing a stuff query into an earlier segment it resets its counter to that segment's id, so the next new
        # segment takes an id that is already in use (two segments, one id). Ours numbers every segment once.
        assert torch.equal(id_map == 0, hf_map == 0)
        to_hf = {}
        for s in info:
            values = hf_map[id_map == s["id"]].unique().tolist()
            assert len(values) == 1
            to_hf[s["id"]] = values[0]
            assert s["category_id"] in {r["label_id"] for r in ref[i]["segments_info"] if r["id"] == values[0]}
        collisions += len(to_hf) - len(set(to_hf.values()))
    assert collisions > 0  # the case above does exercise HF's id reuse


def test_panoptic_inference_mask2former_rules():
    """The original rules on a hand-built case: pixels no confident mask claims stay void, a query keeping less than
    the overlap threshold of its mask is dropped, segments of one stuff class merge, things never do."""
    k = 3  # 0 = stuff, 1, 2 = things
    big = 10.0
    logits = torch.full((5, k + 1), -big)
    for q, c in enumerate([0, 0, 1, 1, 2]):
        logits[q, c] = big
    logits[4, 2] = 1.0  # query 4: score softmax ~ 0.95 -> kept, but overlapped by query 2 below
    m = torch.full((5, 4, 8), -big)
    m[0, :2, :4] = big  # stuff, top-left
    m[1, :2, 4:] = big  # stuff, top-right (same class: merged)
    m[2, 2:, :3] = big  # thing
    m[3, 2:, 5:] = big  # thing of the same class: its own id
    m[4, 2:, :4] = 2.0  # mostly under query 2 (higher score and prob): keeps 1/4 of its mask -> dropped
    id_map, info = panoptic_inference(logits, m, thing_classes=[1, 2])
    # query 4 owns only column 3 of its 2 x 4 mask (query 2 wins columns 0-2): kept fraction 1/4 < 0.8 -> dropped
    assert [(s["category_id"], s["isthing"]) for s in info] == [(0, False), (1, True), (1, True)]
    assert id_map[:2].unique().tolist() == [1]  # both stuff queries of class 0 share one segment
    assert id_map[2:, :3].unique().tolist() == [2] and id_map[2:, 5:].unique().tolist() == [3]
    assert id_map[2:, 3:5].unique().tolist() == [0]  # claimed by no confident mask: void
    id_map2, info2 = panoptic_inference(logits, m, thing_classes=[1, 2], overlap_threshold=0.2)
    assert len(info2) == 4 and info2[3]["category_id"] == 2
    assert id_map2[2:, 3].unique().tolist() == [4] and id_map2[2:, 4].unique().tolist() == [0]


# ------------------------------------------------------------------------------------------------ model behaviour
def _tiny(task="panoptic", **kw):
    torch.manual_seed(0)
    return create_model("mask2former", num_classes=4, task=task, thing_classes=[2, 3], **{**TINY_MASK2FORMER, **kw})


def _targets(h=64, w=80):
    sem = torch.zeros(h, w, dtype=torch.long)
    sem[: h // 2] = 1
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0] = sem == 0
    masks[1] = sem == 1
    masks[2, 10:30, 10:30] = True
    masks[0] &= ~masks[2]
    masks[1] &= ~masks[2]
    return {"labels": torch.tensor([0, 1, 2]), "masks": masks}, sem


def test_training_losses_and_backward():
    model = _tiny().train()
    target, sem = _targets()
    images = [torch.randn(3, 64, 80), torch.randn(3, 50, 70)]
    t2 = {"semantic": sem[:50, :70]}
    losses = model(images, [target, t2])
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_dice_2"} <= set(losses)
    assert len(losses) == 3 * (1 + 3)  # final prediction + one before each of the 3 layers
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    with pytest.raises(ValueError, match="labels must be in"):
        model(images[:1], [{"labels": torch.tensor([7]), "masks": target["masks"][:1]}])
    with pytest.raises(ValueError, match="computes its own loss"):
        model(images)


def test_eval_outputs_of_each_task():
    model = _tiny().eval()
    images = [torch.randn(3, 64, 80), torch.randn(3, 50, 70)]
    with torch.no_grad():
        raw = model.forward_raw(images)
        assert raw["pred_logits"].shape == (2, 12, 5) and raw["pred_masks"].shape == (2, 12, 16, 24)
        pan = model(images)
        model.task = "instance"
        inst = model(images)
        model.task = "semantic"
        sem = model(torch.randn(2, 3, 50, 70))
    assert sem.shape == (2, 4, 50, 70) and torch.allclose(sem.exp().sum(1).clamp(max=100), sem.exp().sum(1))
    for out, (h, w) in zip(pan, [(64, 80), (50, 70)]):
        seg, info = out["panoptic_seg"], out["segments_info"]
        assert seg.shape == (h, w) and seg.dtype == torch.int32
        ids = set(seg.unique().tolist()) - {0}
        assert ids == {s["id"] for s in info}
    for out, (h, w) in zip(inst, [(64, 80), (50, 70)]):
        assert out["masks"].shape[1:] == (h, w) and out["masks"].dtype == torch.bool
        assert set(out["labels"].tolist()) <= {2, 3}  # only the thing classes
        assert (out["scores"][:-1] >= out["scores"][1:]).all()


def test_maskformer_ablation_has_no_masked_attention():
    torch.manual_seed(0)
    m = create_model("maskformer", num_classes=4, **TINY_MASK2FORMER).eval()
    assert not m.predictor.masked_attention
    assert type(m.pixel_decoder).__name__ == "FPNPixelDecoder"
    with torch.no_grad():
        raw = m.forward_raw(torch.randn(1, 3, 64, 64))
    assert raw["pred_masks"].shape == (1, 12, 16, 16)
    with pytest.raises(TypeError, match="fixes"):
        create_model("maskformer", pixel_decoder="msdeformattn")


def test_masked_attention_resets_fully_masked_rows():
    """A query whose previous mask is empty everywhere attends everywhere (no NaN from an all-masked softmax)."""
    model = _tiny().eval()
    with torch.no_grad():
        model.predictor.mask_embed.layers[-1].bias.fill_(-1e4)  # every mask logit very negative
        raw = model.forward_raw(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(raw["pred_logits"]).all() and torch.isfinite(raw["pred_masks"]).all()


def test_registry_declares_all_three_tasks():
    from maskworks.registry import model_entry

    for name in ("mask2former", "mask2former_resnet50", "mask2former_swin_tiny", "maskformer"):
        assert model_entry(name).all_tasks == ("semantic", "instance", "panoptic")
    with pytest.raises(ValueError, match="task must be one of"):
        create_model("mask2former", task="video", **TINY_MASK2FORMER)


# ------------------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_mask2former_learns_synthetic_panoptic(tmp_path):
    """Through the trainer and the panoptic task, test-sized: 64 px scenes with one textured stuff class around up to
    two shapes of a thing class, ResNet-18 + a 64-wide decoder with 8 queries, AdamW 1e-3, 8 epochs of 128 images:
    PQ >= 0.5 (0.88 on a 2-core machine in about 35 s: stuff 0.97, things 0.78). Harder scenes learn more slowly
    from scratch: with two thing classes the same recipe needs 16 epochs for PQ 0.60 (things 0.42), and with two
    stuff textures to tell apart (stripes / checks) 30 epochs reach PQ 0.36 (stuff 0.27)."""
    import time

    from maskworks.data import SyntheticShapes
    from maskworks.engine import Trainer
    from maskworks.tasks import PanopticTask

    kw = {"image_size": 64, "num_classes": 2, "max_shapes": 2, "radius_range": (0.2, 0.35), "panoptic": True,
          "num_stuff": 1}  # fmt: skip
    train, val = SyntheticShapes(128, split="train", **kw), SyntheticShapes(16, split="val", **kw)
    torch.manual_seed(0)
    model = create_model(
        "mask2former", num_classes=train.num_classes, task="panoptic", thing_classes=train.thing_classes,
        **{**TINY_MASK2FORMER, "num_queries": 8},
    )  # fmt: skip
    trainer = Trainer(
        model, train, val, tmp_path, task=PanopticTask(class_names=train.class_names, isthing=train.isthing),
        epochs=8, batch_size=8, optimizer="adamw", lr=1e-3, schedule="cosine", warmup_epochs=0.5, grad_clip=1.0,
        progress=False, amp="auto",
    )  # fmt: skip
    start = time.perf_counter()
    rows = trainer.fit()["history"]
    pq = [round(r["val_pq"], 3) for r in rows]
    print(f"Mask2Former panoptic learning: {time.perf_counter() - start:.0f} s, PQ per epoch {pq}")
    assert rows[-1]["val_pq"] >= 0.5, pq
    assert rows[-1]["val_pq_stuff"] > 0.5 and rows[-1]["val_pq_things"] > 0.5, rows[-1]


@pytest.mark.slow
def test_mask2former_learns_camvid_semantic(camvid_root, tmp_path):
    """The semantic task on real data: a tiny Mask2Former from scratch on 48 CamVid images (96x128 crops at a
    quarter to half scale), three epochs; validation mIoU (5 images at half resolution) rises above the first
    epoch's."""
    from torch.utils.data import Subset
    from torchvision.transforms import v2

    from maskworks.data import CamVid
    from maskworks.data.transforms import build_transforms
    from maskworks.engine import Trainer
    from maskworks.tasks import SemanticTask

    train = CamVid(camvid_root, "train", transform=build_transforms(True, crop_size=(96, 128), scale_range=(0.25, 0.5)))
    val = CamVid(camvid_root, "val", transform=v2.Resize((180, 240), antialias=True))
    train, val = Subset(train, range(0, 48 * 7, 7)), Subset(val, range(0, 100, 20))
    torch.manual_seed(0)
    model = create_model("mask2former", num_classes=11, **{**TINY_MASK2FORMER, "num_queries": 16})
    trainer = Trainer(
        model, train, val, tmp_path, task=SemanticTask(num_classes=11), epochs=3, batch_size=8, optimizer="adamw",
        lr=1e-3, schedule="cosine", grad_clip=1.0, progress=False, amp="auto",
    )  # fmt: skip
    rows = trainer.fit()["history"]
    miou = [round(r["val_miou"], 4) for r in rows]
    print("Mask2Former CamVid semantic mIoU per epoch", miou)
    assert rows[-1]["val_miou"] > rows[0]["val_miou"] + 0.01, miou


def test_postprocess_upsamples_only_the_queries_it_uses():
    """Eval upsamples only the kept / top-k queries: the results equal the inference functions on every query."""
    model = _tiny().eval()
    model.object_mask_threshold = 0.0  # every query whose best class is real is kept: segments to compare
    images = [torch.randn(3, 64, 80), torch.randn(3, 50, 70)]
    with torch.no_grad():
        raw = model.forward_raw(images)
        batch, sizes = model._batch(images)
        canvas = batch.shape[-2:]
        inst = model.postprocess(raw, sizes, canvas, task="instance")
        pan = model.postprocess(raw, sizes, canvas, task="panoptic")
    for i, size in enumerate(sizes):
        full = F.interpolate(raw["pred_masks"][i : i + 1], size=tuple(canvas), mode="bilinear")[0]
        full = full[:, : size[0], : size[1]]
        ref = instance_inference(raw["pred_logits"][i], full, model.test_topk, model.thing_classes)
        assert torch.equal(inst[i]["masks"], ref["masks"]) and torch.allclose(inst[i]["scores"], ref["scores"])
        ref_map, ref_info = panoptic_inference(raw["pred_logits"][i], full, model.thing_classes, 0.0, 0.8)
        assert torch.equal(pan[i]["panoptic_seg"], ref_map) and pan[i]["segments_info"] == ref_info
    assert any(p["segments_info"] for p in pan)


def test_panoptic_needs_thing_classes_and_checks_inputs():
    with pytest.raises(ValueError, match="thing_classes"):
        create_model("mask2former", num_classes=4, task="panoptic", **TINY_MASK2FORMER)
    coco = create_model("mask2former", num_classes=133, task="panoptic", **TINY_MASK2FORMER)
    assert coco.thing_classes == list(range(80))
    model = _tiny().eval()
    with pytest.raises(ValueError, match=r"images\[1\]"):
        model([torch.randn(3, 32, 32), torch.randn(1, 32, 32)])


def test_semantic_loss_settings_are_refused_for_set_prediction():
    from maskworks.cli import builders
    from maskworks.cli.config import ConfigError, load_config

    cfg = load_config(None)
    cfg["model"] = {"name": "mask2former"}
    builders.check_task_settings(cfg, "semantic")  # defaults pass
    cfg["train"]["class_weights"] = "inverse"
    with pytest.raises(ConfigError, match="class_weights"):
        builders.check_task_settings(cfg, "semantic")
    cfg["train"]["class_weights"] = None
    cfg["train"]["rare_class_sampling"] = True  # a sampler, not a loss: fine for the set loss too
    builders.check_task_settings(cfg, "semantic")

"""SETR (naive / PUP / MLA): structure, mmseg parameter counts, MLA aggregation by hand, any size, aux, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import maskworks.models.semantic.setr  # noqa: F401  (registers setr_naive / setr_pup / setr_mla)
from maskworks.losses import CrossEntropyLoss
from maskworks.models.semantic.setr import SETR, MLANeck, SETRMLAHead, SETRUPHead, setr_out_indices
from maskworks.registry import create_model, list_models, model_entry

NAMES = ["setr_naive", "setr_pup", "setr_mla"]
TINY = {"encoder": "vit_test_patch16", "img_size": 64, "channels": 16, "mla_channels": 16, "mla_head_channels": 8}

# mmseg 1.2.2, ViT-L/16 configs at 512 x 512 with 150 classes and their auxiliary heads, counted from the configs
# (setr_vit-l_naive_8xb2-160k_ade20k-512x512.py, setr_vit-l_pup_8xb2-160k_ade20k-512x512.py,
# setr_vit-l-mla_8xb1-160k_ade20k-512x512.py and their _base_/models/setr_*.py; numbers given by the lead engineer,
# re-derived by hand below). mmseg's VisionTransformer there has patch_bias=False and final_norm=False:
#   encoder 304,146,432 = patch conv 786,432 + cls 1,024 + pos (1 + 32 * 32) * 1,024 + 24 blocks * 12,596,224
#   naive  = encoder + head 303,254 + 3 aux * 369,302                         = 305,557,592
#   PUP    = encoder + head 4,171,414 + 3 aux * 2,990,742                     = 317,290,072
#   MLA    = encoder + neck 3,420,160 + head 1,848,470 + 4 aux * 38,550       = 309,569,262
MMSEG_PARAMS = {"setr_naive": 305_557_592, "setr_pup": 317_290_072, "setr_mla": 309_569_262}
MMSEG_VIT_L_512 = 304_146_432
PATCH_BIAS = 1024  # timm's ViT-L patch_embed.proj.bias, which mmseg's ViT lacks (patch_bias=False)


def tiny(name: str, **kwargs) -> SETR:
    torch.manual_seed(0)
    return create_model(name, num_classes=3, **{**TINY, **kwargs})


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registered_as_semantic_models():
    for name in NAMES:
        assert name in list_models(kind="model")
        assert model_entry(name).task == "semantic"
    with pytest.raises(TypeError):
        create_model("setr_pup", decoder="mla")


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_mmseg(name):
    with torch.device("meta"):
        exact = create_model(name, patch_bias=False)  # mmseg's ViT: no patch bias
    assert n_params(exact.encoder) == MMSEG_VIT_L_512
    assert n_params(exact) == MMSEG_PARAMS[name]
    assert exact.encoder.patch_embed.proj.bias is None
    # the default keeps timm's patch bias (timm checkpoints have it): exactly 1,024 more than mmseg
    with torch.device("meta"):
        default = create_model(name)
    assert default.encoder.patch_embed.proj.bias.numel() == PATCH_BIAS
    assert n_params(default) == MMSEG_PARAMS[name] + PATCH_BIAS
    assert isinstance(default.encoder.norm, nn.Identity)  # mmseg's final_norm=False
    if name == "setr_mla":
        assert default.out_indices == (5, 11, 17, 23)
        assert len(default.auxiliary_head) == 4
    else:
        assert default.out_indices == (9, 14, 19, 23)
        assert len(default.auxiliary_head) == 3
        kernel = 3 if name == "setr_pup" else 1
        for head in default.auxiliary_head:  # mmseg: SETRUPHead(num_convs=2, up_scale=4, channels=256)
            assert len(head.up_convs) == 2 and head.up_convs[0][1].scale_factor == 4
            assert head.up_convs[0][0].conv.kernel_size == (kernel, kernel)


def test_encoder_weights_at_another_resolution_are_resampled(tmp_path):
    """A timm-layout ViT checkpoint made at 64 px loads into SETR built for 96 px (pos_embed resampled as timm's
    checkpoint_filter_fn does); the final norm the heads do not use is dropped."""
    from safetensors.torch import save_file

    from maskworks.backbones.vit import checkpoint_filter_fn

    torch.manual_seed(0)
    vit = create_model("vit_test_patch16")
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    model = create_model("setr_pup", num_classes=3, **{**TINY, "img_size": 96}, encoder_weights=str(path))
    assert model.encoder.pos_embed.shape == (1, 1 + 6 * 6, 64)
    expected = checkpoint_filter_fn(vit.state_dict(), model.encoder)["pos_embed"]
    torch.testing.assert_close(model.encoder.pos_embed, expected)
    torch.testing.assert_close(model.encoder.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(model.encoder.patch_embed.proj.bias, vit.patch_embed.proj.bias)


def test_out_indices_for_other_depths():
    assert setr_out_indices("pup", 24) == (9, 14, 19, 23)
    assert setr_out_indices("naive", 12) == (4, 7, 9, 11)
    assert setr_out_indices("mla", 24) == (5, 11, 17, 23)
    assert setr_out_indices("mla", 12) == (2, 5, 8, 11)
    assert setr_out_indices("pup", 2) == (0, 0, 1, 1)
    assert setr_out_indices("mla", 2) == (0, 0, 0, 1)
    with pytest.raises(ValueError):
        create_model("setr_mla", num_classes=3, **TINY, out_indices=(0, 1))
    with pytest.raises(ValueError):
        SETR(decoder="fancy", **TINY)


def test_pup_upsamples_four_times_by_two_to_full_resolution():
    model = tiny("setr_pup").eval()
    head = model.decode_head
    assert len(head.up_convs) == 4
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for i, (conv, up) in enumerate(head.up_convs):
        assert conv.conv.kernel_size == (3, 3) and up.scale_factor == 2
        conv.register_forward_hook(lambda m, a, out, i=i: shapes.append((f"conv{i}", tuple(out.shape))))
        up.register_forward_hook(lambda m, a, out, i=i: shapes.append((f"up{i}", tuple(out.shape))))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))  # 4 x 6 tokens
    c, k = 16, 3  # the last upsampling gets the logits (classifier first; they commute)
    assert shapes == [
        ("conv0", (1, c, 4, 6)), ("up0", (1, c, 8, 12)),
        ("conv1", (1, c, 8, 12)), ("up1", (1, c, 16, 24)),
        ("conv2", (1, c, 16, 24)), ("up2", (1, c, 32, 48)),
        ("conv3", (1, c, 32, 48)), ("up3", (1, k, 64, 96)),
    ]  # fmt: skip
    assert out.shape == (1, k, 64, 96)


def _up_head_mmseg_order(head: SETRUPHead, x: torch.Tensor) -> torch.Tensor:
    """mmseg's SETRUPHead.forward: LN, every (conv, upsample) stage, then the classifier."""
    x = head.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    for stage in head.up_convs:
        x = stage(x)
    return head.conv_seg(x)


@pytest.mark.parametrize("kernel_size, num_convs, up_scale", [(3, 4, 2), (1, 1, 4), (1, 2, 4)])
def test_up_head_classifying_before_the_last_upsampling_is_exact(kernel_size, num_convs, up_scale):
    torch.manual_seed(0)
    head = SETRUPHead(8, 5, 6, num_convs=num_convs, up_scale=up_scale, kernel_size=kernel_size).eval()
    nn.init.normal_(head.conv_seg.bias)
    x = torch.randn(2, 8, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(head(x), _up_head_mmseg_order(head, x), rtol=1e-5, atol=1e-5)


def test_mla_head_matches_upsample_concat_classify():
    torch.manual_seed(0)
    head = SETRMLAHead([6] * 4, num_classes=5, mla_channels=4).eval()
    nn.init.normal_(head.conv_seg.bias)
    xs = [torch.randn(2, 6, 3, 4) for _ in range(4)]
    with torch.no_grad():
        ups = [
            nn.functional.interpolate(conv(x), scale_factor=4, mode="bilinear") for conv, x in zip(head.up_convs, xs)
        ]
        ref = head.conv_seg(torch.cat(ups, dim=1))  # mmseg: per level convs + x4, concat, classifier
        torch.testing.assert_close(head(xs), ref, rtol=1e-5, atol=1e-5)
    assert ref.shape == (2, 5, 12, 16)


def test_naive_is_a_one_by_one_head():
    model = tiny("setr_naive").eval()
    head = model.decode_head
    assert len(head.up_convs) == 1 and head.up_convs[0][0].conv.kernel_size == (1, 1)
    assert head.conv_seg.kernel_size == (1, 1) and head.up_convs[0][1].scale_factor == 4
    # pointwise on the token map: LN -> 1x1 conv -> BN -> ReLU -> 1x1 classifier, then bilinear x4
    x = torch.randn(2, 64, 3, 5)
    with torch.no_grad():
        conv = head.up_convs[0][0]
        y = head.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = head.conv_seg(torch.relu(conv.bn(conv.conv(y))))
        torch.testing.assert_close(head(x), nn.functional.interpolate(y, scale_factor=4, mode="bilinear"))
        # the decode head reads the last block: a model whose last block is replaced sees the change
        img = torch.randn(1, 3, 64, 64)
        before = model(img)
        nn.init.normal_(model.encoder.blocks[-1].mlp.fc2.bias)
        assert not torch.allclose(before, model(img))


def test_mla_neck_aggregates_top_down_by_hand():
    """Levels with constant values 1, 2, 4, 8 (shallow -> deep): the neck returns, deepest first, the cumulative
    sums 8, 8 + 4, 8 + 4 + 2, 8 + 4 + 2 + 1 (each bit says which levels were added)."""
    channels = 3
    neck = MLANeck([channels] * 4, out_channels=1).eval()
    values = [1.0, 2.0, 4.0, 8.0]
    with torch.no_grad():
        for i, v in enumerate(values):
            neck.norm[i].weight.zero_()  # LayerNorm output = its bias: the constant level value
            neck.norm[i].bias.fill_(v)
            neck.mla.channel_proj[i].conv.weight.fill_(1.0 / channels)  # mean over channels -> v
            extract = neck.mla.feat_extract[i].conv.weight
            extract.zero_()
            extract[0, 0, 1, 1] = 1.0  # 3x3 identity
        for m in neck.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 0.0  # eval BN with running (0, 1) and unit affine: identity
        outs = neck([torch.randn(2, channels, 5, 7) for _ in values])
    assert len(outs) == 4
    for out, expected in zip(outs, [8.0, 12.0, 14.0, 15.0]):
        assert out.shape == (2, 1, 5, 7)
        torch.testing.assert_close(out, torch.full_like(out, expected))


@pytest.mark.parametrize("name", NAMES)
def test_any_input_size(name):
    model = tiny(name)
    num_aux = 4 if name == "setr_mla" else 3
    for size in [(97, 131), (33, 33)]:
        x = torch.randn(2, 3, *size)
        model.train()
        out = model(x)
        assert out["out"].shape == (2, 3, *size) and len(out["aux"]) == num_aux
        assert all(a.shape == (2, 3, *size) for a in out["aux"])
        model.eval()
        with torch.no_grad():
            logits = model(x)
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3, *size)
        assert torch.isfinite(logits).all()
        # padding is zeros at the bottom / right, then a crop: the same as padding by hand
        padded = nn.functional.pad(x, (0, -size[1] % 16, 0, -size[0] % 16))
        with torch.no_grad():
            torch.testing.assert_close(logits, model(padded)[..., : size[0], : size[1]])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_trainable_parameter(name):
    model = tiny(name).train()
    x, y = torch.randn(2, 3, 48, 64), torch.randint(0, 3, (2, 48, 64))
    CrossEntropyLoss()(model(x), y).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    zero = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.any()]
    assert not zero, zero


@pytest.mark.parametrize("name", NAMES)
def test_aux_outputs_only_in_training(name):
    model = tiny(name)
    x = torch.randn(1, 3, 32, 48)
    model.train()
    assert isinstance(model(x), dict)
    model.eval()
    with torch.no_grad():
        assert isinstance(model(x), torch.Tensor)
    no_aux = tiny(name, aux=False).train()
    assert no_aux.auxiliary_head is None
    assert isinstance(no_aux(x), torch.Tensor)


def test_short_training_run_learns_synthetic_shapes():
    """SETR-PUP on the 2-d, 2-block test ViT (patch 8) from scratch, 150 AdamW steps of 16 images, 32 x 32 shapes
    (background / circle): validation mIoU about 0.74 (about 12 s on an idle 2-core CPU). With the default four
    classes (circle / rectangle / triangle) the same budget reaches only about 0.26: telling the shapes apart
    from 4 x 4 tokens takes a bigger ViT or much longer training."""
    from maskworks.data import SyntheticShapes, build_transforms

    torch.manual_seed(0)
    size, classes = 32, 2
    kwargs = {"image_size": size, "num_classes": classes, "transform": build_transforms(train=False),
              "return_instances": False, "cache": True}  # fmt: skip
    data = SyntheticShapes(num_samples=512, split="train", **kwargs)
    val = SyntheticShapes(num_samples=64, split="val", **kwargs)
    xs = torch.stack([data[i]["image"] for i in range(len(data))])
    ys = torch.stack([data[i]["mask"] for i in range(len(data))])
    model = create_model(
        "setr_pup", encoder="vit_test_patch8", img_size=size, num_classes=classes, channels=32, aux=False
    )
    steps, lr = 150, 8e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (16,), generator=gen)
        loss = loss_fn(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    xv = torch.stack([val[i]["image"] for i in range(len(val))])
    yv = torch.stack([val[i]["mask"] for i in range(len(val))])
    with torch.no_grad():
        pred = model(xv).argmax(1)
    cm = torch.bincount(yv.flatten() * classes + pred.flatten(), minlength=classes**2).reshape(classes, classes)
    iou = cm.diag() / (cm.sum(0) + cm.sum(1) - cm.diag()).clamp(min=1)
    assert iou.mean() >= 0.7, iou

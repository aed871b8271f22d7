"""The table of published weights: every row names a registered model, a converter that exists and a source that
resolves (torchvision URLs through ``get_weight``, timm repositories through timm's own pretrained configurations,
no network), and every row's checkpoint layout fills the model it is for (checked at full size on the ``meta``
device, so nothing is allocated)."""

from __future__ import annotations

import contextlib
import inspect
import re
from collections import Counter

import pytest
import torch

from maskworks import create_model, list_models
from maskworks.convert import CONVERTERS, load_weights
from maskworks.hub import (
    KINDS,
    NO_PUBLISHED_WEIGHTS,
    PRETRAINED,
    format_pretrained_table,
    list_pretrained,
)
from maskworks.registry import _check_kwargs, model_entry


def test_rows_are_complete():
    names = set(list_models())
    for row in PRETRAINED:
        assert row.model in names, row.name
        assert row.kind in KINDS and row.converter in CONVERTERS, row.name
        assert row.license and row.dataset and row.tag, row.name
        assert set(row.requires) <= set(row.model_kwargs), row.name
        _check_kwargs(model_entry(row.model), dict(row.model_kwargs))  # the constructor takes them
        if row.is_hub:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", row.repo) and row.files and not row.url, row.name
        else:
            assert row.repo is None and not row.files, row.name
        if row.sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{64}", row.sha256), row.name
    # one row per (model, tag, requires), exactly one default per model
    keys = Counter((r.model, r.tag, tuple(r.model_kwargs[k] for k in r.requires)) for r in PRETRAINED)
    assert max(keys.values()) == 1
    defaults = Counter(r.model for r in PRETRAINED if r.default)
    assert set(defaults) == {r.model for r in PRETRAINED} and max(defaults.values()) == 1
    # encoder_weights="imagenet" is each backbone's default, which must be an ImageNet one
    for row in PRETRAINED:
        if row.default and model_entry(row.model).kind == "backbone":
            assert "imagenet" in row.dataset, row.name


def test_every_registered_model_has_rows_or_a_reason():
    with_rows = {r.model for r in PRETRAINED}
    registered = set(list_models())
    assert not with_rows & set(NO_PUBLISHED_WEIGHTS)
    unlisted = registered - with_rows - set(NO_PUBLISHED_WEIGHTS)
    assert not unlisted, f"add rows (or a reason) to maskworks/hub/table.py for: {sorted(unlisted)}"
    assert set(NO_PUBLISHED_WEIGHTS) <= registered


def test_torchvision_rows_resolve_without_network():
    from torchvision.models import get_weight

    rows = [r for r in PRETRAINED if r.kind == "torchvision"]
    assert {r.model for r in rows} >= {"resnet34", "mobilenet_v2", "mobilenet_v3_large", "vit_base_patch16_224"}
    for row in rows:
        weights = get_weight(row.torchvision_weights)
        url = row.resolve_url()
        assert url == weights.url and url.startswith("https://download.pytorch.org/models/")
        prefix = row.expected_sha256()
        assert re.fullmatch(r"[0-9a-f]{8,}", prefix) and f"-{prefix}." in url, row.name
        # torchvision says which weights carry another licence (SWAG: CC-BY-NC 4.0)
        assert (row.license == "cc-by-nc-4.0") == ("SWAG" in str(weights.meta.get("license", ""))), row.name
        if row.model in ("deeplabv3", "lraspp_mobilenet_v3_large") or row.model.startswith("mask_rcnn"):
            assert len(weights.meta["categories"]) == row.model_kwargs["num_classes"]
        elif "img_size" in row.model_kwargs:
            assert weights.meta["min_size"] == (row.model_kwargs["img_size"],) * 2


def test_timm_rows_exist_in_timm():
    timm = pytest.importorskip("timm")
    for row in PRETRAINED:
        if row.kind != "timm-hub":
            continue
        cfg = timm.models.get_pretrained_cfg(row.repo.split("/", 1)[1])
        assert cfg is not None, row.name
        assert cfg.hf_hub_id == row.repo and cfg.architecture == row.model, row.name
        assert cfg.license == row.license, row.name


def test_list_and_format():
    rows = list_pretrained("resnet34")
    assert rows[0].default and rows[0].tag == "tv_in1k" and all(r.model == "resnet34" for r in rows)
    assert [r.name for r in list_pretrained("*.mae")] == [
        "vit_base_patch16_224.mae",
        "vit_huge_patch14_224.mae",
        "vit_large_patch16_224.mae",
    ]
    text = format_pretrained_table()
    assert "https://download.pytorch.org/models/resnet34-b627a593.pth" in text
    assert "timm/resnet34.a1_in1k" in text and "b627a593 (prefix)" in text
    assert "* coco_voc (encoder='resnet50', num_classes=21)" in text
    assert "fast_scnn: published only as mmsegmentation" in text
    assert f"{len(PRETRAINED)} weights for" in text
    assert "no published weights match 'nothing*'" in format_pretrained_table("nothing*")
    as_dict = rows[0].as_dict()
    assert as_dict["url"].endswith("resnet34-b627a593.pth") and as_dict["expected_sha256"] == "b627a593"


# --------------------------------------------------------------------------------------------------- coverage

_HF_SIZES = {  # hidden, layers, heads, mlp
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 16, 5120),
}


_UPERNET_SWIN = {  # embed, depths, heads, window
    "tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24], 7),
    "small": (96, [2, 2, 18, 2], [3, 6, 12, 24], 7),
    "base": (128, [2, 2, 18, 2], [4, 8, 16, 32], 12),
    "large": (192, [2, 2, 18, 2], [6, 12, 24, 48], 12),
}
_UPERNET_CONVNEXT = {  # depths, first width
    "tiny": ([3, 3, 9, 3], 96),
    "small": ([3, 3, 27, 3], 96),
    "base": ([3, 3, 27, 3], 128),
    "large": ([3, 3, 27, 3], 192),
    "xlarge": ([3, 3, 27, 3], 256),
}


def _hf_upernet_reference(name: str) -> torch.nn.Module:
    """openmmlab/upernet-{swin,convnext}-{size}: UperNetForSemanticSegmentation on ADE20K (150 classes)."""
    import transformers

    stages = ["stage1", "stage2", "stage3", "stage4"]
    _, family, size = name.split("-")
    if family == "swin":
        embed, depths, heads, window = _UPERNET_SWIN[size]
        backbone = transformers.SwinConfig(
            embed_dim=embed, depths=depths, num_heads=heads, window_size=window, out_features=stages
        )
        aux_in = embed * 4
    else:
        depths, width = _UPERNET_CONVNEXT[size]
        sizes = [width * 2**i for i in range(4)]
        backbone = transformers.ConvNextConfig(depths=depths, hidden_sizes=sizes, out_features=stages)
        aux_in = sizes[2]
    config = transformers.UperNetConfig(backbone_config=backbone, num_labels=150, auxiliary_in_channels=aux_in)
    return transformers.UperNetForSemanticSegmentation(config)


_SEGFORMER = {  # hidden sizes, depths, decoder width
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
}


def _hf_segformer_reference(name: str) -> torch.nn.Module:
    """nvidia/mit-b*: SegformerForImageClassification (1000 classes); nvidia/segformer-b*-finetuned-ade-*: ADE20K."""
    import transformers

    sizes, depths, decoder = _SEGFORMER[re.search(r"b\d", name).group(0)]
    if name.startswith("mit-"):
        config = transformers.SegformerConfig(hidden_sizes=sizes, depths=depths, num_labels=1000)
        return transformers.SegformerForImageClassification(config)
    config = transformers.SegformerConfig(
        hidden_sizes=sizes, depths=depths, decoder_hidden_size=decoder, num_labels=150
    )
    return transformers.SegformerForSemanticSegmentation(config)


def _hf_reference(repo: str) -> torch.nn.Module:
    """The transformers model a hub repository holds, from its name (configs are not available offline)."""
    transformers = pytest.importorskip("transformers")
    name = repo.split("/", 1)[1]
    if name.startswith("sam-vit-"):
        size = name.removeprefix("sam-vit-")
        hidden, layers, heads, _ = _HF_SIZES[size]
        glob = {"base": [2, 5, 8, 11], "large": [5, 11, 17, 23], "huge": [7, 15, 23, 31]}[size]
        vision = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads}
        return transformers.SamModel(transformers.SamConfig(vision_config={**vision, "global_attn_indexes": glob}))
    if name.startswith("upernet-"):
        return _hf_upernet_reference(name)
    if name.startswith(("mit-", "segformer-")):
        return _hf_segformer_reference(name)
    if name.startswith("mask2former-swin-tiny-"):
        labels = {"coco-panoptic": 133, "coco-instance": 80, "ade-semantic": 150, "cityscapes-semantic": 19}
        swin = transformers.SwinConfig(
            embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )  # fmt: skip
        config = transformers.Mask2FormerConfig(
            backbone_config=swin, num_labels=labels[name.removeprefix("mask2former-swin-tiny-")]
        )
        return transformers.Mask2FormerForUniversalSegmentation(config)
    size = next(s for s in _HF_SIZES if f"-{s}" in name)
    hidden, layers, heads, mlp = _HF_SIZES[size]
    dims = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": mlp}
    if name.startswith("vit-mae"):
        patch = 14 if size == "huge" else 16
        return transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(patch_size=patch, **dims))
    patch, image = map(int, re.search(r"patch(\d+)-(\d+)", name).groups())
    if "distilled" in name:
        config = transformers.DeiTConfig(patch_size=patch, image_size=image, num_labels=1000, **dims)
        return transformers.DeiTForImageClassificationWithTeacher(config)
    config = transformers.ViTConfig(patch_size=patch, image_size=image, **dims)
    if name.endswith("in21k"):
        return transformers.ViTModel(config)  # with its pooler, as published
    config.num_labels = 1000
    return transformers.ViTForImageClassification(config)


def _torchvision_reference(enum: str) -> torch.nn.Module:
    import torchvision.models as tvm

    weights = tvm.get_weight(enum)
    builder = type(weights).__name__.removesuffix("_Weights").lower()
    kwargs = {"num_classes": len(weights.meta["categories"])}
    if builder.startswith("deeplabv3"):
        kwargs.update(aux_loss=True, weights_backbone=None)
    elif builder.startswith("lraspp"):
        kwargs["weights_backbone"] = None
    elif builder.startswith("maskrcnn"):
        kwargs["weights_backbone"] = None
    elif builder.startswith("vit"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    return tvm.get_model(builder, weights=None, **kwargs)


def _reference(row) -> torch.nn.Module:
    if row.kind == "torchvision":
        return _torchvision_reference(row.torchvision_weights)
    if row.kind == "url" and row.converter == "segment_anything":
        sa = pytest.importorskip("segment_anything")
        return sa.sam_model_registry[re.search(r"sam_(vit_[blh])_", row.url).group(1)](checkpoint=None)
    if row.kind == "timm-hub":
        timm = pytest.importorskip("timm")
        name = row.repo.split("/", 1)[1]  # with the tag: its class count
        if row.model.startswith(("vit", "deit")):
            try:  # skipping the random initialisation saves seconds; timm < 1.0.23 (nnunetv2's pin) lacks "skip"
                return timm.create_model(name, pretrained=False, weight_init="skip")
            except AssertionError:
                pass
        return timm.create_model(name, pretrained=False)
    return _hf_reference(row.repo)


def _distinct_layouts() -> list:
    """The rows, less timm tags whose checkpoint has the same layout as an earlier tag of the same architecture (timm
    builds every tag of an architecture alike; only the class count of the head can differ)."""
    try:
        import timm
    except ImportError:
        return list(PRETRAINED)
    seen, rows = set(), []
    for row in PRETRAINED:
        if row.kind == "timm-hub":
            key = (row.model, timm.models.get_pretrained_cfg(row.repo.split("/", 1)[1]).num_classes)
            if key in seen:
                continue
            seen.add(key)
        rows.append(row)
    return rows


def _with_gray_check(rows: list) -> set[str]:
    """Rows also loaded into a 1-channel model: each backbone's default, and the first row of each source kind and
    model family (the first-convolution adaptation is per converter and architecture)."""
    chosen, seen = set(), set()
    for row in rows:
        family = row.model.split("_")[0] + ("_hybrid" if "_r50_" in row.model else "")
        if row.default or (row.kind, family) not in seen:
            chosen.add(row.name + row.kind)
        seen.add((row.kind, family))
    return chosen


_ROWS = _distinct_layouts()
_GRAY = _with_gray_check(_ROWS)


@contextlib.contextmanager
def _meta_shapes_only(monkeypatch):
    """Build on the meta device, skipping weight initialisation (only shapes and names matter here)."""
    with monkeypatch.context() as patch:
        linspace = torch.linspace  # timm's ResNetV2 reads its drop-path rates back with .tolist(): keep them on CPU
        patch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": k.get("device") or "cpu"}))
        for name in ("normal_", "uniform_", "erfinv_", "clamp_", "fill_", "zero_", "mul_", "add_", "copy_"):
            patch.setattr(torch.Tensor, name, lambda self, *a, **k: self)
        for name in ("normal_", "uniform_", "trunc_normal_", "kaiming_normal_", "kaiming_uniform_", "xavier_uniform_"):
            patch.setattr(torch.nn.init, name, lambda tensor, *a, **k: tensor)
        with torch.device("meta"):
            yield


@pytest.mark.parametrize("row", _ROWS, ids=lambda r: f"{r.name}:{r.kind}")
def test_row_fills_its_model(row, monkeypatch):
    """The published checkpoint's layout (its reference model, random, on the meta device) loads into the model
    ``create_model(row.model, pretrained=row.tag)`` builds through the row's converter, passing load_weights'
    coverage check; all that may stay unfilled is a classifier head the checkpoint has at another size (or not)."""
    with _meta_shapes_only(monkeypatch):
        reference = _reference(row)
        model = create_model(row.model, **row.model_kwargs)
        gray = None
        if row.name + row.kind in _GRAY and "in_channels" in inspect.signature(model_entry(row.model).fn).parameters:
            gray = create_model(row.model, in_channels=1, **row.model_kwargs)
    state = reference.state_dict()
    result = load_weights(model, state, source=row.converter)  # strict=None: at least half must match
    own = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    assert all(k.split(".")[0] in ("head", "head_dist") for k in missing), (row.name, missing[:5])
    assert len(own) - len(missing) >= 0.9 * len(own), row.name
    if gray is not None:  # the first convolution is adapted to 1 channel: no shape error
        load_weights(gray, state, source=row.converter)

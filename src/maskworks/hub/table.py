"""The table of published weights: one :class:`PretrainedWeights` row per (registered model, tag).

Rows are data. Torchvision rows name the weights enum (``"ResNet34_Weights.IMAGENET1K_V1"``); its URL, and the
SHA-256 prefix embedded in that URL's file name, are read from torchvision at run time
(``torchvision.models.get_weight(...).url``), never copied by hand. Hub rows name the repository and the file(s) to
take from it, in order of preference. Tags follow timm's naming (``tv_in1k``, ``a1_in1k``, ``augreg2_in21k_ft_in1k``,
``fb_in1k``, ``mae``, ...); weights taken from a Hugging Face transformers repository have tags starting ``hf_``.

:data:`NO_PUBLISHED_WEIGHTS` says, for every registered model without a row, why it has none.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

__all__ = ["PretrainedWeights", "PRETRAINED", "NO_PUBLISHED_WEIGHTS", "KINDS", "torchvision_weights_url"]

# How a row's file is obtained: a torchvision weights enum (its URL, through torch.hub's downloader), a plain URL,
# or a file in a Hugging Face hub repository (timm's or a transformers model's, through huggingface_hub).
KINDS = ("torchvision", "url", "timm-hub", "hf-hub")

# torch.hub's rule (torch.hub.HASH_REGEX): the hex digits between the last '-' and the first '.' of the file name
# are a prefix of the file's SHA-256.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def torchvision_weights_url(weights: str) -> str:
    """The download URL of a torchvision weights enum, e.g. ``"ResNet34_Weights.IMAGENET1K_V1"`` (no network)."""
    from torchvision.models import get_weight

    return get_weight(weights).url


@dataclass(frozen=True)
class PretrainedWeights:
    """One published weights file for one registered model.

    Attributes:
        model: the registered model name it loads into.
        tag: the name of these weights for that model (``create_model(model, pretrained=tag)``).
        kind: ``"torchvision"``, ``"url"``, ``"timm-hub"`` or ``"hf-hub"`` (see :data:`KINDS`).
        converter: the ``source=`` of :func:`maskworks.load_weights` that maps its keys.
        license: the licence the publisher states for the weights (SPDX-style id).
        dataset: what the weights were trained on (``"imagenet-21k > 1k"``: pre-trained, then fine-tuned).
        torchvision_weights: for ``kind="torchvision"``: the enum, e.g. ``"ResNet34_Weights.IMAGENET1K_V1"``.
        url: for ``kind="url"``: the download URL.
        repo: for hub kinds: the repository id, e.g. ``"timm/resnet34.a1_in1k"``.
        files: for hub kinds: the file names to take, the first one present wins.
        revision: for hub kinds: a branch, tag or commit (``None``: ``main``).
        sha256: the full SHA-256 of the file where its publisher states one (else ``None``: torchvision files are
            checked against the hash prefix in their name, hub files against their LFS object id).
        default: the row that ``pretrained=True`` picks (one per model; where the caller's arguments rule it out
            by its ``requires``, the first row that fits is taken).
        model_kwargs: constructor arguments of the architecture the weights were trained with; they are the
            defaults of ``create_model(model, pretrained=tag, ...)`` (the caller's own arguments win).
        requires: names in ``model_kwargs`` that the caller may not change (they change tensor shapes); tags with
            the same name are told apart by these (``deeplabv3`` ``coco_voc`` for ``encoder="resnet50"`` or
            ``"resnet101"``).
        note: anything else a user must know.
    """

    model: str
    tag: str
    kind: str
    converter: str
    license: str
    dataset: str
    torchvision_weights: str | None = None
    url: str | None = None
    repo: str | None = None
    files: tuple[str, ...] = ()
    revision: str | None = None
    sha256: str | None = None
    default: bool = False
    model_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    requires: tuple[str, ...] = ()
    note: str = ""

    @property
    def name(self) -> str:
        """``model.tag``, as timm names its pretrained configurations."""
        return f"{self.model}.{self.tag}"

    @property
    def is_hub(self) -> bool:
        return self.kind in ("timm-hub", "hf-hub")

    def resolve_url(self) -> str | None:
        """The download URL (torchvision rows: read from torchvision); ``None`` for hub rows."""
        if self.kind == "torchvision":
            return torchvision_weights_url(self.torchvision_weights)
        return self.url

    @property
    def location(self) -> str:
        """Where the file comes from: the URL, or ``repo/file`` (``@revision``) for hub rows."""
        if self.is_hub:
            return f"{self.repo}/{self.files[0]}" + (f"@{self.revision}" if self.revision else "")
        return self.resolve_url()

    def expected_sha256(self) -> str | None:
        """The full SHA-256 when known, else the prefix in a URL's file name (torch.hub's check), else ``None``."""
        if self.sha256:
            return self.sha256.lower()
        url = self.resolve_url()
        if url:
            match = _HASH_IN_NAME.search(os.path.basename(urlparse(url).path))
            if match and len(match.group(1)) >= 6:
                return match.group(1)
        return None

    def accepts(self, model_kwargs: Mapping[str, Any]) -> bool:
        """Whether a model built with ``model_kwargs`` can take these weights (its ``requires`` agree)."""
        return all(model_kwargs.get(k, self.model_kwargs[k]) == self.model_kwargs[k] for k in self.requires)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the row, with the URL resolved and the expected checksum."""
        return {
            "model": self.model,
            "tag": self.tag,
            "name": self.name,
            "default": self.default,
            "kind": self.kind,
            "converter": self.converter,
            "license": self.license,
            "dataset": self.dataset,
            "location": self.location,
            "url": self.resolve_url(),
            "repo": self.repo,
            "files": list(self.files),
            "revision": self.revision,
            "sha256": self.sha256,
            "expected_sha256": self.expected_sha256(),
            "model_kwargs": dict(self.model_kwargs),
            "requires": list(self.requires),
            "note": self.note,
        }


def _dataset(tag: str) -> str:
    """The training data a timm-style tag names."""
    if tag.startswith("fb_ssl_yfcc100m"):
        return "yfcc100m (semi-sup.) > imagenet-1k"
    if tag.startswith("fb_swsl_ig1b"):
        return "ig-1b (semi-weakly sup.) > imagenet-1k"
    if tag.startswith("swag_"):
        return "ig-3.6b (weakly sup.) > imagenet-1k"
    if tag in ("mae", "dino", "fcmae") or tag.endswith("_mae"):
        return "imagenet-1k (self-supervised)"
    if tag.startswith("fcmae_ft_in22k_in1k"):
        return "imagenet-1k (self-supervised) > 22k > 1k"
    if tag.startswith("fcmae_ft_in1k"):
        return "imagenet-1k (self-supervised) > 1k"
    if "in22k_ft_in1k" in tag:
        return "imagenet-22k > 1k"
    if tag.endswith("in22k"):
        return "imagenet-22k"
    if "in21k_ft_in1k" in tag:
        return "imagenet-21k > 1k"
    if tag.endswith("in21k"):
        return "imagenet-21k"
    if tag.endswith("in1k"):
        return "imagenet-1k"
    raise ValueError(f"no data set known for tag {tag!r}")


def _tv(model: str, tag: str, weights: str, *, default: bool = False, **kwargs: Any) -> PretrainedWeights:
    kwargs.setdefault("license", "cc-by-nc-4.0" if tag.startswith("swag_") else "bsd-3-clause")
    if "dataset" not in kwargs:
        kwargs["dataset"] = _dataset(tag)
    return PretrainedWeights(
        model, tag, "torchvision", "torchvision", torchvision_weights=weights, default=default, **kwargs
    )


# timm tags whose publisher's licence is non-commercial (timm's pretrained configurations say so too; ConvNeXt V2's
# ``fcmae*`` weights are all cc-by-nc-4.0)
_TIMM_NC = ("fb_ssl_yfcc100m_ft_in1k", "fb_swsl_ig1b_ft_in1k", "mae")


def _timm(
    model: str, tag: str, *, default: bool = False, note: str = "", license: str | None = None
) -> PretrainedWeights:
    if license is None:
        license = "cc-by-nc-4.0" if tag in _TIMM_NC or tag.startswith("fcmae") else "apache-2.0"
    return PretrainedWeights(
        model,
        tag,
        "timm-hub",
        "timm",
        license,
        _dataset(tag),
        repo=f"timm/{model}.{tag}",
        files=_HUB_FILES,
        default=default,
        note=note,
    )


def _hf(model: str, tag: str, repo: str, *, default: bool = False, **kwargs: Any) -> PretrainedWeights:
    kwargs.setdefault("license", "apache-2.0")
    if "dataset" not in kwargs:
        kwargs["dataset"] = _dataset(tag.removeprefix("hf_"))
    return PretrainedWeights(model, tag, "hf-hub", "hf", repo=repo, files=_HUB_FILES, default=default, **kwargs)


_CONVNEXT_SIZES = ("tiny", "small", "base", "large", "xlarge")


def _rows() -> list[PretrainedWeights]:
    rows: list[PretrainedWeights] = []

    # ---- ResNets: torchvision (the default, as smp's "imagenet") and timm's other recipes
    tv_resnet = {
        "resnet18": ("ResNet18_Weights.IMAGENET1K_V1",),
        "resnet34": ("ResNet34_Weights.IMAGENET1K_V1",),
        "resnet50": ("ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2"),
        "resnet101": ("ResNet101_Weights.IMAGENET1K_V1", "ResNet101_Weights.IMAGENET1K_V2"),
    }
    timm_resnet = {
        "resnet18": ("a1_in1k", "a2_in1k", "a3_in1k", "gluon_in1k", "fb_ssl_yfcc100m_ft_in1k", "fb_swsl_ig1b_ft_in1k"),
        "resnet34": ("a1_in1k", "a2_in1k", "a3_in1k", "bt_in1k", "gluon_in1k", "ra4_e3600_r224_in1k"),
        "resnet50": (
            "a1_in1k",
            "a1h_in1k",
            "a2_in1k",
            "a3_in1k",
            "am_in1k",
            "b1k_in1k",
            "b2k_in1k",
            "bt_in1k",
            "c1_in1k",
            "c2_in1k",
            "d_in1k",
            "ra_in1k",
            "ram_in1k",
            "gluon_in1k",
            "fb_ssl_yfcc100m_ft_in1k",
            "fb_swsl_ig1b_ft_in1k",
        ),
        "resnet101": ("a1_in1k", "a1h_in1k", "a2_in1k", "a3_in1k", "gluon_in1k"),
    }
    for model, enums in tv_resnet.items():
        for i, enum in enumerate(enums):
            rows.append(_tv(model, "tv_in1k" if i == 0 else "tv2_in1k", enum, default=i == 0))
        rows.extend(_timm(model, tag) for tag in timm_resnet[model])

    # ---- MobileNets: torchvision (timm's MobileNets are other architectures)
    tv_mobilenet = {
        "mobilenet_v2": ("MobileNet_V2_Weights.IMAGENET1K_V1", "MobileNet_V2_Weights.IMAGENET1K_V2"),
        "mobilenet_v3_large": ("MobileNet_V3_Large_Weights.IMAGENET1K_V1", "MobileNet_V3_Large_Weights.IMAGENET1K_V2"),
        "mobilenet_v3_small": ("MobileNet_V3_Small_Weights.IMAGENET1K_V1",),
    }
    for model, enums in tv_mobilenet.items():
        for i, enum in enumerate(enums):
            rows.append(_tv(model, "tv_in1k" if i == 0 else "tv2_in1k", enum, default=i == 0))

    # ---- ViTs: timm (default: the best ImageNet-1k fine-tune), torchvision, Hugging Face
    timm_vit = {
        "vit_tiny_patch16_224": ("augreg_in21k_ft_in1k", "augreg_in21k"),
        "vit_tiny_patch16_384": ("augreg_in21k_ft_in1k",),
        "vit_small_patch32_224": ("augreg_in21k_ft_in1k", "augreg_in21k"),
        "vit_small_patch16_224": ("augreg_in21k_ft_in1k", "augreg_in1k", "augreg_in21k", "dino"),
        "vit_small_patch16_384": ("augreg_in21k_ft_in1k", "augreg_in1k"),
        "vit_small_patch8_224": ("dino",),
        "vit_base_patch32_224": ("augreg_in21k_ft_in1k", "augreg_in1k", "augreg_in21k", "orig_in21k", "sam_in1k"),
        "vit_base_patch32_384": ("augreg_in21k_ft_in1k", "augreg_in1k"),
        "vit_base_patch16_224": (
            "augreg2_in21k_ft_in1k",
            "augreg_in21k_ft_in1k",
            "augreg_in1k",
            "augreg_in21k",
            "orig_in21k_ft_in1k",
            "orig_in21k",
            "sam_in1k",
            "dino",
            "mae",
        ),
        "vit_base_patch16_384": ("augreg_in21k_ft_in1k", "augreg_in1k", "orig_in21k_ft_in1k"),
        "vit_base_patch8_224": ("augreg2_in21k_ft_in1k", "augreg_in21k_ft_in1k", "augreg_in21k", "dino"),
        "vit_large_patch16_224": ("augreg_in21k_ft_in1k", "augreg_in21k", "orig_in21k", "mae"),
        "vit_large_patch16_384": ("augreg_in21k_ft_in1k",),
        "vit_large_patch32_224": ("orig_in21k",),
        "vit_large_patch32_384": ("orig_in21k_ft_in1k",),
        "vit_huge_patch14_224": ("orig_in21k", "mae"),
        "vit_base_r50_s16_224": ("orig_in21k",),
        "vit_base_r50_s16_384": ("orig_in21k_ft_in1k",),
    }
    # models whose default is not their first timm tag
    vit_defaults = {"vit_small_patch8_224": "dino", "vit_large_patch32_224": "tv_in1k"}
    for model, tags in timm_vit.items():
        want = vit_defaults.get(model, tags[0])
        rows.extend(_timm(model, tag, default=tag == want) for tag in tags)

    rows += [
        _tv("vit_base_patch16_224", "tv_in1k", "ViT_B_16_Weights.IMAGENET1K_V1"),
        _tv("vit_base_patch16_224", "swag_lc_in1k", "ViT_B_16_Weights.IMAGENET1K_SWAG_LINEAR_V1"),
        _tv("vit_base_patch16_384", "swag_e2e_in1k", "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1"),
        _tv("vit_base_patch32_224", "tv_in1k", "ViT_B_32_Weights.IMAGENET1K_V1"),
        _tv("vit_large_patch16_224", "tv_in1k", "ViT_L_16_Weights.IMAGENET1K_V1"),
        _tv("vit_large_patch16_224", "swag_lc_in1k", "ViT_L_16_Weights.IMAGENET1K_SWAG_LINEAR_V1"),
        _tv(
            "vit_large_patch16_384",
            "swag_e2e_in1k",
            "ViT_L_16_Weights.IMAGENET1K_SWAG_E2E_V1",
            model_kwargs={"img_size": 512},
            note="fine-tuned at 512 px: built with img_size=512 (another img_size resamples the position table)",
        ),
        _tv("vit_large_patch32_224", "tv_in1k", "ViT_L_32_Weights.IMAGENET1K_V1", default=True),
        _tv("vit_huge_patch14_224", "swag_lc_in1k", "ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1"),
        _tv(
            "vit_huge_patch14_224",
            "swag_e2e_in1k",
            "ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1",
            model_kwargs={"img_size": 518},
            note="fine-tuned at 518 px: built with img_size=518 (another img_size resamples the position table)",
        ),
    ]
    hf_vit = [
        ("vit_base_patch16_224", "hf_in21k_ft_in1k", "google/vit-base-patch16-224"),
        ("vit_base_patch16_224", "hf_in21k", "google/vit-base-patch16-224-in21k"),
        ("vit_base_patch16_384", "hf_in21k_ft_in1k", "google/vit-base-patch16-384"),
        ("vit_base_patch32_224", "hf_in21k", "google/vit-base-patch32-224-in21k"),
        ("vit_base_patch32_384", "hf_in21k_ft_in1k", "google/vit-base-patch32-384"),
        ("vit_large_patch16_224", "hf_in21k_ft_in1k", "google/vit-large-patch16-224"),
        ("vit_large_patch16_224", "hf_in21k", "google/vit-large-patch16-224-in21k"),
        ("vit_large_patch16_384", "hf_in21k_ft_in1k", "google/vit-large-patch16-384"),
        ("vit_large_patch32_224", "hf_in21k", "google/vit-large-patch32-224-in21k"),
        ("vit_large_patch32_384", "hf_in21k_ft_in1k", "google/vit-large-patch32-384"),
        ("vit_huge_patch14_224", "hf_in21k", "google/vit-huge-patch14-224-in21k"),
    ]
    rows.extend(_hf(model, tag, repo) for model, tag, repo in hf_vit)

    # ---- DeiT: timm (official Facebook weights) and the transformers ports
    for size in ("tiny", "small", "base"):
        for distilled in ("", "_distilled"):
            model = f"deit_{size}{distilled}_patch16_224"
            rows.append(_timm(model, "fb_in1k", default=True))
            rows.append(_hf(model, "hf_in1k", f"facebook/deit-{size}{distilled.replace('_', '-')}-patch16-224"))
    for distilled in ("", "_distilled"):
        model = f"deit_base{distilled}_patch16_384"
        rows.append(_timm(model, "fb_in1k", default=True))
        rows.append(_hf(model, "hf_in1k", f"facebook/deit-base{distilled.replace('_', '-')}-patch16-384"))

    # ---- MAE pre-training models (encoder and decoder): the transformers ports of the official release
    mae_note = "the official MAE release is cc-by-nc-4.0 (the hub model card says apache-2.0)"
    for model, repo in (
        ("mae_vit_base_patch16", "facebook/vit-mae-base"),
        ("mae_vit_large_patch16", "facebook/vit-mae-large"),
        ("mae_vit_huge_patch14", "facebook/vit-mae-huge"),
    ):
        rows.append(_hf(model, "hf_mae", repo, default=True, license="cc-by-nc-4.0", note=mae_note))

    # ---- ConvNeXt V1 (official Facebook weights; xlarge has no ImageNet-1k-only ones) and V2 (FCMAE pre-training)
    for size in ("tiny", "small", "base", "large", "xlarge"):
        tags = ("fb_in22k_ft_in1k", "fb_in22k") if size == "xlarge" else ("fb_in1k", "fb_in22k_ft_in1k", "fb_in22k")
        rows.extend(_timm(f"convnext_{size}", tag, default=i == 0) for i, tag in enumerate(tags))
    for size in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"):
        tags = ("fcmae_ft_in1k", "fcmae")
        if size in ("nano", "tiny", "base", "large"):
            tags += ("fcmae_ft_in22k_in1k",)
        rows.extend(_timm(f"convnextv2_{size}", tag, default=i == 0) for i, tag in enumerate(tags))

    # ---- Swin Transformer V1 (official Microsoft weights, MIT); large has no ImageNet-1k-only ones
    for model in (
        "swin_tiny_patch4_window7_224",
        "swin_small_patch4_window7_224",
        "swin_base_patch4_window7_224",
        "swin_base_patch4_window12_384",
        "swin_large_patch4_window7_224",
        "swin_large_patch4_window12_384",
    ):
        tags = ("ms_in22k_ft_in1k", "ms_in22k") if "large" in model else ("ms_in1k", "ms_in22k_ft_in1k", "ms_in22k")
        rows.extend(_timm(model, tag, default=i == 0, license="mit") for i, tag in enumerate(tags))

    # ---- Swin Transformer V2 (official Microsoft weights, MIT); the "12to" models are fine-tuned from 22k at 192
    for model in (
        "swinv2_tiny_window8_256",
        "swinv2_tiny_window16_256",
        "swinv2_small_window8_256",
        "swinv2_small_window16_256",
        "swinv2_base_window8_256",
        "swinv2_base_window16_256",
    ):
        rows.append(_timm(model, "ms_in1k", default=True, license="mit"))
    for model in ("swinv2_base_window12to16_192to256", "swinv2_base_window12to24_192to384"):
        rows.append(_timm(model, "ms_in22k_ft_in1k", default=True, license="mit"))

    # ---- torchvision's own Swin / Swin V2 / ConvNeXt ImageNet-1k recipes (BSD-3 code, weights trained by torchvision)
    for model, enum in (
        ("swin_tiny_patch4_window7_224", "Swin_T_Weights.IMAGENET1K_V1"),
        ("swin_small_patch4_window7_224", "Swin_S_Weights.IMAGENET1K_V1"),
        ("swin_base_patch4_window7_224", "Swin_B_Weights.IMAGENET1K_V1"),
        ("swinv2_tiny_window8_256", "Swin_V2_T_Weights.IMAGENET1K_V1"),
        ("swinv2_small_window8_256", "Swin_V2_S_Weights.IMAGENET1K_V1"),
        ("swinv2_base_window8_256", "Swin_V2_B_Weights.IMAGENET1K_V1"),
        ("convnext_tiny", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1"),
        ("convnext_small", "ConvNeXt_Small_Weights.IMAGENET1K_V1"),
        ("convnext_base", "ConvNeXt_Base_Weights.IMAGENET1K_V1"),
        ("convnext_large", "ConvNeXt_Large_Weights.IMAGENET1K_V1"),
    ):
        rows.append(_tv(model, "tv_in1k", enum))

    # ---- UPerNet on ADE20K (150 classes): mmsegmentation's models as published by OpenMMLab on the HF hub
    #      (UperNetForSemanticSegmentation); Swin-B / -L use the window-12 backbones pre-trained at 384 on 22k
    for family, sizes in (("swin", ("tiny", "small", "base", "large")), ("convnext", _CONVNEXT_SIZES)):
        for size in sizes:
            rows.append(
                _hf(
                    f"upernet_{family}_{size}",
                    "ade20k",
                    f"openmmlab/upernet-{family}-{size}",
                    default=True,
                    license="mit",
                    dataset="imagenet > ade20k (150 classes)",
                    model_kwargs={"num_classes": 150},
                    requires=("num_classes",),
                )
            )

    # ---- Mask2Former Swin-T as Meta publishes it on the HF hub (Mask2FormerForUniversalSegmentation): one row per
    #      task; COCO panoptic's 133 labels put the 80 things first
    for tag, repo, kwargs, data in (
        ("coco_panoptic", "facebook/mask2former-swin-tiny-coco-panoptic",
         {"num_classes": 133, "task": "panoptic", "thing_classes": list(range(80))}, "coco panoptic (80 + 53)"),
        ("coco_instance", "facebook/mask2former-swin-tiny-coco-instance",
         {"num_classes": 80, "task": "instance"}, "coco instances (80 classes)"),
        ("ade20k", "facebook/mask2former-swin-tiny-ade-semantic",
         {"num_classes": 150, "task": "semantic"}, "ade20k (150 classes)"),
        ("cityscapes", "facebook/mask2former-swin-tiny-cityscapes-semantic",
         {"num_classes": 19, "task": "semantic"}, "cityscapes (19 classes)"),
    ):  # fmt: skip
        rows.append(
            _hf(
                "mask2former_swin_tiny",
                tag,
                repo,
                default=tag == "coco_panoptic",
                license="mit",
                dataset=f"imagenet-1k > {data}",
                model_kwargs=kwargs,
                requires=("num_classes",),
            )
        )

    # ---- MiT encoders (ImageNet-1k) and SegFormer on ADE20K, as NVIDIA publishes them on the HF hub
    nvidia_note = (
        "NVIDIA Source Code License for SegFormer (https://github.com/NVlabs/SegFormer/blob/master/LICENSE): "
        "non-commercial (research / evaluation) use only"
    )
    for i in range(6):
        rows.append(
            _hf(
                f"mit_b{i}",
                "hf_in1k",
                f"nvidia/mit-b{i}",
                default=True,
                license="other",
                dataset="imagenet-1k",
                note=nvidia_note,
            )
        )
        ade = "640-640" if i == 5 else "512-512"
        rows.append(
            _hf(
                f"segformer_b{i}",
                "ade20k",
                f"nvidia/segformer-b{i}-finetuned-ade-{ade}",
                default=True,
                license="other",
                dataset="imagenet-1k > ade20k (150 classes)",
                model_kwargs={"num_classes": 150},
                requires=("num_classes",),
                note=nvidia_note,
            )
        )

    # ---- Whole segmentation models: torchvision DeepLabv3 (COCO images, the 20 Pascal VOC classes + background)
    for i, encoder in enumerate(("resnet50", "resnet101")):
        rows.append(
            _tv(
                "deeplabv3",
                "coco_voc",
                f"DeepLabV3_ResNet{encoder[6:]}_Weights.COCO_WITH_VOC_LABELS_V1",
                default=i == 0,
                dataset="coco (20 voc classes + background)",
                model_kwargs={"encoder": encoder, "num_classes": 21, "aux": True, "output_stride": 8},
                requires=("encoder", "num_classes"),
            )
        )
    # torchvision LR-ASPP MobileNetV3-Large, the same COCO subset and labels
    rows.append(
        _tv(
            "lraspp_mobilenet_v3_large",
            "coco_voc",
            "LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1",
            default=True,
            dataset="coco (20 voc classes + background)",
            model_kwargs={"num_classes": 21},
            requires=("num_classes",),
        )
    )

    # ---- Whole instance models: torchvision Mask R-CNN on COCO (91 category slots, background included)
    for model, enum in (
        ("mask_rcnn_resnet50_fpn", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"),
        ("mask_rcnn_resnet50_fpn_v2", "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"),
    ):
        rows.append(
            _tv(
                model,
                "coco",
                enum,
                default=True,
                dataset="imagenet-1k > coco instances (80 classes in 91 slots)",
                model_kwargs={"num_classes": 91},
                requires=("num_classes",),
            )
        )

    # ---- Segment Anything: the official release (Meta's CDN) and the same weights on the HF hub
    for model, size, file in (
        ("sam_vit_base", "base", "sam_vit_b_01ec64.pth"),
        ("sam_vit_large", "large", "sam_vit_l_0b3195.pth"),
        ("sam_vit_huge", "huge", "sam_vit_h_4b8939.pth"),
    ):
        rows.append(
            PretrainedWeights(
                model,
                "sa1b",
                "url",
                "segment_anything",
                "apache-2.0",
                "sa-1b (11 M images, 1.1 B masks)",
                url=f"https://dl.fbaipublicfiles.com/segment_anything/{file}",
                default=True,
                note="the official release; the hex in the file name is not a SHA-256 prefix, so it is not checked",
            )
        )
        rows.append(_hf(model, "hf_sa1b", f"facebook/sam-vit-{size}", dataset="sa-1b (11 M images, 1.1 B masks)"))
    return rows


PRETRAINED: tuple[PretrainedWeights, ...] = tuple(_rows())

_ENCODER_HINT = "start its encoder from published weights with encoder_weights='imagenet' (or another encoder tag)"
_TEST_SIZE = "a test-size configuration; nothing is published for it"

# Registered models without a row, and why.
NO_PUBLISHED_WEIGHTS: dict[str, str] = {
    **{
        name: "SAM 2 weights are published as facebookresearch/sam2 .pt files, a layout maskworks does not convert; "
        "a Hugging Face Sam2Model / Sam2VideoModel state dict loads with load_weights(model, path, source='hf')"
        for name in ("sam2_hiera_tiny", "sam2_hiera_small", "sam2_hiera_base_plus", "sam2_hiera_large")
    },
    **{
        name: f"no whole-model weights are published in a format maskworks converts; {_ENCODER_HINT}"
        for name in (
            "unet",
            "unetplusplus",
            "attention_unet",
            "fpn",
            "pspnet",
            "deeplabv3plus",
            "deeplabv3plus_mobilenet_v3_large",
            "bisenetv1",
            "upernet",
            "upernet_resnet50",
            "upernet_resnet101",
        )
    },
    "embedding_unet": "no whole-model weights are published for this bottom-up head; " + _ENCODER_HINT,
    "mask_rcnn": "no whole-model weights are published for arbitrary encoders; start its encoder with "
    "encoder_weights='imagenet' (or another encoder tag), or use mask_rcnn_resnet50_fpn's COCO weights",
    "mask_rcnn_mobilenet_v3_large_fpn": "torchvision publishes MobileNetV3-FPN only as Faster R-CNN (no mask head); "
    + _ENCODER_HINT,
    "solov2": "published only as mmdetection / official SOLO checkpoints, for which there is no converter; "
    + _ENCODER_HINT,
    "solov2_resnet50_fpn": "published only as mmdetection / official SOLO checkpoints, for which there is no converter",
    "yolact": "no whole-model weights are published for arbitrary encoders; " + _ENCODER_HINT,
    "yolact_resnet50_fpn": "published only as mmdetection / official YOLACT checkpoints, for which there is no "
    "converter; " + _ENCODER_HINT,
    "mask2former": "no whole-model weights are published for arbitrary encoders; " + _ENCODER_HINT,
    "maskformer": "MaskFormer's own checkpoints (facebook/maskformer-*) have another architecture than this "
    "ablation; " + _ENCODER_HINT,
    "mask2former_resnet50": "published only as detectron2 checkpoints (facebookresearch/Mask2Former), for which "
    "there is no converter; " + _ENCODER_HINT,
    "panoptic_fpn": "no whole-model weights are published for arbitrary encoders; " + _ENCODER_HINT,
    "panoptic_fpn_resnet50": "published only as detectron2 / mmdetection checkpoints, for which there is no "
    "converter; " + _ENCODER_HINT,
    "unet_vanilla": "no PyTorch / safetensors checkpoint is published for the original U-Net",
    "unet3d": "no PyTorch / safetensors checkpoint is published for the 3D U-Net of Cicek et al.",
    "dynunet": "nnU-Net / MONAI DynUNet weights belong to one dataset's plan (topology and classes); a MONAI DynUNet "
    "state dict loads with load_weights(model, path, source='monai')",
    "unetr": "MONAI publishes UNETR weights in Model Zoo bundles (unetr_btcv_segmentation), not on a hub: convert the "
    "bundle's models/model.pt with load_weights(model, path, source='monai')",
    "swin_unetr": "MONAI publishes SwinUNETR weights in Model Zoo bundles (swin_unetr_btcv_segmentation), not on a "
    "hub: convert the bundle's models/model.pt with load_weights(model, path, source='monai')",
    "setr_naive": "published only as mmsegmentation checkpoints, for which there is no converter",
    "setr_pup": "published only as mmsegmentation checkpoints, for which there is no converter",
    "setr_mla": "published only as mmsegmentation checkpoints, for which there is no converter",
    "transunet": "the official release (Beckschen/TransUNet) publishes no trained TransUNet weights, only Google's "
    "ImageNet-21k ViT encoders; start its encoder with encoder_weights='orig_in21k' or convert a checkpoint trained "
    "with the official code by maskworks.convert.transunet.convert_transunet_official (build with official_cnn=True)",
    "bisenetv2": "published only as mmsegmentation checkpoints, for which there is no converter",
    "fast_scnn": "published only as mmsegmentation checkpoints, for which there is no converter",
    "vit_large_patch14_224": "timm and torchvision publish ViT-L/14 only as CLIP models (another architecture)",
    "vit_small_convstem_patch16_224": "no checkpoint of this configuration is published by timm, torchvision or the hub",
    "vit_test_patch16": _TEST_SIZE,
    "vit_test_patch8": _TEST_SIZE,
    "vit_test_convstem_patch16": _TEST_SIZE,
    "vit_test_r50_s16": _TEST_SIZE,
    "deit_test_distilled_patch16": _TEST_SIZE,
    "mae_vit_test_patch8": _TEST_SIZE,
}

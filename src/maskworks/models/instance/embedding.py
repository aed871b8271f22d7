"""Bottom-up instance segmentation with a discriminative embedding head (De Brabandere et al., 2017): the Q16
answer for dense scenes of touching objects, where boxes overlap and NMS would merge or drop instances.

A U-Net (any registered encoder) predicts, per pixel, ``num_classes`` class logits and an ``embedding_dim``-
dimensional embedding. Training: cross-entropy on the class map painted from the instance masks plus
:class:`~maskworks.losses.DiscriminativeLoss` on the embeddings (padding and ``ignore_index`` pixels never count).
Eval: foreground = pixels whose most likely class is not background; :func:`~maskworks.ops.cluster_embeddings`
groups them; each group is an instance with the majority class of its pixels, the mean probability of that class
as its score and its tight box (DESIGN.md "Instance output"). No boxes, no NMS: touching instances are separated
by their embeddings alone.

Images of a batch may differ in size: they are zero-padded (bottom / right) to a common size divisible by 32 and
the results cropped back. Images arrive normalised, as maskworks datasets deliver them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.data.io import masks_to_boxes
from maskworks.losses.discriminative import DiscriminativeLoss
from maskworks.models._utils import check_positive_int
from maskworks.models.instance._common import check_image_list, pad_batch
from maskworks.ops.grouping import cluster_embeddings
from maskworks.registry import register_model

__all__ = ["EmbeddingInstanceUNet", "embedding_unet"]

_IGNORE = 255


class EmbeddingInstanceUNet(nn.Module):
    """U-Net with a class head and an embedding head, grouped bottom-up into instances (see the module docstring).

    Args:
        encoder: a registered backbone name (``"resnet18"``, ``"resnet34"``, ``"convnext_tiny"`` ...).
        num_classes: classes including the background class 0.
        in_channels: image channels.
        embedding_dim: dimensions of the pixel embeddings.
        encoder_weights: published encoder weights tag or local path (``None``: random).
        delta_v, delta_d: margins of the discriminative loss.
        bandwidth: grouping radius in embedding space (default ``delta_d``).
        min_pixels: groups smaller than this are dropped.
        embedding_weight: weight of the embedding loss against the class loss.
        coord_scale: the pixel's ``(y, x)`` times ``coord_scale`` is added to the first two embedding dimensions
            (spatial embeddings, Neven et al., CVPR 2019): the network then predicts offsets towards a per-instance
            point, and two instances that look alike but lie apart separate without having to learn where they
            are (a convolution cannot). ``0`` turns it off (the plain discriminative embedding).
    """

    def __init__(
        self,
        encoder: str = "resnet18",
        num_classes: int = 2,
        in_channels: int = 3,
        embedding_dim: int = 8,
        encoder_weights: str | None = None,
        delta_v: float = 0.5,
        delta_d: float = 1.5,
        bandwidth: float | None = None,
        min_pixels: int = 8,
        embedding_weight: float = 1.0,
        coord_scale: float = 0.1,
    ) -> None:
        super().__init__()
        from maskworks.models.semantic.unet import UNet

        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (it counts the background class 0), got {num_classes!r}")
        check_positive_int("embedding_dim", embedding_dim)
        check_positive_int("min_pixels", min_pixels)
        if not embedding_weight >= 0:
            raise ValueError(f"embedding_weight must be >= 0, got {embedding_weight!r}")
        self.num_classes, self.in_channels, self.embedding_dim = num_classes, in_channels, embedding_dim
        self.net = UNet(
            encoder=encoder,
            num_classes=num_classes + embedding_dim,
            in_channels=in_channels,
            encoder_weights=encoder_weights,
        )
        self.embedding_loss = DiscriminativeLoss(delta_v=delta_v, delta_d=delta_d, ignore_index=_IGNORE)
        self.bandwidth = float(delta_d if bandwidth is None else bandwidth)
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
        self.min_pixels = min_pixels
        self.embedding_weight = float(embedding_weight)
        if not coord_scale >= 0:
            raise ValueError(f"coord_scale must be >= 0, got {coord_scale!r}")
        if coord_scale > 0 and embedding_dim < 2:
            raise ValueError(f"coord_scale > 0 needs embedding_dim >= 2 (y and x), got embedding_dim={embedding_dim}")
        self.coord_scale = float(coord_scale)

    def _images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return check_image_list(images, self.in_channels)

    def _targets(self, images: list[torch.Tensor], targets: Sequence[dict], size: tuple[int, int]):
        classes = torch.full((len(images), *size), _IGNORE, dtype=torch.int64, device=images[0].device)
        instances = torch.full_like(classes, _IGNORE)
        for k, (image, target) in enumerate(zip(images, targets)):
            h, w = image.shape[-2:]
            masks = torch.as_tensor(target["masks"]).bool().to(classes.device)
            labels = torch.as_tensor(target["labels"]).long().to(classes.device)
            if masks.shape[-2:] != (h, w):
                raise ValueError(f"targets[{k}]: masks are {tuple(masks.shape[-2:])} but the image is {(h, w)}")
            cls, inst = classes[k, :h, :w], instances[k, :h, :w]
            cls.zero_()
            inst.zero_()
            for i in range(masks.shape[0]):  # later instances are painted over earlier ones (paint order)
                cls[masks[i]] = labels[i]
                inst[masks[i]] = i + 1
        return classes, instances

    def forward(
        self, images: torch.Tensor | Sequence[torch.Tensor], targets: Sequence[dict] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training (``targets`` given): ``{"loss_semantic", "loss_embedding"}``. Eval: one instance dict per image."""
        image_list = self._images(images)
        batch = pad_batch(image_list)
        out = self.net(batch)
        logits, embeddings = out[:, : self.num_classes], out[:, self.num_classes :]
        if self.coord_scale > 0:
            h, w = embeddings.shape[-2:]
            ys = torch.arange(h, device=out.device, dtype=out.dtype)[:, None].expand(h, w)
            xs = torch.arange(w, device=out.device, dtype=out.dtype)[None, :].expand(h, w)
            coords = torch.stack([ys, xs]) * self.coord_scale
            embeddings = torch.cat([embeddings[:, :2] + coords, embeddings[:, 2:]], 1)
        if targets is not None:
            if len(targets) != len(image_list):
                raise ValueError(f"got {len(image_list)} images but {len(targets)} targets")
            classes, instances = self._targets(image_list, targets, tuple(batch.shape[-2:]))
            return {
                "loss_semantic": F.cross_entropy(logits.float(), classes, ignore_index=_IGNORE),
                "loss_embedding": self.embedding_weight * self.embedding_loss(embeddings.float(), instances),
            }
        return self._postprocess(image_list, logits.float(), embeddings.float())

    @torch.no_grad()
    def _postprocess(self, images: list[torch.Tensor], logits: torch.Tensor, embeddings: torch.Tensor) -> list[dict]:
        probs = logits.softmax(1)
        classes = probs.argmax(1)
        results = []
        for k, image in enumerate(images):
            h, w = image.shape[-2:]
            cls = classes[k, :h, :w]
            ids = cluster_embeddings(embeddings[k, :, :h, :w], cls > 0, self.bandwidth, self.min_pixels)
            n = int(ids.max())
            masks = ids[None] == torch.arange(1, n + 1, device=ids.device)[:, None, None]  # (N, H, W)
            labels, scores = [], []
            for m in masks:
                label = int(torch.bincount(cls[m], minlength=self.num_classes)[1:].argmax()) + 1
                labels.append(label)
                scores.append(probs[k, label, :h, :w][m].mean())
            results.append(
                {
                    "boxes": masks_to_boxes(masks.cpu()).to(image.device),
                    "labels": torch.tensor(labels, dtype=torch.int64, device=image.device),
                    "scores": torch.stack(scores) if scores else image.new_zeros(0),
                    "masks": masks,
                }
            )
        return results


@register_model(task="instance")
def embedding_unet(
    encoder: str = "resnet18",
    num_classes: int = 2,
    in_channels: int = 3,
    embedding_dim: int = 8,
    encoder_weights: str | None = None,
    **options,
) -> EmbeddingInstanceUNet:
    """Bottom-up instance segmentation: U-Net + discriminative embeddings, grouped by mean-shift (Q16).

    Options: ``delta_v``, ``delta_d``, ``bandwidth``, ``min_pixels``, ``embedding_weight``, ``coord_scale`` (see
    :class:`EmbeddingInstanceUNet`).
    """
    return EmbeddingInstanceUNet(encoder, num_classes, in_channels, embedding_dim, encoder_weights, **options)

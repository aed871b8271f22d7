"""ONNX export of Segment Anything in two graphs, as the official repository deploys it.

- The **image encoder** (``embed_image(preprocess(x))``): a resized image ``(1, 3, h, w)`` in 0-255 (longest side
  ``image_size``, e.g. from ``model.transform.apply_image``) -> the image embedding ``(1, C, S/16, S/16)``. Heavy, run
  once per image.
- The **prompt decoder** (:class:`SamOnnxDecoder`, the interface of the official ``SamOnnxModel``): inputs
  ``image_embeddings (1, C, h, w)``, ``point_coords (1, N, 2)`` in the resized input frame (``transform.apply_coords``),
  ``point_labels (1, N)`` (1 positive, 0 negative, 2 / 3 a box's top-left / bottom-right corner, -1 padding),
  ``mask_input (1, 1, 4h, 4w)``, ``has_mask_input (1,)``, ``orig_im_size (2,)`` (H, W as float); outputs ``masks``
  (logits at the original size), ``iou_predictions`` and ``low_res_masks``. ``N`` and the original size are dynamic.
  Light, run at every click (in a browser with onnxruntime-web, or on a server).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from maskworks.export.onnx import DEFAULT_OPSET, ExportError

__all__ = ["SamImageEncoder", "SamOnnxDecoder", "export_sam"]


class SamOnnxDecoder(nn.Module):
    """SAM's prompt encoder + mask decoder + mask post-processing as one traceable module (the official
    ``SamOnnxModel``'s inputs, outputs and label convention; see the module docstring).

    Args:
        model: a :class:`~maskworks.models.promptable.Sam`.
        return_single_mask: return only the best mask: the single-mask output for two or more prompt points (a box
            counts as two), the best of the multi-mask outputs by predicted IoU for one point (the official rule);
            otherwise all ``1 + num_multimask_outputs`` masks.
    """

    def __init__(self, model: nn.Module, return_single_mask: bool = False):
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.img_size = int(model.image_size)
        self.return_single_mask = return_single_mask

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        embedding = pe.pe_layer._encode((coords + 0.5) / self.img_size)  # pixel centres, normalised
        labels = labels[..., None]
        embedding = embedding * (labels != -1) + pe.not_a_point_embed.weight * (labels == -1)
        for i, table in enumerate(pe.point_embeddings):  # 0 negative, 1 positive, 2 / 3 box corners
            embedding = embedding + table.weight * (labels == i)
        return embedding

    def _embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * pe.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.float32)
        resized = torch.floor(size * (self.img_size / size.max()) + 0.5).to(torch.int64)  # the un-padded input
        masks = masks[..., : resized[0], : resized[1]]
        original = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(original[0], original[1]), mode="bilinear", align_corners=False)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_mask(mask_input, has_mask_input)
        masks, scores = self.mask_decoder.predict_masks(
            image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense
        )
        if self.return_single_mask:
            # one point: the best multi-mask output; more points: the single-mask output (token 0)
            bonus = torch.zeros_like(scores)
            bonus[:, 0] = 1000.0
            best = torch.argmax(scores + (point_coords.shape[1] - 2.5) * bonus, dim=1)
            rows = torch.arange(masks.shape[0])
            masks, scores = masks[rows, best][:, None], scores[rows, best][:, None]
        return self._postprocess(masks, orig_im_size), scores, masks


class SamImageEncoder(nn.Module):
    """``embed_image(preprocess(x))``: a resized 0-255 image ``(1, 3, h, w)`` -> its embedding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.embed_image(self.model.preprocess(image))


def _atomic_export(module: nn.Module, args: tuple, path: Path, opset: int, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, tmp_name, dynamo=False, opset_version=opset, do_constant_folding=True, **kwargs
            )
        os.replace(tmp_name, path)
    except Exception as e:
        Path(tmp_name).unlink(missing_ok=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"exporting SAM to {path} failed: {type(e).__name__}: {first}") from e


def export_sam(
    model: nn.Module,
    out_dir: str | os.PathLike,
    name: str = "sam",
    opset: int | None = None,
    return_single_mask: bool = False,
    encoder: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
) -> dict[str, Path]:
    """Export SAM as ``<name>_decoder.onnx`` (prompt encoder + mask decoder, the image embedding as an input) and,
    with ``encoder``, ``<name>_encoder.onnx`` (the image encoder, fixed ``image_size`` input with a dynamic resized
    height / width up to it). Both are verified against PyTorch in onnxruntime when ``verify``.

    Returns:
        ``{"decoder": path, "encoder": path}``.

    Raises:
        ExportError: an export fails or disagrees with PyTorch.
    """
    from maskworks.export.onnx import _session

    opset = int(opset or DEFAULT_OPSET)
    out_dir = Path(out_dir)
    model = model.eval()
    decoder = SamOnnxDecoder(model, return_single_mask=return_single_mask).eval()
    c = model.prompt_encoder.embed_dim
    h, w = model.prompt_encoder.image_embedding_size
    g = torch.Generator().manual_seed(0)
    inputs = {
        "image_embeddings": torch.randn(1, c, h, w, generator=g),
        "point_coords": torch.randint(0, model.image_size, (1, 3, 2), generator=g).float(),
        "point_labels": torch.tensor([[1.0, 0.0, -1.0]]),
        "mask_input": torch.randn(1, 1, 4 * h, 4 * w, generator=g),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([float(model.image_size) * 0.75, float(model.image_size)]),
    }
    paths = {"decoder": out_dir / f"{name}_decoder.onnx"}
    _atomic_export(
        decoder,
        tuple(inputs.values()),
        paths["decoder"],
        opset,
        input_names=list(inputs),
        output_names=["masks", "iou_predictions", "low_res_masks"],
        dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
    )
    if verify:
        session = _session(paths["decoder"])
        checks = [
            inputs,
            {
                **inputs,
                "point_coords": torch.tensor([[[10.0, 20.0], [200.0, 120.0]]]),
                "point_labels": torch.tensor([[2.0, 3.0]]),  # a box
                "has_mask_input": torch.tensor([0.0]),
                "orig_im_size": torch.tensor([50.0, 77.0]),
            },
        ]
        for case in checks:
            with torch.no_grad():
                expected = decoder(*case.values())
            got = session.run(None, {k: v.numpy() for k, v in case.items()})
            for e, o, what in zip(expected, got, ("masks", "iou_predictions", "low_res_masks")):
                if o.shape != tuple(e.shape) or float(np.abs(o - e.numpy()).max()) > atol * max(
                    1.0, float(e.abs().max())
                ):
                    raise ExportError(f"{paths['decoder']}: {what} disagrees with PyTorch")
    if encoder:
        paths["encoder"] = out_dir / f"{name}_encoder.onnx"
        image = torch.randint(0, 256, (1, 3, model.image_size * 3 // 4, model.image_size), generator=g).float()
        module = SamImageEncoder(model).eval()
        _atomic_export(
            module,
            (image,),
            paths["encoder"],
            opset,
            input_names=["image"],
            output_names=["image_embeddings"],
            dynamic_axes={"image": {2: "height", 3: "width"}},
        )
        if verify:
            session = _session(paths["encoder"])
            for shape in (
                (1, 3, model.image_size * 3 // 4, model.image_size),
                (1, 3, model.image_size, model.image_size // 2),
            ):
                x = torch.randint(0, 256, shape, generator=g).float()
                with torch.no_grad():
                    expected = module(x).numpy()
                got = session.run(None, {"image": x.numpy()})[0]
                if got.shape != expected.shape or float(np.abs(got - expected).max()) > atol * max(
                    1.0, float(np.abs(expected).max())
                ):
                    raise ExportError(f"{paths['encoder']} disagrees with PyTorch on a {shape} image")
    return paths

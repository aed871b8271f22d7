"""ONNX export of segmentation models, checked in onnxruntime, and an onnxruntime runner with the same interface.

:func:`to_onnx` exports a model's logits (``(B, K, H, W)`` for an image batch ``(B, C, H, W)``), with a dynamic batch,
height and width where the model allows it, and stores what inference needs in the graph's metadata (class names,
palette, mean / std, number of classes, task): :class:`OnnxSegmenter` reads it back, so ``maskworks predict
--backend onnxruntime model.onnx`` needs nothing else. Every export is verified: onnxruntime's outputs are compared
with PyTorch's on the example input and, for a dynamic export, on a second size and batch, and a mismatch raises
instead of leaving a silently wrong file behind.

Dynamic height / width is impossible where the graph depends on the input size through Python numbers: adaptive
average pooling to fixed bins other than 1 x 1 (PSPNet's and UPerNet's pyramid pooling, Fast-SCNN's) has no ONNX
operator for sizes unknown at export time, and ViT segmenters resample their position table for the input grid
(SETR, TransUNet). Those export at a fixed size (``dynamic=False``); :func:`dynamic_blockers` names the reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "DEFAULT_OPSET",
    "INSTANCE_EXPORT",
    "ExportError",
    "ExportReport",
    "OnnxSegmenter",
    "dynamic_blockers",
    "read_metadata",
    "to_onnx",
    "to_onnx_instance",
    "verify_onnx",
]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
METADATA_KEY = "maskworks"


class ExportError(RuntimeError):
    """The model cannot be exported as asked, or the exported graph disagrees with PyTorch."""


@dataclass
class ExportReport:
    """What :func:`to_onnx` wrote and how well it agrees with PyTorch."""

    path: Path
    dynamic: bool
    opset: int
    exporter: str
    input_shape: tuple[int, ...]
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # "<shape>": max |onnxruntime - PyTorch|
    size_bytes: int = 0

    def __str__(self) -> str:
        diffs = ", ".join(f"{k}: {v:.2e}" for k, v in self.max_abs_diff.items())
        return (
            f"{self.path} ({self.size_bytes / 2**20:.1f} MiB, opset {self.opset}, "
            f"{'dynamic' if self.dynamic else 'fixed'} size, {self.exporter} exporter; max |ORT - PyTorch| {diffs})"
        )


class _Logits(nn.Module):
    """The logits of a segmentation model (the ``"out"`` of a training-style dict, the first of a tuple)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from maskworks.losses import split_outputs

        logits, _ = split_outputs(self.model(image))
        return logits


def _explicit_adaptive_avg_pool2d(x: torch.Tensor, output_size: Any) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` written out as the means of its bins (``[floor(i n / o), ceil((i + 1) n / o))`` on
    each axis, PyTorch's rule): the same numbers, in operators ONNX has, for a size fixed at export time."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    oh, ow = (output_size, output_size) if not isinstance(output_size, (tuple, list)) else output_size
    oh, ow = oh or h, ow or w
    if (oh, ow) == (1, 1):
        return x.mean(dim=(-2, -1), keepdim=True)
    rows = []
    for i in range(oh):
        y0, y1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        cols = [x[..., y0:y1, (j * w) // ow : -((-(j + 1) * w) // ow)].mean(dim=(-2, -1)) for j in range(ow)]
        rows.append(torch.stack(cols, dim=-1))
    return torch.stack(rows, dim=-2)


@contextlib.contextmanager
def _explicit_adaptive_pooling():
    """Route ``F.adaptive_avg_pool2d`` (and ``nn.AdaptiveAvgPool2d``, which calls it) through
    :func:`_explicit_adaptive_avg_pool2d` while a fixed-size graph is traced."""
    import torch.nn.functional as F

    original = F.adaptive_avg_pool2d
    F.adaptive_avg_pool2d = _explicit_adaptive_avg_pool2d
    try:
        yield
    finally:
        F.adaptive_avg_pool2d = original


def dynamic_blockers(model: nn.Module) -> list[str]:
    """Why ``model`` cannot be exported with a dynamic height / width (empty when it can)."""
    reasons = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            size = m.output_size
            sizes = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
            if any(s not in (1, None) for s in sizes):
                reasons.append(
                    f"{name} ({type(m).__name__} to {sizes}): adaptive pooling to bins other than 1x1 has no ONNX "
                    "operator for input sizes unknown at export time"
                )
        bins = getattr(m, "bins", None)  # pyramid pooling written with F.adaptive_avg_pool2d (Fast-SCNN's)
        if isinstance(bins, (tuple, list)) and any(isinstance(b, int) and b != 1 for b in bins):
            reasons.append(
                f"{name} ({type(m).__name__}, bins {tuple(bins)}): adaptive pooling to bins other than 1x1 has no "
                "ONNX operator for input sizes unknown at export time"
            )
    for name, m in model.named_modules():
        if "DeformableAttention" in type(m).__name__:
            reasons.append(
                f"{name} ({type(m).__name__}): the sampling grid is built from the feature levels' sizes read as "
                "Python numbers at export time"
            )
            break
    for name, m in model.named_modules():
        if getattr(m, "dynamic_img_size", False) or (hasattr(m, "pos_embed") and hasattr(m, "patch_embed")):
            reasons.append(
                f"{name or 'the model'} ({type(m).__name__}): the position table is resampled for the input grid with "
                "sizes read as Python numbers at export time"
            )
            break
    return reasons


def _metadata(model: nn.Module, meta: dict[str, Any] | None, dynamic: bool, input_shape: tuple[int, ...]) -> dict:
    meta = dict(meta if meta is not None else getattr(model, "maskworks_meta", None) or {})
    config = getattr(model, "maskworks_config", None) or {}
    num_classes = meta.get("num_classes") or (config.get("kwargs") or {}).get("num_classes")
    in_channels = int(meta.get("in_channels", input_shape[1]))
    out = {
        "task": meta.get("task", "semantic"),
        "model": config.get("name", type(model).__name__),
        "num_classes": int(num_classes) if num_classes is not None else None,
        "in_channels": in_channels,
        "class_names": meta.get("class_names"),
        "palette": [list(c) for c in meta["palette"]] if meta.get("palette") else None,
        "mean": list(meta.get("mean", [0.5] * in_channels)),
        "std": list(meta.get("std", [0.25] * in_channels)),
        "dynamic": bool(dynamic),
        "input_shape": list(input_shape),
    }
    return out


def _write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    for key in ("task", "model", "num_classes", "class_names", "mean", "std"):  # readable in Netron & co.
        if metadata.get(key) is not None:
            e = model.metadata_props.add()
            e.key, e.value = key, json.dumps(metadata[key]) if not isinstance(metadata[key], str) else metadata[key]
    onnx.save(model, str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The maskworks metadata stored in an exported graph (``{}`` for a graph exported elsewhere)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return {}


def _session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(
    model: nn.Module, path: str | os.PathLike, inputs: list[torch.Tensor], atol: float = 1e-4, rtol: float = 1e-3
) -> dict[str, float]:
    """Compare onnxruntime with PyTorch on each input; returns ``{"BxCxHxW": max abs diff}``.

    Raises:
        ExportError: a run fails, or the outputs differ in shape or beyond ``atol + rtol * |PyTorch|``.
    """
    session = _session(path)
    name = session.get_inputs()[0].name
    diffs: dict[str, float] = {}
    logits = _Logits(model).eval()
    for x in inputs:
        key = "x".join(str(s) for s in x.shape)
        with torch.no_grad():
            expected = logits(x).float().numpy()
        try:
            got = session.run(None, {name: x.numpy()})[0]
        except Exception as e:  # onnxruntime's own exception types
            raise ExportError(f"onnxruntime cannot run {path} on a {key} input: {str(e).splitlines()[0]}") from e
        if got.shape != expected.shape:
            raise ExportError(
                f"{path} gives logits of shape {got.shape} for a {key} input, PyTorch {expected.shape}: the graph "
                "fixed a size at export time"
            )
        diff = float(np.abs(got - expected).max()) if got.size else 0.0
        tolerance = atol + rtol * float(np.abs(expected).max() if expected.size else 0.0)
        if not np.isfinite(diff) or diff > tolerance:
            raise ExportError(
                f"{path} disagrees with PyTorch on a {key} input: max |difference| {diff:.3g} > {tolerance:.3g}"
            )
        diffs[key] = diff
    return diffs


@contextlib.contextmanager
def _staged(model: nn.Module, path: Path):
    """A temporary file beside ``path`` for the graph: moved onto ``path`` when the block succeeds, removed
    otherwise; exporter failures become :class:`ExportError` naming the model; the model's train / eval mode (set to
    eval here for the export) is restored afterwards."""
    was_training = model.training
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"exporting {type(model).__name__} to ONNX failed: {type(e).__name__}: {first}") from e
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)


def _second_input(x: torch.Tensor) -> torch.Tensor:
    """Another batch and size than the example (multiples of 32 kept) to check that the axes are really dynamic."""
    b, c, h, w = x.shape
    step = 32 if h % 32 == 0 and w % 32 == 0 else 1
    return torch.randn(b + 1, c, h + step * (1 if step == 32 else 7), w + step * (2 if step == 32 else 13))


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | None = None,
    dynamic: bool = True,
    opset: int | None = None,
    meta: dict[str, Any] | None = None,
    verify: bool = True,
    exporter: str = "torchscript",
    atol: float = 1e-4,
) -> ExportReport:
    """Export a semantic segmentation model's logits to ONNX (input ``image``, output ``logits``).

    Args:
        model: a model returning logits ``(B, K, H, W)`` (or a training dict / tuple whose first part they are).
        path: the ``.onnx`` file to write (written atomically).
        example_input: a normalised image batch ``(B, C, H, W)``; default ``(1, in_channels, 256, 256)`` noise.
        dynamic: batch, height and width as dynamic axes (see :func:`dynamic_blockers` for models that cannot).
        opset: ONNX opset (default :data:`DEFAULT_OPSET`).
        meta: metadata to store (class names, palette, mean / std, ...); default ``model.maskworks_meta``.
        verify: compare onnxruntime with PyTorch on the example input and, when dynamic, on another batch and size.
        exporter: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``: fast, the mature path) or ``"dynamo"``
            (``torch.export``-based, needs onnxscript).
        atol: absolute tolerance of the verification (plus 1e-3 relative to the largest logit).

    Returns:
        An :class:`ExportReport` (path, size, the verified differences).

    Raises:
        ExportError: ``dynamic=True`` for a model that cannot (with the reason), an exporter failure, or a graph
            that disagrees with PyTorch.
    """
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    path = Path(path)
    opset = int(opset or DEFAULT_OPSET)
    in_channels = int((meta or getattr(model, "maskworks_meta", None) or {}).get("in_channels", 3))
    if example_input is None:
        example_input = torch.randn(1, in_channels, 256, 256)
    if example_input.ndim != 4:
        raise ValueError(f"example_input must be an image batch (B, C, H, W), got shape {tuple(example_input.shape)}")
    example_input = example_input.float().cpu()
    if dynamic:
        blockers = dynamic_blockers(model)
        if blockers:
            raise ExportError(
                f"{type(model).__name__} cannot be exported with a dynamic height / width: {blockers[0]}"
                f"{f' (and {len(blockers) - 1} more)' if len(blockers) > 1 else ''}; export at a fixed size "
                "(dynamic=False, maskworks export without --dynamic)"
            )
    wrapped = _Logits(model).cpu().eval()  # a new module starts in training mode, and the exporter restores it
    with _staged(model, path) as tmp:
        pooling = contextlib.nullcontext() if dynamic else _explicit_adaptive_pooling()
        with torch.no_grad(), warnings.catch_warnings(), pooling:
            warnings.simplefilter("ignore")  # tracer warnings about Python numbers: verification below decides
            if exporter == "torchscript":
                axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {}
                torch.onnx.export(
                    wrapped,
                    (example_input,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=["image"],
                    output_names=["logits"],
                    dynamic_axes={"image": axes, "logits": axes} if dynamic else None,
                    do_constant_folding=True,
                )
            else:
                shapes = ({0: "batch", 2: "height", 3: "width"},) if dynamic else None
                program = torch.onnx.export(
                    wrapped,
                    (example_input,),
                    dynamo=True,
                    opset_version=opset,
                    input_names=["image"],
                    output_names=["logits"],
                    dynamic_shapes=shapes,
                    verbose=False,
                )
                program.save(str(tmp))
        _write_metadata(tmp, _metadata(model, meta, dynamic, tuple(example_input.shape)))
        diffs: dict[str, float] = {}
        if verify:
            inputs = [example_input] + ([_second_input(example_input)] if dynamic else [])
            diffs = verify_onnx(model, tmp, inputs, atol=atol)
    return ExportReport(path, dynamic, opset, exporter, tuple(example_input.shape), diffs, path.stat().st_size)


class OnnxSegmenter(nn.Module):
    """An exported graph run by onnxruntime behind a PyTorch module's interface: ``forward(image) -> logits``.

    It carries what ``maskworks predict`` reads from a checkpoint (``maskworks_meta``, ``num_classes``), so the
    prediction code (tiles, TTA, CRF, outputs) runs unchanged on it. A graph exported at a fixed size refuses other
    sizes with a clear error (predict it in tiles of that size).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"ONNX model {self.path} not found")
        self.session = _session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name
        metadata = read_metadata(self.path)
        shape = self.session.get_inputs()[0].shape
        self.fixed_size = None if metadata.get("dynamic", True) else tuple(int(s) for s in shape[2:])
        self.maskworks_meta = {k: v for k, v in metadata.items() if v is not None}
        self.num_classes = metadata.get("num_classes")
        if self.num_classes is None:
            out_shape = self.session.get_outputs()[0].shape
            self.num_classes = out_shape[1] if isinstance(out_shape[1], int) else None
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)  # next(parameters()) callers

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.fixed_size is not None and tuple(image.shape[-2:]) != self.fixed_size:
            h, w = self.fixed_size
            raise ValueError(
                f"{self.path} was exported for {h}x{w} inputs, got {image.shape[-2]}x{image.shape[-1]}: predict in "
                f"tiles of that size (--tile {max(h, w)} when square) or export with --dynamic"
            )
        out = self.session.run(None, {self.input_name: image.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(image.device)


# instance models and ONNX: what exports and why the others do not
INSTANCE_EXPORT = {
    "mask_rcnn": None,  # torchvision's detection models support ONNX tracing (opset >= 11)
    "yolact": "its Fast NMS sorts with an out= argument, which the ONNX exporter does not support",
    "solov2": "Matrix NMS and the score filtering are data-dependent Python control flow that tracing freezes",
    "mask2former": "panoptic / instance inference selects segments with data-dependent Python control flow; the "
    "semantic task exports at a fixed size with to_onnx",
}


def to_onnx_instance(
    model: nn.Module,
    path: str | os.PathLike,
    example_image: torch.Tensor | None = None,
    opset: int | None = None,
    meta: dict[str, Any] | None = None,
    verify: bool = True,
) -> ExportReport:
    """Export a torchvision-style instance model (Mask R-CNN) for one image: input ``image`` ``(C, H, W)`` (dynamic
    height / width), outputs ``boxes (N, 4)``, ``labels (N,)``, ``scores (N,)``, ``masks (N, H, W)``; verified in
    onnxruntime on the example and on another size (boxes and scores to 1e-3, labels equal, masks on > 99.9 % of
    pixels).

    Raises:
        ExportError: a model that cannot export (:data:`INSTANCE_EXPORT` says why), an exporter failure, or a graph
            that disagrees with PyTorch.
    """
    config = getattr(model, "maskworks_config", None) or {}
    name = config.get("name", "")
    family = next((k for k in INSTANCE_EXPORT if name.startswith(k)), None)
    if family is not None and INSTANCE_EXPORT[family] is not None:
        raise ExportError(f"{name} cannot be exported to ONNX: {INSTANCE_EXPORT[family]}")
    path = Path(path)
    opset = int(opset or DEFAULT_OPSET)
    in_channels = int((meta or getattr(model, "maskworks_meta", None) or {}).get("in_channels", 3))
    if example_image is None:
        example_image = torch.rand(in_channels, 256, 256)
    example_image = example_image.float().cpu()
    outputs = ["boxes", "labels", "scores", "masks"]
    with _staged(model, path) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                ([example_image],),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["image"],
                output_names=outputs,
                dynamic_axes={
                    "image": {1: "height", 2: "width"},
                    "boxes": {0: "n"},
                    "labels": {0: "n"},
                    "scores": {0: "n"},
                    "masks": {0: "n", 1: "height", 2: "width"},
                },  # fmt: skip
            )
        info = _metadata(model, meta, True, tuple(example_image.shape))
        info["task"] = "instance"
        _write_metadata(tmp, info)
        diffs: dict[str, float] = {}
        if verify:
            session = _session(tmp)
            c, h, w = example_image.shape
            for image in (example_image, torch.rand(c, h + 16, w + 32)):
                key = "x".join(str(v) for v in image.shape)
                with torch.no_grad():
                    expected = model([image])[0]
                got = dict(zip(outputs, session.run(None, {"image": image.numpy()})))
                for k in outputs:
                    ref = expected[k].detach().cpu().numpy()
                    if got[k].shape != ref.shape:
                        raise ExportError(f"{path}: {k} of shape {got[k].shape} for a {key} image, PyTorch {ref.shape}")
                if not np.array_equal(got["labels"], expected["labels"].numpy()):
                    raise ExportError(f"{path}: labels disagree with PyTorch on a {key} image")
                box = float(np.abs(got["boxes"] - expected["boxes"].numpy()).max()) if got["boxes"].size else 0.0
                score = float(np.abs(got["scores"] - expected["scores"].numpy()).max()) if got["scores"].size else 0.0
                masks = got["masks"] > 0.5 if got["masks"].dtype != np.bool_ else got["masks"]
                agree = float((masks == expected["masks"].bool().numpy()).mean()) if masks.size else 1.0
                if box > 1e-3 or score > 1e-3 or agree < 0.999:
                    raise ExportError(
                        f"{path} disagrees with PyTorch on a {key} image (boxes {box:.3g}, scores {score:.3g}, "
                        f"mask pixels agreeing {agree:.4f})"
                    )
                diffs[key] = max(box, score)
    return ExportReport(path, True, opset, "torchscript", tuple(example_image.shape), diffs, path.stat().st_size)

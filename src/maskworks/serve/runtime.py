"""What the server runs: loaded checkpoints answering one image at a time, and SAM with an LRU of embeddings.

Both classes are plain Python (no web framework): the app calls them from worker threads, off the event loop.
A semantic prediction goes through :func:`maskworks.cli.commands.semantic_prediction`, the function
``maskworks predict`` uses, so both give the same labels for the same image, bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from maskworks.serve.images import decode_upload, png_base64

__all__ = ["PredictOptions", "SamService", "ServedModel"]


@dataclass
class PredictOptions:
    """Per-request options of ``POST /predict/{model}`` (validated by the app)."""

    tile: int | None = None
    overlap: float = 0.25
    tta: str | None = None
    probabilities: bool = False
    entropy: bool = False
    threshold: float = 0.5
    score_threshold: float = 0.5


def _input_size(meta: dict[str, Any]) -> list[int] | None:
    data = meta.get("data_config") or {}
    size = data.get("crop_size") or data.get("image_size")
    if size is None:
        return None
    return [int(size), int(size)] if isinstance(size, int) else [int(v) for v in size]


class ServedModel:
    """A checkpoint the server answers ``POST /predict/{name}`` with: semantic, instance or panoptic.

    Args:
        name: the name in URLs (``/predict/{name}``) and in ``GET /models``.
        model: the loaded model (``maskworks.checkpoint.load_model``), or any module built by ``create_model``.
        meta: the checkpoint's metadata (class names, palette, mean / std, in_channels, task); default: the
            model's ``maskworks_meta``.
        task: the task of a model that serves several (Mask2Former); default: the one it was trained for.
    """

    def __init__(self, name: str, model: torch.nn.Module, meta: dict[str, Any] | None = None, task: str | None = None):
        from maskworks.cli import builders
        from maskworks.cli.commands import _inference_model, _set_thing_classes, checkpoint_task, model_output_classes
        from maskworks.tasks import build_task
        from maskworks.viz import default_palette

        self.name = name
        self.meta = dict(meta if meta is not None else getattr(model, "maskworks_meta", None) or {})
        model = model.eval()
        self.kind = checkpoint_task(model, self.meta, task)
        self.device = next(model.parameters()).device
        self.in_channels = int(self.meta.get("in_channels", 3))
        self.mean = self.meta.get("mean", [0.5] * self.in_channels)
        self.std = self.meta.get("std", [0.25] * self.in_channels)
        config = getattr(model, "maskworks_config", None) or {}
        self.architecture = config.get("name", type(model).__name__)
        self.channels_last = False
        self.task = None
        if self.kind == "semantic":
            self.num_classes = model_output_classes(model)
            k = max(self.num_classes, 2)
            model, self.channels_last = _inference_model(model, fuse_bn=False)
        else:
            self.task = build_task(
                self.kind, **builders.task_kwargs(self.kind, None, self.meta, where=f"model {name!r}")
            )
            if self.kind == "panoptic":
                _set_thing_classes(model, self.task)
            isthing = getattr(self.task, "isthing", None)
            names = self.meta.get("class_names") or []
            k = len(isthing) if isthing else max(len(names), int(self.meta.get("num_classes") or 0), 2)
            self.num_classes = k
        self.model = model
        self.class_names = list(self.meta.get("class_names") or [f"class {i}" for i in range(k)])
        self.palette = [tuple(int(v) for v in c) for c in self.meta.get("palette") or default_palette(k)]

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, name: str | None = None, device: str = "auto", task: str | None = None
    ) -> ServedModel:
        """Load a maskworks checkpoint (``.safetensors`` with its ``.json``); ``name`` defaults to the run folder's
        name (``runs/camvid/best.safetensors`` -> ``camvid``) or the file's stem."""
        from maskworks.checkpoint import load_model
        from maskworks.engine import resolve_device

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} not found")
        model = load_model(path, map_location=resolve_device(device))
        if name is None:
            name = path.parent.name if path.stem in ("best", "last", "final") and path.parent.name else path.stem
        return cls(name, model, task=task)

    def info(self) -> dict[str, Any]:
        """The ``GET /models`` entry."""
        return {
            "name": self.name,
            "task": self.kind,
            "architecture": self.architecture,
            "classes": self.class_names,
            "palette": [list(c) for c in self.palette],
            "input_size": _input_size(self.meta),
            "in_channels": self.in_channels,
        }

    # -------------------------------------------------------------------------------------------- prediction
    def predict_bytes(self, data: bytes, options: PredictOptions, max_pixels: int) -> dict[str, Any]:
        """Decode an upload and predict it (see :meth:`predict`); raises :class:`~maskworks.serve.images.UploadError`
        for bad uploads."""
        rgb = decode_upload(data, max_pixels, channels=1 if self.in_channels == 1 else 3)
        return self.predict(rgb, options)

    def predict(self, image: np.ndarray, options: PredictOptions | None = None) -> dict[str, Any]:
        """The response body of ``POST /predict/{name}`` for a uint8 ``(H, W, C)`` image (plus ``"_label_png"``,
        the raw label PNG bytes of a semantic result, for ``?format=png``)."""
        options = options or PredictOptions()
        start = time.perf_counter()
        if self.kind == "semantic":
            body = self._semantic(image, options)
        elif self.kind == "instance":
            body = self._instance(image, options)
        else:
            body = self._panoptic(image)
        h, w = image.shape[:2]
        body = {"model": self.name, "task": self.kind, "width": int(w), "height": int(h), **body}
        body["time_ms"] = round(1000 * (time.perf_counter() - start), 1)
        return body

    def _semantic(self, image: np.ndarray, options: PredictOptions) -> dict[str, Any]:
        from maskworks.cli.commands import AUTO_TILE, MAX_WHOLE_IMAGE_PIXELS, semantic_prediction
        from maskworks.inference import entropy_map
        from maskworks.viz import label_png_bytes

        h, w = image.shape[:2]
        tile = options.tile
        if tile is None and h * w > MAX_WHOLE_IMAGE_PIXELS:  # the rule of maskworks predict --max-pixels
            tile = AUTO_TILE
        args = SimpleNamespace(tta=options.tta, tile=options.tile, overlap=options.overlap)
        with torch.inference_mode():
            pred, probs = semantic_prediction(
                self.model,
                image,
                args,
                self.num_classes,
                self.mean,
                self.std,
                self.device,
                self.channels_last,
                tile,
                options.threshold,
                where="the upload",
            )
        label_png = label_png_bytes(pred, self.palette)
        lut = np.zeros((256, 4), dtype=np.uint8)
        lut[: len(self.palette), :3] = np.asarray(self.palette, dtype=np.uint8)[:256]
        lut[: len(self.palette), 3] = 255
        k = max(self.num_classes, 2)
        counts = np.bincount(pred.reshape(-1), minlength=k)
        total = max(int(pred.size), 1)
        body: dict[str, Any] = {
            "label_png": png_base64(label_png),
            "color_png": png_base64(lut[pred.astype(np.uint8)]),
            "classes": [
                {
                    "id": i,
                    "name": self.class_names[i] if i < len(self.class_names) else f"class {i}",
                    "color": list(self.palette[i]) if i < len(self.palette) else [0, 0, 0],
                    "pixels": int(counts[i]),
                    "share": int(counts[i]) / total,
                }
                for i in range(k)
            ],
            "_label_png": label_png,
        }
        if options.probabilities:
            p8 = (probs[0].float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
            body["probabilities_png"] = [png_base64(p8[c]) for c in range(p8.shape[0])]
        if options.entropy:
            ent = entropy_map(probs)[0] / math.log(probs.shape[1])  # normalised to [0, 1]
            body["entropy_png"] = png_base64((ent.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy())
        return body

    def _forward(self, image: np.ndarray, task) -> Any:
        from maskworks.data.transforms import normalize_image

        with torch.inference_mode():  # as maskworks predict reads and normalises an image for a task model
            x = normalize_image(torch.from_numpy(image.copy()).permute(2, 0, 1), self.mean, self.std).to(self.device)
            return task.postprocess(task.forward(self.model, {"images": [x]}))[0]

    def _instance(self, image: np.ndarray, options: PredictOptions) -> dict[str, Any]:
        from maskworks.tasks import build_task
        from maskworks.viz import instance_colors

        task = build_task("instance", class_names=self.task.class_names, score_threshold=options.score_threshold)
        result = self._forward(image, task)
        ids = task.id_map(result, "score").numpy()
        n = len(result["labels"])
        if n > 65535:
            raise ValueError(f"{n} instances do not fit a 16-bit id PNG (at most 65,535)")
        rgba = np.zeros((*ids.shape, 4), dtype=np.uint8)
        if n:
            colors = np.concatenate([np.zeros((1, 3), np.uint8), instance_colors(n)])
            rgba[..., :3] = colors[ids]
            rgba[..., 3] = np.where(ids > 0, 255, 0)
        return {
            "instances": task.result_rows(result, 0, None, self.meta),
            "ids_png": png_base64(ids.astype(np.uint16)),
            "color_png": png_base64(rgba),
        }

    def _panoptic(self, image: np.ndarray) -> dict[str, Any]:
        from maskworks.data.coco_panoptic import id_to_rgb
        from maskworks.viz import instance_colors

        result = self._forward(image, self.task)
        ids = torch.as_tensor(result[0]).long().cpu().numpy()
        annotation = self.task.annotation(result, 0, "", self.meta)
        rgba = np.zeros((*ids.shape, 4), dtype=np.uint8)
        things = [s for s in annotation["segments_info"] if s.get("isthing")]
        thing_colors = instance_colors(len(things)) if things else np.zeros((0, 3), np.uint8)
        thing_index = {s["id"]: j for j, s in enumerate(things)}
        for seg, raw in zip(annotation["segments_info"], result[1]):
            m = ids == seg["id"]
            if seg["id"] in thing_index:
                rgba[m, :3] = thing_colors[thing_index[seg["id"]]]
            else:
                label = int(raw["category_id"])
                rgba[m, :3] = self.palette[label] if 0 <= label < len(self.palette) else (0, 0, 0)
            rgba[m, 3] = 255
        return {
            "panoptic_png": png_base64(id_to_rgb(ids)),
            "segments": annotation["segments_info"],
            "categories": self.task.categories(self.meta),
            "color_png": png_base64(rgba),
        }


def _nbytes(features: Any) -> int:
    if isinstance(features, torch.Tensor):
        return features.numel() * features.element_size()
    if isinstance(features, dict):
        return sum(_nbytes(v) for v in features.values())
    if isinstance(features, (list, tuple)):
        return sum(_nbytes(v) for v in features)
    return 0


class SamService:
    """SAM (or SAM 2) behind ``POST /sam/embed`` and ``POST /sam/predict``.

    ``embed`` runs the image encoder once per image and keeps the embedding in a least-recently-used cache of at
    most ``cache_size`` images (the id is a hash of the decoded pixels, so the same image is embedded once);
    ``predict`` answers each prompt with the prompt encoder and mask decoder only, through
    :class:`~maskworks.models.promptable.SamPredictor` (the same code as ``maskworks sam``).
    """

    def __init__(self, model: torch.nn.Module, cache_size: int = 8):
        from maskworks.models.promptable import SamPredictor

        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        SamPredictor(model)  # raises TypeError for a model that is not promptable
        self.model = model.eval()
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[Any, tuple[int, int], tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()
        config = getattr(model, "maskworks_config", None) or {}
        self.architecture = config.get("name", type(model).__name__)
        self.image_size = int(getattr(model, "image_size", 0))
        self.entry_bytes = 0

    def info(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "image_size": self.image_size,
            "cache_size": self.cache_size,
            "cached_images": len(self._cache),
        }

    @staticmethod
    def image_id(image: np.ndarray) -> str:
        """A content id of a decoded image (shape and pixels)."""
        digest = hashlib.sha256(repr(image.shape).encode())
        digest.update(np.ascontiguousarray(image).data)
        return digest.hexdigest()[:32]

    def embed_bytes(self, data: bytes, max_pixels: int) -> dict[str, Any]:
        return self.embed(decode_upload(data, max_pixels, channels=3))

    def embed(self, image: np.ndarray) -> dict[str, Any]:
        """Embed a uint8 ``(H, W, 3)`` image (or find it in the cache): ``{"image_id", "width", "height", "cached",
        "time_ms"}``."""
        from maskworks.models.promptable import SamPredictor

        start = time.perf_counter()
        key = self.image_id(image)
        h, w = image.shape[:2]
        with self._lock:
            cached = key in self._cache
            if cached:
                self._cache.move_to_end(key)
        if not cached:
            predictor = SamPredictor(self.model)
            predictor.set_image(image)
            entry = (predictor.features, predictor.original_size, predictor.input_size)
            with self._lock:
                self._cache[key] = entry
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
                self.entry_bytes = max(self.entry_bytes, _nbytes(entry[0]))
        ms = round(1000 * (time.perf_counter() - start), 1)
        return {"image_id": key, "width": int(w), "height": int(h), "cached": cached, "time_ms": ms}

    def predict(
        self,
        image_id: str,
        points: list[list[float]] | None = None,
        labels: list[int] | None = None,
        box: list[float] | None = None,
        multimask: bool | None = None,
    ) -> dict[str, Any]:
        """Masks for prompts in original-image pixels on an embedded image.

        Raises:
            KeyError: ``image_id`` is not (or no longer) in the cache.
            ValueError: malformed prompts or coordinates outside the image (the message says which).
        """
        from maskworks.models.promptable import SamPredictor

        start = time.perf_counter()
        with self._lock:
            entry = self._cache.get(image_id)
            if entry is not None:
                self._cache.move_to_end(image_id)
        if entry is None:
            raise KeyError(
                f"image_id {image_id!r} is unknown or was evicted from the embedding cache (it keeps the "
                f"{self.cache_size} most recent images); POST the image to /sam/embed again"
            )
        features, original_size, input_size = entry
        h, w = original_size
        points = list(points or [])
        labels = list(labels or [])
        if len(points) != len(labels):
            raise ValueError(f"{len(points)} point(s) but {len(labels)} label(s); give one label (1 or 0) per point")
        if not points and box is None:
            raise ValueError("give at least one prompt: points with labels, or a box")
        for i, p in enumerate(points):
            if len(p) != 2 or not all(math.isfinite(float(v)) for v in p):
                raise ValueError(f"point {i} is {p!r}; expected [x, y]")
            x, y = float(p[0]), float(p[1])
            if not (0 <= x <= w and 0 <= y <= h):
                raise ValueError(f"point {i} (x={x:g}, y={y:g}) lies outside the {w}x{h} image")
        for i, v in enumerate(labels):
            if v not in (0, 1):
                raise ValueError(f"label {i} is {v!r}; expected 1 (foreground) or 0 (background)")
        if box is not None:
            if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
                raise ValueError(f"box is {box!r}; expected [x0, y0, x1, y1]")
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (x0 < x1 and y0 < y1):
                raise ValueError(f"box {box!r} needs x0 < x1 and y0 < y1")
            if not (0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h):
                raise ValueError(f"box {box!r} reaches outside the {w}x{h} image")
        if multimask is None:
            multimask = len(points) == 1 and box is None  # SAM's advice: three candidates for one ambiguous click
        predictor = SamPredictor(self.model)
        predictor.set_embedding(features, original_size, input_size)
        with torch.inference_mode():
            masks, iou, _ = predictor.predict(
                point_coords=np.asarray(points, dtype=np.float32) if points else None,
                point_labels=np.asarray(labels, dtype=np.int64) if points else None,
                box=np.asarray(box, dtype=np.float32) if box is not None else None,
                multimask_output=bool(multimask),
            )
        out = []
        for m, score in zip(masks, iou):
            ys, xs = np.nonzero(m)
            bbox = (
                [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
                if len(xs)
                else [0, 0, 0, 0]
            )
            out.append(
                {
                    "png": png_base64(m.astype(np.uint8) * 255),
                    "iou": float(score),
                    "area": int(m.sum()),
                    "bbox": bbox,
                }
            )
        return {
            "image_id": image_id,
            "width": int(w),
            "height": int(h),
            "masks": out,
            "best": int(np.argmax(iou)) if len(iou) else 0,
            "time_ms": round(1000 * (time.perf_counter() - start), 1),
        }

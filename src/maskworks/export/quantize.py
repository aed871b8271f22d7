"""INT8 post-training static quantization with calibration images.

- :func:`quantize_onnx`: onnxruntime's static quantizer on an exported graph, QDQ format (quantize / dequantize pairs
  around each quantized operator, what current runtimes fuse into integer kernels), INT8 weights per output channel,
  UINT8 activations with ranges from calibration batches (min / max by default, or entropy / percentile). The graph
  is pre-processed (shape inference, BatchNorm folded into convolutions) first, and keeps its maskworks metadata.
- :func:`quantize_pt2e`: PyTorch's PT2E flow (``torch.export`` -> ``prepare_pt2e`` with the x86 Inductor quantizer ->
  calibration -> ``convert_pt2e``), from ``torchao``, for deployment in PyTorch (``torch.compile`` lowers the
  quantized graph to integer kernels). Where the model does not export with ``torch.export`` it raises.

Calibration batches are normalised images as the model sees them (``(B, C, H, W)``, the checkpoint's mean / std):
:func:`calibration_batches` reads them from a folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["calibration_batches", "quantize_onnx", "quantize_pt2e", "sqnr"]


def calibration_batches(
    folder: str | os.PathLike,
    mean: Sequence[float],
    std: Sequence[float],
    in_channels: int = 3,
    size: tuple[int, int] | None = None,
    limit: int = 32,
) -> list[torch.Tensor]:
    """Up to ``limit`` images of ``folder`` (sorted by name) as normalised ``(1, C, H, W)`` batches; resized
    (bilinear) to ``size = (H, W)`` when given (a graph exported at a fixed size).

    Raises:
        FileNotFoundError: the folder does not exist or holds no images.
    """
    from maskworks.data import IMAGE_EXTENSIONS, read_image
    from maskworks.data.transforms import normalize_image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder {folder} does not exist")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())[:limit]
    if not files:
        raise FileNotFoundError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    batches = []
    for f in files:
        arr = read_image(f, channels=1 if in_channels == 1 else 3)
        x = normalize_image(torch.from_numpy(arr.copy()).permute(2, 0, 1), mean, std)[None]
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        batches.append(x)
    return batches


def sqnr(reference: torch.Tensor | np.ndarray, quantized: torch.Tensor | np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|x|^2 / |x - q|^2)``."""
    x = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    q = torch.as_tensor(np.asarray(quantized), dtype=torch.float64)
    noise = float(((x - q) ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * float(np.log10(float((x**2).sum()) / noise))


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of batches."""

    def __init__(self, name: str, batches: Iterable[torch.Tensor | np.ndarray]):
        self.name = name
        self._items: Iterator = iter([np.ascontiguousarray(np.asarray(b, dtype=np.float32)) for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._items, None)
        return None if item is None else {self.name: item}

    def rewind(self) -> None:  # pragma: no cover - not used by the static quantizer's single pass
        pass


def quantize_onnx(
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: Iterable[torch.Tensor | np.ndarray],
    per_channel: bool = True,
    method: str = "minmax",
    keep_ends: bool = True,
) -> Path:
    """INT8 static quantization (QDQ) of an ONNX graph with calibration batches; returns ``out_path``.

    Args:
        model_path: an fp32 graph (e.g. from :func:`~maskworks.export.to_onnx`).
        out_path: the INT8 graph to write (atomically); the maskworks metadata is copied and marked ``int8``.
        calibration: normalised input batches ``(B, C, H, W)`` (sizes the graph accepts).
        per_channel: per-output-channel weight scales (better accuracy for depthwise / thin convolutions).
        method: activation ranges from ``"minmax"``, ``"entropy"`` or ``"percentile"`` calibration.
        keep_ends: leave the first and the last convolution in float (the input layer sees raw image statistics,
            the last one produces the logits: the two most sensitive places). On CamVid this keeps Fast-SCNN's
            INT8 mIoU within 0.2 points of fp32, where quantizing them too lost 8 points (benchmarks/RESULTS.md).

    Raises:
        ValueError: an unknown method or no calibration batch.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ValueError(f"method must be one of {', '.join(methods)}, got {method!r}")
    batches = list(calibration)
    if not batches:
        raise ValueError("quantization needs at least one calibration batch")
    model_path, out_path = Path(model_path), Path(out_path)
    source = onnx.load(str(model_path), load_external_data=False)
    input_name = source.graph.input[0].name
    metadata = {p.key: p.value for p in source.metadata_props}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize.") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX's shape inference and graph optimisation (BatchNorm folding); onnxruntime's symbolic shape inference
        # is skipped: it gives up on some dynamic graphs and leaves temporary files in the working directory
        quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
        result = Path(tmp) / "int8.onnx"
        exclude = _end_convolutions(prepared) if keep_ends else []
        quantize_static(
            str(prepared),
            str(result),
            _Reader(input_name, batches),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=exclude,
        )
        quantized = onnx.load(str(result))
        del quantized.metadata_props[:]
        for key, value in metadata.items():
            if key == "maskworks":
                info = json.loads(value)
                info.update(precision="int8", calibration_batches=len(batches), calibration_method=method)
                value = json.dumps(info)
            entry = quantized.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(quantized, str(result))
        os.replace(result, out_path)
    return out_path


def _end_convolutions(path: Path) -> list[str]:
    """Names of the first and the last convolution nodes of a graph (in its topological order)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    convs = [n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    return sorted({convs[0], convs[-1]}) if convs else []


def quantize_pt2e(model: torch.nn.Module, calibration: Iterable[torch.Tensor], example_input: torch.Tensor) -> Any:
    """INT8 static quantization in PyTorch with the PT2E flow and the x86 Inductor quantizer (torchao).

    Returns the converted ``torch.fx.GraphModule`` (run it as it is, or ``torch.compile`` it for integer kernels).

    Raises:
        ImportError: torchao is not installed.
        RuntimeError: ``torch.export`` cannot capture the model (data-dependent control flow, ...).
    """
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        raise ImportError(f'PT2E quantization needs torchao: pip install "maskworks[export]" ({e})') from e
    from maskworks.export.onnx import _Logits

    wrapped = _Logits(model.eval()).eval()
    try:
        exported = torch.export.export(wrapped, (example_input,)).module()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"torch.export cannot capture {type(model).__name__} for PT2E: {first}") from e
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return convert_pt2e(prepared)

"""Deployment: ONNX export verified in onnxruntime (semantic models, SAM's two graphs), an onnxruntime runner, and
INT8 post-training quantization (onnxruntime QDQ, PyTorch PT2E). Needs the ``export`` extra:
``pip install "maskworks[export]"``."""

from maskworks.export.onnx import (
    DEFAULT_OPSET,
    INSTANCE_EXPORT,
    ExportError,
    ExportReport,
    OnnxSegmenter,
    dynamic_blockers,
    read_metadata,
    to_onnx,
    to_onnx_instance,
    verify_onnx,
)
from maskworks.export.sam import SamImageEncoder, SamOnnxDecoder, export_sam

__all__ = [
    "DEFAULT_OPSET",
    "INSTANCE_EXPORT",
    "ExportError",
    "ExportReport",
    "OnnxSegmenter",
    "SamImageEncoder",
    "SamOnnxDecoder",
    "dynamic_blockers",
    "export_sam",
    "read_metadata",
    "to_onnx",
    "to_onnx_instance",
    "verify_onnx",
]

"""Uploaded images: size, type and decode checks before any model sees them, and PNG encoding of results.

Nothing here touches the filesystem: uploads are decoded from memory, results are encoded into memory.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

__all__ = ["ALLOWED_CONTENT_TYPES", "UploadError", "decode_upload", "png_base64", "png_bytes"]

# what browsers and curl send for image files; application/octet-stream is what curl -F sends for unknown suffixes
ALLOWED_CONTENT_TYPES = ("image/", "application/octet-stream")


class UploadError(Exception):
    """An upload the server refuses: ``status`` is the HTTP status, the message says what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def check_content_type(content_type: str | None, field: str = "image") -> None:
    """Refuse a multipart part that does not declare an image (415)."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if not ct or not any(ct.startswith(p) for p in ALLOWED_CONTENT_TYPES):
        raise UploadError(
            415,
            f"the {field!r} part has content type {content_type or 'none'!r}; expected an image (image/png, "
            "image/jpeg, image/tiff, image/webp, image/bmp)",
        )


def decode_upload(data: bytes, max_pixels: int, channels: int | None = 3, name: str = "the upload") -> np.ndarray:
    """Decode uploaded bytes into uint8 ``(H, W, C)`` by the rules of :func:`maskworks.data.read_image` (the same
    conversion code, so a server prediction equals ``maskworks predict`` on the file).

    The declared size is checked from the header *before* the pixels are decoded, so a decompression bomb (a small
    file declaring a huge image) is refused without allocating it.

    Raises:
        UploadError: 400 for an empty, unreadable or truncated file; 413 for more than ``max_pixels`` pixels.
    """
    from maskworks.data.io import DatasetError, image_to_array

    if not data:
        raise UploadError(400, f"{name} is empty; expected an image file")
    try:  # header only: Image.open does not decode the pixels
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # more than twice Pillow's limit (create_app lifts it to ours)
        raise UploadError(413, f"{name} declares too many pixels ({e}); this server's limit is {max_pixels}") from None
    except Image.UnidentifiedImageError:
        raise UploadError(
            400,
            f"{name} is not an image this server can read (no known image format); expected PNG, JPEG, TIFF, "
            "BMP or WebP",
        ) from None
    except Exception as e:  # OSError, SyntaxError, ValueError, struct.error ... from a damaged header
        raise UploadError(
            400,
            f"{name} is not an image this server can read ({type(e).__name__}: {e}); expected PNG, JPEG, TIFF, "
            "BMP or WebP",
        ) from None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise UploadError(400, f"{name} is {width}x{height} (WxH); expected at least 1x1 pixels")
        if width * height > max_pixels:
            raise UploadError(
                413, f"{name} is {width}x{height} = {width * height} pixels, above this server's limit of {max_pixels}"
            )
        try:
            img.load()  # truncated or corrupt pixel data fails here
        except Exception as e:
            raise UploadError(
                400, f"{name} could not be decoded ({type(e).__name__}: {e}); the file is truncated or corrupt"
            ) from None
        try:
            return image_to_array(img, channels, name)
        except DatasetError as e:
            raise UploadError(400, str(e)) from None
    finally:
        img.close()


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of a uint8 / uint16 array (``(H, W)`` gray or ``(H, W, 3 | 4)`` colour)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(array_or_bytes: np.ndarray | bytes) -> str:
    """Base64 text of a PNG (``bytes``) or of an array encoded with :func:`png_bytes`."""
    data = array_or_bytes if isinstance(array_or_bytes, bytes) else png_bytes(array_or_bytes)
    return base64.b64encode(data).decode("ascii")

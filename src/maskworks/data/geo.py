"""Satellite and aerial imagery: GeoTIFF reading and writing with the georeference kept, per-band statistics,
spectral indices, N-band model inputs and scene-sized prediction to a GeoTIFF.

GeoTIFFs are read and written with `rasterio <https://rasterio.readthedocs.io>`_ (GDAL) when it is installed, and
otherwise with ``tifffile`` (``pip install 'maskworks[tiff]'``), which reads and writes the GeoTIFF tags itself:
ModelPixelScale (33550), ModelTiepoint (33922), ModelTransformation (34264), the GeoKey directory (34735) with its
double (34736) and ASCII (34737) parameters, GDAL_METADATA (42112, band descriptions) and GDAL_NODATA (42113). The
``tifffile`` backend knows coordinate reference systems by their EPSG code (ProjectedCSTypeGeoKey 3072 /
GeographicTypeGeoKey 2048); other GeoKeys read from a file are kept and written back as they were. Files written by
either backend read back with the same geotransform and CRS through the other.

The georeference is :class:`GeoInfo`: a GDAL geotransform ``(x0, dx, rx, y0, ry, dy)``, mapping the *corner* of
pixel ``(row, col)`` to ``x = x0 + col * dx + row * rx``, ``y = y0 + col * ry + row * dy``, the same for
PixelIsArea and PixelIsPoint rasters, as GDAL reports it (a PixelIsPoint file stores the centre of the first pixel;
reading shifts it by half a pixel, writing shifts it back).

Typical use::

    image, info = read_geotiff("S2_scene.tif")                        # (13, H, W) uint16, GeoInfo
    stats = band_statistics(["S2_a.tif", "S2_b.tif"])                 # mean / std per band, nodata excluded
    x = add_indices(image, SENTINEL2_L1C_BANDS, ("ndvi", "ndwi"))     # (15, H, W) float32
    model = adapt_model_input(create_model("unet", encoder="resnet34", encoder_weights="imagenet"), 15)
    predict_geotiff(model, "S2_scene.tif", "classes.tif", num_classes=6, mean=..., std=...,
                    band_map=SENTINEL2_L1C_BANDS, indices=("ndvi", "ndwi"))
"""

from __future__ import annotations

import inspect
import math
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "LANDSAT_OLI_BANDS",
    "SENTINEL2_L1C_BANDS",
    "SENTINEL2_L2A_BANDS",
    "SPECTRAL_INDICES",
    "BandStatistics",
    "GeoInfo",
    "adapt_model_input",
    "add_indices",
    "band_statistics",
    "ndvi",
    "ndwi",
    "normalized_difference",
    "predict_geotiff",
    "read_geoinfo",
    "read_geotiff",
    "write_geotiff",
]

# ------------------------------------------------------------------------------------------------ band layouts

#: Sentinel-2 Level-1C, 13 bands in product order B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9, B10, B11, B12.
SENTINEL2_L1C_BANDS: Mapping[str, int] = MappingProxyType(
    {
        "coastal": 0,
        "blue": 1,
        "green": 2,
        "red": 3,
        "red_edge1": 4,
        "red_edge2": 5,
        "red_edge3": 6,
        "nir": 7,
        "nir_narrow": 8,
        "water_vapour": 9,
        "cirrus": 10,
        "swir1": 11,
        "swir2": 12,
    }
)
#: Sentinel-2 Level-2A, 12 bands: the Level-1C order without B10 (cirrus).
SENTINEL2_L2A_BANDS: Mapping[str, int] = MappingProxyType(
    {k: v - (v > 10) for k, v in SENTINEL2_L1C_BANDS.items() if k != "cirrus"}
)
#: Landsat 8 / 9 OLI surface reflectance, bands 1 to 7 (SR_B1 ... SR_B7).
LANDSAT_OLI_BANDS: Mapping[str, int] = MappingProxyType(
    {"coastal": 0, "blue": 1, "green": 2, "red": 3, "nir": 4, "swir1": 5, "swir2": 6}
)

#: Normalised-difference indices ``(a - b) / (a + b)`` by name: ``(a, b)`` band names. NDVI (Rouse et al. 1974),
#: NDWI (McFeeters 1996, green and NIR), MNDWI (Xu 2006), NDBI (Zha et al. 2003), NBR (Key and Benson 2006).
SPECTRAL_INDICES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "ndvi": ("nir", "red"),
        "ndwi": ("green", "nir"),
        "mndwi": ("green", "swir1"),
        "ndbi": ("swir1", "nir"),
        "nbr": ("nir", "swir2"),
    }
)

# ----------------------------------------------------------------------------------------------- GeoTIFF constants

_PIXEL_SCALE, _TIEPOINT, _TRANSFORMATION = 33550, 33922, 34264
_GEOKEY_DIRECTORY, _GEO_DOUBLES, _GEO_ASCII = 34735, 34736, 34737
_GDAL_METADATA, _GDAL_NODATA = 42112, 42113
_MODEL_TYPE, _RASTER_TYPE, _GEOGRAPHIC_TYPE, _PROJECTED_TYPE = 1024, 1025, 2048, 3072
_MODEL_PROJECTED, _MODEL_GEOGRAPHIC = 1, 2
_PIXEL_IS_AREA, _PIXEL_IS_POINT = 1, 2
_USER_DEFINED = 32767
_EPSG_KEYS = (_GEOGRAPHIC_TYPE, _PROJECTED_TYPE)

_DTYPES = tuple(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"))
_COMPRESSIONS = {None: None, "none": None, "deflate": "zlib", "lzw": "lzw", "zstd": "zstd"}
_BACKENDS = ("auto", "rasterio", "tifffile")
_BLOCK_BYTES = 64 << 20  # float64 bytes per block of rows read by band_statistics and the mask pass
# pixel scale applied by the large-image reader (maskworks.inference.large), undone here to get raw values back
_READER_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(np.bool_): 1.0}

GeoKeyValue = int | float | str | tuple[float, ...]


# --------------------------------------------------------------------------------------------------------- GeoInfo


@dataclass(frozen=True)
class GeoInfo:
    """The georeference and band metadata of a raster.

    Attributes:
        transform: GDAL geotransform ``(x0, dx, rx, y0, ry, dy)`` of pixel corners (``x = x0 + col * dx + row * rx``,
            ``y = y0 + col * ry + row * dy``), or None for a raster without one.
        epsg: EPSG code of the coordinate reference system, or None.
        wkt: the CRS as WKT (filled by the rasterio backend; used to write a CRS that has no EPSG code).
        geographic: whether the CRS is geographic (latitude / longitude) rather than projected; None: decided from
            the EPSG code when writing (rasterio's CRS database when installed, else codes 4000-4999 are taken as
            geographic; set it for other codes).
        pixel_is_point: the raster's values are samples at pixel centres (GTRasterTypeGeoKey PixelIsPoint, GDAL's
            ``AREA_OR_POINT=Point``); ``transform`` still maps pixel corners.
        nodata: the value marking missing pixels, or None.
        descriptions: one description (or None) per band, or None.
        geokeys: the GeoKey directory as read by the tifffile backend (key id -> value), written back unchanged
            when ``epsg`` is None or agrees with it; other keys describe CRSs that have no EPSG code.
    """

    transform: tuple[float, float, float, float, float, float] | None = None
    epsg: int | None = None
    wkt: str | None = None
    geographic: bool | None = None
    pixel_is_point: bool = False
    nodata: float | None = None
    descriptions: tuple[str | None, ...] | None = None
    geokeys: Mapping[int, GeoKeyValue] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.transform is not None:
            t = tuple(self.transform)
            if len(t) != 6 or not all(isinstance(v, Real) and math.isfinite(v) for v in t):
                raise ValueError(f"transform must be 6 finite numbers (a GDAL geotransform), got {self.transform!r}")
            if t[1] * t[5] - t[2] * t[4] == 0:
                raise ValueError(f"transform {t} is singular (its pixel axes are parallel or of zero size)")
            object.__setattr__(self, "transform", tuple(float(v) for v in t))
        if self.epsg is not None and (isinstance(self.epsg, bool) or not isinstance(self.epsg, Integral)):
            raise TypeError(f"epsg must be an int or None, got {self.epsg!r}")
        if self.epsg is not None and not 0 < self.epsg < _USER_DEFINED:
            raise ValueError(f"epsg must be in 1..32766, got {self.epsg}")
        if self.nodata is not None:
            if isinstance(self.nodata, bool) or not isinstance(self.nodata, Real):
                raise TypeError(f"nodata must be a number or None, got {self.nodata!r}")
            object.__setattr__(self, "nodata", float(self.nodata))
        if self.descriptions is not None:
            object.__setattr__(self, "descriptions", tuple(None if d is None else str(d) for d in self.descriptions))
        if self.geokeys is not None:
            object.__setattr__(self, "geokeys", MappingProxyType(dict(self.geokeys)))

    @property
    def affine(self) -> tuple[float, float, float, float, float, float] | None:
        """The transform in affine order ``(a, b, c, d, e, f)`` (``x = a col + b row + c``), as rasterio's
        ``Affine(*info.affine)`` takes it."""
        if self.transform is None:
            return None
        x0, dx, rx, y0, ry, dy = self.transform
        return dx, rx, x0, ry, dy, y0

    @classmethod
    def from_affine(cls, affine: Sequence[float], **kwargs: Any) -> GeoInfo:
        """A GeoInfo from affine coefficients ``(a, b, c, d, e, f)`` (a rasterio ``Affine``) and other fields."""
        a, b, c, d, e, f = tuple(affine)[:6]
        return cls(transform=(c, a, b, f, d, e), **kwargs)

    def window(self, row: int, col: int) -> GeoInfo:
        """The GeoInfo of a window whose first pixel is ``(row, col)`` of this raster."""
        if self.transform is None:
            return self
        x0, dx, rx, y0, ry, dy = self.transform
        return replace(self, transform=(x0 + col * dx + row * rx, dx, rx, y0 + col * ry + row * dy, ry, dy))

    def xy(self, row: float, col: float, centre: bool = True) -> tuple[float, float]:
        """Map coordinates of pixel ``(row, col)``: its centre, or its upper-left corner with ``centre=False``."""
        if self.transform is None:
            raise ValueError("this GeoInfo has no transform, so pixels have no map coordinates")
        x0, dx, rx, y0, ry, dy = self.transform
        r, c = (row + 0.5, col + 0.5) if centre else (row, col)
        return x0 + c * dx + r * rx, y0 + c * ry + r * dy


# -------------------------------------------------------------------------------------------------- the backends


def _backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        try:
            import rasterio  # noqa: F401
        except ImportError:
            return "tifffile"
        return "rasterio"
    return backend


def _import_tifffile() -> Any:
    try:
        import tifffile
    except ImportError as e:
        raise ImportError("GeoTIFF support needs tifffile (pip install 'maskworks[tiff]') or rasterio") from e
    return tifffile


def _import_rasterio() -> Any:
    try:
        import rasterio
    except ImportError as e:
        raise ImportError("backend='rasterio' needs rasterio: pip install rasterio") from e
    return rasterio


def _is_geographic(info: GeoInfo) -> bool:
    if info.geographic is not None:
        return bool(info.geographic)
    try:
        from rasterio.crs import CRS

        return bool(CRS.from_epsg(info.epsg).is_geographic)
    except Exception:  # rasterio missing or the code unknown to its database
        return 4000 <= info.epsg < 5000


class _Raster(ABC):
    """An open raster: ``shape`` ``(C, H, W)``, ``dtype``, ``info``, and ``read`` of a window of some bands."""

    shape: tuple[int, int, int]
    dtype: np.dtype
    info: GeoInfo

    @abstractmethod
    def read(self, rows: tuple[int, int], cols: tuple[int, int], bands: Sequence[int]) -> np.ndarray:
        """Pixels ``(len(bands), rows, cols)`` of the window ``rows = (start, stop)``, ``cols = (start, stop)``."""

    def close(self) -> None:  # noqa: B027 - a reader without a file handle has nothing to release
        """Release the file."""

    def __enter__(self) -> _Raster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RasterioRaster(_Raster):
    def __init__(self, path: Path):
        rasterio = _import_rasterio()
        try:
            self._src = rasterio.open(path)
        except Exception as e:  # rasterio.errors.RasterioIOError and friends
            raise ValueError(f"cannot read {path} as a raster: {type(e).__name__}: {e}") from e
        src = self._src
        self.shape = (src.count, src.height, src.width)
        self.dtype = np.dtype(src.dtypes[0])
        crs = src.crs
        transform = src.transform
        georeferenced = not (transform.is_identity and crs is None)
        point = src.tags().get("AREA_OR_POINT", "Area").lower() == "point"
        self.info = GeoInfo(
            transform=transform.to_gdal() if georeferenced else None,
            epsg=None if crs is None else crs.to_epsg(),
            wkt=None if crs is None else crs.to_wkt(),
            geographic=None if crs is None else bool(crs.is_geographic),
            pixel_is_point=point,
            nodata=src.nodata,
            descriptions=tuple(src.descriptions) if any(src.descriptions) else None,
        )

    def read(self, rows: tuple[int, int], cols: tuple[int, int], bands: Sequence[int]) -> np.ndarray:
        from rasterio.windows import Window

        window = Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0])
        return self._src.read([b + 1 for b in bands], window=window)

    def close(self) -> None:
        self._src.close()


class _TiffRaster(_Raster):
    def __init__(self, path: Path):
        tifffile = _import_tifffile()
        self._path = path
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as e:
            raise ValueError(f"cannot read {path} as a TIFF: {type(e).__name__}: {e}") from e
        try:
            page = self._tif.pages.first
            separate, depth, h, w, contig = page.shaped
            if depth != 1:
                raise ValueError(f"{path} is a volume (image depth {depth}); expected a 2-D raster")
            self.shape = (separate * contig, h, w)
            self.dtype = np.dtype(page.dtype)
            self.info = _tiff_geoinfo(page, self.shape[0], path)
        except Exception:
            self._tif.close()
            raise
        self._page = page
        self._rows: Any = None  # region reader of maskworks.inference.large, opened for the first partial read

    def read(self, rows: tuple[int, int], cols: tuple[int, int], bands: Sequence[int]) -> np.ndarray:
        c, h, w = self.shape
        if rows == (0, h) and cols == (0, w):
            try:
                data = self._page.asarray()
            except Exception as e:  # a missing codec, corrupt data
                raise ValueError(f"cannot decode {self._path}: {type(e).__name__}: {e}") from e
            separate, _, _, _, contig = self._page.shaped
            data = np.moveaxis(data.reshape(separate, h, w, contig), 3, 1).reshape(c, h, w)
            return data if list(bands) == list(range(c)) else data[list(bands)]
        if self._rows is None:
            from maskworks.inference.large import _open_tiff

            self._rows = _open_tiff(self._path)
        part = self._rows.read(*rows)[:, cols[0] : cols[1], list(bands)]  # (h, w, C')
        return np.ascontiguousarray(np.moveaxis(part, 2, 0))

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()
        self._tif.close()


def _open_raster(path: str | os.PathLike, backend: str) -> _Raster:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"raster {path} does not exist (or is not a file)")
    return _RasterioRaster(path) if _backend(backend) == "rasterio" else _TiffRaster(path)


# --------------------------------------------------------------------------------- GeoTIFF tags (tifffile backend)


def _tag(page: Any, code: int) -> Any:
    tag = page.tags.get(code)
    return None if tag is None else tag.value


def _parse_geokeys(directory: Sequence[int], doubles: Sequence[float], ascii_: str, path: Path) -> dict:
    """GeoKey id -> value (int, float, tuple of floats or str) from the three GeoTIFF tags."""
    d = [int(v) for v in directory]
    if len(d) < 4 or len(d) < 4 + 4 * d[3]:
        raise ValueError(f"{path} has a truncated GeoKeyDirectoryTag ({len(d)} values)")
    keys: dict[int, GeoKeyValue] = {}
    for i in range(d[3]):
        key, location, count, value = d[4 + 4 * i : 8 + 4 * i]
        if location == 0:
            keys[key] = value
        elif location == _GEO_DOUBLES:
            vals = tuple(float(v) for v in doubles[value : value + count])
            keys[key] = vals[0] if count == 1 else vals
        elif location == _GEO_ASCII:
            keys[key] = ascii_[value : value + count].rstrip("|\x00")
        # keys stored in other tags (none are defined for CRSs) are not kept
    return keys


def _tiff_geoinfo(page: Any, bands: int, path: Path) -> GeoInfo:
    """The GeoInfo of a TIFF page from its GeoTIFF and GDAL tags."""
    geokeys = None
    directory = _tag(page, _GEOKEY_DIRECTORY)
    if directory is not None:
        ascii_ = _tag(page, _GEO_ASCII) or ""
        ascii_ = ascii_.decode("latin-1") if isinstance(ascii_, bytes) else str(ascii_)
        geokeys = _parse_geokeys(directory, _tag(page, _GEO_DOUBLES) or (), ascii_, path)
    keys = geokeys or {}
    point = keys.get(_RASTER_TYPE) == _PIXEL_IS_POINT

    transform = None
    matrix, scale, tie = _tag(page, _TRANSFORMATION), _tag(page, _PIXEL_SCALE), _tag(page, _TIEPOINT)
    if matrix is not None and len(matrix) >= 8:
        m = [float(v) for v in matrix]
        transform = (m[3], m[0], m[1], m[7], m[4], m[5])
    elif scale is not None and tie is not None and len(scale) >= 2 and len(tie) >= 6:
        sx, sy = float(scale[0]), float(scale[1])
        i, j, x, y = (float(tie[k]) for k in (0, 1, 3, 4))
        transform = (x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy)
    if transform is not None and point:  # the file maps pixel centres: move to corners, as GDAL does
        x0, dx, rx, y0, ry, dy = transform
        transform = (x0 - 0.5 * (dx + rx), dx, rx, y0 - 0.5 * (ry + dy), ry, dy)

    epsg, geographic = None, None
    model = keys.get(_MODEL_TYPE)
    projected, geog = keys.get(_PROJECTED_TYPE), keys.get(_GEOGRAPHIC_TYPE)
    if model == _MODEL_PROJECTED or (model is None and projected is not None):
        geographic = False
        if isinstance(projected, int) and 0 < projected < _USER_DEFINED:
            epsg = projected
    elif model == _MODEL_GEOGRAPHIC or (model is None and geog is not None):
        geographic = True
        if isinstance(geog, int) and 0 < geog < _USER_DEFINED:
            epsg = geog

    nodata = None
    text = _tag(page, _GDAL_NODATA)
    if text is not None:
        text = text.decode("latin-1") if isinstance(text, bytes) else str(text)
        try:
            nodata = float(text.strip("\x00 "))
        except ValueError:
            nodata = None  # GDAL ignores a value it cannot parse too
    return GeoInfo(
        transform=transform,
        epsg=epsg,
        geographic=geographic,
        pixel_is_point=point,
        nodata=nodata,
        descriptions=_parse_descriptions(_tag(page, _GDAL_METADATA), bands),
        geokeys=geokeys,
    )


def _parse_descriptions(xml: Any, bands: int) -> tuple[str | None, ...] | None:
    """Band descriptions from GDAL's metadata XML (``<Item name="DESCRIPTION" sample="i" role="description">``)."""
    if not xml:
        return None
    try:
        root = ElementTree.fromstring(xml.decode("utf-8") if isinstance(xml, bytes) else str(xml))
    except ElementTree.ParseError:
        return None
    out: list[str | None] = [None] * bands
    for item in root.iter("Item"):
        sample = item.get("sample")
        if item.get("role") == "description" and sample is not None and sample.isdigit() and int(sample) < bands:
            out[int(sample)] = item.text or ""
    return tuple(out) if any(d is not None for d in out) else None


def _geokeys_for(info: GeoInfo) -> dict[int, GeoKeyValue] | None:
    """The GeoKeys to write: those read from a file when they describe ``info.epsg``, else the EPSG keys."""
    keys: dict[int, GeoKeyValue] | None
    stored = dict(info.geokeys) if info.geokeys else None
    if stored is not None and (info.epsg is None or info.epsg in (stored.get(k) for k in _EPSG_KEYS)):
        keys = stored
    elif info.epsg is not None:
        if _is_geographic(info):
            keys = {_MODEL_TYPE: _MODEL_GEOGRAPHIC, _GEOGRAPHIC_TYPE: info.epsg}
        else:
            keys = {_MODEL_TYPE: _MODEL_PROJECTED, _PROJECTED_TYPE: info.epsg}
    elif info.wkt is not None:
        raise ValueError(
            "the tifffile backend writes CRSs by EPSG code, and this GeoInfo has only WKT; install rasterio "
            "(backend='rasterio') or give an epsg"
        )
    else:
        keys = None
    if keys is None:
        return {_RASTER_TYPE: _PIXEL_IS_POINT} if info.pixel_is_point else None
    keys[_RASTER_TYPE] = _PIXEL_IS_POINT if info.pixel_is_point else _PIXEL_IS_AREA
    return keys


def _geotiff_tags(info: GeoInfo, bands: int) -> list[tuple]:
    """tifffile ``extratags`` holding ``info``."""
    tags: list[tuple] = []
    if info.transform is not None:
        x0, dx, rx, y0, ry, dy = info.transform
        if info.pixel_is_point:  # the file maps the centre of the first pixel
            x0, y0 = x0 + 0.5 * (dx + rx), y0 + 0.5 * (ry + dy)
        if rx == 0 and ry == 0 and dy < 0:
            tags.append((_PIXEL_SCALE, "d", 3, (dx, -dy, 0.0), True))
            tags.append((_TIEPOINT, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0), True))
        else:
            matrix = (dx, rx, 0.0, x0, ry, dy, 0.0, y0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
            tags.append((_TRANSFORMATION, "d", 16, matrix, True))
    keys = _geokeys_for(info)
    if keys:
        entries: list[int] = []
        doubles: list[float] = []
        ascii_ = ""
        for key in sorted(keys):
            value = keys[key]
            if isinstance(value, str):
                text = value + "|"
                entries += [key, _GEO_ASCII, len(text), len(ascii_)]
                ascii_ += text
            elif isinstance(value, (float, tuple)):
                vals = (value,) if isinstance(value, float) else value
                entries += [key, _GEO_DOUBLES, len(vals), len(doubles)]
                doubles += [float(v) for v in vals]
            else:
                entries += [key, 0, 1, int(value)]
        directory = [1, 1, 0, len(keys), *entries]
        tags.append((_GEOKEY_DIRECTORY, "H", len(directory), directory, True))
        if doubles:
            tags.append((_GEO_DOUBLES, "d", len(doubles), doubles, True))
        if ascii_:
            tags.append((_GEO_ASCII, "s", 0, ascii_, True))
    if info.descriptions is not None and any(d is not None for d in info.descriptions):
        items = "".join(
            f'  <Item name="DESCRIPTION" sample={quoteattr(str(i))} role="description">{escape(d)}</Item>\n'
            for i, d in enumerate(info.descriptions)
            if d is not None
        )
        tags.append((_GDAL_METADATA, "s", 0, f"<GDALMetadata>\n{items}</GDALMetadata>", True))
    if info.nodata is not None:
        tags.append((_GDAL_NODATA, "s", 0, _nodata_text(info.nodata), True))
    return tags


def _nodata_text(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return str(int(value)) if value.is_integer() and abs(value) < 2**63 else repr(value)


# -------------------------------------------------------------------------------------------------- read / write


def _check_bands(bands: Sequence[int] | None, count: int, name: str = "bands") -> list[int]:
    if bands is None:
        return list(range(count))
    if isinstance(bands, (str, bytes)) or not isinstance(bands, Sequence) or not bands:
        raise TypeError(f"{name} must be a non-empty sequence of 0-based band indices, got {bands!r}")
    out = []
    for b in bands:
        if isinstance(b, bool) or not isinstance(b, Integral) or not 0 <= b < count:
            raise ValueError(f"{name} must hold 0-based band indices in 0..{count - 1}, got {b!r}")
        out.append(int(b))
    return out


def read_geoinfo(path: str | os.PathLike, backend: str = "auto") -> tuple[GeoInfo, tuple[int, int, int], np.dtype]:
    """The georeference, shape and pixel type of a GeoTIFF, without reading its pixels.

    Args:
        path: the GeoTIFF.
        backend: ``"auto"`` (rasterio when installed, else tifffile), ``"rasterio"`` or ``"tifffile"``.

    Returns:
        ``(info, (C, H, W), dtype)``.
    """
    with _open_raster(path, backend) as raster:
        return raster.info, raster.shape, raster.dtype


def read_geotiff(
    path: str | os.PathLike,
    bands: Sequence[int] | None = None,
    window: Sequence[int] | None = None,
    backend: str = "auto",
) -> tuple[np.ndarray, GeoInfo]:
    """Read a GeoTIFF (or, with rasterio, any raster GDAL reads) as ``(C, H, W)`` with its georeference.

    Args:
        path: the file.
        bands: 0-based band indices to read, in the order wanted (default: all).
        window: ``(row, col, height, width)`` to read a part only; the returned transform is that of the window.
            The tifffile backend decodes only the strips or tiles that hold the window's rows.
        backend: ``"auto"`` (rasterio when installed, else tifffile), ``"rasterio"`` or ``"tifffile"``.

    Returns:
        ``(array, info)``: the pixels ``(C, H, W)`` in the file's data type, and the :class:`GeoInfo` (with the
        descriptions of the bands read).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: not a readable raster, or ``bands`` / ``window`` out of range.
        ImportError: neither rasterio nor tifffile is installed (``pip install 'maskworks[tiff]'``).
    """
    with _open_raster(path, backend) as raster:
        c, h, w = raster.shape
        idx = _check_bands(bands, c)
        if window is None:
            row, col, hh, ww = 0, 0, h, w
        else:
            if len(window) != 4 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in window):
                raise TypeError(f"window must be 4 ints (row, col, height, width), got {window!r}")
            row, col, hh, ww = (int(v) for v in window)
            if row < 0 or col < 0 or hh < 1 or ww < 1 or row + hh > h or col + ww > w:
                raise ValueError(f"window {tuple(window)} (row, col, height, width) is outside the {h}x{w} raster")
        array = raster.read((row, row + hh), (col, col + ww), idx)
        info = raster.info.window(row, col)
    if info.descriptions is not None:
        info = replace(info, descriptions=tuple(info.descriptions[i] for i in idx))
    return array, info


def _temporary(dest: Path, suffix: str = ".partial") -> Path:
    """A fresh name beside ``dest`` ending in ``suffix``."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def write_geotiff(
    path: str | os.PathLike,
    array: np.ndarray,
    info: GeoInfo,
    compress: str | None = "deflate",
    tile: int | None = None,
    backend: str = "auto",
) -> Path:
    """Write ``(C, H, W)`` (or ``(H, W)``) pixels as a GeoTIFF with ``info``'s georeference.

    Bands are stored as separate planes (GDAL's ``INTERLEAVE=BAND``). The file is written to a temporary name
    beside ``path`` and renamed when complete, so a failure never leaves a truncated file under ``path``.

    Args:
        path: the destination (``.tif`` / ``.tiff``).
        array: pixels of type uint8, int8, uint16, int16, uint32, int32, float32 or float64; a ``np.memmap`` is
            written without being loaded whole.
        info: the georeference; its ``descriptions``, when given, need one entry per band.
        compress: ``"deflate"`` (default), ``"lzw"``, ``"zstd"`` or None.
        tile: tile size (a multiple of 16) for a tiled file; None writes strips.
        backend: ``"auto"`` (rasterio when installed, else tifffile; tifffile also for a CRS known only by GeoKeys
            read from a file), ``"rasterio"`` or ``"tifffile"``.

    Returns:
        The path written.

    Raises:
        ValueError: a bad shape, pixel type, ``compress`` or ``tile``, descriptions of the wrong length, or a
            CRS the tifffile backend cannot write (WKT only).
        FileNotFoundError: the destination folder does not exist.
    """
    path = Path(path)
    if not isinstance(info, GeoInfo):
        raise TypeError(f"info must be a GeoInfo, got {type(info).__name__}")
    if not isinstance(array, np.ndarray):
        raise TypeError(f"array must be a numpy array (C, H, W) or (H, W), got {type(array).__name__}")
    if array.ndim not in (2, 3) or min(array.shape) < 1:
        raise ValueError(f"array must have shape (C, H, W) or (H, W) with no empty axis, got {tuple(array.shape)}")
    dtype = np.dtype(array.dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"array has pixels of type {dtype}; expected one of {', '.join(map(str, _DTYPES))}")
    bands = 1 if array.ndim == 2 else array.shape[0]
    if info.descriptions is not None and len(info.descriptions) != bands:
        raise ValueError(f"info.descriptions has {len(info.descriptions)} entries for {bands} band(s)")
    key = compress.lower() if isinstance(compress, str) else compress
    if key not in _COMPRESSIONS:
        raise ValueError(f"compress must be one of 'deflate', 'lzw', 'zstd' or None, got {compress!r}")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, Integral) or tile < 16 or tile % 16):
        raise ValueError(f"tile must be None or a positive multiple of 16, got {tile!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist (for {path})")
    which = _backend(backend)
    if backend == "auto" and info.epsg is None and info.wkt is None and info.geokeys:
        which = "tifffile"  # a CRS rasterio would not get: the GeoKeys read from a file
    tmp = _temporary(path)
    try:
        if which == "rasterio":
            _write_rasterio(tmp, array, info, key, tile)
        else:
            _write_tifffile(tmp, array, info, key, tile)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_tifffile(path: Path, array: np.ndarray, info: GeoInfo, compress: str | None, tile: int | None) -> None:
    tifffile = _import_tifffile()
    data = array[0] if array.ndim == 3 and array.shape[0] == 1 else array
    tifffile.imwrite(
        path,
        data,
        photometric="minisblack",
        planarconfig="separate" if data.ndim == 3 else None,
        compression=_COMPRESSIONS[compress],
        tile=None if tile is None else (tile, tile),
        extratags=_geotiff_tags(info, 1 if array.ndim == 2 else array.shape[0]),
        metadata=None,
    )


def _write_rasterio(path: Path, array: np.ndarray, info: GeoInfo, compress: str | None, tile: int | None) -> None:
    rasterio = _import_rasterio()
    from rasterio.crs import CRS
    from rasterio.transform import Affine
    from rasterio.windows import Window

    data = array[None] if array.ndim == 2 else array
    c, h, w = data.shape
    crs = CRS.from_epsg(info.epsg) if info.epsg is not None else CRS.from_wkt(info.wkt) if info.wkt else None
    profile: dict[str, Any] = {"driver": "GTiff", "width": w, "height": h, "count": c, "dtype": data.dtype.name}
    profile["interleave"] = "band"
    if crs is not None:
        profile["crs"] = crs
    if info.transform is not None:
        profile["transform"] = Affine(*info.affine)
    if info.nodata is not None:
        profile["nodata"] = info.nodata
    if compress is not None:
        profile["compress"] = compress
    if tile is not None:
        profile.update(tiled=True, blockxsize=tile, blockysize=tile)
    rows = max(1, _BLOCK_BYTES // (8 * c * w))
    with rasterio.open(path, "w", **profile) as dst:
        if info.pixel_is_point:
            dst.update_tags(AREA_OR_POINT="Point")
        for i, d in enumerate(info.descriptions or ()):
            if d is not None:
                dst.set_band_description(i + 1, d)
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            dst.write(np.asarray(data[:, r0:r1]), window=Window(0, r0, w, r1 - r0))


# --------------------------------------------------------------------------------------------- spectral indices


def _is_tensor(*values: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in values)


def normalized_difference(a: Any, b: Any, eps: float = 0.0, fill: float = 0.0) -> Any:
    """``(a - b) / (a + b)``, with ``fill`` where ``|a + b| <= eps`` (e.g. both bands zero).

    Integer bands are converted to float first (no unsigned wrap-around); NaN inputs give NaN.

    Args:
        a: first band (numpy array or torch tensor, any shape broadcastable with ``b``).
        b: second band.
        eps: denominators at most this large in magnitude give ``fill`` (0: only an exact zero).
        fill: the value where the denominator is (near) zero.

    Returns:
        float32 values in ``[-1, 1]`` for non-negative bands (float64 when an input is float64, or, for numpy, a
        32-bit integer), a tensor when an input is a tensor.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if _is_tensor(a, b):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
        a, b = a.to(dtype), b.to(dtype)
        den = a + b
        small = den.abs() <= eps
        return torch.where(small, torch.full_like(den, fill), (a - b) / torch.where(small, torch.ones_like(den), den))
    a, b = np.asarray(a), np.asarray(b)
    dtype = np.result_type(a.dtype, b.dtype, np.float32)
    a, b = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
    den = a + b
    small = np.abs(den) <= eps
    with np.errstate(invalid="ignore"):
        return np.where(small, dtype.type(fill), (a - b) / np.where(small, dtype.type(1), den)).astype(dtype)


def ndvi(nir: Any, red: Any, eps: float = 0.0) -> Any:
    """Normalised difference vegetation index ``(nir - red) / (nir + red)`` (Rouse et al. 1974); 0 where both
    bands are 0. See :func:`normalized_difference`."""
    return normalized_difference(nir, red, eps)


def ndwi(green: Any, nir: Any, eps: float = 0.0) -> Any:
    """Normalised difference water index of McFeeters (1996), ``(green - nir) / (green + nir)``; 0 where both
    bands are 0. See :func:`normalized_difference`."""
    return normalized_difference(green, nir, eps)


def _index_pairs(band_map: Mapping[str, int], indices: Sequence[str], channels: int) -> list[tuple[int, int]]:
    if isinstance(indices, str):
        indices = (indices,)
    pairs = []
    for name in indices:
        if name not in SPECTRAL_INDICES:
            raise ValueError(f"unknown spectral index {name!r}; expected one of {sorted(SPECTRAL_INDICES)}")
        pair = []
        for band in SPECTRAL_INDICES[name]:
            if band not in band_map:
                raise ValueError(
                    f"index {name!r} needs band {band!r}, which band_map lacks (it has {sorted(band_map)})"
                )
            i = band_map[band]
            if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < channels:
                raise ValueError(f"band_map[{band!r}] = {i!r} is not a channel index in 0..{channels - 1}")
            pair.append(int(i))
        pairs.append((pair[0], pair[1]))
    return pairs


def add_indices(
    array: Any,
    band_map: Mapping[str, int],
    indices: Sequence[str] = ("ndvi", "ndwi"),
    eps: float = 0.0,
) -> Any:
    """Append spectral indices to an image as extra channels.

    Args:
        array: ``(C, H, W)`` or ``(N, C, H, W)`` bands (numpy array or torch tensor), channels on axis -3.
        band_map: band name -> channel index of ``array`` (e.g. :data:`SENTINEL2_L1C_BANDS`); the names are those
            of :data:`SPECTRAL_INDICES` (``"red"``, ``"green"``, ``"nir"``, ``"swir1"``, ``"swir2"``).
        indices: names in :data:`SPECTRAL_INDICES`, appended in this order.
        eps: see :func:`normalized_difference`.

    Returns:
        ``(C + len(indices), H, W)`` (or batched) float32 (float64 when the bands are float64) with the bands
        first, then the indices.
    """
    if not hasattr(array, "ndim") or array.ndim < 3:
        raise ValueError(f"array must have shape (C, H, W) or (N, C, H, W), got {getattr(array, 'shape', array)!r}")
    pairs = _index_pairs(band_map, indices, array.shape[-3])
    if isinstance(array, torch.Tensor):
        x = array.to(torch.float64 if array.dtype == torch.float64 else torch.float32)
        extra = [normalized_difference(x[..., a, :, :], x[..., b, :, :], eps) for a, b in pairs]
        return torch.cat([x, *(e.unsqueeze(-3) for e in extra)], dim=-3)
    x = np.asarray(array)
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    extra = [normalized_difference(x[..., a, :, :], x[..., b, :, :], eps) for a, b in pairs]
    return np.concatenate([x, *(e[..., None, :, :] for e in extra)], axis=-3)


# --------------------------------------------------------------------------------------------- band statistics


class BandStatistics(NamedTuple):
    """Per-band statistics over a set of rasters.

    Attributes:
        mean: ``(C,)`` mean of the valid pixels of each band, float64.
        std: ``(C,)`` population standard deviation (ddof 0), float64.
        count: ``(C,)`` number of valid pixels, int64.
    """

    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray


def _row_blocks(source: Any, nodata: float | None, backend: str) -> Iterator[tuple[np.ndarray, float | None]]:
    """``(C, n, W)`` blocks of rows of one source with its nodata value."""
    if isinstance(source, (str, os.PathLike)):
        with _open_raster(source, backend) as raster:
            c, h, w = raster.shape
            rows = max(1, _BLOCK_BYTES // (8 * c * w))
            value = raster.info.nodata if nodata is None else nodata
            for r0 in range(0, h, rows):
                yield raster.read((r0, min(r0 + rows, h)), (0, w), range(c)), value
        return
    array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(f"band_statistics takes arrays of shape (C, H, W) or (H, W), got {tuple(array.shape)}")
    c, h, w = array.shape
    rows = max(1, _BLOCK_BYTES // (8 * c * w))
    for r0 in range(0, h, rows):
        yield array[:, r0 : r0 + rows], nodata


def band_statistics(
    sources: Sequence[Any] | Any,
    nodata: float | None = None,
    backend: str = "auto",
) -> BandStatistics:
    """Mean and standard deviation of every band over a set of rasters, streamed by blocks of rows.

    Statistics are accumulated in float64 with Chan et al.'s pairwise update, so the result does not depend on how
    the data is split, and memory stays at one block (about 64 MiB) whatever the rasters' size. NaN pixels and
    pixels equal to the nodata value are left out, band by band.

    Args:
        sources: GeoTIFF paths and / or arrays ``(C, H, W)`` (or ``(H, W)``), all with the same number of bands;
            one path or array alone is accepted too.
        nodata: the value to leave out of every source; None: each file's own nodata value (arrays: none).
        backend: how files are read (see :func:`read_geotiff`).

    Returns:
        :class:`BandStatistics` in the rasters' pixel units (use them as ``mean`` / ``std`` of
        :func:`predict_geotiff`).

    Raises:
        ValueError: no sources, band counts that differ, or a band with no valid pixel.
    """
    if isinstance(sources, (str, os.PathLike, np.ndarray, torch.Tensor)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError("sources is empty; expected GeoTIFF paths or (C, H, W) arrays")
    count = mean = m2 = None
    for k, source in enumerate(sources):
        for block, value in _row_blocks(source, nodata, backend):
            c = block.shape[0]
            if count is None:
                count, mean, m2 = np.zeros(c, np.int64), np.zeros(c), np.zeros(c)
            elif c != count.shape[0]:
                raise ValueError(f"source {k} ({_name(source)}) has {c} band(s); the first source has {len(count)}")
            x = block.reshape(c, -1).astype(np.float64)
            valid = ~np.isnan(x)
            if value is not None and not math.isnan(value):
                valid &= x != value
            n = valid.sum(axis=1)
            block_mean = np.where(valid, x, 0.0).sum(axis=1) / np.maximum(n, 1)
            block_m2 = np.square(np.where(valid, x - block_mean[:, None], 0.0)).sum(axis=1)
            total = count + n
            delta = block_mean - mean
            share = np.divide(n, total, out=np.zeros(c), where=total > 0)
            mean += delta * share
            m2 += block_m2 + delta**2 * count * share
            count = total
    empty = np.flatnonzero(count == 0)
    if empty.size:
        raise ValueError(f"band(s) {empty.tolist()} have no valid pixel (all nodata or NaN) in the sources")
    return BandStatistics(mean, np.sqrt(m2 / count), count)


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"array {tuple(np.shape(source))}"


# ----------------------------------------------------------------------------------------------- N-band models


def _conv_inputs(model: nn.Module) -> int:
    channels = getattr(model, "in_channels", None)
    if isinstance(channels, int) and not isinstance(channels, bool):
        return channels
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError(f"{type(model).__name__} has no in_channels attribute and no Conv2d; cannot adapt its input")


def adapt_model_input(model: nn.Module, in_channels: int, probe_size: int = 64) -> nn.Module:
    """Adapt a model built for 3-band (or any C-band) images to ``in_channels`` bands, keeping pretrained weights.

    Every convolution that receives the input image is found by one forward pass on a ``probe_size`` probe of
    ``in_channels`` bands (so models whose input feeds several branches, such as BiSeNet, are adapted whole), and
    its weight is replaced by :func:`maskworks.convert.resnet.adapt_input_conv` of it, the rule of timm and smp:
    one band sums the filters over their input channels; more bands repeat the filters cyclically and scale them by
    ``C / in_channels``. So a model adapted from 3 to 6 bands gives, on an image whose bands 3-5 repeat bands 0-2,
    exactly its 3-band output, and a 1-band model on a grey image that of the 3-band model on the grey image
    repeated three times. ``in_channels`` attributes and ``maskworks_config`` are updated, so checkpoints saved
    from the adapted model rebuild it. Create the optimizer after adapting (the weights are new parameters).

    For satellite images, normalise every band with its own statistics (:func:`band_statistics`), so the
    repeated filters see inputs of the scale they were trained on.

    Args:
        model: a segmentation model taking ``(B, C, H, W)`` images; changed in place.
        in_channels: the new number of bands.
        probe_size: height and width of the probe image (large enough for the model).

    Returns:
        ``model``.

    Raises:
        ValueError: ``in_channels`` is not a positive int, or the model cannot take the new band count (no
            convolution receives the image, or the probe fails: the model is then left unchanged).
    """
    from maskworks.convert.resnet import adapt_input_conv
    from maskworks.inference.sliding import eval_mode, model_device

    if isinstance(in_channels, bool) or not isinstance(in_channels, Integral) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if isinstance(probe_size, bool) or not isinstance(probe_size, Integral) or probe_size < 1:
        raise ValueError(f"probe_size must be a positive int, got {probe_size!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    old = _conv_inputs(model)
    if in_channels == old:
        return model
    originals: dict[nn.Conv2d, nn.Parameter] = {}

    def adapt(module: nn.Conv2d, args: tuple) -> None:
        if module not in originals and args and args[0].shape[1] == in_channels and module.in_channels == old:
            weight = module.weight
            originals[module] = weight
            module.weight = nn.Parameter(adapt_input_conv(weight.detach(), in_channels), weight.requires_grad)
            module.in_channels = in_channels

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == old and m.groups == 1]
    handles = [m.register_forward_pre_hook(adapt) for m in convs]
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    probe = torch.zeros(1, in_channels, probe_size, probe_size, device=model_device(model, torch.device("cpu")))
    try:
        with torch.no_grad(), eval_mode(model):
            model(probe.to(dtype))
        if not originals:
            raise RuntimeError(f"no Conv2d with {old} input channels receives the image")
    except Exception as e:
        for module, weight in originals.items():
            module.weight, module.in_channels = weight, old
        raise ValueError(
            f"cannot adapt {type(model).__name__} from {old} to {in_channels} input bands: {type(e).__name__}: {e}"
        ) from e
    finally:
        for handle in handles:
            handle.remove()
    names = {module: name for name, module in model.named_modules()}
    prefixes = {""} | {".".join(names[m].split(".")[:i]) for m in originals for i in range(1, names[m].count(".") + 1)}
    for name, module in model.named_modules():
        if name in prefixes and getattr(module, "in_channels", None) == old:
            module.in_channels = in_channels
    _record_in_channels(model, in_channels)
    return model


def _record_in_channels(model: nn.Module, in_channels: int) -> None:
    """Set ``in_channels`` in ``maskworks_config`` when the registered constructor takes it."""
    config = getattr(model, "maskworks_config", None)
    if not config:
        return
    from maskworks.registry import model_entry

    try:
        params = inspect.signature(model_entry(config["name"]).fn).parameters
    except (ValueError, TypeError, KeyError):
        return
    if "in_channels" in params:
        model.maskworks_config = {**config, "kwargs": {**config["kwargs"], "in_channels": in_channels}}


# ---------------------------------------------------------------------------------------------- scene prediction


class _ScenePreprocess(nn.Module):
    """Raw file bands -> the model's input: band selection, nodata filled with the band mean, spectral indices,
    per-channel normalisation; pointwise, so tiled prediction is unaffected."""

    def __init__(
        self,
        model: nn.Module,
        bands: list[int] | None,
        index_pairs: list[tuple[int, int]],
        mean: Sequence[float],
        std: Sequence[float],
        nodata: float | None,
    ):
        super().__init__()
        self.model = model
        self.bands = bands
        self.index_pairs = index_pairs
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.nodata = nodata

    def forward(self, x: torch.Tensor) -> Any:
        if self.bands is not None:
            x = x[:, self.bands]
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        nb = x.shape[1]
        invalid = torch.isnan(x)
        if self.nodata is not None:
            invalid |= x == self.nodata
        x = torch.where(invalid, mean[:, :nb].expand_as(x), x)
        if self.index_pairs:
            x = torch.cat([x, *(normalized_difference(x[:, a], x[:, b])[:, None] for a, b in self.index_pairs)], 1)
        return self.model((x - mean) / std)


def _output_classes(model: nn.Module, num_classes: int | None) -> int:
    if num_classes is None:
        config = getattr(model, "maskworks_config", None) or {}
        num_classes = config.get("kwargs", {}).get("num_classes", getattr(model, "num_classes", None))
        if num_classes is None:
            raise ValueError("cannot tell how many classes the model predicts; pass num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or not 1 <= num_classes <= 255:
        raise ValueError(f"num_classes must be an int in 1..255 (uint8 labels), got {num_classes!r}")
    return int(num_classes)


def _readable_source(src: Path, dtype: np.dtype) -> bool:
    """Whether the large-image reader takes ``src`` as it is (a TIFF it decodes, in a pixel type it takes)."""
    if src.suffix.lower() not in (".tif", ".tiff") or (dtype not in _READER_SCALES and dtype.kind != "f"):
        return False
    try:
        from maskworks.inference.large import _open_tiff

        reader = _open_tiff(src)
        try:
            reader.read(0, 1)
        finally:
            reader.close()
    except Exception:  # a codec tifffile lacks, or not a TIFF it understands: convert through the backend
        return False
    return True


def _convert_source(src: Path, dest: Path, backend: str) -> np.dtype:
    """Copy ``src`` to an uncompressed planar TIFF the large-image reader maps (float32 unless the pixel type is
    one it takes), block of rows by block of rows; returns the pixel type written."""
    tifffile = _import_tifffile()
    with _open_raster(src, backend) as raster:
        c, h, w = raster.shape
        dtype = raster.dtype if raster.dtype in _READER_SCALES or raster.dtype.kind == "f" else np.dtype(np.float32)
        shape = (c, h, w) if c > 1 else (h, w)
        out = tifffile.memmap(dest, shape=shape, dtype=dtype, photometric="minisblack", planarconfig="separate")
        try:
            rows = max(1, _BLOCK_BYTES // (8 * c * w))
            for r0 in range(0, h, rows):
                r1 = min(r0 + rows, h)
                block = raster.read((r0, r1), (0, w), range(c))
                if c > 1:
                    out[:, r0:r1] = block
                else:
                    out[r0:r1] = block[0]
                out.flush()
        finally:
            del out
    return dtype


def _mark_nodata(labels: np.ndarray, src: Path, bands: list[int], nodata: float | None, backend: str, label: int):
    """Set ``label`` where every selected band of ``src`` is nodata or NaN, block of rows by block of rows."""
    with _open_raster(src, backend) as raster:
        _, h, w = raster.shape
        if nodata is None and raster.dtype.kind != "f":
            return
        rows = max(1, _BLOCK_BYTES // (8 * len(bands) * w))
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            block = raster.read((r0, r1), (0, w), bands)
            invalid = np.isnan(block) if block.dtype.kind == "f" else np.zeros(block.shape, bool)
            if nodata is not None:
                invalid |= block == nodata
            labels[r0:r1][invalid.all(axis=0)] = label


def predict_geotiff(
    model: nn.Module,
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    tile: int | Sequence[int] = 512,
    overlap: float = 0.25,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    bands: Sequence[int] | None = None,
    band_map: Mapping[str, int] | None = None,
    indices: Sequence[str] = (),
    blend: str = "gaussian",
    batch_size: int = 4,
    nodata_label: int | None = 255,
    compress: str | None = "deflate",
    device: torch.device | str | None = None,
    progress: bool = False,
    backend: str = "auto",
) -> GeoInfo:
    """Segment a whole scene with bounded memory and write the class map as a GeoTIFF with the scene's georeference.

    The scene is predicted by :func:`maskworks.inference.predict_large_image` (windows blended as by
    :func:`~maskworks.inference.sliding_window`, read and labelled strip by strip), then written as a
    single-band uint8 GeoTIFF with the source's transform and CRS. The model's input is made from the file's raw
    pixel values, window by window: ``bands`` selected, nodata and NaN pixels replaced by the band's ``mean``,
    ``indices`` appended (computed on the selected bands, as :func:`add_indices` with ``band_map``), then
    ``(x - mean) / std`` per channel. Sources in a pixel type the large-image reader does not take (int16,
    int32, ...) or a compression tifffile cannot decode are first copied to an uncompressed temporary TIFF beside
    ``dst_path``, block by block.

    Args:
        model: the segmentation model (logits ``(N, K, h, w)``), on ``device``.
        src_path: the scene (GeoTIFF).
        dst_path: the class map to write (``.tif``).
        num_classes: K (default: the model's ``num_classes``); 1 means binary (sigmoid > 0.5).
        tile: window size, one int or ``(h, w)``.
        overlap: window overlap fraction in [0, 1).
        mean: per input channel (selected bands, then indices), in the file's pixel units, as
            :func:`band_statistics` gives them (default 0).
        std: likewise (default 1).
        bands: 0-based file bands the model takes, in order (default: all).
        band_map: band name -> index in the selected bands, for ``indices``.
        indices: names in :data:`SPECTRAL_INDICES` appended as extra channels.
        blend: ``"gaussian"`` or ``"constant"`` window blending.
        batch_size: windows per model call.
        nodata_label: written where every selected band is nodata (or NaN), and declared the output's nodata
            value; None: those pixels keep their predicted class and no nodata value is written.
        compress: compression of the output (see :func:`write_geotiff`).
        device: the device the model runs on (default: the model's).
        progress: show the large-image path's progress bar over the window batches.
        backend: how the GeoTIFFs are read and written (see :func:`read_geotiff`).

    Returns:
        The :class:`GeoInfo` written.

    Raises:
        ValueError: bad options (lengths of ``mean`` / ``std``, bands, indices, ``num_classes`` above 255,
            ``nodata_label`` that is a class).
        FileNotFoundError: the source or the destination folder does not exist.
    """
    from maskworks.inference.large import predict_large_image

    src, dst = Path(src_path), Path(dst_path)
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output folder {dst.parent} does not exist (for {dst})")
    info, (c, _, _), dtype = read_geoinfo(src, backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    k = _output_classes(model, num_classes)
    if nodata_label is not None:
        if isinstance(nodata_label, bool) or not isinstance(nodata_label, Integral) or not 0 <= nodata_label <= 255:
            raise ValueError(f"nodata_label must be None or an int in 0..255, got {nodata_label!r}")
        if nodata_label < max(k, 2):
            raise ValueError(f"nodata_label {nodata_label} is one of the {max(k, 2)} classes; pick a label above them")
    selected = _check_bands(bands, c)
    pairs = _index_pairs(band_map or {}, indices, len(selected)) if indices else []
    channels = len(selected) + len(pairs)
    mean = [0.0] * channels if mean is None else [float(v) for v in mean]
    std = [1.0] * channels if std is None else [float(v) for v in std]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need {channels} values ({len(selected)} bands + {len(pairs)} indices), got {len(mean)} "
            f"and {len(std)}"
        )
    if not all(s > 0 and math.isfinite(s) for s in std) or not all(math.isfinite(m) for m in mean):
        raise ValueError(f"mean must be finite and std positive, got mean {mean} and std {std}")
    net = _ScenePreprocess(model, None if bands is None else selected, pairs, mean, std, info.nodata)

    temporaries = [_temporary(dst, ".labels.npy"), _temporary(dst, ".source.tif")]
    labels_path, converted = temporaries
    try:
        source = src
        if not _readable_source(src, dtype):
            dtype, source = _convert_source(src, converted, backend), converted
        scale = _READER_SCALES.get(dtype, 1.0)  # the reader divides by it; std = 1 / scale gives raw values back
        predict_large_image(
            net,
            source,
            labels_path,
            window=tile,
            overlap=overlap,
            num_classes=k,
            blend=blend,
            batch_size=batch_size,
            mean=[0.0] * c,
            std=[1.0 / scale] * c,
            device=device,
            progress=progress,
        )
        labels = np.load(labels_path, mmap_mode="r+")
        if nodata_label is not None:
            _mark_nodata(labels, src, selected, info.nodata, backend, nodata_label)
            labels.flush()
        out = GeoInfo(
            transform=info.transform,
            epsg=info.epsg,
            wkt=info.wkt,
            geographic=info.geographic,
            pixel_is_point=info.pixel_is_point,
            nodata=nodata_label,
            descriptions=("class",),
            geokeys=info.geokeys,
        )
        write_geotiff(dst, labels[None], out, compress=compress, backend=backend)
        del labels
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
    return out

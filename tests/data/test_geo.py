"""Satellite toolkit: GeoTIFF round trips (tifffile tags, rasterio cross-reads), spectral indices, streamed band
statistics, N-band model inputs, and scene prediction to a GeoTIFF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import maskworks
from maskworks.data import geo
from maskworks.data.geo import (
    SENTINEL2_L1C_BANDS,
    GeoInfo,
    adapt_model_input,
    add_indices,
    band_statistics,
    ndvi,
    ndwi,
    normalized_difference,
    predict_geotiff,
    read_geoinfo,
    read_geotiff,
    write_geotiff,
)

pytest.importorskip("tifffile")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKENDS = [
    "tifffile",
    pytest.param("rasterio", marks=pytest.mark.skipif(geo._backend("auto") != "rasterio", reason="no rasterio")),
]

# (array, GeoInfo): a projected UTM scene with nodata and band names; a geographic raster with a rotated transform
# (written as ModelTransformation) and NaN nodata; a PixelIsPoint raster
rng = np.random.default_rng(0)
CASES = {
    "projected": (
        rng.integers(0, 10000, (4, 19, 23)).astype(np.uint16),
        GeoInfo(
            (399960.0, 10.0, 0.0, 5000040.0, 0.0, -10.0), epsg=32633, nodata=0, descriptions=("B2", "B3", "B4", "B8")
        ),
    ),
    "geographic": (
        rng.normal(size=(2, 17, 21)).astype(np.float32),
        GeoInfo((10.25, 0.001, 0.0002, 45.5, 0.0001, -0.001), epsg=4326, nodata=math.nan),
    ),
    "point": (
        rng.integers(-500, 500, (1, 16, 32)).astype(np.int16),
        GeoInfo((500000.0, 30.0, 0.0, 4100000.0, 0.0, -30.0), epsg=32611, pixel_is_point=True, nodata=-9999),
    ),
}


def same_info(a: GeoInfo, b: GeoInfo) -> None:
    assert a.transform == pytest.approx(b.transform, rel=0, abs=1e-9)
    assert (a.epsg, a.pixel_is_point, a.descriptions) == (b.epsg, b.pixel_is_point, b.descriptions)
    assert a.nodata == b.nodata or (math.isnan(a.nodata) and math.isnan(b.nodata))


# ------------------------------------------------------------------------------------------------------ GeoTIFF


@pytest.mark.parametrize("case", sorted(CASES))
def test_tifffile_round_trip_keeps_pixels_and_georeference(tmp_path, case):
    array, info = CASES[case]
    path = write_geotiff(tmp_path / "a.tif", array, info, backend="tifffile")
    back, got = read_geotiff(path, backend="tifffile")
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    same_info(got, info)
    assert got.geographic is (case == "geographic")
    assert read_geoinfo(path, backend="tifffile")[1:] == (array.shape, array.dtype)

    import tifffile

    with tifffile.TiffFile(path) as tif:
        tags = {t.code: t.value for t in tif.pages.first.tags.values()}
    keys = dict(zip(tags[34735][4::4], tags[34735][7::4]))  # GeoKey id -> inline value
    assert keys[1025] == (2 if case == "point" else 1)  # GTRasterTypeGeoKey
    assert keys[2048 if case == "geographic" else 3072] == info.epsg
    if case == "geographic":  # a rotation is stored as ModelTransformation, the x row first
        assert tags[34264][:4] == pytest.approx((0.001, 0.0002, 0.0, 10.25))
    if case == "point":  # PixelIsPoint files store the centre of the first pixel (GDAL's convention)
        assert tags[33922][3:5] == pytest.approx((500015.0, 4099985.0))


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_cross_read_between_tifffile_and_rasterio(tmp_path, case):
    pytest.importorskip("rasterio")
    array, info = CASES[case]
    for writer, reader in (("tifffile", "rasterio"), ("rasterio", "tifffile")):
        path = write_geotiff(tmp_path / f"{writer}.tif", array, info, compress="lzw", backend=writer)
        back, got = read_geotiff(path, backend=reader)
        np.testing.assert_array_equal(back, array)
        assert back.dtype == array.dtype
        same_info(got, info)


def test_crs_without_epsg_code_survives_the_tifffile_backend(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.crs import CRS

    crs = CRS.from_proj4("+proj=laea +lat_0=52 +lon_0=10 +x_0=4321000 +y_0=3210000 +ellps=GRS80 +units=m")
    info = GeoInfo((4000000.0, 100.0, 0.0, 3000000.0, 0.0, -100.0), wkt=crs.to_wkt())
    array = np.arange(6 * 8, dtype=np.uint8).reshape(1, 6, 8)
    write_geotiff(tmp_path / "a.tif", array, info, backend="rasterio")
    back, got = read_geotiff(tmp_path / "a.tif", backend="tifffile")  # the GeoKeys are kept, as read
    assert got.epsg is None and got.geokeys
    write_geotiff(tmp_path / "b.tif", back, got)  # "auto" picks tifffile for a GeoKeys-only CRS
    with rasterio.open(tmp_path / "b.tif") as src:
        assert src.crs == crs
        assert src.transform.to_gdal() == pytest.approx(info.transform)


def test_window_reads_decode_only_the_window_and_shift_the_transform(tmp_path):
    array, info = CASES["projected"]
    path = write_geotiff(tmp_path / "t.tif", np.pad(array, ((0, 0), (0, 13), (0, 9))), info, tile=16)
    part, sub = read_geotiff(path, bands=[3, 1], window=(5, 7, 9, 11), backend="tifffile")
    np.testing.assert_array_equal(part, array[[3, 1], 5:14, 7:18])
    assert sub.xy(0, 0) == pytest.approx(info.xy(5, 7))
    assert sub.descriptions == ("B8", "B3")
    with pytest.raises(ValueError, match="window"):
        read_geotiff(path, window=(30, 0, 5, 5), backend="tifffile")
    with pytest.raises(ValueError, match="bands"):
        read_geotiff(path, bands=[4], backend="tifffile")


def test_write_errors_name_the_problem(tmp_path):
    array, info = CASES["projected"]
    with pytest.raises(ValueError, match="float16"):
        write_geotiff(tmp_path / "a.tif", array.astype(np.float16), info)
    with pytest.raises(ValueError, match="descriptions"):
        write_geotiff(tmp_path / "a.tif", array[:2], info)
    with pytest.raises(ValueError, match="EPSG"):
        write_geotiff(tmp_path / "a.tif", array, GeoInfo(info.transform, wkt='LOCAL_CS["x"]'), backend="tifffile")
    with pytest.raises(ValueError, match="singular"):
        GeoInfo((0.0, 1.0, 0.0, 0.0, 0.0, 0.0))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- spectral indices


def test_ndvi_and_ndwi_are_exact_on_hand_made_bands():
    nir = np.array([[3, 1, 0], [5, 0, 7]], dtype=np.uint16)
    red = np.array([[1, 3, 0], [0, 7, 1]], dtype=np.uint16)
    expected = np.array([[0.5, -0.5, 0.0], [1.0, -1.0, 0.75]], dtype=np.float32)  # 0 where nir + red == 0
    out = ndvi(nir, red)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)  # uint16 1 - 3 does not wrap around
    np.testing.assert_array_equal(ndvi(torch.from_numpy(nir.astype(np.int32)), torch.from_numpy(red)), expected)
    np.testing.assert_array_equal(ndwi(red, nir), -expected)  # McFeeters: (green - nir) / (green + nir)
    np.testing.assert_array_equal(normalized_difference([1.0, 2.0], [-1.0, 2.0], fill=-2.0), [-2.0, 0.0])
    np.testing.assert_array_equal(normalized_difference([0.25, 3.0], [0.0, 1.0], eps=0.5), [0.0, 0.5])
    assert np.isnan(ndvi(np.array([np.nan]), np.array([1.0]))).all()


def test_add_indices_appends_channels_in_order():
    bands = np.random.default_rng(1).integers(0, 4000, (2, 13, 5, 6)).astype(np.uint16)
    out = add_indices(bands, SENTINEL2_L1C_BANDS, ("ndwi", "ndvi"))
    assert out.shape == (2, 15, 5, 6) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :13], bands)
    np.testing.assert_array_equal(out[:, 13], ndwi(bands[:, 2], bands[:, 7]))
    np.testing.assert_array_equal(out[:, 14], ndvi(bands[:, 7], bands[:, 3]))
    torch_out = add_indices(torch.from_numpy(bands[0].astype(np.float32)), SENTINEL2_L1C_BANDS, ("ndvi",))
    np.testing.assert_array_equal(torch_out.numpy(), out[0, [*range(13), 14]])
    with pytest.raises(ValueError, match="swir1"):
        add_indices(bands, {"green": 0, "nir": 1}, ("mndwi",))
    with pytest.raises(ValueError, match="unknown spectral index"):
        add_indices(bands, SENTINEL2_L1C_BANDS, ("evi",))


# --------------------------------------------------------------------------------------------- band statistics


def test_band_statistics_streamed_equal_numpy_on_concatenated_valid_data(tmp_path, monkeypatch):
    r = np.random.default_rng(2)
    a = r.normal(1000, 50, (3, 40, 17))
    a[:, 3:9, 2:5] = -1.0  # the file's nodata
    a[1, 20:, :] = -1.0
    b = r.normal(-3, 2, (3, 11, 29)).astype(np.float32)
    b[2, 0, :7] = np.nan
    path = write_geotiff(tmp_path / "a.tif", a, GeoInfo((100.0, 1.0, 0.0, 200.0, 0.0, -1.0), nodata=-1.0))
    monkeypatch.setattr(geo, "_BLOCK_BYTES", 8 * 3 * 17 * 7)  # 7-row blocks: the update across blocks is tested
    stats = band_statistics([path, b])
    for c in range(3):
        values = np.concatenate([a[c][a[c] != -1.0], b[c][~np.isnan(b[c])].astype(np.float64)])
        assert stats.count[c] == values.size
        assert stats.mean[c] == pytest.approx(values.mean(), rel=1e-12)
        assert stats.std[c] == pytest.approx(values.std(), rel=1e-10)
    # an explicit nodata overrides the file's: -1 is then a value like any other
    whole = band_statistics(a, nodata=1e9)
    np.testing.assert_allclose(whole.mean, a.reshape(3, -1).mean(1), rtol=1e-12)
    with pytest.raises(ValueError, match="has 2 band"):
        band_statistics([a, b[:2]])
    with pytest.raises(ValueError, match="no valid pixel"):
        band_statistics(np.full((2, 4, 4), np.nan))


# ----------------------------------------------------------------------------------------------- N-band models


def test_adapt_model_input_keeps_the_pretrained_response():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 56)
    # BiSeNetV2 feeds the image to two branches: both stems must be adapted
    model = maskworks.create_model("bisenetv2", num_classes=3).eval()
    with torch.no_grad():
        ref = model(x)
        adapt_model_input(model, 6)
        out = model(torch.cat([x, x], 1))  # the 3 bands twice: weights repeated and halved give the same response
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert model.in_channels == 6 and model.maskworks_config["kwargs"]["in_channels"] == 6
    rebuilt = maskworks.create_model(model.maskworks_config["name"], **model.maskworks_config["kwargs"])
    rebuilt.load_state_dict(model.state_dict())  # strict: a checkpoint of the adapted model rebuilds

    grey = x[:, :1]
    model = maskworks.create_model("unet", encoder="resnet18", num_classes=2).eval()
    with torch.no_grad():
        ref = model(grey.expand(-1, 3, -1, -1))
        adapt_model_input(model, 1)  # one band: the filters summed over RGB
        out = model(grey)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert model.encoder.in_channels == 1 and model.encoder.conv1.weight.shape[1] == 1


def test_adapt_model_input_refuses_a_model_that_cannot_take_the_bands_and_leaves_it_unchanged():
    class TwoStems(nn.Module):  # the second stem sees the image only after a 3-band-only step
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.a(x) + self.b(x * torch.ones(1, 3, 1, 1))

    model = TwoStems()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot adapt TwoStems from 3 to 5"):
        adapt_model_input(model, 5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.a.in_channels == 3 and model.a.weight.shape == (2, 3, 1, 1)


# -------------------------------------------------------------------------------------------- scene prediction


def pointwise(in_channels: int, classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(in_channels, 8, 1), nn.Tanh(), nn.Conv2d(8, classes, 1)).eval()


def direct(model, raw: np.ndarray, nodata, mean, std, band_map=None, indices=()) -> np.ndarray:
    """Whole-image labels computed the documented way: nodata / NaN -> band mean, indices, normalise, argmax."""
    x = torch.from_numpy(raw.astype(np.float32))
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    invalid = torch.isnan(x) | (x == nodata if nodata is not None else torch.zeros_like(x, dtype=torch.bool))
    x = torch.where(invalid, m[: x.shape[0]].expand_as(x), x)
    if indices:
        x = add_indices(x, band_map, indices)
    with torch.no_grad():
        labels = model(((x - m) / s)[None])[0].argmax(0).numpy().astype(np.uint8)
    labels[invalid.all(0).numpy()] = 255
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_geotiff_equals_whole_image_prediction_and_keeps_the_georeference(tmp_path, backend):
    r = np.random.default_rng(3)
    raw = r.integers(1, 5000, (5, 37, 45)).astype(np.uint16)
    raw[:, :4, :6] = 0  # nodata in every band: the output's nodata
    raw[2, 20:23, 30:40] = 0  # in one band only: filled with its mean, still predicted
    info = GeoInfo((600000.0, 20.0, 0.0, 5200000.0, 0.0, -20.0), epsg=32632, nodata=0, pixel_is_point=True)
    src = write_geotiff(tmp_path / "scene.tif", raw, info, backend=backend)
    bands, band_map = [4, 2, 1], {"nir": 0, "red": 1, "green": 2}  # the model's bands: B8, B4, B3 of a S2 stack
    stats = band_statistics(raw[bands], nodata=0)
    mean, std = [*stats.mean, 0.0, 0.0], [*stats.std, 0.5, 0.5]
    model = pointwise(5, 4)
    written = predict_geotiff(
        model,
        src,
        tmp_path / "classes.tif",
        num_classes=4,
        tile=16,
        overlap=0.25,
        mean=mean,
        std=std,
        bands=bands,
        band_map=band_map,
        indices=("ndvi", "ndwi"),
        batch_size=3,
        backend=backend,
    )
    labels, got = read_geotiff(tmp_path / "classes.tif", backend=backend)
    assert labels.shape == (1, 37, 45) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels[0], direct(model, raw[bands], 0, mean, std, band_map, ("ndvi", "ndwi")))
    assert (labels[0, :4, :6] == 255).all() and (labels[0, 20:23, 30:40] < 4).all()
    assert got.transform == info.transform and got.epsg == 32632 and got.pixel_is_point
    assert got.nodata == 255 and written.nodata == 255
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.tif", "scene.tif"]  # no temporary left


def test_predict_geotiff_converts_pixel_types_the_large_image_reader_does_not_take(tmp_path):
    r = np.random.default_rng(4)
    raw = r.integers(-2000, 2000, (3, 21, 26)).astype(np.int16)
    raw[1, 5, 5] = -9999
    info = GeoInfo((5.0, 0.01, 0.0, 50.0, 0.0, -0.01), epsg=4326, nodata=-9999)
    src = write_geotiff(tmp_path / "dem.tif", raw, info, backend="tifffile")
    model = pointwise(3, 2, seed=1)
    mean, std = [0.0, 10.0, -5.0], [900.0, 1100.0, 1000.0]
    predict_geotiff(
        model, src, tmp_path / "out.tif", num_classes=2, tile=(8, 12), mean=mean, std=std, backend="tifffile"
    )
    labels, got = read_geotiff(tmp_path / "out.tif", backend="tifffile")
    np.testing.assert_array_equal(labels[0], direct(model, raw, -9999, mean, std))
    assert got.transform == info.transform and got.epsg == 4326 and got.geographic
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        predict_geotiff(model, src, tmp_path / "x.tif", num_classes=2, mean=[0.0], std=[1.0])
    with pytest.raises(ValueError, match="nodata_label 1"):
        predict_geotiff(model, src, tmp_path / "x.tif", num_classes=2, nodata_label=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dem.tif", "out.tif"]

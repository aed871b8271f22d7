"""Published weights end to end, without the internet: a torchvision-style file served from 127.0.0.1, and a
pre-populated huggingface_hub cache used offline. Both hold randomly initialised reference models; the models
built with ``pretrained=`` / ``encoder_weights=`` must give the reference's features."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import maskworks.hub.table as table_module
from maskworks import create_model, load_model, load_weights, save_model
from maskworks.hub import (
    ChecksumError,
    WeightsUnavailable,
    fetch_weights,
    find_pretrained,
    hub_cache_dir,
    manual_path,
    weights_dir,
)

_TV_ENUM = "ResNet34_Weights.IMAGENET1K_V1"


# --------------------------------------------------------------------------------------------------- fixtures


class _Server:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1 and counts the requests per path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self.chunk_delay = 0.0  # seconds between the 8 pieces of a body (keeps downloads in flight together)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                server.requests[self.path] += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not server.chunk_delay:
                    self.wfile.write(body)
                    return
                step = -(-len(body) // 8)
                for start in range(0, len(body), step):
                    self.wfile.write(body[start : start + step])
                    self.wfile.flush()
                    time.sleep(server.chunk_delay)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh MASKWORKS_HOME per test, online, no Hugging Face cache settings, no proxy for 127.0.0.1."""
    root = tmp_path / "home"
    monkeypatch.setenv("MASKWORKS_HOME", str(root))
    for var in ("MASKWORKS_OFFLINE", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return root


@pytest.fixture(scope="module")
def tv_resnet34():
    """A random torchvision ResNet-34, its saved bytes and their SHA-256."""
    from torchvision.models import resnet34

    torch.manual_seed(0)
    ref = resnet34(weights=None).eval()
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    data = buffer.getvalue()
    return ref, data, hashlib.sha256(data).hexdigest()


def _serve_as_torchvision(monkeypatch, server: _Server, data: bytes, name_hash: str) -> str:
    """Serve ``data`` as ``/models/resnet34-<name_hash[:8]>.pth`` and point the torchvision row at it."""
    path = f"/models/resnet34-{name_hash[:8]}.pth"
    server.files[path] = data
    url = server.url + path
    real = table_module.torchvision_weights_url
    monkeypatch.setattr(table_module, "torchvision_weights_url", lambda w: url if w == _TV_ENUM else real(w))
    return url


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _assert_features_equal(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Our ResNet's five maps equal those of a torchvision / timm ResNet (``conv1``...``layer4``)."""
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = ours.eval().forward_intermediates(x)
        y = ref.act1(ref.bn1(ref.conv1(x))) if hasattr(ref, "act1") else ref.relu(ref.bn1(ref.conv1(x)))
        expected = [y]
        y = ref.maxpool(y)
        for layer in (ref.layer1, ref.layer2, ref.layer3, ref.layer4):
            y = layer(y)
            expected.append(y)
    assert len(feats) == 5
    for a, b in zip(feats, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------- URLs


def test_url_download_once_verified_and_loaded_like_torchvision(home, server, tv_resnet34, monkeypatch):
    ref, data, sha = tv_resnet34
    url = _serve_as_torchvision(monkeypatch, server, data, sha)

    model = create_model("resnet34", pretrained=True)
    assert server.total == 1
    cached = weights_dir() / f"resnet34-{sha[:8]}.pth"
    assert cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == sha
    assert manual_path(find_pretrained("resnet34")) == cached
    assert not [p for p in _files(home) if p.name.endswith(".partial")]
    _assert_features_equal(model, ref)
    assert model.maskworks_config == {"name": "resnet34", "kwargs": {"pretrained": True}}

    # the cache is used from now on: the encoder of a U-Net, a 1-channel encoder (first conv adapted), by tag
    unet = create_model("unet", encoder="resnet34", encoder_weights="imagenet", num_classes=3)
    gray = create_model("unet", encoder="resnet34", encoder_weights="tv_in1k", in_channels=1, num_classes=2)
    assert server.total == 1 and server.requests[url[len(server.url) :]] == 1
    _assert_features_equal(unet.encoder, ref)
    torch.testing.assert_close(gray.encoder.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(gray.encoder.layer4[2].conv2.weight, ref.layer4[2].conv2.weight)

    # checkpoints keep the trained weights, not where the initial ones came from: rebuilding downloads nothing
    for built, kwargs in ((unet, {"encoder": "resnet34", "num_classes": 3}), (model, {})):
        path = save_model(built, home / "ckpt" / built.maskworks_config["name"])
        assert json.loads(path.with_suffix(".json").read_text())["kwargs"] == kwargs
        loaded = load_model(path)
        _assert_features_equal(getattr(loaded, "encoder", loaded), ref)
    assert server.total == 1


def test_checksum_mismatch_raises_and_leaves_nothing(home, server, tv_resnet34, monkeypatch):
    _, data, sha = tv_resnet34
    url = _serve_as_torchvision(monkeypatch, server, data, hashlib.sha256(b"other bytes").hexdigest())
    with pytest.raises(ChecksumError) as info:
        create_model("resnet34", pretrained=True)
    assert isinstance(info.value, WeightsUnavailable) and isinstance(info.value, OSError)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert server.total == 1
    assert _files(home) == []


def test_offline_empty_cache_names_url_and_path_then_manual_file_loads(home, server, tv_resnet34, monkeypatch):
    ref, data, sha = tv_resnet34
    url = _serve_as_torchvision(monkeypatch, server, data, sha)
    monkeypatch.setenv("MASKWORKS_OFFLINE", "1")
    expected_path = weights_dir() / f"resnet34-{sha[:8]}.pth"
    with pytest.raises(WeightsUnavailable) as info:
        create_model("unet", encoder="resnet34", encoder_weights="imagenet")
    message = str(info.value)
    assert url in message and str(expected_path) in message and "MASKWORKS_OFFLINE" in message
    assert "\n" not in message
    assert info.value.path == expected_path and info.value.source == url
    assert server.total == 0

    expected_path.parent.mkdir(parents=True)
    expected_path.write_bytes(data)  # downloaded by hand
    model = create_model("resnet34", pretrained=True)
    _assert_features_equal(model, ref)
    assert server.total == 0


def test_corrupted_cached_file_is_refetched(home, server, tv_resnet34, monkeypatch):
    ref, data, sha = tv_resnet34
    _serve_as_torchvision(monkeypatch, server, data, sha)
    create_model("resnet34", pretrained=True)
    cached = weights_dir() / f"resnet34-{sha[:8]}.pth"
    assert server.total == 1

    cached.write_bytes(b"\0" * 1000 + data[1000 : len(data) // 2])  # damaged and truncated
    monkeypatch.setenv("MASKWORKS_OFFLINE", "true")
    with pytest.raises(ChecksumError, match="does not match its SHA-256 prefix") as info:
        create_model("resnet34", pretrained=True)
    assert str(cached) in str(info.value)
    assert server.total == 1

    monkeypatch.delenv("MASKWORKS_OFFLINE")
    model = create_model("resnet34", pretrained=True)
    assert server.total == 2
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha
    _assert_features_equal(model, ref)


def test_concurrent_downloads_both_end_with_the_whole_file(home, server, tv_resnet34, monkeypatch):
    """Two downloads of one file at once (each writes its own temporary file, renamed into place when complete and
    verified): both return the verified file, and no partial file is left."""
    _, data, sha = tv_resnet34
    _serve_as_torchvision(monkeypatch, server, data, sha)
    server.chunk_delay = 0.05
    entry = find_pretrained("resnet34")
    results, errors = [], []

    def fetch():
        try:
            results.append(fetch_weights(entry, progress=False))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert server.total == 2  # both were in flight before either finished
    assert hashlib.sha256(results[0].read_bytes()).hexdigest() == sha
    assert [p.name for p in _files(weights_dir()) if not p.parent.name == ".verified"] == [results[0].name]


def test_unreachable_server_names_url_and_path(home, server, monkeypatch):
    url = server.url + "/models/resnet34-0123abcd.pth"  # nothing served there: HTTP 404
    monkeypatch.setattr(table_module, "torchvision_weights_url", lambda w: url)
    with pytest.raises(WeightsUnavailable, match="HTTP 404") as info:
        create_model("resnet34", pretrained=True)
    assert url in str(info.value) and str(weights_dir() / "resnet34-0123abcd.pth") in str(info.value)
    assert _files(home) == []


def test_whole_model_weights_build_the_rows_architecture(home, monkeypatch):
    """``deeplabv3`` ``coco_voc``: the row's architecture (21 classes, auxiliary head, output stride 8) is built and
    the file, picked up where a manual download goes, fills it. The layout is torchvision's ``deeplabv3_resnet50``,
    at full size on the meta device (the numbers of that conversion are checked in tests/convert)."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    with torch.device("meta"):
        ref = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    url = f"http://127.0.0.1:9/models/deeplabv3_resnet50_coco-{sha[:8]}.pth"
    real = table_module.torchvision_weights_url
    monkeypatch.setattr(table_module, "torchvision_weights_url", lambda w: url if "ResNet50" in w else real(w))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # either variable turns downloads off
    path = weights_dir() / f"deeplabv3_resnet50_coco-{sha[:8]}.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(buffer.getvalue())

    with torch.device("meta"):
        model = create_model("deeplabv3", pretrained="coco_voc", in_channels=4)
    assert model.maskworks_config["kwargs"] == {
        "encoder": "resnet50",
        "num_classes": 21,
        "aux": True,
        "output_stride": 8,
        "in_channels": 4,
        "pretrained": "coco_voc",
    }
    assert model.segmentation_head[0].out_channels == 21 and model.aux_classifier is not None
    assert model.encoder.conv1.in_channels == 4
    with pytest.raises(ValueError, match="num_classes=5"):
        create_model("deeplabv3", pretrained=True, num_classes=5)


# --------------------------------------------------------------------------------------------------- hub


def _populate_hub_cache(cache: Path, repo: str, filename: str, data: bytes, revision: str = "a" * 40) -> Path:
    """Lay out a huggingface_hub cache entry as hf_hub_download leaves it: the blob named by its SHA-256, the
    snapshot file a relative symlink to it, ``refs/main`` the commit."""
    sha = hashlib.sha256(data).hexdigest()
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / sha).write_bytes(data)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / filename).symlink_to(os.path.join("..", "..", "blobs", sha))
    return folder / "blobs" / sha


@pytest.fixture(scope="module")
def timm_resnet34():
    timm = pytest.importorskip("timm")
    from safetensors.torch import save

    torch.manual_seed(1)
    ref = timm.create_model("resnet34", pretrained=False).eval()
    return ref, save({k: v.contiguous() for k, v in ref.state_dict().items()})


def test_hub_weights_from_the_cache_offline(home, monkeypatch, timm_resnet34):
    ref, data = timm_resnet34
    # no HF_HUB_CACHE / HF_HOME: the hub cache is under MASKWORKS_HOME
    assert hub_cache_dir() == home / "hub"
    blob = _populate_hub_cache(home / "hub", "timm/resnet34.a1_in1k", "model.safetensors", data)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    model = create_model("resnet34", pretrained="a1_in1k")
    _assert_features_equal(model, ref)
    unet = create_model("unet", encoder="resnet34", encoder_weights="a1_in1k", num_classes=2)
    _assert_features_equal(unet.encoder, ref)

    # a damaged blob is caught by its LFS object id (offline: an error naming the file, nothing re-fetched)
    blob.write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumError, match="does not match its SHA-256") as info:
        create_model("resnet34", pretrained="a1_in1k")
    assert blob.name in str(info.value)


def test_hub_cache_follows_hf_hub_cache(home, tmp_path, monkeypatch, timm_resnet34):
    ref, data = timm_resnet34
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf"
    _populate_hub_cache(tmp_path / "hf", "timm/resnet34.a2_in1k", "model.safetensors", data)
    monkeypatch.setenv("MASKWORKS_OFFLINE", "1")
    _assert_features_equal(create_model("resnet34", pretrained="a2_in1k"), ref)


def test_hub_offline_not_cached_names_repo_and_path_then_manual_file_loads(home, monkeypatch, timm_resnet34):
    ref, data = timm_resnet34
    monkeypatch.setenv("MASKWORKS_OFFLINE", "1")
    expected = weights_dir() / "timm--resnet34.a3_in1k" / "model.safetensors"
    with pytest.raises(WeightsUnavailable) as info:
        create_model("resnet34", pretrained="a3_in1k")
    message = str(info.value)
    assert "timm/resnet34.a3_in1k" in message and str(expected) in message and "\n" not in message
    assert info.value.path == expected

    expected.parent.mkdir(parents=True)
    expected.write_bytes(data)
    _assert_features_equal(create_model("resnet34", pretrained="a3_in1k"), ref)


# --------------------------------------------------------------------------------------------------- arguments


def test_tags_paths_and_errors(home, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown weights tag 'imagenet21k'.*a1_in1k.*tv_in1k"):
        create_model("unet", encoder="resnet34", encoder_weights="imagenet21k")
    with pytest.raises(ValueError, match="has no published weights.*encoder_weights='imagenet'"):
        create_model("unet", pretrained=True)
    with pytest.raises(ValueError, match="test-size"):
        create_model("vit_test_patch16", pretrained=True)
    # path-like strings stay paths (the error is load_weights' FileNotFoundError, not a tag lookup)
    for path in ("weights/r34.pth", "r34.safetensors", str(tmp_path / "missing")):
        with pytest.raises(FileNotFoundError):
            create_model("unet", encoder="resnet34", encoder_weights=path)
    # a local file keeps loading as it always did, for pretrained= too
    src = create_model("resnet34")
    path = tmp_path / "r34.pth"
    torch.save(src.state_dict(), path)
    loaded = create_model("resnet34", pretrained=path)
    torch.testing.assert_close(loaded.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    assert loaded.maskworks_config["kwargs"] == {"pretrained": str(path)}
    with pytest.raises(TypeError, match="weights must be True, a tag or a path"):
        create_model("resnet34", pretrained=3)
    # a folder named like a tag does not make the tag a path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tv_in1k").mkdir()
    monkeypatch.setenv("MASKWORKS_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="resnet34.tv_in1k"):
        create_model("resnet34", pretrained="tv_in1k")


def test_default_and_requires_pick_the_row():
    assert find_pretrained("resnet34").tag == "tv_in1k"
    assert find_pretrained("resnet34", "imagenet").tag == "tv_in1k"
    assert find_pretrained("vit_base_patch16_224").tag == "augreg2_in21k_ft_in1k"
    assert find_pretrained("deeplabv3").model_kwargs["encoder"] == "resnet50"
    r101 = find_pretrained("deeplabv3", "coco_voc", {"encoder": "resnet101", "aux": False})
    assert r101.model_kwargs["encoder"] == "resnet101" and "resnet101_coco" in r101.resolve_url()
    with pytest.raises(ValueError, match="encoder='resnet18'"):
        find_pretrained("deeplabv3", True, {"encoder": "resnet18"})
    with pytest.raises(ValueError, match="no ImageNet weights"):
        find_pretrained("deeplabv3", "imagenet")


def test_hybrid_vit_checkpoint_adapts_its_cnn_stem_to_in_channels():
    """A timm R50+ViT checkpoint into a 1-channel model: the image goes through the CNN stem, so that kernel is the
    one summed over its input channels; the patch projection (on the CNN's channels) is left alone."""
    torch.manual_seed(0)
    rgb = create_model("vit_test_r50_s16")
    gray = create_model("vit_test_r50_s16", in_channels=1)
    load_weights(gray, rgb.state_dict(), source="timm", strict=True)
    stem = "patch_embed.backbone.stem.conv.weight"
    torch.testing.assert_close(gray.state_dict()[stem], rgb.state_dict()[stem].sum(1, keepdim=True))
    torch.testing.assert_close(gray.patch_embed.proj.weight, rgb.patch_embed.proj.weight)

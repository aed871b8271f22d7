"""``maskworks serve``'s REST API through FastAPI's test client: every endpoint and every documented error, results
equal to ``maskworks predict`` (semantic: the label PNG bytes; instance and panoptic: the JSON results) and to
``SamPredictor``, the limits (bytes, pixels, queue, time) and the token."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi import HTTPException  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from maskworks.checkpoint import save_model  # noqa: E402
from maskworks.cli.main import main  # noqa: E402
from maskworks.models.promptable import SamPredictor, build_sam  # noqa: E402
from maskworks.registry import create_model  # noqa: E402
from maskworks.serve import SamService, ServedModel, ServeSettings, create_app  # noqa: E402
from maskworks.serve.app import Limiter  # noqa: E402
from maskworks.testing import TINY_MASK2FORMER, TINY_MASK_RCNN, TINY_SAM, perturb_parameters  # noqa: E402

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
META = {
    "class_names": ["background", "disc", "square"],
    "palette": [[0, 0, 0], [230, 40, 40], [40, 200, 60]],
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "in_channels": 3,
    "num_classes": 3,
    "task": "semantic",
    "data_config": {"image_size": 64},
}


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _decode(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


def _image(h: int = 45, w: int = 61, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def semantic_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_parameters(create_model("unet_vanilla", num_classes=3, features=[8, 16, 32]), seed=0, scale=0.3)
    path = tmp_path_factory.mktemp("sem") / "shapes.safetensors"
    save_model(model, path, META)
    return path


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    return perturb_parameters(build_sam(**TINY_SAM), seed=0, scale=0.05).eval()


@pytest.fixture(scope="module")
def client(semantic_ckpt, tiny_sam):
    served = ServedModel.from_checkpoint(semantic_ckpt, device="cpu")
    settings = ServeSettings(token=TOKEN, max_upload_bytes=200_000, max_pixels=300 * 300)
    with TestClient(create_app([served], sam=SamService(tiny_sam, cache_size=2), settings=settings)) as c:
        yield c


def _post_image(client, url, data: bytes, content_type="image/png", headers=AUTH, **form):
    return client.post(url, files={"image": ("x.png", data, content_type)}, data=form, headers=headers)


# ------------------------------------------------------------------------------------------------ endpoints
def test_health_models_docs_and_page(client):
    health = client.get("/health")  # open without the token
    assert health.status_code == 200 and health.json()["models"] == ["shapes"] and health.json()["sam"] is True
    info = client.get("/models", headers=AUTH).json()
    (m,) = info["models"]
    assert m["name"] == "shapes" and m["task"] == "semantic" and m["architecture"] == "unet_vanilla"
    assert m["classes"] == META["class_names"] and m["palette"] == META["palette"] and m["input_size"] == [64, 64]
    assert info["sam"]["architecture"] == "Sam" or info["sam"]["image_size"] == 256
    assert info["limits"] == {
        "max_upload_bytes": 200_000,
        "max_pixels": 90_000,
        "max_concurrency": 1,
        "max_queue": 8,
        "timeout_s": 60.0,
    }
    assert "token" not in json.dumps(info)
    schema = client.get("/openapi.json").json()
    assert {"/health", "/models", "/predict/{model}", "/sam/embed", "/sam/predict"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/static/app.js").status_code == 200
    for bad in ("/static/../app.py", "/static/%2e%2e%2fapp.py", "/static/app.py", "/static/..%2F..%2Fetc%2Fpasswd"):
        r = client.get(bad)
        assert r.status_code == 404 and "detail" in r.json(), bad


def test_semantic_prediction_equals_maskworks_predict_bit_for_bit(client, semantic_ckpt, tmp_path):
    image = _image()
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "scene.png")
    for options, flags in (
        ({}, []),
        ({"tile": "32", "overlap": "0.5", "tta": "flip"}, ["--tile", "32", "--overlap", "0.5", "--tta", "flip"]),
    ):
        out = tmp_path / f"out{len(flags)}"
        assert main(["predict", str(tmp_path / "in"), "--checkpoint", str(semantic_ckpt), "--out", str(out),
                     "--device", "cpu", *flags]) == 0  # fmt: skip
        expected = (out / "scene_label.png").read_bytes()
        r = _post_image(client, "/predict/shapes", (tmp_path / "in" / "scene.png").read_bytes(), **options)
        assert r.status_code == 200, r.text
        body = r.json()
        assert base64.b64decode(body["label_png"]) == expected  # the same PNG file, byte for byte
        labels = np.array(Image.open(out / "scene_label.png"))
        assert body["width"] == 61 and body["height"] == 45
        counts = np.bincount(labels.ravel(), minlength=3)
        assert [c["pixels"] for c in body["classes"]] == counts.tolist()
        assert sum(c["share"] for c in body["classes"]) == pytest.approx(1.0)
        colors = _decode(body["color_png"])
        assert colors.shape == (45, 61, 4) and (colors[..., :3] == np.asarray(META["palette"])[labels]).all()
        raw = _post_image(client, "/predict/shapes?format=png", (tmp_path / "in" / "scene.png").read_bytes(), **options)
        assert raw.headers["content-type"] == "image/png" and raw.content == expected
    assert len(set(np.unique(labels).tolist())) >= 2  # the check compares more than one class


def test_probability_and_entropy_maps(client):
    r = _post_image(client, "/predict/shapes", _png(_image()), probabilities="true", entropy="true")
    body = r.json()
    probs = np.stack([_decode(p) for p in body["probabilities_png"]]).astype(np.int64)
    assert probs.shape == (3, 45, 61) and np.abs(probs.sum(0) - 255).max() <= 2
    labels = np.array(Image.open(io.BytesIO(base64.b64decode(body["label_png"]))))
    assert (np.take_along_axis(probs, labels[None], 0)[0] >= probs.max(0) - 1).all()
    entropy = _decode(body["entropy_png"])
    assert entropy.shape == (45, 61) and entropy.dtype == np.uint8


def test_grayscale_and_rgba_uploads_follow_read_image(client):
    gray = _image()[..., 0]
    rgba = np.dstack([_image(), np.full((45, 61), 128, np.uint8)])
    for arr in (gray, rgba):
        r = _post_image(client, "/predict/shapes", _png(arr))
        assert r.status_code == 200 and r.json()["width"] == 61


# --------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "case, status, words",
    [
        ("not_an_image", 400, "not an image"),
        ("truncated", 400, "truncated"),
        ("empty", 400, "empty"),
        ("text_content_type", 415, "content type"),
        ("too_many_pixels", 413, "pixels"),
        ("too_many_bytes", 413, "upload limit"),
        ("unknown_model", 404, "no model named"),
        ("missing_token", 401, "token"),
        ("wrong_token", 401, "wrong bearer token"),
        ("bad_tile", 422, "tile must be at least 8"),
        ("bad_tta", 422, "tta must be one of"),
        ("missing_image", 422, "image"),
    ],
)
def test_predict_errors_are_json_with_the_documented_status(client, case, status, words):
    good = _png(_image())
    noise = np.random.default_rng(1).integers(0, 256, (200, 260, 3), dtype=np.uint8)  # incompressible: ~156 kB
    url, data, ctype, headers, form = "/predict/shapes", good, "image/png", AUTH, {}
    if case == "not_an_image":
        data = b"GIF89a but not really" * 10
    elif case == "truncated":
        data = _png(noise)[:20_000]
    elif case == "empty":
        data = b""
    elif case == "text_content_type":
        ctype = "text/plain"
    elif case == "too_many_pixels":  # a small file declaring 400 x 400 pixels (above 300 x 300)
        data = _png(np.zeros((400, 400), np.uint8))
        assert len(data) < 5_000
    elif case == "too_many_bytes":
        data = _png(np.random.default_rng(2).integers(0, 256, (250, 350, 3), dtype=np.uint8))
        assert len(data) > 200_000
    elif case == "unknown_model":
        url = "/predict/nope"
    elif case == "missing_token":
        headers = {}
    elif case == "wrong_token":
        headers = {"Authorization": "Bearer guess"}
    elif case == "bad_tile":
        form = {"tile": "4"}
    elif case == "bad_tta":
        form = {"tta": "spin"}
    if case == "missing_image":
        r = client.post(url, headers=headers)
    else:
        r = _post_image(client, url, data, ctype, headers, **form)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and words in body["detail"], body
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_oversized_body_is_refused_while_streaming_without_content_length(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 65536  # 2.6 MB > 200 kB + the form allowance

    r = client.post(
        "/predict/shapes", content=chunks(), headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 413 and "upload limit" in r.json()["detail"]
    r = client.post("/predict/shapes", content=b"x" * 10, headers={**AUTH, "Content-Length": str(10**9)})
    assert r.status_code == 413


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    from maskworks.serve.images import UploadError, decode_upload

    bomb = _png(np.zeros((3000, 3000), np.uint8))  # 9 Mpx of zeros compress to a few kB
    assert len(bomb) < 20_000
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(self.size))
    with pytest.raises(UploadError) as e:
        decode_upload(bomb, max_pixels=1_000_000)
    assert e.value.status == 413 and "3000x3000" in e.value.message and not loaded


# ------------------------------------------------------------------------------------------------------ SAM
def test_sam_embed_and_predict_equal_sam_predictor(client, tiny_sam):
    image = _image(70, 90, seed=3)
    r = _post_image(client, "/sam/embed", _png(image))
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["width"] == 90 and first["height"] == 70 and first["cached"] is False
    again = _post_image(client, "/sam/embed", _png(image)).json()
    assert again["image_id"] == first["image_id"] and again["cached"] is True
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)
    prompts = [
        {"points": [[30.5, 20.0]], "labels": [1]},
        {"points": [[30.5, 20.0], [70, 50]], "labels": [1, 0]},
        {"box": [10, 5, 60, 40]},
        {"points": [[40, 30]], "labels": [1], "box": [10, 5, 60, 40], "multimask": True},
    ]
    for prompt in prompts:
        r = client.post("/sam/predict", json={"image_id": first["image_id"], **prompt}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        multimask = prompt.get("multimask", len(prompt.get("points", [])) == 1 and "box" not in prompt)
        masks, iou, _ = predictor.predict(
            point_coords=np.asarray(prompt["points"], np.float32) if "points" in prompt else None,
            point_labels=np.asarray(prompt["labels"]) if "points" in prompt else None,
            box=np.asarray(prompt["box"], np.float32) if "box" in prompt else None,
            multimask_output=multimask,
        )
        assert len(body["masks"]) == len(masks) == (3 if multimask else 1)
        for got, mask, score in zip(body["masks"], masks, iou):
            assert (_decode(got["png"]) == mask.astype(np.uint8) * 255).all()
            assert got["iou"] == pytest.approx(float(score), abs=1e-6) and got["area"] == int(mask.sum())
        assert body["best"] == int(np.argmax(iou))


def test_sam_errors_and_lru_eviction(client):
    ids = [_post_image(client, "/sam/embed", _png(_image(40, 40, seed=10 + i))).json()["image_id"] for i in range(3)]
    assert len(set(ids)) == 3
    r = client.post("/sam/predict", json={"image_id": ids[0], "points": [[5, 5]], "labels": [1]}, headers=AUTH)
    assert r.status_code == 404 and "evicted" in r.json()["detail"]  # the cache keeps 2 images
    assert client.get("/models", headers=AUTH).json()["sam"]["cached_images"] == 2
    cases = [
        ({"points": [[50, 5]], "labels": [1]}, "outside the 40x40 image"),
        ({"points": [[5, -1]], "labels": [1]}, "outside"),
        ({"points": [[5, 5]], "labels": [2]}, "expected 1 (foreground) or 0"),
        ({"points": [[5, 5]], "labels": []}, "1 point(s) but 0 label(s)"),
        ({"box": [10, 10, 5, 20]}, "x0 < x1"),
        ({"box": [0, 0, 41, 20]}, "outside"),
        ({}, "at least one prompt"),
        ({"points": "here"}, "points"),
    ]
    for prompt, words in cases:
        r = client.post("/sam/predict", json={"image_id": ids[2], **prompt}, headers=AUTH)
        assert r.status_code == 422 and words in r.json()["detail"], (prompt, r.text)
    assert client.post("/sam/predict", json={"image_id": ids[2], "box": [1, 1, 9, 9]}).status_code == 401


def test_a_server_without_sam_says_so(semantic_ckpt):
    app = create_app([ServedModel.from_checkpoint(semantic_ckpt, name="a")])
    with TestClient(app) as c:
        r = _post_image(c, "/sam/embed", _png(_image()), headers={})
        assert r.status_code == 404 and "--sam" in r.json()["detail"]
        assert c.get("/models").status_code == 200  # no token configured: open
    with pytest.raises(ValueError, match="nothing to serve"):
        create_app([])
    with pytest.raises(ValueError, match="two models are named"):
        create_app([ServedModel.from_checkpoint(semantic_ckpt, name="a")] * 2)


# -------------------------------------------------------------------------------------- instance / panoptic
def test_instance_results_equal_maskworks_predict(tmp_path):
    torch.manual_seed(0)
    model = create_model("mask_rcnn", num_classes=3, encoder="resnet18", **TINY_MASK_RCNN)
    meta = {**META, "task": "instance"}
    save_model(model, tmp_path / "inst.safetensors", meta)
    image = _image(64, 80, seed=5)
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "in"), "--checkpoint", str(tmp_path / "inst.safetensors"), "--out",
                 str(out), "--score-threshold", "0.0", "--device", "cpu"]) == 0  # fmt: skip
    expected = json.loads((out / "coco_results.json").read_text())
    assert expected, "the random model should detect something at score >= 0"
    app = create_app([ServedModel.from_checkpoint(tmp_path / "inst.safetensors", device="cpu")])
    with TestClient(app) as c:
        body = _post_image(c, "/predict/inst", _png(image), headers={}, score_threshold="0.0").json()
        assert body["task"] == "instance"
        for row in expected:
            row.pop("file_name")
        assert body["instances"] == expected
        ids = _decode(body["ids_png"])
        assert (ids == np.array(Image.open(out / "a_ids.png"))).all()
        assert (_decode(body["color_png"])[..., 3] > 0).sum() == (ids > 0).sum()
        r = _post_image(c, "/predict/inst", _png(image), headers={}, tta="flip")
        assert r.status_code == 422 and "apply to semantic models" in r.json()["detail"]


def test_panoptic_results_equal_maskworks_predict(tmp_path):
    torch.manual_seed(0)
    model = create_model("mask2former", num_classes=4, task="panoptic", thing_classes=[2, 3], **TINY_MASK2FORMER)
    model = perturb_parameters(model, seed=1, scale=0.2)
    meta = {**META, "task": "panoptic", "class_names": ["sky", "road", "car", "person"], "num_classes": 4,
            "isthing": [False, False, True, True], "thing_classes": [2, 3], "palette": [[0, 0, 0]] * 4}  # fmt: skip
    save_model(model, tmp_path / "pan.safetensors", meta)
    image = _image(48, 64, seed=6)
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "in"), "--checkpoint", str(tmp_path / "pan.safetensors"), "--out",
                 str(out), "--device", "cpu"]) == 0  # fmt: skip
    expected = json.loads((out / "panoptic_results.json").read_text())
    app = create_app([ServedModel.from_checkpoint(tmp_path / "pan.safetensors", device="cpu")])
    with TestClient(app) as c:
        body = _post_image(c, "/predict/pan", _png(image), headers={}).json()
    assert body["task"] == "panoptic" and body["segments"] == expected["annotations"][0]["segments_info"]
    assert body["categories"] == expected["categories"]
    assert (_decode(body["panoptic_png"]) == np.array(Image.open(out / "a_panoptic.png"))).all()


# ------------------------------------------------------------------------------------- concurrency and time
def test_limiter_refuses_beyond_the_queue_and_times_out_without_freeing_the_slot():
    async def scenario():
        limiter = Limiter(concurrency=1, queue=1)
        gate = threading.Event()
        running = asyncio.ensure_future(limiter.run(gate.wait, 5, timeout=10))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(limiter.run(lambda: "second", timeout=10))
        await asyncio.sleep(0.05)
        assert limiter.pending == 2
        with pytest.raises(HTTPException) as busy:
            await limiter.run(lambda: "third", timeout=10)
        assert busy.value.status_code == 503 and busy.value.headers == {"Retry-After": "1"}
        gate.set()
        assert await running is True and await waiting == "second"
        assert limiter.pending == 0

        slow = threading.Event()
        with pytest.raises(HTTPException) as late:
            await limiter.run(slow.wait, 5, timeout=0.1)
        assert late.value.status_code == 504 and "time limit" in late.value.detail
        assert limiter.pending == 1  # the worker still runs: its slot stays taken
        with pytest.raises(HTTPException) as queued_too_long:
            await limiter.run(lambda: None, timeout=0.1)
        assert queued_too_long.value.status_code == 504 and "waited" in queued_too_long.value.detail
        slow.set()
        for _ in range(100):
            if limiter.pending == 0:
                break
            await asyncio.sleep(0.01)
        assert limiter.pending == 0
        limiter.shutdown()

    asyncio.run(scenario())


def test_503_over_http_when_the_queue_is_full(semantic_ckpt, monkeypatch):
    served = ServedModel.from_checkpoint(semantic_ckpt, device="cpu")
    gate = threading.Event()
    real = served.predict_bytes

    def slow(*args):
        gate.wait(10)
        return real(*args)

    monkeypatch.setattr(served, "predict_bytes", slow)
    app = create_app([served], settings=ServeSettings(max_concurrency=1, max_queue=1, timeout_s=20))
    data = _png(_image())
    with TestClient(app) as c:
        results: list = []
        threads = [
            threading.Thread(target=lambda: results.append(_post_image(c, "/predict/shapes", data, headers={})))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for _ in range(200):
            if c.get("/health").json()["pending"] == 2:
                break
            time.sleep(0.01)
        busy = _post_image(c, "/predict/shapes", data, headers={})
        early = c.post("/predict/shapes", content=b"never parsed", headers={"Content-Type": "multipart/form-data"})
        gate.set()
        for t in threads:
            t.join(10)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
    assert sorted(r.status_code for r in results) == [200, 200]
    assert early.status_code == 503  # refused before its body was read (a malformed body would give 422 / 400)


# -------------------------------------------------------------------------------------------------- the CLI
def test_serve_command_line(semantic_ckpt, capsys, monkeypatch):
    import argparse

    from maskworks.cli.main import build_parser
    from maskworks.cli.serve import build_app, parse_checkpoint

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0 and "/sam/predict" in capsys.readouterr().out
    assert parse_checkpoint("roads=runs/a/best.safetensors") == ("roads", "runs/a/best.safetensors")
    assert parse_checkpoint("runs/a/best.safetensors") == (None, "runs/a/best.safetensors")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_checkpoint("bad name=x")
    parser = build_parser()
    args = parser.parse_args(["serve", "--checkpoint", f"one={semantic_ckpt}", "--checkpoint", str(semantic_ckpt)])
    monkeypatch.setenv("MASKWORKS_SERVE_TOKEN", "from-env")
    app = build_app(args)
    assert list(app.state.models) == ["one", "shapes"] and app.state.settings.token == "from-env"
    assert args.host == "127.0.0.1"
    assert main(["serve", "--checkpoint", str(semantic_ckpt), "--checkpoint", str(semantic_ckpt)]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "nothing to serve" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "missing.safetensors"]) != 0
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(semantic_ckpt), "--max-queue", "-1"]) == 2
    assert "max-queue" in capsys.readouterr().err

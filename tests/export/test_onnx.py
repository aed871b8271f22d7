"""ONNX export: every registered semantic model exports and agrees with PyTorch in onnxruntime (dynamic height /
width where the model allows, with the reason where it does not), metadata round trip, SAM's two graphs against the
official ``SamOnnxModel``, INT8 (onnxruntime QDQ, PT2E) accuracy on a trained synthetic model, and the CLI
(``maskworks export``, ``maskworks predict --backend onnxruntime``, ``--scale``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from maskworks.checkpoint import save_model  # noqa: E402
from maskworks.cli.main import main  # noqa: E402
from maskworks.export import (  # noqa: E402
    ExportError,
    OnnxSegmenter,
    SamOnnxDecoder,
    dynamic_blockers,
    export_sam,
    read_metadata,
    to_onnx,
)
from maskworks.registry import create_model  # noqa: E402
from maskworks.testing import TINY_SAM, TINY_SEMANTIC, perturb_parameters, semantic_models_to_test  # noqa: E402

# the models whose graph fixes the input size, and why (dynamic_blockers): a new model lands here knowingly
FIXED_SIZE = {
    "fast_scnn": "adaptive pooling",
    "pspnet": "adaptive pooling",
    "upernet": "adaptive pooling",
    "setr_naive": "position table",
    "setr_pup": "position table",
    "setr_mla": "position table",
    "transunet": "position table",
}
META = {
    "class_names": ["bg", "a", "b"],
    "palette": [[0, 0, 0], [200, 0, 0], [0, 200, 0]],
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "in_channels": 3,
    "num_classes": 3,
    "task": "semantic",
}


@pytest.mark.parametrize("name", semantic_models_to_test())
def test_every_semantic_model_exports_and_agrees_with_pytorch(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **TINY_SEMANTIC.get(name, {})).eval()
    blockers = dynamic_blockers(model)
    assert bool(blockers) == (name in FIXED_SIZE), blockers
    if blockers:
        assert FIXED_SIZE[name] in blockers[0]
        with pytest.raises(ExportError, match="cannot be exported with a dynamic height / width"):
            to_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 64, 64), dynamic=True)
    report = to_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 64, 64), dynamic=not blockers)
    # verified in onnxruntime (atol 1e-4 + 1e-3 relative): the example and, when dynamic, another batch and size
    assert list(report.max_abs_diff) == (["1x3x64x64"] if blockers else ["1x3x64x64", "2x3x96x128"])
    assert all(d <= 1e-3 for d in report.max_abs_diff.values()), report.max_abs_diff


def test_verification_catches_a_wrong_graph_and_nothing_is_left_behind(tmp_path, monkeypatch):
    model = create_model("unet_vanilla", num_classes=3, features=(8, 16, 32, 64)).eval()
    to_onnx(model, tmp_path / "good.onnx", torch.randn(1, 3, 32, 32))
    other = create_model("unet_vanilla", num_classes=3, features=(8, 16, 32, 64)).eval()  # other random weights
    from maskworks.export.onnx import verify_onnx

    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        verify_onnx(other, tmp_path / "good.onnx", [torch.randn(1, 3, 32, 32)])
    pooled = create_model("pspnet", num_classes=3, **TINY_SEMANTIC["pspnet"]).eval()
    with pytest.raises(ExportError, match="AdaptiveAvgPool2d"):
        to_onnx(pooled, tmp_path / "bad.onnx", torch.randn(1, 3, 64, 64), dynamic=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]  # no partial file
    assert model.training is False


def test_instance_and_universal_models(tmp_path):
    from maskworks.export import to_onnx_instance
    from maskworks.testing import TINY_MASK2FORMER, TINY_MASK_RCNN

    torch.manual_seed(0)
    mask_rcnn = create_model("mask_rcnn", num_classes=3, encoder="resnet18", **TINY_MASK_RCNN).eval()
    report = to_onnx_instance(mask_rcnn, tmp_path / "mr.onnx", torch.rand(3, 64, 80))
    assert list(report.max_abs_diff) == ["3x64x80", "3x80x112"]  # boxes / scores / labels / masks at two sizes
    assert read_metadata(tmp_path / "mr.onnx")["task"] == "instance"
    with pytest.raises(ExportError, match="Fast NMS"):
        to_onnx_instance(create_model("yolact", encoder="resnet18", num_classes=3), tmp_path / "y.onnx")
    m2f = create_model("mask2former", num_classes=4, task="semantic", **TINY_MASK2FORMER).eval()
    assert "DeformableAttention" in dynamic_blockers(m2f)[0]
    report = to_onnx(m2f, tmp_path / "m2f.onnx", torch.randn(1, 3, 64, 64), dynamic=False)
    assert report.max_abs_diff["1x3x64x64"] < 1e-4


def test_metadata_and_onnx_segmenter(tmp_path):
    torch.manual_seed(0)
    model = create_model("segformer_b0", num_classes=3, **TINY_SEMANTIC["segformer_b0"]).eval()
    to_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 64, 64), meta=META)
    info = read_metadata(tmp_path / "m.onnx")
    assert info["class_names"] == META["class_names"] and info["palette"] == META["palette"]
    assert info["mean"] == META["mean"] and info["num_classes"] == 3 and info["dynamic"] is True
    assert info["model"] == "segformer_b0"
    runner = OnnxSegmenter(tmp_path / "m.onnx")
    x = torch.randn(1, 3, 80, 48)
    with torch.no_grad():
        assert torch.allclose(runner(x), model(x), atol=1e-4)
    fixed = create_model("pspnet", num_classes=3, **TINY_SEMANTIC["pspnet"]).eval()
    to_onnx(fixed, tmp_path / "f.onnx", torch.randn(1, 3, 64, 64), dynamic=False, meta=META)
    with pytest.raises(ValueError, match="exported for 64x64 inputs"):
        OnnxSegmenter(tmp_path / "f.onnx")(torch.randn(1, 3, 96, 96))


def test_sam_decoder_and_encoder_graphs(tmp_path):
    pytest.importorskip("segment_anything")
    from segment_anything.modeling import Sam as OfficialSam
    from segment_anything.utils.onnx import SamOnnxModel

    from maskworks.models.promptable import SamPredictor, build_sam

    torch.manual_seed(0)
    ours = perturb_parameters(build_sam(**TINY_SAM), seed=1, scale=0.05).eval()
    paths = export_sam(ours, tmp_path, name="tiny")
    assert sorted(paths) == ["decoder", "encoder"] and all(p.exists() for p in paths.values())

    # the decoder graph = the official SamOnnxModel on the same weights (the official model holds ours)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "promptable"))
    try:
        from test_sam import _official_tiny  # the official tiny SAM of the parity tests
    finally:
        sys.path.pop(0)
    official: OfficialSam = _official_tiny(TINY_SAM)
    state = {k.replace("mlp.fc1", "mlp.lin1").replace("mlp.fc2", "mlp.lin2"): v for k, v in ours.state_dict().items()}
    missing, unexpected = official.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "image_encoder" not in k]
    reference = SamOnnxModel(official, return_single_mask=False).eval()
    import onnxruntime as ort

    session = ort.InferenceSession(str(paths["decoder"]), providers=["CPUExecutionProvider"])
    c, (h, w) = ours.prompt_encoder.embed_dim, ours.prompt_encoder.image_embedding_size
    g = torch.Generator().manual_seed(2)
    cases = [
        (torch.tensor([[[30.0, 40.0], [200.0, 100.0]]]), torch.tensor([[1.0, 0.0]]), 0.0),  # points
        (torch.tensor([[[20.0, 30.0], [180.0, 150.0], [0.0, 0.0]]]), torch.tensor([[2.0, 3.0, -1.0]]), 0.0),  # box
        (torch.tensor([[[60.0, 70.0]]]), torch.tensor([[1.0]]), 1.0),  # point + mask input
    ]
    for coords, labels, has_mask in cases:
        inputs = {
            "image_embeddings": torch.randn(1, c, h, w, generator=g),
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": torch.randn(1, 1, 4 * h, 4 * w, generator=g),
            "has_mask_input": torch.tensor([has_mask]),
            "orig_im_size": torch.tensor([120.0, 90.0]),
        }
        with torch.no_grad():
            expected = reference(*inputs.values())
            mine = SamOnnxDecoder(ours)(*inputs.values())
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        for e, m, o in zip(expected, mine, got):
            assert e.shape == m.shape == o.shape
            assert torch.allclose(m, e, atol=1e-5)
            assert np.abs(o - e.numpy()).max() < 1e-4
    # end to end: encoder graph + decoder graph = SamPredictor (points in original pixels, masks at the original size)
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    predictor = SamPredictor(ours)
    predictor.set_image(image)
    masks, iou, _ = predictor.predict(np.array([[50.0, 40.0]]), np.array([1]), multimask_output=True)
    resized = ours.transform.apply_image(image)
    encoder = ort.InferenceSession(str(paths["encoder"]), providers=["CPUExecutionProvider"])
    embedding = encoder.run(None, {"image": resized.transpose(2, 0, 1)[None].astype(np.float32)})[0]
    assert np.abs(embedding - predictor.features.numpy()).max() < 1e-4
    # without a box the caller adds the padding point (label -1), as with the official graph
    coords = ours.transform.apply_coords(np.array([[[50.0, 40.0], [0.0, 0.0]]]), image.shape[:2]).astype(np.float32)
    onnx_masks, onnx_iou, _ = session.run(
        None,
        {
            "image_embeddings": embedding,
            "point_coords": coords,
            "point_labels": np.array([[1.0, -1.0]], np.float32),
            "mask_input": np.zeros((1, 1, 4 * h, 4 * w), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(image.shape[:2], np.float32),
        },
    )
    # the graph returns all four masks (single-mask token first), the predictor the three multi-mask ones
    assert np.abs(onnx_iou[0, 1:] - iou).max() < 1e-4
    assert ((onnx_masks[0, 1:] > 0) == masks).mean() > 0.999


def _synthetic_checkpoint(tmp_path):
    from maskworks.data import SyntheticShapes, build_transforms

    torch.manual_seed(0)
    val = SyntheticShapes(num_samples=12, image_size=64, split="val", transform=build_transforms(train=False))
    model = perturb_parameters(
        create_model("unet_vanilla", num_classes=val.num_classes, features=(8, 16, 32, 64)), seed=0, scale=0.2
    )
    meta = {**META, "num_classes": val.num_classes, "mean": list(val.mean), "std": list(val.std)}
    meta["class_names"], meta["palette"] = list(val.class_names), [list(c) for c in val.palette]
    save_model(model, tmp_path / "best.safetensors", meta)
    return tmp_path / "best.safetensors", val


def test_export_int8_and_predict_with_onnxruntime(tmp_path, capsys):
    ckpt, val = _synthetic_checkpoint(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    targets = []
    for i in range(len(val)):
        sample = val[i]
        rgb = (sample["image"].permute(1, 2, 0).numpy() * np.asarray(val.std) + np.asarray(val.mean)) * 255
        Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8)).save(images / f"v{i:02d}.png")
        targets.append(sample["mask"].numpy())
    out = tmp_path / "deploy"
    assert (
        main(["export", str(ckpt), "--dynamic", "--size", "64", "--int8", "--calib", str(images), "--out", str(out)])
        == 0
    )
    report = json.loads((out / "export.json").read_text())
    assert report["dynamic"] is True and report["calibration_images"] == 12
    assert (out / "best_int8.onnx").stat().st_size < 0.5 * (out / "best.onnx").stat().st_size
    labels = {}
    for backend, model_file in (("torch", ckpt), ("onnxruntime", out / "best.onnx"), ("int8", out / "best_int8.onnx")):
        pred_dir = tmp_path / f"pred_{backend}"
        args = ["predict", str(images), "--checkpoint", str(model_file), "--out", str(pred_dir), "--no-overlay"]
        assert main([*args, "--backend", "torch" if backend == "torch" else "onnxruntime"]) == 0
        labels[backend] = np.stack(
            [np.array(Image.open(pred_dir / f"v{i:02d}_label.png")) for i in range(len(targets))]
        )
    assert len(np.unique(labels["torch"])) >= 2  # the comparison is not between constant maps
    assert (labels["onnxruntime"] == labels["torch"]).mean() > 0.999  # fp32 graph: the same labels
    # INT8 (calibrated on the same kind of images): at least 95 % of the pixels keep their fp32 label
    assert (labels["int8"] == labels["torch"]).mean() > 0.95, (labels["int8"] == labels["torch"]).mean()

    # --scale: predicted at half size, labels at the full size
    assert main(["predict", str(images / "v00.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "half"),
                 "--scale", "0.5", "--no-overlay"]) == 0  # fmt: skip
    assert np.array(Image.open(tmp_path / "half" / "v00_label.png")).shape == targets[0].shape
    capsys.readouterr()
    assert main(["predict", str(images), "--checkpoint", str(out / "best.onnx"), "--out", str(tmp_path / "x")]) == 2
    assert "--backend onnxruntime" in capsys.readouterr().err
    assert main(["predict", str(images), "--checkpoint", str(ckpt), "--backend", "onnxruntime", "--out",
                 str(tmp_path / "y")]) == 2  # fmt: skip
    assert "maskworks export" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--int8", "--out", str(tmp_path / "z")]) == 2
    assert "--calib" in capsys.readouterr().err


def test_int8_can_keep_the_first_and_last_convolution_in_float(tmp_path):
    import onnx

    from maskworks.export.quantize import quantize_onnx

    model = create_model("unet_vanilla", num_classes=3, features=(8, 16, 32, 64)).eval()
    to_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 32, 32))
    calibration = [torch.randn(1, 3, 32, 32) for _ in range(2)]
    for keep_ends in (False, True):
        out = quantize_onnx(tmp_path / "m.onnx", tmp_path / f"q{keep_ends}.onnx", calibration, keep_ends=keep_ends)
        graph = onnx.load(str(out)).graph
        made_by = {o: n.op_type for n in graph.node for o in n.output}
        convs = [n for n in graph.node if n.op_type == "Conv"]
        dequantized = [made_by.get(c.input[1]) == "DequantizeLinear" for c in convs]  # the weight's producer
        assert dequantized[1:-1] == [True] * (len(convs) - 2)
        assert [dequantized[0], dequantized[-1]] == ([False, False] if keep_ends else [True, True])


def test_pt2e_int8_where_torch_export_captures_the_model():
    from maskworks.export.quantize import quantize_pt2e, sqnr

    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = create_model("unet_vanilla", num_classes=3, features=(8, 16, 32, 64)).eval()
    calibration = [torch.randn(1, 3, 64, 64) for _ in range(4)]
    quantized = quantize_pt2e(model, calibration, calibration[0])
    with torch.no_grad():
        assert sqnr(model(calibration[1]), quantized(calibration[1])) > 20.0

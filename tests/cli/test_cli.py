"""The command line: help, config resolution, train/eval/predict on tiny data, models listing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from maskworks.cli.config import ConfigError, apply_overrides, load_config
from maskworks.cli.main import build_parser, main


@pytest.mark.parametrize("cmd", ["demo", "train", "eval", "predict", "models"])
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_overrides_parse_yaml_values_and_reject_unknown_keys(tmp_path):
    cfg = apply_overrides(
        load_config(None),
        ["train.lr=0.01", "model.encoder=resnet34", "data.scale_range=[0.5, 2]", "train.grad_clip=null"],
    )
    assert cfg["train"]["lr"] == 0.01 and cfg["model"]["encoder"] == "resnet34"
    assert cfg["data"]["scale_range"] == [0.5, 2] and cfg["train"]["grad_clip"] is None
    with pytest.raises(ConfigError, match="did you mean lr"):
        apply_overrides(cfg, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_errors_exit_cleanly(capsys):
    assert main(["train", "--set", "train.bogus=1"]) == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err
    assert main(["train", "--model", "unett"]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()


def test_models_lists_with_params(capsys):
    assert main(["models", "resnet1*"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "11.18M" in out  # resnet18 without the classifier: 11,176,512 parameters


def test_train_eval_predict_round_trip(tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        "synthetic",
        "--model",
        "unet_vanilla",
        "--no-progress",
        "--epochs",
        "2",
        "--set",
        "model.features=[8,16,32]",
        "--set",
        "data.image_size=32",
        "--set",
        "data.num_train=32",
        "--set",
        "data.num_val=8",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.device=cpu",
        "--run-dir",
        str(run),
    ]
    assert main(args) == 0
    for name in (
        "config.yaml",
        "history.jsonl",
        "best.safetensors",
        "best.json",
        "training_curves.png",
        "checkpoints/last.pt",
    ):
        assert (run / name).exists(), name
    assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "background" in out.lower()
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["num_images"] == 8 and 0 <= report["miou"] <= 1
    assert (tmp_path / "ev" / "confusion_matrix.png").exists()
    assert (tmp_path / "ev" / "reliability.png").exists()
    assert 0 <= report["calibration"]["ece"] <= 1 and report["calibration"]["num_pixels"] > 0
    assert 0 <= report["boundary_f1"]["mbf1"] <= 1 and "boundary_iou" in report["boundary_iou"]
    assert "BF1" in out and "ECE" in out
    ev2 = ["eval", "--checkpoint", str(run / "best.safetensors"), "--out", str(tmp_path / "ev2")]
    assert main([*ev2, "--metrics", "confusion,surface"]) == 0
    report2 = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert "surface" in report2 and "calibration" not in report2 and not (tmp_path / "ev2" / "reliability.png").exists()
    assert "HD95" in capsys.readouterr().out
    assert main([*ev2, "--metrics", "confusion,bogus"]) == 2

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 45, 3), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(imgs / "b.jpg")
    assert (
        main(["predict", str(imgs), "--checkpoint", str(run / "best.safetensors"), "--out", str(tmp_path / "pred")])
        == 0
    )
    label = Image.open(tmp_path / "pred" / "a_label.png")
    assert label.mode == "P" and label.size == (45, 37)
    assert (tmp_path / "pred" / "b_overlay.png").exists()
    pred2 = tmp_path / "pred2"
    extra = ["--tile", "16", "--overlap", "0.5", "--tta", "flip", "--crf", "--uncertainty", "--out", str(pred2)]
    assert main(["predict", str(imgs), "--checkpoint", str(run / "best.safetensors"), *extra]) == 0
    assert Image.open(pred2 / "a_label.png").size == (45, 37)
    heat = Image.open(pred2 / "a_uncertainty.png")
    assert heat.mode == "RGB" and heat.size == (45, 37)
    assert "TTA flip" in capsys.readouterr().out
    bad = ["predict", str(imgs), "--checkpoint", str(run / "best.safetensors"), "--overlap", "1.5"]
    assert main(bad) == 2
    assert main(["predict", str(tmp_path / "nope.png"), "--checkpoint", str(run / "best.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_parser_builds():
    assert build_parser().prog == "maskworks"


def _write_folder(root, n=6, size=(40, 52)):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros(size, np.uint8)
        mask[5 + i : 25 + i, 10:30] = 1 + i % 2
        img = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
        img[mask > 0] += 150
        Image.fromarray(img).save(root / "images" / f"s{i}.jpg" if i % 2 else root / "images" / f"s{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"s{i}.png")
    (root / "classes.txt").write_text("background\nleft\nright\n")


def test_train_on_folder_with_held_out_split(tmp_path, capsys):
    data = tmp_path / "data"
    _write_folder(data)
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        "folder",
        "--root",
        str(data),
        "--model",
        "unet_vanilla",
        "--no-progress",
        "--epochs",
        "1",
        "--set",
        "model.features=[8,16]",
        "--set",
        "data.val_fraction=0.34",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.device=cpu",
        "--run-dir",
        str(run),
    ]
    assert main(args) == 0
    meta = json.loads((run / "best.json").read_text())["meta"]
    assert meta["class_names"] == ["background", "left", "right"] and meta["num_classes"] == 3
    assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["num_images"] == 2  # 34% of 6 held out
    assert "right" in capsys.readouterr().out


def test_folder_without_root_is_a_clear_error(capsys):
    assert main(["train", "--data", "folder"]) == 2
    assert "data.root" in capsys.readouterr().err


@pytest.mark.realdata
def test_train_and_predict_on_isbi(isbi_root, tmp_path):
    run = tmp_path / "isbi"
    args = [
        "train",
        "--data",
        "isbi2012",
        "--root",
        str(isbi_root),
        "--model",
        "unet_vanilla",
        "--no-progress",
        "--epochs",
        "1",
        "--set",
        "model.features=[8,16]",
        "--set",
        "data.crop_size=64",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.device=cpu",
        "--run-dir",
        str(run),
    ]
    assert main(args) == 0
    recipe = json.loads((run / "best.json").read_text())
    assert recipe["kwargs"]["in_channels"] == 1 and recipe["meta"]["class_names"] == ["cell", "membrane"]
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(isbi_root / "image" / "0.png"),
                "--checkpoint",
                str(run / "best.safetensors"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    label = np.asarray(Image.open(out / "0_label.png"))
    assert label.shape == (512, 512) and set(np.unique(label)) <= {0, 1}


@pytest.mark.realdata
def test_camvid_splits_from_config(camvid_root):
    from maskworks.cli.builders import build_split
    from maskworks.cli.config import load_config

    data = {**load_config(None)["data"], "name": "camvid", "root": str(camvid_root)}
    val = build_split(data, "val")
    assert len(val) == 101 and val.num_classes == 11
    with pytest.raises(Exception, match="testannot"):
        build_split(data, "test")


def test_train_with_compound_loss_median_weights_and_rare_class_sampling(tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        "synthetic",
        "--model",
        "unet_vanilla",
        "--no-progress",
        "--epochs",
        "1",
        "--set",
        "model.features=[8,16]",
        "--set",
        "data.image_size=32",
        "--set",
        "data.num_train=16",
        "--set",
        "data.num_val=4",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.device=cpu",
        "--set",
        "train.loss=ce+0.5*dice",
        "--set",
        "train.class_weights=median",
        "--set",
        "train.rare_class_sampling=0.9",
        "--set",
        "data.copy_paste={classes: [2, 3], p: 0.5}",
        "--run-dir",
        str(run),
    ]
    assert main(args) == 0
    assert json.loads((run / "history.jsonl").read_text().splitlines()[0])["train_loss"] > 0
    assert main([*args[:-2], "--set", "train.loss=ce+dicee", "--run-dir", str(run)]) == 2
    assert main([*args[:-2], "--set", "data.copy_paste={classes: [2], q: 1}", "--run-dir", str(run)]) == 2


def test_eval_and_predict_with_folded_batchnorm_give_the_same_results(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--model", "unet", "--set", "model.encoder=resnet18", "--no-progress", "--set", "train.device=cpu"]
    data = [
        "--data",
        "synthetic",
        "--set",
        "data.image_size=32",
        "--set",
        "data.num_train=8",
        "--set",
        "data.num_val=4",
    ]
    assert main(["train", *data, *common, "--epochs", "1", "--set", "train.batch_size=4", "--run-dir", str(run)]) == 0
    ckpt = str(run / "best.safetensors")
    reports = {}
    for flag in ([], ["--fuse-bn"]):
        out = tmp_path / f"ev{len(flag)}"
        assert main(["eval", "--checkpoint", ckpt, "--out", str(out), "--metrics", "confusion", *flag]) == 0
        reports[len(flag)] = json.loads((out / "eval.json").read_text())
    assert reports[0]["iou"] == reports[1]["iou"] and reports[0]["miou"] == reports[1]["miou"]
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    for flag in ([], ["--fuse-bn"]):
        assert main(["predict", str(img), "--checkpoint", ckpt, "--out", str(tmp_path / f"p{len(flag)}"), *flag]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "x_label.png")) for d in ("p0", "p1"))
    np.testing.assert_array_equal(a, b)


def test_models_pretrained_lists_the_published_weights(capsys):
    assert main(["models", "resnet34", "--pretrained"]) == 0
    out = capsys.readouterr().out
    assert "* tv_in1k" in out and "resnet34-" in out and "timm/resnet34.a1_in1k" in out and "cache:" in out


@pytest.mark.parametrize(
    "model, sets",
    [
        ("segformer_b0", ["model.decoder_channels=32"]),
        ("setr_pup", ["model.encoder=vit_test_patch16", "model.img_size=32", "model.channels=16"]),
        (
            "transunet",
            ["model.encoder=vit_test_r50_s16", "model.decoder_channels=[32,16,16,8]", "model.head_channels=32"],
        ),
    ],
)
def test_train_and_predict_transformer_segmenters_end_to_end(model, sets, tmp_path):
    """`maskworks train --model segformer_b0 ...` (and SETR with its auxiliary heads, TransUNet) trains, saves a
    checkpoint that rebuilds the model, and predicts."""
    run = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--model", model, "--no-progress", "--epochs", "1", "--run-dir", str(run)]
    for item in [*sets, "data.image_size=32", "data.num_train=16", "data.num_val=4", "train.batch_size=8"]:
        args += ["--set", item]
    assert main([*args, "--set", "train.device=cpu"]) == 0
    assert (run / "best.safetensors").exists() and (run / "checkpoints" / "last.pt").exists()
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run / "best.safetensors"), str(image), "--out", str(out)]) == 0
    assert np.asarray(Image.open(next(out.glob("in*.png")))).shape[:2] == (40, 52)

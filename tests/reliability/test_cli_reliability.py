"""The command line never loses a run, never writes over an input's prediction, and answers bad input with one line."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from maskworks.cli.main import main

TINY = [
    "--model",
    "unet_vanilla",
    "--no-progress",
    "--set",
    "model.features=[8,16]",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.device=cpu",
]
SYNTHETIC = [
    "--data",
    "synthetic",
    "--set",
    "data.image_size=32",
    "--set",
    "data.num_train=8",
    "--set",
    "data.num_val=4",
]


def _train(run, *extra, epochs=1):
    return main(["train", *SYNTHETIC, *TINY, "--epochs", str(epochs), "--run-dir", str(run), *extra])


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _write_folder(root, n=6, size=(24, 32), labels=(0, 1, 2)):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.full(size, labels[0], np.uint8)
        mask[4:12, 4 + i : 14 + i] = labels[1 + i % (len(labels) - 1)]
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"s{i}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert _train(run, epochs=2) == 0
    return run


# ----------------------------------------------------------------------------------------------- binary models
def test_binary_model_predicts_and_evaluates_with_a_sigmoid_threshold(tmp_path, capsys):
    run = tmp_path / "bin"
    binary = ["--set", "data.num_classes=2", "--set", "model.num_classes=1"]
    assert _train(run, *binary) == 0
    recipe = json.loads((run / "best.json").read_text())
    assert recipe["kwargs"]["num_classes"] == 1 and recipe["meta"]["num_classes"] == 2
    img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    from maskworks.checkpoint import load_model
    from maskworks.cli.commands import load_image_for_model

    model = load_model(run / "best.safetensors")
    meta = model.maskworks_meta
    _, x = load_image_for_model(tmp_path / "x.png", 3, meta["mean"], meta["std"])
    with torch.no_grad():
        p = torch.sigmoid(model(x))[0, 0].numpy()
    for threshold in (0.5, float(np.median(p))):
        out = tmp_path / f"pred{threshold}"
        args = ["predict", str(tmp_path / "x.png"), "--checkpoint", str(run / "best.safetensors"), "--out", str(out)]
        assert main([*args, "--threshold", str(threshold)]) == 0
        label = np.asarray(Image.open(out / "x_label.png"))
        np.testing.assert_array_equal(label, (p > threshold).astype(np.uint8))
    ev = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--out", str(ev), "--threshold", "0.3"]) == 0
    report = json.loads((ev / "eval.json").read_text())
    assert report["threshold"] == 0.3 and len(report["iou"]) == 2 and 0 <= report["miou"] <= 1


def test_binary_model_on_three_class_data_is_refused_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    _write_folder(data, labels=(0, 1, 2))
    run = tmp_path / "run"
    args = ["train", "--data", "folder", "--root", str(data), *TINY, "--set", "model.num_classes=1"]
    assert main([*args, "--epochs", "1", "--run-dir", str(run)]) == 2
    _one_line_error(capsys, "binary model", "3")
    assert not (run / "history.jsonl").exists() and not (run / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------- lost data
def test_new_run_in_a_folder_holding_a_run_is_refused_and_keeps_it(trained, capsys):
    before = {name: (trained / name).read_bytes() for name in ("history.jsonl", "best.safetensors", "config.yaml")}
    assert _train(trained) == 2
    _one_line_error(capsys, str(trained), "--resume", "--overwrite")
    for name, content in before.items():
        assert (trained / name).read_bytes() == content, name


def test_overwrite_starts_a_fresh_run(tmp_path):
    run = tmp_path / "run"
    assert _train(run, epochs=2) == 0
    assert _train(run, "--overwrite") == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1]
    assert json.loads((run / "final.json").read_text())["meta"]["epoch"] == 1


def test_predict_keeps_inputs_with_the_same_stem_apart(trained, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for rel in ("a/scene.png", "a/scene.jpg", "b/scene.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + len(rel), 30, 3), dtype=np.uint8)).save(tmp_path / rel)
    out = tmp_path / "out"
    ckpt = str(trained / "best.safetensors")
    assert main(["predict", str(tmp_path / "a"), str(tmp_path / "b"), "--checkpoint", ckpt, "--out", str(out)]) == 0
    labels = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_label.png"))
    assert labels == ["a/scene_jpg_label.png", "a/scene_png_label.png", "b/scene_label.png"]
    assert "wrote 3 prediction(s)" in capsys.readouterr().out
    assert Image.open(out / "a/scene_jpg_label.png").size == (30, 31)


def test_resume_refuses_changed_settings_and_never_rewrites_the_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, epochs=2) == 0
    config = (run / "config.yaml").read_bytes()
    final = (run / "final.json").read_bytes()
    # a changed learning rate would be silently ignored by the restored optimizer: refused
    assert _train(run, "--resume", "--set", "train.lr=0.1", epochs=3) == 2
    _one_line_error(capsys, "train.lr", "0.1", "--run-dir")
    # fewer epochs than already done
    assert _train(run, "--resume", epochs=1) == 2
    _one_line_error(capsys, "already finished 2 epoch")
    assert (run / "config.yaml").read_bytes() == config and (run / "final.json").read_bytes() == final
    # a resumable change is applied, logged and recorded
    assert main(["train", "--run-dir", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3
    assert json.loads((run / "final.json").read_text())["meta"]["epoch"] == 3
    assert [json.loads(r)["epoch"] for r in (run / "history.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_failed_resume_from_a_corrupt_checkpoint_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run) == 0
    (run / "checkpoints" / "last.pt").write_bytes(b"\x80\x04 not a checkpoint")
    config = (run / "config.yaml").read_bytes()
    assert _train(run, "--resume", epochs=2) == 2
    _one_line_error(capsys, "last.pt")
    assert (run / "config.yaml").read_bytes() == config


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    assert _train(tmp_path / "never", "--resume") == 2
    _one_line_error(capsys, "no checkpoint", "without --resume")


def test_large_images_are_predicted_in_tiles_automatically(trained, tmp_path, caplog):
    img = np.random.default_rng(2).integers(0, 255, (90, 140, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "big.png")
    ckpt = str(trained / "best.safetensors")
    auto, tiled = tmp_path / "auto", tmp_path / "tiled"
    assert (
        main(["predict", str(tmp_path / "big.png"), "--checkpoint", ckpt, "--out", str(auto), "--max-pixels", "5000"])
        == 0
    )
    assert "tiles" in caplog.text and "90x140" in caplog.text
    assert (
        main(["predict", str(tmp_path / "big.png"), "--checkpoint", ckpt, "--out", str(tiled), "--tile", "1024"]) == 0
    )
    a, b = (np.asarray(Image.open(d / "big_label.png")) for d in (auto, tiled))
    assert a.shape == (90, 140)
    np.testing.assert_array_equal(a, b)


def test_very_large_images_are_predicted_by_strips_with_the_same_labels(trained, tmp_path, monkeypatch):
    from maskworks.cli import commands
    from maskworks.inference import large

    img = np.random.default_rng(3).integers(0, 255, (70, 50, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "huge.png")
    ckpt = str(trained / "best.safetensors")
    tiled = ["predict", str(tmp_path / "huge.png"), "--checkpoint", ckpt, "--tile", "32", "--overlap", "0.5"]
    assert main([*tiled, "--out", str(tmp_path / "whole")]) == 0
    calls = []
    real = large.predict_large_image
    monkeypatch.setattr(large, "predict_large_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr("maskworks.inference.predict_large_image", large.predict_large_image)
    monkeypatch.setattr(commands, "STRIP_PIXELS", 1000)
    assert main([*tiled, "--out", str(tmp_path / "strips")]) == 0
    assert calls == [1]
    a, b = (np.asarray(Image.open(tmp_path / d / "huge_label.png")) for d in ("whole", "strips"))
    np.testing.assert_array_equal(a, b)
    assert not list((tmp_path / "strips").glob(".labels.*"))


def test_images_above_the_decompression_bomb_limit_are_refused_by_name(trained, tmp_path, capsys):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
    args = ["predict", str(tmp_path / "x.png"), "--checkpoint", str(trained / "best.safetensors")]
    assert main([*args, "--out", str(tmp_path / "o"), "--max-image-pixels", "1000"]) == 2
    _one_line_error(capsys, "x.png", "too large")


def test_disk_full_while_saving_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert _train(run) == 0
    last = (run / "checkpoints" / "last.pt").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("maskworks.checkpoint.torch.save", full)
    assert _train(run, "--resume", epochs=2) != 0
    line = _one_line_error(capsys, "no space left on device", "last.pt")
    assert "Errno" not in line
    assert (run / "checkpoints" / "last.pt").read_bytes() == last
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize(
    "setting, fragment",
    [
        ("train.lr=abc", "train.lr='abc': expected a number > 0"),
        ("train.epochs=two", "train.epochs='two'"),
        ("train.batch_size=0", "train.batch_size=0"),
        ("data.hflip=[1]", "data.hflip"),
        ("train.amp=fp8", "train.amp"),
    ],
)
def test_bad_setting_values_are_one_line_errors(tmp_path, capsys, setting, fragment):
    assert _train(tmp_path / "run", "--set", setting) == 2
    _one_line_error(capsys, fragment)
    assert not (tmp_path / "run").exists()


def test_numbers_written_as_yaml_strings_are_accepted(tmp_path):
    assert _train(tmp_path / "run", "--set", "train.lr=1e-3") == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["lr"] == 0.001


def test_malformed_config_file_is_named(tmp_path, capsys):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("train: {lr: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    _one_line_error(capsys, str(bad), "not valid YAML")


def test_out_that_is_a_file_is_refused_before_any_work(trained, tmp_path, capsys, monkeypatch):
    target = tmp_path / "taken"
    target.write_text("keep me")
    ckpt = str(trained / "best.safetensors")

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("maskworks.cli.commands._model_and_meta", never)
    assert main(["eval", "--checkpoint", ckpt, "--out", str(target)]) == 2
    _one_line_error(capsys, str(target), "existing file")
    assert main(["predict", str(trained / "best.json"), "--checkpoint", ckpt, "--out", str(target / "sub")]) == 2
    _one_line_error(capsys, str(target / "sub"), "cannot be created")
    assert target.read_text() == "keep me"


def test_out_that_cannot_be_written_is_refused(trained, tmp_path, capsys, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    assert main(["eval", "--checkpoint", str(trained / "best.safetensors"), "--out", str(tmp_path / "ro")]) == 2
    _one_line_error(capsys, "not writable", "Permission denied")


def test_eval_creates_out_before_evaluating(trained, tmp_path, monkeypatch):
    out = tmp_path / "fresh" / "report"
    from maskworks.cli import builders

    seen = {}
    real = builders.build_split

    def spy(*args, **kwargs):
        seen["out_existed"] = out.is_dir()
        return real(*args, **kwargs)

    monkeypatch.setattr(builders, "build_split", spy)
    assert main(["eval", "--checkpoint", str(trained / "best.safetensors"), "--out", str(out)]) == 0
    assert seen["out_existed"] and (out / "eval.json").exists()


def test_checkpoint_evaluated_on_data_with_another_class_count_names_both(trained, tmp_path, capsys):
    data = tmp_path / "data"
    _write_folder(data, labels=(0, 1, 2))
    ckpt = str(trained / "best.safetensors")  # synthetic: 4 classes
    assert main(["eval", "--checkpoint", ckpt, "--data", "folder", "--root", str(data), "--split", "all"]) == 2
    _one_line_error(capsys, "4 classes", "has 3")


def test_class_count_is_settable_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "data"
    _write_folder(data, labels=(0, 1, 2))
    run = tmp_path / "run"
    folder = ["train", "--data", "folder", "--root", str(data), *TINY, "--epochs", "1", "--run-dir", str(run)]
    assert main([*folder, "--set", "data.num_classes=5", "--set", "data.val_fraction=0.25"]) == 0
    assert json.loads((run / "best.json").read_text())["meta"]["num_classes"] == 5
    assert main([*folder, "--set", "data.num_classes=2", "--overwrite"]) == 2
    _one_line_error(capsys, "s")  # a label value 2 outside 0..1 names the mask file
    assert main(["train", *SYNTHETIC, *TINY, "--set", "data.num_classes=9", "--run-dir", str(tmp_path / "x")]) == 2
    _one_line_error(capsys, "num_classes")


def test_unknown_data_option_lists_the_readers_options(tmp_path, capsys):
    assert _train(tmp_path / "run", "--set", "data.val_slice=[1]") == 2
    line = _one_line_error(capsys, "data.val_slice")
    assert "max_shapes" in line  # SyntheticShapes' own options are listed


def test_version_and_did_you_mean(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("maskworks 0.")
    with pytest.raises(SystemExit) as e:
        main(["trian", "--epochs", "1"])
    assert e.value.code == 2
    assert "did you mean 'train'?" in capsys.readouterr().err


def test_isbi_reader_options_reach_the_command_line(tmp_path, trained, capsys):
    root = tmp_path / "isbi"
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    rng = np.random.default_rng(0)
    for n in range(20, 30):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / "image" / f"{n}.png")
        Image.fromarray((rng.random((32, 32)) > 0.3).astype(np.uint8) * 255).save(root / "label" / f"{n}.png")
    run = tmp_path / "run"
    isbi = ["--data", "isbi2012", "--root", str(root), *TINY, "--epochs", "1", "--run-dir", str(run)]
    assert main(["train", *isbi, "--set", "data.val_slices=[28, 29]"]) == 0
    assert (
        main(["eval", "--checkpoint", str(run / "best.safetensors"), "--split", "all", "--out", str(tmp_path / "e")])
        == 0
    )
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["num_images"] == 10


def test_a_training_state_given_as_checkpoint_points_to_the_model_checkpoints(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained / "checkpoints" / "last.pt")]) == 2
    line = _one_line_error(capsys, "last.pt", "training state", "best.safetensors")
    assert "last.safetensors" not in line


def test_a_truncated_file_stops_training_before_the_first_epoch(tmp_path, capsys):
    data = tmp_path / "data"
    _write_folder(data, labels=(0, 1, 2))
    mask = data / "masks" / "s4.png"
    mask.write_bytes(mask.read_bytes()[:60])  # a header and part of the pixel data
    run = tmp_path / "run"
    args = ["train", "--data", "folder", "--root", str(data), *TINY, "--epochs", "2", "--run-dir", str(run)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "s4.png" in err
    assert err.splitlines()[0].startswith("maskworks train: error:")
    assert not (run / "history.jsonl").exists() and not (run / "checkpoints").exists()

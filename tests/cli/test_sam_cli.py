"""``maskworks sam``: prompted and automatic segmentation of one image, with a tiny SAM checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maskworks import create_model
from maskworks.checkpoint import save_model
from maskworks.cli.main import main
from maskworks.testing import TINY_SAM, perturb_parameters


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam")
    torch.manual_seed(0)
    model = perturb_parameters(create_model("sam_vit_base", **TINY_SAM), seed=0)
    ckpt = save_model(model, root / "tiny_sam")
    rng = np.random.default_rng(0)
    image = (rng.random((90, 140, 3)) * 60).astype(np.uint8)
    image[20:60, 30:80] = (200, 40, 40)
    Image.fromarray(image).save(root / "street.png")
    return root, ckpt


def test_point_and_box_prompts_write_masks_overlay_and_json(tiny, capsys):
    root, ckpt = tiny
    out = root / "prompt"
    argv = ["sam", str(root / "street.png"), "--checkpoint", str(ckpt), "--point", "50,40", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "masks.json").read_text())
    assert report["mode"] == "prompt" and report["multimask_output"] is True and len(report["masks"]) == 3
    assert report["points"] == [{"x": 50.0, "y": 40.0, "label": 1}] and report["size"] == [90, 140]
    best = np.asarray(Image.open(out / "mask.png"))
    assert best.shape == (90, 140) and set(np.unique(best)) <= {0, 255}
    assert report["masks"][report["best"]]["area"] == int((best == 255).sum())
    assert np.array_equal(best, np.asarray(Image.open(out / f"mask_{report['best']}.png")))
    assert np.asarray(Image.open(out / "overlay.png")).shape == (90, 140, 3)
    # a box and two points: one mask (multimask off by default), agreeing with the predictor called directly
    out2 = root / "box"
    argv = ["sam", str(root / "street.png"), "--checkpoint", str(ckpt), "--box", "25,15,85,65"]
    assert main([*argv, "--point", "50,40", "--point", "120,80,0", "--out", str(out2)]) == 0
    report = json.loads((out2 / "masks.json").read_text())
    assert len(report["masks"]) == 1 and report["box"] == [25.0, 15.0, 85.0, 65.0]
    from maskworks.checkpoint import load_model
    from maskworks.models.promptable import SamPredictor

    predictor = SamPredictor(load_model(ckpt))
    predictor.set_image(np.asarray(Image.open(root / "street.png").convert("RGB")))
    masks, scores, _ = predictor.predict(
        np.array([[50.0, 40.0], [120.0, 80.0]]), np.array([1, 0]), np.array([25.0, 15, 85, 65]), multimask_output=False
    )
    assert np.array_equal(np.asarray(Image.open(out2 / "mask.png")) == 255, masks[0])
    assert report["masks"][0]["predicted_iou"] == pytest.approx(float(scores[0]), abs=1e-6)


def test_auto_writes_segments_that_match_the_json(tiny):
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_utils

    root, ckpt = tiny
    out = root / "auto"
    argv = ["sam", str(root / "street.png"), "--checkpoint", str(ckpt), "--auto", "--out", str(out)]
    argv += ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    assert main(argv) == 0
    report = json.loads((out / "masks.json").read_text())
    assert report["mode"] == "auto" and len(report["masks"]) >= 1
    ids = np.asarray(Image.open(out / "segments.png"))
    assert ids.shape == (90, 140) and ids.max() <= len(report["masks"])
    areas = [m["area"] for m in report["masks"]]
    assert areas == sorted(areas, reverse=True)
    for row in report["masks"]:
        rle = {**row["segmentation"], "counts": row["segmentation"]["counts"].encode()}
        decoded = mask_utils.decode(rle).astype(bool)
        assert decoded.sum() == row["area"] and {"predicted_iou", "stability_score", "bbox"} <= row.keys()
        assert np.all(ids[decoded] >= row["id"])  # painted, or covered by a smaller (later) mask


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "at least one --point"),
        (["--auto", "--point", "1,1"], "leave out --point"),
        (["--point", "500,10"], "outside the 140x90 image"),
        (["--point", "1,1", "--checkpoint", "missing.pth"], "not found"),
    ],
)
def test_errors_are_one_line(tiny, capsys, extra, message):
    root, ckpt = tiny
    argv = ["sam", str(root / "street.png"), *extra]
    if "--checkpoint" not in extra:
        argv += ["--checkpoint", str(ckpt)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_foreign_checkpoint_of_unknown_width_asks_for_model(tiny, capsys):
    root, ckpt = tiny
    from maskworks.checkpoint import load_model

    state = {k.replace(".mlp.fc1.", ".mlp.lin1."): v for k, v in load_model(ckpt).state_dict().items()}
    torch.save(state, root / "official_layout.pth")
    argv = ["sam", str(root / "street.png"), "--checkpoint", str(root / "official_layout.pth"), "--point", "5,5"]
    assert main(argv) == 2
    assert "width 64 is not B / L / H; pass --model" in capsys.readouterr().err


def test_bad_point_is_an_argparse_error(tiny, capsys):
    root, ckpt = tiny
    with pytest.raises(SystemExit):
        main(["sam", str(root / "street.png"), "--checkpoint", str(ckpt), "--point", "1,2,7"])
    assert "label must be 1 (foreground) or 0 (background)" in capsys.readouterr().err


def test_train_eval_predict_refuse_a_promptable_model_with_a_pointer_to_sam(tiny, capsys):
    root, ckpt = tiny
    assert main(["train", "--model", "sam_vit_base", "--set", "train.epochs=1"]) == 2
    assert "run it with `maskworks sam IMAGE" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(ckpt)]) == 2
    assert "run it with `maskworks sam IMAGE" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(ckpt), str(root / "street.png"), "--out", str(root / "p")]) == 2
    assert "run it with `maskworks sam IMAGE" in capsys.readouterr().err

"""The command line with volumes: plan an MSD folder, train dynunet from the plan, eval, predict NIfTI files that
overlay their inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maskworks.cli.main import main

nib = pytest.importorskip("nibabel")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _affine(i: int) -> np.ndarray:
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    affine[:3, 3] = [-10.0 * i, 5.0, 2.0]
    return affine


def _write_msd(root, n=5):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (20 + i % 2, 18, 8)  # (i, j, k): thick slices along k
        lab = np.zeros(shape, np.uint8)
        c = rng.integers(6, 12, size=2)
        lab[c[0] - 4 : c[0] + 4, c[1] - 4 : c[1] + 4, 2:6] = 1
        img = (lab * 2.0 + rng.normal(0, 0.3, size=shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, _affine(i)), str(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(lab, _affine(i)), str(root / "labelsTr" / f"case_{i:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1},
                                                   "channel_names": {"0": "MRI"}}))  # fmt: skip


def test_plan_train_eval_predict_volumes(tmp_path, capsys):
    data = tmp_path / "Task01_Tiny"
    _write_msd(data)
    plan_file = tmp_path / "plan.json"
    assert main(["plan", str(data), "--out", str(plan_file), "--no-progress"]) == 0
    plan = json.loads(plan_file.read_text())
    assert plan["spacing"] == pytest.approx([3.0, 0.9, 0.9]) and len(plan["patch_size"]) == 3
    assert plan["strides"][0] == [1, 1, 1] and plan["num_classes"] == 2

    run = tmp_path / "run"
    args = ["train", "--model", "dynunet", "--data", "nifti", "--set", f"data.root={data}",
            "--set", f"data.plan={plan_file}", "--set", "model.deep_supervision=true", "--epochs", "2",
            "--set", "train.batch_size=2", "--run-dir", str(run), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "best val Dice" in capsys.readouterr().out
    rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert "val_dice" in rows[-1] and "val_dice_lesion" in rows[-1]
    best = json.loads((run / "best.json").read_text())
    assert best["meta"]["task"] == "volumetric" and best["meta"]["volume"]["spacing"] == pytest.approx([3.0, 0.9, 0.9])

    assert (
        main(
            ["eval", "--checkpoint", str(run / "best.safetensors"), "--out", str(tmp_path / "ev"), "--batch-size", "1"]
        )
        == 0
    )
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["task"] == "volumetric" and 0.0 <= report["dice"] <= 1.0

    src = data / "imagesTr" / "case_001_0000.nii.gz"
    pred = tmp_path / "pred"
    assert (
        main(
            ["predict", str(src), "--checkpoint", str(run / "best.safetensors"), "--out", str(pred), "--tta", "mirror"]
        )
        == 0
    )
    out = nib.load(str(pred / "case_001.nii.gz"))
    ref = nib.load(str(src))
    np.testing.assert_allclose(out.affine, ref.affine)  # overlays the input in world coordinates
    assert out.shape == ref.shape and set(np.unique(np.asanyarray(out.dataobj)).tolist()) <= {0, 1}
    assert (
        main(["predict", str(data / "imagesTr"), "--checkpoint", str(run / "best.safetensors"), "--out", str(pred)])
        == 0
    )
    assert len(list(pred.glob("*.nii.gz"))) == 5

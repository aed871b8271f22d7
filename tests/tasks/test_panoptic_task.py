"""PanopticTask: collate, training targets, PQ evaluation (hand-computed and oracle = 1.0), results written and read
back, one Trainer epoch and train / eval / predict on the command line with a tiny test-only panoptic model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from maskworks.data import SyntheticShapes, build_transforms, instances_to_panoptic, read_id_png, rgb_to_id
from maskworks.engine import Trainer
from maskworks.tasks import TASKS, PanopticEvaluator, PanopticTask, build_task

NAMES = ["sky", "grass", "car", "person"]  # labels 0, 1 stuff; 2, 3 things
ISTHING = [False, False, True, True]


# ----------------------------------------------------------------------------- a tiny test-only panoptic model
def panoptic_from_labels(labels: torch.Tensor, probs: torch.Tensor, isthing) -> dict:
    """A contract output from a label map: one segment per stuff class, one per 4-connected component of a thing
    class; score = the mean probability of the class over the segment."""
    from scipy import ndimage

    ids = torch.zeros(labels.shape, dtype=torch.int32)
    infos = []
    for c in torch.unique(labels).tolist():
        region = (labels == c).cpu().numpy()
        parts, n = ndimage.label(region) if isthing[c] else (region.astype(np.int32), 1)
        for k in range(1, n + 1):
            m = torch.from_numpy(parts == k)
            sid = len(infos) + 1
            ids[m] = sid
            score = float(probs[c][m.to(probs.device)].mean())
            infos.append({"id": sid, "category_id": int(c), "isthing": bool(isthing[c]), "score": score})
    return {"panoptic_seg": ids, "segments_info": infos}


class TinyPanoptic(nn.Module):
    """A 1x1-convolution per-pixel classifier with the panoptic model contract: losses in training, per-image
    ``{"panoptic_seg", "segments_info"}`` in eval (things = connected components)."""

    def __init__(self, num_classes: int = 4, thing_classes=(), in_channels: int = 3):
        super().__init__()
        self.head = nn.Conv2d(in_channels, num_classes, 1)
        self.num_classes, self.thing_classes = num_classes, list(thing_classes)
        self.seen_targets = None

    def forward(self, images, targets=None):
        isthing = [c in self.thing_classes for c in range(self.num_classes)]
        if self.training:
            self.seen_targets = targets
            losses = [
                F.cross_entropy(self.head(im[None]), t["semantic"][None], ignore_index=255)
                for im, t in zip(images, targets)
            ]
            return {"loss_semantic": torch.stack(losses).mean(), "loss_zero": self.head.bias.sum() * 0.0}
        outs = []
        for im in images:
            probs = self.head(im[None]).softmax(1)[0]
            outs.append(panoptic_from_labels(probs.argmax(0), probs, isthing))
        return outs


def oracle(target, isthing) -> dict:
    """The ground truth of a target as a model output (crowd segments included: they are never false positives)."""
    ids, segments = instances_to_panoptic(target, target["semantic"], isthing)
    return {
        "panoptic_seg": ids.int(),
        "segments_info": [{**{k: s[k] for k in ("id", "category_id")}, "isthing": s["isthing"]} for s in segments],
    }


def _sample(h, w, segments, semantic=None):
    """A panoptic sample from ``[(label, iscrowd, (y0, y1, x0, x1)), ...]`` rectangles; later rectangles cover
    earlier ones (segments do not overlap)."""
    masks = torch.zeros(len(segments), h, w, dtype=torch.bool)
    for i, (_, _, (y0, y1, x0, x1)) in enumerate(segments):
        masks[:i, y0:y1, x0:x1] = False
        masks[i, y0:y1, x0:x1] = True
    labels = torch.tensor([s[0] for s in segments], dtype=torch.int64)
    sem = torch.full((h, w), 255, dtype=torch.int64)
    for i in range(len(segments)):
        sem[masks[i]] = labels[i]
    inst = {
        "labels": labels,
        "masks": masks,
        "iscrowd": torch.tensor([s[1] for s in segments], dtype=torch.int64),
        "isthing": torch.tensor([ISTHING[s[0]] for s in segments]),
    }
    return {"image": torch.rand(3, h, w), "mask": sem if semantic is None else semantic, "instances": inst,
            "meta": {"file": None}}  # fmt: skip


SCENE = [
    (0, 0, (0, 4, 0, 12)),
    (1, 0, (4, 10, 0, 12)),
    (2, 0, (5, 8, 1, 4)),
    (2, 0, (5, 8, 6, 9)),
    (3, 1, (0, 2, 9, 12)),
]


# ----------------------------------------------------------------------------- batches and training targets
def test_registered_and_built_by_name():
    assert TASKS["panoptic"] is PanopticTask and isinstance(build_task("panoptic"), PanopticTask)
    task = PanopticTask(class_names=NAMES, thing_classes=[2, 3])
    assert task.isthing == ISTHING and task.headline == "pq" and task.headline_label == "PQ"
    with pytest.raises(ValueError, match="disagrees"):
        PanopticTask(class_names=NAMES, isthing=ISTHING, thing_classes=[1])
    with pytest.raises(ValueError, match="one flag per class"):
        PanopticTask(class_names=NAMES, isthing=[True])


def test_collate_keeps_sizes_and_training_drops_crowd_segments_but_keeps_the_semantic_map():
    task = PanopticTask(NAMES, ISTHING)
    a, b = _sample(10, 12, SCENE), _sample(6, 7, [(1, 0, (0, 6, 0, 7))])
    batch = task.collate([a, b])
    assert [tuple(im.shape) for im in batch["images"]] == [(3, 10, 12), (3, 6, 7)]
    t = batch["targets"][0]
    assert set(t) == {"boxes", "labels", "masks", "iscrowd", "isthing", "semantic"}
    assert t["masks"].dtype == torch.bool and t["boxes"].shape == (5, 4)
    assert t["boxes"][2].tolist() == [1.0, 5.0, 4.0, 8.0]  # boxes from the masks when the sample has none
    assert t["isthing"].tolist() == [False, False, True, True, True]

    model = TinyPanoptic(4, [2, 3]).train()
    out = task.training_step(model, batch)
    assert set(out) == {"loss", "loss_semantic", "loss_zero"} and out["loss"].requires_grad
    seen = model.seen_targets[0]
    assert seen["labels"].tolist() == [0, 1, 2, 2] and seen["iscrowd"].tolist() == [0, 0, 0, 0]
    assert seen["masks"].shape == (4, 10, 12) and seen["isthing"].tolist() == [False, False, True, True]
    assert torch.equal(seen["semantic"], t["semantic"]) and (seen["semantic"] == 3).sum() == 6  # crowd kept


def test_collate_errors_and_isthing_from_the_task():
    task = PanopticTask(NAMES, ISTHING)
    with pytest.raises(ValueError, match="has no 'instances'.*panoptic dataset"):
        task.collate([{"image": torch.rand(3, 4, 4), "mask": torch.zeros(4, 4, dtype=torch.long)}])
    s = _sample(10, 12, SCENE)
    del s["instances"]["isthing"]
    assert task.collate([s])["targets"][0]["isthing"].tolist() == [False, False, True, True, True]
    with pytest.raises(ValueError, match="which classes are things"):
        PanopticTask().collate([s])
    model = nn.Conv2d(3, 4, 1)  # not a panoptic model: returns a tensor in training
    with pytest.raises(TypeError, match="dict of losses"):
        task.training_step(lambda images, targets: model(images[0][None]), task.collate([_sample(10, 12, SCENE)]))


# ----------------------------------------------------------------------------- evaluation
def test_prediction_equal_to_ground_truth_scores_pq_one():
    task = PanopticTask(NAMES, ISTHING)
    batch = task.collate([_sample(10, 12, SCENE), _sample(6, 7, [(1, 0, (0, 6, 0, 7)), (3, 0, (1, 3, 1, 3))])])
    ev = task.evaluator()
    ev.update([oracle(t, ISTHING) for t in batch["targets"]], batch)
    r = ev.compute()
    assert r["pq"] == r["sq"] == r["rq"] == 1.0
    assert r["pq_things"] == r["pq_stuff"] == 1.0 and r["num_images"] == 2 and len(ev) == 2
    per = r["per_class"]
    assert per["class_names"] == NAMES and per["isthing"] == ISTHING and per["classes"] == [0, 1, 2, 3]
    assert per["pq"] == [1.0, 1.0, 1.0, 1.0] and per["tp"] == [1, 2, 2, 1] and per["fp"] == per["fn"] == [0] * 4
    assert task.history_row(r) == {"val_pq": 1.0, "val_sq": 1.0, "val_rq": 1.0, "val_pq_things": 1.0,
                                   "val_pq_stuff": 1.0}  # fmt: skip


def test_hand_computed_pq_with_a_missed_thing_a_void_region_and_a_crowd_hit():
    """Ground truth: sky rows 0-3 and grass rows 4-8 (42 px each), cars at (5-8, 1-4) and (5-8, 6-9), a crowd of
    persons at (0-2, 9-12) (cut out of the sky), and row 9 void. Prediction: sky exact; grass over rows 4-9 but car 1
    (the second car missed, row 9 on void); car 1 exact; a person segment exactly on the crowd region (ignored,
    not a false positive)."""
    h, w = 10, 12
    sem = torch.full((h, w), 255, dtype=torch.int64)
    s = _sample(h, w, SCENE)
    sem[:9] = s["mask"][:9]
    s["mask"] = sem
    for m in s["instances"]["masks"]:
        m[9] = False  # row 9 is void in the ground truth
    task = PanopticTask(NAMES, ISTHING)
    batch = task.collate([s])
    ids = torch.zeros(h, w, dtype=torch.int32)
    ids[0:4] = 1  # sky
    ids[4:10] = 2  # grass, row 9 on ground-truth void
    ids[5:8, 1:4] = 3  # car 1
    ids[0:2, 9:12] = 4  # a person on the crowd region
    segments = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 2},
                {"id": 4, "category_id": 3}]  # fmt: skip
    ev = task.evaluator()
    ev.update([{"panoptic_seg": ids, "segments_info": segments}], batch)
    r = ev.compute()
    sky_iou = 1.0
    # grass: gt = rows 4-8 (60 px) - 2 cars (18) = 42; pred = rows 4-9 minus car 1 = 72 - 9 = 63 px, of which 12 on
    # void (left out of the union) and 9 on the missed car; |p & g| = 42
    grass_iou = 42 / (63 + 42 - 42 - 12)
    per = r["per_class"]
    assert per["tp"] == [1, 1, 1, 0] and per["fn"] == [0, 0, 1, 0] and per["fp"] == [0, 0, 0, 0]
    assert per["pq"][0] == pytest.approx(sky_iou) and per["pq"][1] == pytest.approx(grass_iou)
    assert per["pq"][2] == pytest.approx(1.0 / 1.5) and math.isnan(per["pq"][3])  # person: crowd only
    assert r["pq_stuff"] == pytest.approx((sky_iou + grass_iou) / 2) and r["pq_things"] == pytest.approx(2 / 3)
    assert r["pq"] == pytest.approx((sky_iou + grass_iou + 2 / 3) / 3) and r["n"] == 3
    assert r["rq_things"] == pytest.approx(2 / 3) and r["sq_things"] == pytest.approx(1.0)


def test_evaluator_learns_things_from_the_batch_meta_and_checks_outputs():
    ds = SyntheticShapes(num_samples=2, image_size=32, panoptic=True, transform=build_transforms(train=False))
    task = PanopticTask()  # no class space: the evaluator takes it from the samples' meta
    batch = task.collate([ds[0], ds[1]])
    ev = task.evaluator()
    ev.update([oracle(t, ds.isthing) for t in batch["targets"]], batch)
    assert ev.compute()["pq"] == 1.0 and ev.isthing == ds.isthing
    bad = oracle(batch["targets"][0], ds.isthing)
    bad["segments_info"] = bad["segments_info"][1:]
    with pytest.raises(ValueError, match="in the map but not listed"):
        ev.update([bad], {"targets": batch["targets"][:1], "meta": batch["meta"][:1]})
    small = {"panoptic_seg": torch.ones(4, 4, dtype=torch.int32), "segments_info": [{"id": 1, "category_id": 0}]}
    with pytest.raises(ValueError, match="expected the id map at the image's size"):
        ev.update([small], {"targets": batch["targets"][:1], "meta": batch["meta"][:1]})
    with pytest.raises(ValueError, match="which classes are things"):
        PanopticEvaluator().update([small], {"targets": batch["targets"][:1], "meta": [{}]})
    with pytest.raises(ValueError, match="no batch"):
        PanopticEvaluator().compute()


# ----------------------------------------------------------------------------- postprocess and write
def test_postprocess_and_write_coco_panoptic_results(tmp_path):
    task = PanopticTask(NAMES, ISTHING, category_ids=[17, 21, 3, 1])
    batch = task.collate([_sample(10, 12, SCENE)])
    out = oracle(batch["targets"][0], ISTHING)
    for s in out["segments_info"]:
        del s["isthing"]  # the task fills it from its classes
        s["score"] = 0.5
    (ids, segments), = task.postprocess([out])  # fmt: skip
    assert ids.dtype == torch.int32 and ids.shape == (10, 12)
    assert [s["isthing"] for s in segments] == [False, False, True, True, True]
    image = np.full((10, 12, 3), 100, dtype=np.uint8)
    written = task.write([(ids, segments)], tmp_path, ["sub/a"], images=[image], meta={"palette": None})
    assert [p.name for p in written] == ["a_panoptic.png", "a_panoptic_overlay.png", "panoptic_results.json"]
    assert np.array_equal(read_id_png(tmp_path / "sub" / "a_panoptic.png"), ids.numpy())
    over = np.asarray(Image.open(tmp_path / "sub" / "a_panoptic_overlay.png"))
    assert over.shape == (10, 12, 3) and not np.array_equal(over[0, 0], over[6, 0])  # sky vs grass colours
    res = json.loads((tmp_path / "panoptic_results.json").read_text())
    assert res["categories"] == [{"id": 17, "name": "sky", "isthing": 0}, {"id": 21, "name": "grass", "isthing": 0},
                                 {"id": 3, "name": "car", "isthing": 1}, {"id": 1, "name": "person", "isthing": 1}]  # fmt: skip
    (ann,) = res["annotations"]
    assert ann["file_name"] == "sub/a_panoptic.png" and ann["image_id"] == 0
    by_id = {s["id"]: s for s in ann["segments_info"]}
    car = next(s for s in segments if s["category_id"] == 2)
    assert by_id[car["id"]] == {"id": car["id"], "category_id": 3, "isthing": True, "score": 0.5, "area": 9,
                                "bbox": [1, 5, 3, 3], "iscrowd": 0}  # fmt: skip
    sky = next(s for s in segments if s["category_id"] == 0)
    assert by_id[sky["id"]]["category_id"] == 17 and by_id[sky["id"]]["area"] == 48 - 6
    with pytest.raises(ValueError, match="listed but absent"):
        task.postprocess(
            [{"panoptic_seg": torch.zeros(3, 3, dtype=torch.int32), "segments_info": [{"id": 1, "category_id": 0}]}]
        )


def test_written_pngs_decode_to_the_maps_and_evaluate_to_pq_one(tmp_path):
    """write -> read -> evaluate is lossless: the PNG ids of oracle outputs score PQ 1 against the targets."""
    ds = SyntheticShapes(num_samples=3, image_size=(24, 40), panoptic=True, transform=build_transforms(train=False))
    task = PanopticTask(ds.class_names, ds.isthing, category_ids=ds.category_ids)
    batch = task.collate([ds[i] for i in range(3)])
    results = task.postprocess([oracle(t, ds.isthing) for t in batch["targets"]])
    task.write(results, tmp_path, ["a", "b", "c"])
    res = json.loads((tmp_path / "panoptic_results.json").read_text())
    outputs = []
    for ann in res["annotations"]:
        ids = rgb_to_id(np.asarray(Image.open(tmp_path / ann["file_name"])))
        outputs.append({"panoptic_seg": torch.from_numpy(ids), "segments_info": ann["segments_info"]})
    for (ids, _), out in zip(results, outputs):
        assert np.array_equal(out["panoptic_seg"].numpy(), ids.numpy())
    ev = task.evaluator()
    ev.update(outputs, batch)
    assert ev.compute()["pq"] == 1.0


# ----------------------------------------------------------------------------- trainer
MODEL_NAME = "tiny_panoptic_for_tests"


@pytest.fixture
def tiny_registered(monkeypatch):
    """TinyPanoptic registered (for this test only) as a panoptic model."""
    from maskworks import registry

    registry._ensure_loaded()

    def tiny_panoptic_for_tests(num_classes=4, thing_classes=(), in_channels=3):
        return TinyPanoptic(num_classes, thing_classes, in_channels)

    entry = registry.ModelEntry(MODEL_NAME, tiny_panoptic_for_tests, "model", "panoptic")
    monkeypatch.setitem(registry._REGISTRY, MODEL_NAME, entry)
    return MODEL_NAME


def test_one_trainer_epoch_with_the_panoptic_task(tmp_path, tiny_registered):
    from maskworks import create_model

    train = SyntheticShapes(num_samples=8, image_size=32, panoptic=True, transform=build_transforms(train=False))
    val = SyntheticShapes(num_samples=4, image_size=32, panoptic=True, split="val",
                          transform=build_transforms(train=False))  # fmt: skip
    torch.manual_seed(0)
    model = create_model(tiny_registered, num_classes=train.num_classes, thing_classes=train.thing_classes)
    task = PanopticTask(train.class_names, train.isthing, category_ids=train.category_ids)
    trainer = Trainer(model, train, val, tmp_path, task=task, epochs=1, batch_size=4, lr=0.05, amp="off",
                      progress=False, device="cpu")  # fmt: skip
    summary = trainer.fit()
    row = trainer.history[-1]
    assert {"train_loss", "train_loss_semantic", "val_pq", "val_sq", "val_rq", "val_pq_things", "val_pq_stuff"} <= set(
        row
    )
    assert summary["metric"] == "pq" and 0.0 <= row["val_pq"] <= 1.0
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["meta"]["task"] == "panoptic" and "val_pq" in best["meta"]
    assert trainer.last_evaluator.compute()["num_images"] == 4


# ----------------------------------------------------------------------------- command line
def test_train_eval_predict_on_the_command_line(tmp_path, capsys, tiny_registered):
    from maskworks.cli.main import main

    run = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--model", tiny_registered, "--epochs", "1", "--run-dir", str(run)]
    args += ["--no-progress", "--set", "data.panoptic=true", "--set", "data.image_size=32"]
    args += ["--set", "data.num_train=8", "--set", "data.num_val=3", "--set", "train.batch_size=4"]
    assert main(args) == 0
    assert "best val PQ" in capsys.readouterr().out
    best = json.loads((run / "best.json").read_text())
    assert best["meta"]["task"] == "panoptic" and best["meta"]["thing_classes"] == [3, 4, 5]
    assert best["kwargs"]["thing_classes"] == [3, 4, 5]  # build_model passed the data's thing classes

    assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "PQ_th" in printed and "stripes" in printed and "things" in printed
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["task"] == "panoptic" and report["num_images"] == 3
    assert {"pq", "sq", "rq", "pq_things", "sq_things", "rq_things", "pq_stuff", "sq_stuff", "rq_stuff"} <= set(report)
    assert report["per_class"]["class_names"][3] == "circle"

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(images / "a.png")
    pred = tmp_path / "pred"
    assert main(["predict", str(images), "--checkpoint", str(run / "final.safetensors"), "--out", str(pred)]) == 0
    ids = read_id_png(pred / "a_panoptic.png")
    assert ids.shape == (20, 30) and Image.open(pred / "a_panoptic_overlay.png").size == (30, 20)
    res = json.loads((pred / "panoptic_results.json").read_text())
    (ann,) = res["annotations"]
    assert ann["file_name"] == "a_panoptic.png" and sorted(s["id"] for s in ann["segments_info"]) == sorted(
        set(np.unique(ids).tolist()) - {0}
    )
    assert [c["isthing"] for c in res["categories"]] == [0, 0, 0, 1, 1, 1]
    assert sum(s["area"] for s in ann["segments_info"]) == 600

    # --task: a model registered with one task refuses another
    code = main(["eval", "--checkpoint", str(run / "best.safetensors"), "--task", "semantic", "--out", str(tmp_path)])
    assert code == 2 and "serves no other task" in capsys.readouterr().err


def test_panoptic_model_on_non_panoptic_data_and_task_override_errors(tmp_path, capsys, tiny_registered):
    from maskworks.cli.main import main

    common = ["--no-progress", "--epochs", "1", "--run-dir", str(tmp_path / "r"), "--set", "data.num_train=4"]
    common += ["--set", "data.num_val=2"]
    assert main(["train", "--data", "synthetic", "--model", tiny_registered, *common]) == 2
    assert "a panoptic model needs panoptic data" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic", "--model", "unet", "--task", "panoptic", *common]) == 2
    assert "unet is a semantic model and serves no other task" in capsys.readouterr().err


# ----------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, outputs, batches, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ev = PanopticTask(NAMES, ISTHING).evaluator() if rank == 0 else PanopticTask(NAMES).evaluator()
        for i in range(rank, len(batches), world):  # the validation sampler's split: rank r gets r::world
            ev.update(outputs[i], batches[i])
        r = ev.all_reduce().compute()
        if rank == 1:
            with open(result_file, "w") as f:
                json.dump(r, f)
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduce_equals_a_single_process_evaluation(tmp_path):
    """Two gloo processes, each scoring half the batches (rank 1 even learns the classes from the batch meta),
    gather the same PQ counts as one process scoring all of them."""
    import socket

    import torch.multiprocessing as mp

    task = PanopticTask(NAMES, ISTHING)
    batches, outputs = [], []
    for k in range(3):
        batch = task.collate([_sample(10, 12, SCENE), _sample(6, 7, [(1, 0, (0, 6, 0, 7)), (3, 0, (1, 3, 1, 3))])])
        for m in batch["meta"]:
            m["isthing"] = ISTHING
        out = [oracle(t, ISTHING) for t in batch["targets"]]
        out[0]["panoptic_seg"] = out[0]["panoptic_seg"].clone()
        out[0]["panoptic_seg"][k : k + 3, :4] = 0  # a different miss in every batch
        batches.append(batch)
        outputs.append(out)
    single = task.evaluator()
    for out, batch in zip(outputs, batches):
        single.update(out, batch)
    expected = single.compute()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "rank1.json"
    mp.start_processes(_ddp_worker, args=(2, port, outputs, batches, str(result)), nprocs=2, start_method="fork")
    got = json.loads(result.read_text())
    assert got["num_images"] == expected["num_images"] == 6
    assert (got["tp"], got["fp"], got["fn"]) == (expected["tp"], expected["fp"], expected["fn"])
    assert got["pq"] == pytest.approx(expected["pq"], rel=1e-12) and expected["pq"] < 1.0
    assert got["per_class"]["pq"] == pytest.approx(expected["per_class"]["pq"], rel=1e-12)

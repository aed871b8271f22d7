"""Tasks: the semantic task is plain supervised training; the instance task batches, filters crowds, scores, writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from maskworks import create_model
from maskworks.data import SyntheticShapes, build_transforms, collate_samples
from maskworks.engine import Trainer, build_optimizer
from maskworks.engine.distributed import ShardedSampler
from maskworks.losses import CrossEntropyLoss
from maskworks.tasks import InstanceTask, SemanticTask, build_task, model_task


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_semantic_task_trainer_equals_a_plain_training_loop(tmp_path):
    """Trainer + SemanticTask == the textbook loop (same batches, same optimizer): bit for bit."""
    train = SyntheticShapes(num_samples=12, image_size=32, split="train", transform=build_transforms(train=False))
    torch.manual_seed(0)
    model = create_model("unet_vanilla", num_classes=train.num_classes, features=(8, 16, 32))
    reference = create_model("unet_vanilla", num_classes=train.num_classes, features=(8, 16, 32))
    reference.load_state_dict(model.state_dict())
    kwargs = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-4, "momentum": 0.9}
    trainer = Trainer(
        model,
        train,
        None,
        tmp_path,
        task=SemanticTask(CrossEntropyLoss()),
        epochs=2,
        batch_size=4,
        schedule="constant",
        amp="off",
        channels_last=False,
        progress=False,
        device="cpu",
        seed=3,
        **kwargs,
    )
    trainer.fit()

    optimizer = build_optimizer(
        reference, kwargs["optimizer"], kwargs["lr"], kwargs["weight_decay"], kwargs["momentum"]
    )
    loss_fn = CrossEntropyLoss()
    sampler = ShardedSampler(len(train), shuffle=True, seed=3, global_batch=4)
    losses = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(train, batch_size=4, sampler=sampler, collate_fn=collate_samples)
        reference.train()
        for batch in loader:
            loss = loss_fn(reference(batch["image"]), batch["mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    a, b = _weights(model), _weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert trainer.history[-1]["train_loss"] == pytest.approx(np.mean(losses[3:]), rel=1e-6)


def test_trainer_refuses_a_loss_next_to_a_task(tmp_path):
    train = SyntheticShapes(num_samples=4, image_size=32, transform=build_transforms(train=False))
    model = create_model("unet_vanilla", num_classes=train.num_classes, features=(8, 16, 32))
    with pytest.raises(ValueError, match="pass loss_fn to the task"):
        Trainer(model, train, None, tmp_path, task=SemanticTask(), loss_fn=CrossEntropyLoss(), batch_size=2)


def test_tasks_import_first_in_a_fresh_process():
    import subprocess
    import sys

    code = "import maskworks.tasks, maskworks.engine; print(maskworks.tasks.SemanticTask.kind)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "semantic", res.stderr[-2000:]


def test_registry_declares_tasks_and_build_task():
    assert model_task("unet") == "semantic"
    assert model_task(create_model("unet_vanilla", num_classes=2, features=(8, 16))) == "semantic"
    assert isinstance(build_task("instance"), InstanceTask)
    with pytest.raises(ValueError, match="unknown task 'panoptik'"):
        build_task("panoptik")


# ----------------------------------------------------------------------------- instance task
def _instance_sample(h, w, boxes, labels, crowd=None):
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, y1:y2, x1:x2] = True
    inst = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels),
        "masks": masks,
    }
    if crowd is not None:
        inst["iscrowd"] = torch.tensor(crowd)
    return {"image": torch.rand(3, h, w), "instances": inst, "meta": {"file": None}}


class _Recorder(nn.Module):
    """Stands in for a detection model: records its targets, returns two losses."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen = None

    def forward(self, images, targets=None):
        self.seen = (images, targets)
        return {"loss_a": self.w * 2.0, "loss_b": self.w * 0.5}


def test_instance_collate_keeps_sizes_and_training_drops_crowds():
    task = InstanceTask(class_names=["background", "a", "b"])
    batch = task.collate(
        [
            _instance_sample(20, 30, [(1, 2, 5, 6), (10, 10, 20, 18)], [1, 2], crowd=[0, 1]),
            _instance_sample(16, 16, [], []),
        ]
    )
    assert [im.shape for im in batch["images"]] == [(3, 20, 30), (3, 16, 16)]
    assert batch["targets"][1]["masks"].shape == (0, 16, 16)
    batch = task.to_device(batch, torch.device("cpu"))
    model = _Recorder()
    losses = task.training_step(model, batch)
    assert losses["loss"].item() == pytest.approx(2.5) and set(losses) == {"loss", "loss_a", "loss_b"}
    _, targets = model.seen
    assert targets[0]["labels"].tolist() == [1]  # the crowd region is not a training target
    assert targets[0]["masks"].dtype == torch.uint8 and targets[0]["masks"].shape == (1, 20, 30)
    assert task.num_images(batch) == 2


def test_instance_collate_needs_instances():
    with pytest.raises(ValueError, match="has no 'instances'"):
        InstanceTask().collate([{"image": torch.rand(3, 8, 8), "meta": {"file": "x.png"}}])


def test_instance_evaluator_scores_perfect_predictions_and_ignores_crowd_hits():
    task = InstanceTask(class_names=["background", "a", "b"])
    batch = task.collate(
        [_instance_sample(32, 32, [(1, 2, 10, 12), (15, 15, 30, 28), (0, 20, 8, 32)], [1, 2, 1], [0, 0, 1])]
    )
    t = batch["targets"][0]
    perfect = {
        "boxes": t["boxes"][:2],
        "labels": t["labels"][:2],
        "scores": torch.tensor([0.9, 0.8]),
        "masks": t["masks"][:2],
    }
    ev = task.evaluator()
    ev.update([perfect], batch)
    r = ev.compute()
    assert r["mask_ap"] == pytest.approx(1.0, abs=1e-6) and r["box_ap"] == pytest.approx(1.0, abs=1e-6)
    # a confident prediction on the crowd region is ignored, not a false positive
    crowd_hit = {
        k: torch.cat([perfect[k], v])
        for k, v in {
            "boxes": t["boxes"][2:],
            "labels": t["labels"][2:],
            "scores": torch.tensor([0.95]),
            "masks": t["masks"][2:],
        }.items()
    }
    ev.reset()
    ev.update([crowd_hit], batch)
    assert ev.compute()["mask_ap"] == pytest.approx(1.0, abs=1e-6)
    # without the crowd region in the targets the same hit is a false positive above every true positive of class a
    batch["targets"][0] = {k: v[:2] for k, v in t.items()}
    ev.reset()
    ev.update([crowd_hit], batch)
    assert ev.compute()["mask_ap"] < 0.9
    assert set(task.history_row(r)) == {"val_mask_ap", "val_mask_ap50", "val_box_ap", "val_box_ap50"}


def test_instance_postprocess_and_write(tmp_path):
    from pycocotools import mask as mask_utils

    task = InstanceTask(class_names=["background", "cat", "dog"], score_threshold=0.5)
    masks = torch.zeros(3, 24, 32, dtype=torch.bool)
    masks[0, 2:10, 3:12] = True
    masks[1, 12:20, 15:30] = True
    masks[2, 0:4, 0:4] = True
    out = {
        "boxes": torch.tensor([[3.0, 2, 12, 10], [15, 12, 30, 20], [0, 0, 4, 4]]),
        "labels": torch.tensor([1, 2, 1]),
        "scores": torch.tensor([0.6, 0.9, 0.2]),
        "masks": masks[:, None].float(),  # torchvision's (N, 1, H, W) probabilities
    }
    (res,) = task.postprocess([out])
    assert res["scores"].tolist() == pytest.approx([0.9, 0.6]) and res["labels"].tolist() == [2, 1]
    assert res["masks"].dtype == torch.bool and torch.equal(res["masks"][0], masks[1])
    image = np.zeros((24, 32, 3), np.uint8)
    written = task.write([res], tmp_path, ["img"], images=[image], meta={"category_ids": [None, 17, 42]}, polygons=True)
    assert (tmp_path / "img_instances.png").exists() and tmp_path / "coco_results.json" in written
    from PIL import Image

    ids = np.asarray(Image.open(tmp_path / "img_ids.png"))
    assert ids.dtype == np.uint16 and ids.shape == (24, 32)
    assert np.array_equal(ids == 1, masks[1].numpy()) and np.array_equal(ids == 2, masks[0].numpy())
    rows = json.loads((tmp_path / "coco_results.json").read_text())
    assert [r["category_id"] for r in rows] == [42, 17] and [r["category_name"] for r in rows] == ["dog", "cat"]
    assert rows[0]["bbox"] == [15.0, 12.0, 15.0, 8.0]
    decoded = mask_utils.decode({**rows[0]["segmentation"], "counts": rows[0]["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), masks[1].numpy())
    assert rows[0]["polygons"] and len(rows[0]["polygons"][0]) >= 6


def test_draw_instances_colours_each_instance():
    from maskworks.viz import draw_instances

    masks = torch.zeros(2, 40, 40, dtype=torch.bool)
    masks[0, 5:15, 5:15] = True
    masks[1, 20:35, 20:35] = True
    image = np.full((40, 40), 128, np.uint8)
    pic = draw_instances(
        image,
        {"masks": masks, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])},
        ["bg", "cell"],
        draw_text=False,
    )
    assert pic.shape == (40, 40, 3)
    inside0, inside1 = pic[10, 10], pic[27, 27]
    assert not np.array_equal(inside0, inside1) and not np.array_equal(inside0, [128, 128, 128])
    assert np.array_equal(pic[38, 2], [128, 128, 128])  # background untouched
    with pytest.raises(ValueError, match="instance masks are"):
        draw_instances(np.zeros((10, 10, 3), np.uint8), {"masks": masks})


def test_task_is_an_abstract_interface():
    from maskworks.tasks import Task

    with pytest.raises(TypeError, match="abstract"):
        Task()


def test_id_map_paste_orders():
    """A small object lying on a large one: the score order buries it under the more confident large mask; the
    occlusion order puts it in front (its whole area is overlap); mask probabilities, when given, decide first."""
    task = InstanceTask()
    big = torch.zeros(20, 20, dtype=torch.bool)
    big[2:18, 2:18] = True
    small = torch.zeros(20, 20, dtype=torch.bool)
    small[6:10, 6:10] = True
    result = {"masks": torch.stack([big, small]), "scores": torch.tensor([0.9, 0.6])}
    by_score = task.id_map(result, "score")
    assert (by_score == 2).sum() == 0 and (by_score == 1).sum() == 256
    assert torch.equal(task.id_map(result), by_score)  # the default
    by_occlusion = task.id_map(result, "occlusion")
    assert torch.equal(by_occlusion == 2, small) and torch.equal(by_occlusion == 1, big & ~small)
    probs = torch.stack([big.float() * 0.95, small.float() * 0.6])
    assert (task.id_map({**result, "mask_probs": probs}, "occlusion") == 2).sum() == 0
    with pytest.raises(ValueError, match="paste_order"):
        task.id_map(result, "depth")

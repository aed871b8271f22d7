"""Bottom-up instances from a U-Net with a discriminative embedding head (Q16)."""

from __future__ import annotations

import tempfile

import pytest
import torch

from maskworks import create_model
from maskworks.data import SyntheticShapes, build_transforms
from maskworks.engine import Trainer, seed_everything
from maskworks.models.instance.embedding import EmbeddingInstanceUNet
from maskworks.registry import model_entry
from maskworks.tasks import InstanceTask


def _target(h, w):
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 2:10, 2:12] = masks[1, 8:20, 10:22] = True  # overlapping: the second is painted over the first
    return {"masks": masks, "labels": torch.tensor([1, 2]), "boxes": torch.zeros(2, 4)}


def test_losses_train_and_eval_contract():
    torch.manual_seed(0)
    model = create_model("embedding_unet", encoder="resnet18", num_classes=3, embedding_dim=4)
    assert isinstance(model, EmbeddingInstanceUNet) and model_entry("embedding_unet").task == "instance"
    images = [torch.randn(3, 40, 50), torch.randn(3, 24, 30)]
    targets = [_target(40, 50), {"masks": torch.zeros(0, 24, 30, dtype=torch.bool), "labels": torch.zeros(0)}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_semantic", "loss_embedding"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    head = model.net.segmentation_head[0].weight.grad  # class rows and embedding rows both learn
    assert head[:3].abs().sum() > 0 and head[3:].abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    for det, (h, w) in zip(out, [(40, 50), (24, 30)]):
        n = det["masks"].shape[0]
        assert det["masks"].shape == (n, h, w) and det["masks"].dtype == torch.bool
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,) and det["scores"].shape == (n,)
        assert ((det["labels"] >= 1) & (det["labels"] < 3)).all()
        if n:
            assert det["masks"].sum(0).max() <= 1  # bottom-up instances never overlap


def test_padding_never_enters_the_targets():
    model = EmbeddingInstanceUNet("resnet18", num_classes=3, embedding_dim=2)
    images = [torch.randn(3, 40, 50), torch.randn(3, 24, 30)]
    classes, instances = model._targets(
        images, [_target(40, 50), _target(24, 30) | {"masks": _target(40, 50)["masks"][:, :24, :30]}], (64, 64)
    )
    assert (classes[0, 40:] == 255).all() and (instances[1, :, 30:] == 255).all()
    assert (instances[0][8:10, 10:12] == 2).all() and (classes[0][8:10, 10:12] == 2).all()  # paint order
    with pytest.raises(ValueError, match="coord_scale > 0 needs embedding_dim >= 2"):
        EmbeddingInstanceUNet("resnet18", embedding_dim=1)


@pytest.mark.slow
@pytest.mark.heavy
def test_embeddings_separate_touching_shapes_in_dense_scenes():
    """15 epochs on dense synthetic scenes (3-6 touching, overlapping shapes at 64 px, about 50 s): the grouped
    embeddings give mask AP50 >= 0.25 (0.35 measured); a model that merged touching shapes would score near 0."""
    seed_everything(0)
    kw = {"image_size": 64, "num_classes": 2, "max_shapes": 6, "min_shapes": 3, "radius_range": (0.1, 0.2)}
    train = SyntheticShapes(96, split="train", transform=build_transforms(train=True), dense=True, cache=True, **kw)
    val = SyntheticShapes(16, split="val", transform=build_transforms(train=False), dense=True, cache=True, **kw)
    model = create_model("embedding_unet", encoder="resnet18", num_classes=2, embedding_dim=8)
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(
            model,
            train,
            val,
            run,
            task=InstanceTask(class_names=train.class_names),
            epochs=15,
            batch_size=8,
            lr=2e-3,
            optimizer="adamw",
            progress=False,
            warmup_epochs=0.5,
            schedule="cosine",
        )
        history = trainer.fit()["history"]
    ap50 = [round(r["val_mask_ap50"], 3) for r in history]
    assert max(ap50[-3:]) >= 0.25, ap50

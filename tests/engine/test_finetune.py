"""Fine-tuning options of the trainer: frozen encoder, encoder LR multiplier, layer-wise LR decay, frozen BatchNorm."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from maskworks import create_model
from maskworks.checkpoint import CheckpointError
from maskworks.data import SyntheticShapes, build_transforms
from maskworks.engine import Trainer, build_optimizer, build_scheduler
from maskworks.engine.optim import find_encoder, param_groups, vit_layer_ids


def tiny_data(n=16, size=32, train=False):
    transform = build_transforms(train=train, hflip=0.5, crop_size=size) if train else build_transforms(train=False)
    return SyntheticShapes(num_samples=n, image_size=size, split="train", transform=transform)


def tiny_unet(k=4):
    torch.manual_seed(0)
    return create_model("unet", encoder="resnet18", num_classes=k, decoder_channels=(16, 16, 8, 8, 8))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def test_frozen_encoder_is_bit_identical_then_trains(tmp_path):
    train = tiny_data()
    model = tiny_unet(train.num_classes)
    trainer = Trainer(
        model,
        train,
        None,
        tmp_path,
        epochs=2,
        batch_size=8,
        lr=1e-2,
        weight_decay=0.5,  # decoupled AdamW decay would move every weight it touched
        freeze_encoder_epochs=1,
        progress=False,
        device="cpu",
    )
    enc0, dec0 = snapshot(model.encoder), snapshot(model.decoder)
    trainer.train_one_epoch(0)
    assert changed(enc0, model.encoder) == []  # weights and BatchNorm statistics, bit for bit
    assert changed(dec0, model.decoder)
    assert all(not p.requires_grad for p in model.encoder.parameters())
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    assert not any(id(p) in encoder_ids for p in trainer.optimizer.state)  # no optimizer state either
    trainer.train_one_epoch(1)
    assert all(p.requires_grad for p in model.encoder.parameters())
    moved = changed(enc0, model.encoder)
    assert any(k.endswith("weight") for k in moved) and any(k.endswith("running_mean") for k in moved)


def test_parameters_frozen_by_the_caller_stay_frozen(tmp_path):
    train = tiny_data()
    model = tiny_unet(train.num_classes)
    model.encoder.conv1.weight.requires_grad_(False)
    trainer = Trainer(
        model, train, None, tmp_path, epochs=2, batch_size=8, freeze_encoder_epochs=1, progress=False, device="cpu"
    )
    stem = model.encoder.conv1.weight.detach().clone()
    trainer.train_one_epoch(0)
    trainer.train_one_epoch(1)
    assert not model.encoder.conv1.weight.requires_grad and torch.equal(stem, model.encoder.conv1.weight)
    assert model.encoder.layer1[0].conv1.weight.requires_grad


def test_options_that_need_an_encoder_name_the_model(tmp_path):
    train = tiny_data()
    model = create_model("fast_scnn", num_classes=train.num_classes)
    assert find_encoder(model) is None
    with pytest.raises(ValueError, match=r"freeze_encoder_epochs=2 .*FastSCNN \(fast_scnn\) has neither"):
        Trainer(model, train, None, tmp_path, batch_size=8, freeze_encoder_epochs=2, device="cpu")
    with pytest.raises(ValueError, match=r"encoder_lr_mult=0.1 .*fast_scnn"):
        Trainer(model, train, None, tmp_path, batch_size=8, encoder_lr_mult=0.1, device="cpu")
    with pytest.raises(ValueError, match="freeze_encoder_epochs must be an integer"):
        Trainer(tiny_unet(), train, None, tmp_path, batch_size=8, freeze_encoder_epochs=-1, device="cpu")
    with pytest.raises(ValueError, match="layer_decay"):
        Trainer(tiny_unet(), train, None, tmp_path, batch_size=8, layer_decay=1.5, device="cpu")
    with pytest.raises(ValueError, match="ViT-family encoder"):  # a ResNet encoder has no transformer layers
        Trainer(tiny_unet(), train, None, tmp_path, batch_size=8, layer_decay=0.75, device="cpu")
    # a model with a `backbone` instead of an `encoder` qualifies too
    net = nn.Module()
    net.backbone, net.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)
    assert find_encoder(net) == ("backbone", net.backbone)


@pytest.mark.parametrize("stop_after", [1, 2])  # inside the frozen span, and at its end
def test_resume_around_the_frozen_span_equals_uninterrupted(tmp_path, stop_after):
    def make(run_dir, freeze=2):
        train = tiny_data(16, train=True)
        return Trainer(
            tiny_unet(train.num_classes),
            train,
            None,
            run_dir,
            epochs=3,
            batch_size=8,
            freeze_encoder_epochs=freeze,
            encoder_lr_mult=0.1,
            progress=False,
            device="cpu",
            deterministic=True,
            seed=5,
        )

    full = make(tmp_path / "a")
    full.fit()
    part = make(tmp_path / "b")
    part.epochs = stop_after  # stop early, as if killed
    part.fit()
    with pytest.raises(CheckpointError, match="freeze_encoder_epochs=2 .* freeze_encoder_epochs=1"):
        make(tmp_path / "b", freeze=1).load_checkpoint()  # other settings would not continue the same run
    resumed = make(tmp_path / "b")
    resumed.fit(resume=True)
    a, b = full.module.state_dict(), resumed.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_encoder_lr_mult_groups_follow_the_schedule():
    model = tiny_unet()
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.01, encoder_lr_mult=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter in exactly one group
    for g in opt.param_groups:
        in_encoder = {names[id(p)].startswith("encoder.") for p in g["params"]}
        assert len(in_encoder) == 1
        assert g["lr"] == pytest.approx(1e-4 if in_encoder.pop() else 1e-3)
        decays = {p.ndim > 1 for p in g["params"]}
        assert decays == {g["weight_decay"] > 0}
    assert {g["name"] for g in opt.param_groups} == {
        "encoder.decay",
        "encoder.no_decay",
        "head.decay",
        "head.no_decay",
    }
    sched = build_scheduler(opt, 10, "poly")
    for _ in range(4):
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["encoder.decay"] == pytest.approx(0.1 * lrs["head.decay"]) and lrs["head.decay"] < 1e-3


def _named_groups(groups, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted((tuple(sorted(names[id(p)] for p in g["params"])), g["lr_scale"], g["weight_decay"]) for g in groups)


@pytest.mark.parametrize("num_classes", [10, 0])
def test_layer_decay_groups_equal_timm(num_classes):
    timm = pytest.importorskip("timm")
    from timm.optim import param_groups_layer_decay

    ours = create_model("vit_small_patch16_224", num_classes=num_classes)
    ref = timm.create_model("vit_small_patch16_224", num_classes=num_classes, pretrained=False)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    mine = param_groups(ours, 0.05, layer_decay=0.75)
    theirs = param_groups_layer_decay(
        ref, weight_decay=0.05, layer_decay=0.75, no_weight_decay_list=ref.no_weight_decay()
    )
    assert _named_groups(mine, ours) == _named_groups(theirs, ref)
    assert len(mine) == (28 if num_classes else 26)  # stem, 12 blocks, head: decay / no-decay each


def test_layer_decay_in_a_segmentation_model_puts_the_decoder_on_top():
    net = nn.Module()
    net.encoder = create_model("vit_test_patch16", num_classes=0)
    net.decoder = nn.Conv2d(net.encoder.embed_dim, 3, 1)
    depth = len(net.encoder.blocks)
    ids = vit_layer_ids(net)
    assert ids["encoder.pos_embed"] == 0 and ids["encoder.patch_embed.proj.weight"] == 0
    assert ids["encoder.blocks.0.attn.qkv.weight"] == 1
    assert ids["encoder.norm.weight"] == ids[f"encoder.blocks.{depth - 1}.mlp.fc2.weight"] == depth
    assert ids["decoder.weight"] == depth + 1
    opt = build_optimizer(net, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5, encoder_lr_mult=0.2)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(net.decoder.weight)] == 1.0
    assert lr_of[id(net.encoder.blocks[0].attn.qkv.weight)] == pytest.approx(0.2 * 0.5**depth)
    assert lr_of[id(net.encoder.pos_embed)] == pytest.approx(0.2 * 0.5 ** (depth + 1))
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd_of[id(net.encoder.pos_embed)] == 0.0 and wd_of[id(net.encoder.cls_token)] == 0.0  # no_weight_decay()
    assert wd_of[id(net.encoder.blocks[0].attn.qkv.weight)] == 0.05


def test_freeze_bn_keeps_statistics_and_affine_parameters(tmp_path):
    train = tiny_data()
    torch.manual_seed(0)
    model = create_model("unet_vanilla", num_classes=train.num_classes, features=(8, 16, 32))
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert norms
    before = {n: snapshot(m) for n, m in norms.items()}
    convs = snapshot(model)
    modes = []
    for m in norms.values():
        m.register_forward_hook(lambda mod, args, out: modes.append(mod.training))
    trainer = Trainer(
        model, train, None, tmp_path, epochs=1, batch_size=8, freeze_bn=True, progress=False, device="cpu"
    )
    trainer.fit()
    assert modes and not any(modes)  # every BatchNorm ran in eval mode during training
    for n, m in norms.items():
        assert changed(before[n], m) == [], n  # running mean / var, batches tracked, weight, bias
        assert not m.weight.requires_grad
    assert any(k.endswith("conv.weight") or k.endswith(".0.weight") for k in changed(convs, model))
    assert model.training  # the model itself is in training mode
    assert math.isfinite(trainer.history[-1]["train_loss"])


@pytest.mark.slow
def test_ddp_with_a_frozen_encoder_equals_single_process(tmp_path):
    # DDP registers the parameters that need gradients when it is built: the trainer rebuilds it at unfreezing
    common = [
        "train",
        "--data",
        "synthetic",
        "--model",
        "unet_vanilla",
        "--no-progress",
        "--epochs",
        "2",
        *("--set", "model.features=[8,16,32]", "--set", "model.batch_norm=false"),
        *("--set", "data.image_size=32", "--set", "data.num_train=16", "--set", "data.num_val=4"),
        *("--set", "train.batch_size=4", "--set", "train.optimizer=sgd", "--set", "train.lr=0.05"),
        *("--set", "train.freeze_encoder_epochs=1", "--set", "train.encoder_lr_mult=0.5"),
        *("--set", "train.deterministic=true", "--set", "train.seed=7", "--set", "train.device=cpu"),
        *("--set", "train.amp=off"),  # float32: reduced bf16 gradients would round differently from one process
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    cli = [sys.executable, "-m", "maskworks.cli.main"]
    subprocess.run([*cli, *common, "--run-dir", str(single)], check=True, env=env, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    res = subprocess.run(
        [*launcher, "--master_port", str(port), "-m", "maskworks.cli.main", *common, "--run-dir", str(ddp)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(single / "final.safetensors"), load_file(ddp / "final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=f"{k} differs")
    first = [json.loads(x) for x in (single / "history.jsonl").read_text().splitlines()]
    assert first[0]["train_loss"] > 0 and len(first) == 2

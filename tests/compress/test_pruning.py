"""maskworks.compress: structured channel pruning (torch-pruning), magnitude pruning, pruned checkpoints."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn as nn

from maskworks import create_model, load_model, save_model
from maskworks.checkpoint import CheckpointError
from maskworks.compress import apply_structure, magnitude_prune, prune_channels, pruned_structure
from maskworks.testing import TINY_SEMANTIC, randomize_norms

tp = pytest.importorskip("torch_pruning")

K = 3  # classes of the test models
CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)


def tiny(name: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=K, **{**TINY_SEMANTIC[name], **kw})


def tiny_unet(seed: int = 0) -> nn.Module:
    return tiny("unet", seed)  # ResNet-18 encoder (residual additions), skips concatenated in the decoder


def kept(c: int, ratio: float) -> int:
    """Channels torch-pruning's local pruning keeps of a group of ``c``."""
    return int(c * (1 - ratio))


def image_convs(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the convolutions that read the image itself (their input channels are never pruned)."""
    found, hooks = set(), []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=name: found.add(n) if inp[0] is x else None))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return found


def conv_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of every Conv2d on ``x`` (output elements x input channels per group x kernel)."""
    macs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):

            def hook(mod, inp, out, n=name):
                macs[n] = out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)

            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return macs


# --------------------------------------------------------------------------- sizes
def test_prune_shrinks_convs_params_and_macs_as_predicted():
    ratio = 0.5
    x = torch.randn(1, 3, 64, 64)
    model = tiny_unet()
    reads_image = image_convs(model, x)
    assert reads_image == {"encoder.conv1"}
    macs0 = conv_macs(model, x)
    # Prediction from the unpruned architecture: every channel dimension keeps floor(c * (1 - ratio)) channels,
    # except the image's input channels and the class logits. Every channel count of this U-Net is even, so with
    # ratio 0.5 the prediction is exact (no rounding tolerance needed); in general a group can keep one channel
    # less than c * (1 - ratio).
    heads = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == K}
    assert heads == {"segmentation_head.0"}
    expected_params, expected_macs = 0, 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.groups == 1
            out_c = m.out_channels if name in heads else kept(m.out_channels, ratio)
            in_c = m.in_channels if name in reads_image else kept(m.in_channels, ratio)
            expected_params += out_c * in_c * math.prod(m.kernel_size) + (out_c if m.bias is not None else 0)
            expected_macs += macs0[name] * (out_c / m.out_channels) * (in_c / m.in_channels)
        elif isinstance(m, nn.BatchNorm2d):
            expected_params += 2 * kept(m.num_features, ratio)
        else:
            assert not list(m.parameters(recurse=False)), name
    params0 = sum(p.numel() for p in model.parameters())

    report = prune_channels(model, ratio)

    assert report.params_before == params0
    assert report.params_after == sum(p.numel() for p in model.parameters()) == expected_params
    assert conv_macs(model, x) and sum(conv_macs(model, x).values()) == pytest.approx(expected_macs, rel=1e-9)
    # A conv between two pruned layers keeps (1 - ratio)^2 of its weights and MACs; the first conv and the head
    # keep (1 - ratio), which puts the totals just above (1 - ratio)^2.
    assert (1 - ratio) ** 2 <= report.params_ratio < (1 - ratio) ** 2 + 0.01, report.summary()
    assert (1 - ratio) ** 2 <= report.macs_ratio < (1 - ratio) ** 2 + 0.03, report.summary()
    assert report.achieved_ratio == pytest.approx(ratio)
    assert report.ignored == ["segmentation_head.0"] and report.unused == []
    assert report.input_shape == (1, 3, 64, 64)
    for name, (before, after) in report.channels.items():
        assert after == (before if name in heads else kept(before, ratio)), name
    # the convolutions really are narrower
    assert model.encoder.layer1[0].conv1.weight.shape == (32, 32, 3, 3)
    assert model.encoder.layer4[1].conv2.weight.shape == (256, 256, 3, 3)
    assert model.segmentation_head[0].weight.shape == (K, 4, 3, 3)
    assert model.maskworks_pruned is True
    print(report.summary())


def test_residual_and_skip_dependencies():
    model = tiny_unet()
    prune_channels(model, 0.5)
    enc, dec = model.encoder, model.decoder
    # residual additions: the stem and every block of layer1 share their output channels; downsample branches
    # match the main branch
    assert enc.conv1.out_channels == enc.layer1[0].conv2.out_channels == enc.layer1[1].conv2.out_channels == 32
    for stage in (enc.layer2, enc.layer3, enc.layer4):
        assert stage[0].downsample[0].out_channels == stage[0].conv2.out_channels == stage[1].conv2.out_channels
    # skip concatenations: a decoder block reads the upsampled map and the pruned encoder map
    assert dec.blocks[0].conv1[0].in_channels == enc.layer4[1].conv2.out_channels + enc.layer3[1].conv2.out_channels
    assert dec.blocks[1].conv1[0].in_channels == dec.blocks[0].conv2[0].out_channels + enc.layer2[1].conv2.out_channels
    assert dec.blocks[3].conv1[0].in_channels == dec.blocks[2].conv2[0].out_channels + enc.conv1.out_channels
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 67, 93)).shape == (2, K, 67, 93)


def _zero_channels(dg, group) -> None:
    """Make the channels of ``group`` carry nothing: producer filters, norm entries and consumer slices zero."""
    for dep, idxs in group:
        m, fn = dep.target.module, dep.handler
        if not isinstance(m, nn.Module) or not idxs:
            continue
        idx = torch.as_tensor(list(idxs))
        out_fn = dg.is_out_channel_pruning_fn(fn)
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            m.weight.data[idx] = 0
            m.bias.data[idx] = 0
        elif isinstance(m, CONV_LINEAR):
            assert not getattr(m, "transposed", False) and getattr(m, "groups", 1) == 1
            if out_fn:
                m.weight.data[idx] = 0
                if m.bias is not None:
                    m.bias.data[idx] = 0
            else:
                m.weight.data[:, idx] = 0


def test_removing_dead_channels_keeps_outputs_exactly():
    """The strongest dependency check: give half the channels of every prunable group no effect at all (zero
    filters, BatchNorm scales and shifts, and zero input slices in every consumer), so that the L1 criterion
    must remove exactly those. Any slice removed in the wrong place of a residual addition or a skip
    concatenation changes the outputs."""
    model = randomize_norms(tiny_unet(), seed=1).eval()
    x = torch.randn(2, 3, 64, 80)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    g = torch.Generator().manual_seed(0)
    groups = 0
    with torch.no_grad():
        for group in dg.get_all_groups(ignored_layers=[model.segmentation_head[0]], root_module_types=CONV_LINEAR):
            root, fn = group[0].dep.target.module, group[0].dep.handler
            c = root.out_channels
            dead = torch.randperm(c, generator=g)[: c - kept(c, 0.5)].tolist()
            _zero_channels(dg, dg.get_pruning_group(root, fn, dead))
            groups += 1
        assert groups > 10
        before = model(x)
    report = prune_channels(model, 0.5, criterion="l1")
    assert report.params_ratio < 0.26
    with torch.no_grad():
        after = model.eval()(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- classes, sizes, aux heads
@pytest.mark.parametrize(
    ("name", "heads"),
    [
        ("unet", ["segmentation_head.0"]),
        ("fast_scnn", ["auxlayer.4", "classifier.conv.1"]),  # with its auxiliary head
        ("deeplabv3plus", ["segmentation_head.0"]),  # MobileNetV3-small: depthwise convs, squeeze-excitation
    ],
)
def test_classes_kept_and_odd_input_sizes(name, heads):
    model = tiny(name).train()
    report = prune_channels(model, 0.4)
    assert report.ignored == heads
    assert model.training and all(m.training for m in model.modules())  # the mode is kept
    assert report.params_ratio < 0.45 and report.macs_ratio < 0.5, report.summary()
    for head in heads:
        assert model.get_submodule(head).out_channels == K
    x = torch.randn(2, 3, 67, 93)
    out = model(x)  # training forward: auxiliary outputs too, and a backward pass for fine-tuning
    outs = [out] if torch.is_tensor(out) else [out["out"], *out.get("aux", [])]
    assert len(outs) == len(heads)
    assert all(o.shape == (2, K, 67, 93) for o in outs)
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, K, 67, 93)


def test_round_to_global_and_ignored_layers():
    model = tiny_unet()
    report = prune_channels(model, 0.5, round_to=8)
    for name, (before, after) in report.channels.items():
        assert after % 8 == 0 or after == before, (name, before, after)  # 8-channel decoder layers stay whole
    assert report.channels["decoder.blocks.4.conv1.0"] == (8, 8)

    model = tiny_unet()
    report = prune_channels(model, 0.5, global_pruning=True)
    fractions = {n: a / b for n, (b, a) in report.channels.items() if n not in report.ignored}
    assert 0.3 < report.achieved_ratio < 0.7, report.achieved_ratio
    assert min(fractions.values()) > 0 and max(fractions.values()) - min(fractions.values()) > 0.2
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, K, 64, 64)

    model = tiny_unet()
    layer2 = model.encoder.layer2
    report = prune_channels(model, 0.5, ignored_layers=["encoder.layer1", layer2])
    assert sorted(report.ignored) == sorted(["encoder.layer1", "encoder.layer2", "segmentation_head.0"])
    for name, (before, after) in report.channels.items():
        if name.startswith(("encoder.layer1", "encoder.layer2")):
            assert after == before, name
    assert report.channels["encoder.layer3.0.conv1"] == (256, 128)


# --------------------------------------------------------------------------- criteria
def _planted_block(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A U-Net whose encoder.layer1[0] conv1 -> bn1 -> conv2 group ranks its 64 channels one way by the conv
    filters' L1 norms and the opposite way by the BatchNorm scales."""
    model = tiny_unet(seed)
    block = model.encoder.layer1[0]
    rank = torch.randperm(64, generator=torch.Generator().manual_seed(seed))  # channel i has rank rank[i]
    with torch.no_grad():
        block.bn1.weight.copy_(0.1 + 0.01 * rank)  # |gamma| grows with the rank
        scale = 1.0 + (63 - rank).float()  # the filter's L1 norm falls with the rank
        block.conv1.weight.copy_(torch.ones_like(block.conv1.weight) * scale[:, None, None, None])
        block.conv2.weight.fill_(0.01)  # the consumer's input slices weigh the same for every channel
    return model, block.bn1.weight.detach().clone(), rank


def test_bn_scale_and_l1_keep_different_channels():
    model, gamma, rank = _planted_block()
    prune_channels(model, 0.5, criterion="bn_scale")
    by_gamma = torch.nonzero(rank >= 32).flatten()  # the 32 largest |gamma|, in channel order
    torch.testing.assert_close(model.encoder.layer1[0].bn1.weight.detach(), gamma[by_gamma])

    model, gamma, rank = _planted_block()
    prune_channels(model, 0.5, criterion="l1")
    by_l1 = torch.nonzero(rank < 32).flatten()  # the 32 largest filters
    torch.testing.assert_close(model.encoder.layer1[0].bn1.weight.detach(), gamma[by_l1])
    assert not set(by_gamma.tolist()) & set(by_l1.tolist())


# --------------------------------------------------------------------------- errors
def test_bad_arguments_and_unprunable_models_leave_the_model_unchanged():
    model = tiny_unet()
    with pytest.raises(ValueError, match="ratio"):
        prune_channels(model, 1.0)
    with pytest.raises(ValueError, match="criterion"):
        prune_channels(model, 0.5, criterion="l2")
    with pytest.raises(ValueError, match="round_to"):
        prune_channels(model, 0.5, round_to=0)
    with pytest.raises(ValueError, match="no submodule"):
        prune_channels(model, 0.5, ignored_layers=["encoder.layer9"])
    # attention that reshapes by a fixed head count: torch-pruning's graph misses that coupling
    segformer = tiny("segformer_b0")
    state = {k: v.clone() for k, v in segformer.state_dict().items()}
    with pytest.raises(RuntimeError, match="model is unchanged"):
        prune_channels(segformer, 0.5)
    after = segformer.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert not getattr(segformer, "maskworks_pruned", False)


# --------------------------------------------------------------------------- unstructured
def test_magnitude_prune_reaches_global_sparsity_and_leaves_no_masks():
    model = tiny("fast_scnn")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    before = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    shapes = {k: v.shape for k, v in model.state_dict().items()}

    sparsity = magnitude_prune(model, 0.5)

    weights = torch.cat([m.weight.detach().flatten() for m in layers])
    assert sparsity == pytest.approx(0.5, abs=0.01)
    assert sparsity == pytest.approx((weights == 0).float().mean().item())
    # global ranking: the zeros are the smallest magnitudes overall, and layers end at different sparsities
    assert before[weights == 0].max() <= before[weights != 0].min()
    per_layer = [(m.weight == 0).float().mean().item() for m in layers]
    assert max(per_layer) - min(per_layer) > 0.2
    # permanent: plain parameters, no weight_orig / weight_mask, no pruning hooks, same shapes
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert all(isinstance(m.weight, nn.Parameter) for m in layers)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, K, 64, 64)

    local = tiny("fast_scnn")
    magnitude_prune(local, 0.3, layers=nn.Conv2d, global_=False)
    for m in local.modules():
        if isinstance(m, nn.Conv2d):
            assert int((m.weight == 0).sum()) == round(0.3 * m.weight.numel())
    with pytest.raises(ValueError, match="amount"):
        magnitude_prune(local, 1.5)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["unet", "fast_scnn"])
def test_pruned_checkpoint_round_trip(tmp_path, name):
    model = randomize_norms(tiny(name), seed=2)
    prune_channels(model, 0.5)
    model.eval()
    path = save_model(model, tmp_path / "pruned", {"classes": ["a", "b", "c"]})
    recipe = json.loads((tmp_path / "pruned.json").read_text())
    assert recipe["meta"]["classes"] == ["a", "b", "c"]
    structure = recipe["meta"]["pruned_structure"]
    assert structure == pruned_structure(model)

    loaded = load_model(path)
    x = torch.randn(2, 3, 67, 93)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.maskworks_pruned is True
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    save_model(loaded, tmp_path / "again")  # a loaded pruned model saves its shapes again
    assert json.loads((tmp_path / "again.json").read_text())["meta"]["pruned_structure"] == structure

    # the functions on their own: a freshly built model takes the pruned state dict strictly
    fresh = apply_structure(tiny(name, seed=5), structure)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_unpruned_checkpoints_unchanged_and_bad_structures_refused(tmp_path):
    model = tiny_unet()
    save_model(model, tmp_path / "plain")
    assert "pruned_structure" not in json.loads((tmp_path / "plain.json").read_text())["meta"]

    prune_channels(model, 0.5)
    save_model(model, tmp_path / "p")
    recipe = json.loads((tmp_path / "p.json").read_text())
    recipe["meta"]["pruned_structure"]["decoder.nowhere"] = {"attrs": {}, "shapes": {}}
    (tmp_path / "p.json").write_text(json.dumps(recipe))
    with pytest.raises(CheckpointError, match="pruned shapes.*decoder.nowhere"):
        load_model(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="which the model does not have"):
        apply_structure(tiny_unet(), {"encoder.conv1": {"attrs": {}, "shapes": {"gamma": [3]}}})


# --------------------------------------------------------------------------- fine-tuning
@pytest.mark.slow
def test_finetuning_recovers_accuracy(tmp_path):
    """Train a small U-Net on synthetic shapes, prune half its channels (the parameters fall to a quarter), and
    fine-tune briefly with the ordinary trainer. Measured (seeds 0-3, 1 thread, ~15 s): original val mIoU
    0.85-0.96, right after pruning 0.36-0.60, after two fine-tuning epochs 0.89-0.96 (within 0.01 of the original
    or above it)."""
    from maskworks.data import SyntheticShapes, build_transforms
    from maskworks.engine import Trainer

    t0 = time.perf_counter()

    def data(n, split):
        return SyntheticShapes(
            num_samples=n,
            image_size=48,
            num_classes=2,  # background / shape: learnable in seconds on a CPU
            split=split,
            transform=build_transforms(train=False),
            return_instances=False,
            cache=True,
        )

    train, val = data(256, "train"), data(32, "val")
    seed = 2
    torch.manual_seed(seed)
    model = create_model("unet_vanilla", num_classes=2, features=(16, 32, 64))
    common = dict(batch_size=8, schedule="cosine", progress=False, device="cpu", seed=seed)
    trainer = Trainer(model, train, val, tmp_path / "train", epochs=3, lr=3e-3, **common)
    trainer.fit()
    original = trainer.evaluate()["miou"]

    report = prune_channels(model, 0.5)
    assert report.params_ratio < 0.26
    finetune = Trainer(model, train, val, tmp_path / "finetune", epochs=2, lr=2e-3, **common)
    pruned = finetune.evaluate()["miou"]
    finetune.fit()
    recovered = finetune.evaluate()["miou"]

    assert original > 0.85, original
    assert pruned < original - 0.2, (original, pruned)  # pruning without fine-tuning hurts
    assert recovered >= pruned + 0.2 and recovered >= original - 0.03, (original, pruned, recovered)
    print(f"val mIoU: original {original:.3f}, pruned {pruned:.3f}, fine-tuned {recovered:.3f}")
    # the trainer's checkpoints of the pruned model load with their pruned shapes
    final = load_model(tmp_path / "finetune" / "final.safetensors")
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(final(x), model.eval()(x))
    assert time.perf_counter() - t0 < 60

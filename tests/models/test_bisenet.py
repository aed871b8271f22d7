"""BiSeNet V1 / V2: sizes, strides, auxiliary outputs, parameter counts, batch-size-1 training, converters."""

import math

import pytest
import torch
import torch.nn as nn

import maskworks.models.semantic.bisenet  # noqa: F401  (registers bisenetv1 / bisenetv2)
from maskworks import create_model
from maskworks.layers import PooledBatchNorm2d
from maskworks.models.semantic.bisenet import (
    BiSeNetV1,
    BiSeNetV2,
    convert_coincheung_bisenetv1,
    convert_coincheung_bisenetv2,
)
from maskworks.testing import count_parameters, randomize_norms

NAMES = ["bisenetv1", "bisenetv2"]
NUM_AUX = {"bisenetv1": 2, "bisenetv2": 4}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: create_model(name, num_classes=5) for name in NAMES}


def test_parameter_counts():
    # Counted from the reference structures: CoinCheung/BiSeNet BiSeNetV1 (ResNet-18, bilinear heads: conv 3x3-BN-ReLU
    # + bias-free 1x1 classifier; 11,176,512 of the parameters are the ResNet-18) and BiSeNetV2 (19 classes:
    # 3,358,627 deployed = detail 519,232 + semantic 1,159,504 + BGA 478,720 + head 1,201,171; its four booster
    # heads add 1,872,860, 1.35 M of them in the 1/32 booster's 128 -> 1024 conv). Both reproduce the reference
    # outputs exactly after loading its weights (checked against the reference code with random weights).
    v1 = BiSeNetV1()
    aux_v1 = count_parameters(v1.conv_out16) + count_parameters(v1.conv_out32)
    assert count_parameters(v1) == 13_392_384
    assert count_parameters(v1) - aux_v1 == 13_242_240  # aux=False builds no auxiliary heads
    assert count_parameters(v1.encoder) == 11_176_512
    # the three bias-free classifiers have 256, 64 and 64 inputs
    assert [h.conv_out.weight.shape[:2] for h in (v1.conv_out, v1.conv_out16, v1.conv_out32)] == [
        (19, 256),
        (19, 64),
        (19, 64),
    ]
    v2 = BiSeNetV2()
    assert count_parameters(v2) == 5_231_487
    deployed = [count_parameters(getattr(v2, n)) for n in ("detail", "segment", "bga", "head")]
    assert deployed == [519_232, 1_159_504, 478_720, 1_201_171]
    assert sum(deployed) == 3_358_627  # "about 3.3-3.4 M": the deployed BiSeNetV2 (aux=False)
    assert count_parameters(v2) - sum(deployed) == 1_872_860


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(65, 97), (128, 256), (33, 31)])
def test_output_size_equals_input(models, name, size):
    model = models[name].eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, *size)


def test_intermediate_strides(models):
    h, w = 65, 97
    shapes = {}

    def hook(key):
        def fn(_m, _i, out):
            shapes[key] = [o.shape[-2:] for o in out] if isinstance(out, tuple) else out.shape[-2:]

        return fn

    v1, v2 = models["bisenetv1"].eval(), models["bisenetv2"].eval()
    handles = [
        v1.sp.register_forward_hook(hook("sp")),
        v1.cp.register_forward_hook(hook("cp")),
        v1.ffm.register_forward_hook(hook("ffm")),
        v2.detail.register_forward_hook(hook("detail")),
        v2.segment.register_forward_hook(hook("segment")),
        v2.bga.register_forward_hook(hook("bga")),
    ]
    with torch.no_grad():
        v1(torch.randn(1, 3, h, w))
        v2(torch.randn(1, 3, h, w))
    for handle in handles:
        handle.remove()
    s = lambda r: (math.ceil(h / r), math.ceil(w / r))  # noqa: E731
    assert tuple(shapes["sp"]) == s(8) == (9, 13)
    assert [tuple(t) for t in shapes["cp"]] == [s(8), s(16)]  # context features at 1/8 (for the FFM) and 1/16
    assert tuple(shapes["ffm"]) == s(8)
    assert tuple(shapes["detail"]) == s(8) and tuple(shapes["bga"]) == s(8)
    assert [tuple(t) for t in shapes["segment"]] == [s(4), s(8), s(16), s(32), s(32)]


@pytest.mark.parametrize("name", NAMES)
def test_train_aux_outputs_and_backward(models, name):
    model = models[name].train()
    model.zero_grad()
    out = model(torch.randn(2, 3, 33, 47))
    assert set(out) == {"out", "aux"} and out["out"].shape == (2, 5, 33, 47)
    assert len(out["aux"]) == NUM_AUX[name] and all(a.shape == (2, 5, 33, 47) for a in out["aux"])
    (out["out"].mean() + sum(a.mean() for a in out["aux"])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    model.zero_grad()


@pytest.mark.parametrize("name", NAMES)
def test_plain_tensor_in_eval_or_without_aux(models, name):
    model = models[name].eval()
    with torch.no_grad():
        assert isinstance(model(torch.randn(1, 3, 33, 47)), torch.Tensor)
    plain = create_model(name, num_classes=5, aux=False).train()
    assert isinstance(plain(torch.randn(2, 3, 33, 47)), torch.Tensor)
    assert not any(n.startswith(("conv_out16", "conv_out32", "aux")) for n, _ in plain.named_parameters())


@pytest.mark.parametrize("name", NAMES)
def test_batch_size_one_train_step(models, name):
    model = models[name].train()
    pooled = [m for m in model.modules() if isinstance(m, PooledBatchNorm2d)]
    assert len(pooled) == (3 if name == "bisenetv1" else 2)  # ARM x2 + global context; CE block BN x2
    before = [m.running_mean.clone() for m in pooled]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(1, 3, 65, 97), torch.randint(0, 5, (1, 65, 97))
    out = model(x)
    loss = nn.functional.cross_entropy(out["out"], y) + sum(0.4 * nn.functional.cross_entropy(a, y) for a in out["aux"])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    # one value per channel: the pooled norms used (and kept) their running statistics
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, pooled))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_channels", [1, 4])
def test_in_channels(name, in_channels):
    model = create_model(name, num_classes=2, in_channels=in_channels, aux=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, 33, 47)).shape == (1, 2, 33, 47)


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic(models, name):
    model = randomize_norms(models[name])
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_v1_other_encoder_and_validation():
    model = BiSeNetV1(encoder="resnet50", num_classes=2, aux=False).eval()
    assert model.cp.arm16.conv.conv.in_channels == 1024 and model.cp.arm32.conv.conv.in_channels == 2048
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 50)).shape == (1, 2, 40, 50)
    with pytest.raises(ValueError, match="num_classes"):
        BiSeNetV1(num_classes=0)
    with pytest.raises(ValueError, match="encoder"):
        BiSeNetV1(encoder="bisenetv2")
    with pytest.raises(ValueError, match="spatial_channels"):
        BiSeNetV1(spatial_channels=(64, 64, 128))
    with pytest.raises(ValueError, match="detail_channels"):
        BiSeNetV2(detail_channels=(64, 64, 96))
    with pytest.raises(ValueError, match="bga_upsample"):
        BiSeNetV2(bga_upsample="bicubic")


def test_v2_bilinear_bga_option():
    model = BiSeNetV2(num_classes=2, aux=False, bga_upsample="bilinear").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 97)).shape == (1, 2, 65, 97)


def test_coincheung_converters():
    # CoinCheung's V1 keeps the ResNet-18 under `cp.resnet` (with an ImageNet `fc`); everything else is named alike.
    ours = randomize_norms(BiSeNetV1(num_classes=4, aux=False))
    foreign = {
        ("cp.resnet." + k[len("encoder.") :] if k.startswith("encoder.") else k): v
        for k, v in ours.state_dict().items()
    }
    foreign["cp.resnet.fc.weight"], foreign["cp.resnet.fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    foreign = {"module." + k: v for k, v in foreign.items()}
    converted, dropped = convert_coincheung_bisenetv1(foreign)
    assert sorted(dropped) == ["cp.resnet.fc.bias", "cp.resnet.fc.weight"]
    assert set(converted) == set(ours.state_dict())
    fresh = BiSeNetV1(num_classes=4, aux=False).eval()
    fresh.load_state_dict(converted, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours(x))
    v2 = BiSeNetV2(num_classes=4)  # with the boosters
    converted, dropped = convert_coincheung_bisenetv2({"module." + k: v for k, v in v2.state_dict().items()})
    assert not dropped and set(converted) == set(v2.state_dict())
    # the CoinCheung key layout (conv-BN-ReLU children `conv`/`bn`/`relu`, booster / stage names)
    keys = set(v2.state_dict())
    assert {"detail.S1.0.conv.weight", "segment.S1S2.left.1.bn.weight", "segment.S5_5.bn.running_var"} <= keys
    assert {"segment.S3.0.dwconv1.0.weight", "segment.S3.1.dwconv.0.weight", "bga.left2.1.weight"} <= keys
    assert {"head.conv_out.1.bias", "aux5_4.conv_out.0.1.conv.weight"} <= keys


def test_v1_encoder_weights_from_a_local_torchvision_checkpoint(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = BiSeNetV1(num_classes=2, aux=False, encoder_weights=path)
    torch.testing.assert_close(model.encoder.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)

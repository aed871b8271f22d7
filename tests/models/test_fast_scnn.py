"""Fast-SCNN: sizes, strides, the paper's additive fusion, parameter count, auxiliary head, batch-size-1 training."""

import math

import pytest
import torch
import torch.nn as nn

import maskworks.models.semantic.fast_scnn  # noqa: F401  (registers fast_scnn)
from maskworks import create_model
from maskworks.layers import PooledBatchNorm2d
from maskworks.models.semantic.fast_scnn import DSConv, FastSCNN
from maskworks.testing import count_parameters


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("fast_scnn", num_classes=5, aux=True)


def test_parameter_count_matches_paper():
    # Built per the paper (= Tramac/Fast-SCNN-pytorch's FastSCNN(19, aux=False), whose count it equals and whose
    # outputs it reproduces after loading its weights): LTD 6,640 + GFE 1,066,112 + FFM 26,752 + classifier 38,547.
    # The paper reports 1.11 M.
    net = FastSCNN()
    parts = [
        count_parameters(net.learning_to_downsample),
        count_parameters(net.global_feature_extractor),
        count_parameters(net.feature_fusion),
        count_parameters(net.classifier),
    ]
    assert count_parameters(net) == sum(parts) == 1_138_051
    assert abs(count_parameters(net) / 1.11e6 - 1) < 0.03
    # classes only change the last 1x1 conv (with bias); the auxiliary head adds 3x3 64->32 + BN + 1x1 32->K
    k = 19
    assert count_parameters(net.classifier.conv) == 128 * k + k
    assert count_parameters(FastSCNN(aux=True)) - count_parameters(net) == 64 * 32 * 9 + 2 * 32 + 33 * k


def test_dsconv_is_cheap():
    # depthwise 3x3 + BN + pointwise 1x1 + BN, far fewer than a dense 3x3 conv
    cin, cout = 48, 64
    assert count_parameters(DSConv(cin, cout)) == cin * 9 + 2 * cin + cin * cout + 2 * cout
    assert count_parameters(DSConv(cin, cout)) < 9 * cin * cout / 5


@pytest.mark.parametrize("size", [(65, 97), (128, 256), (511, 767), (31, 33)])
def test_output_size_equals_input(model, size):
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, *size)


@pytest.mark.parametrize("size", [(65, 97), (511, 767)])
def test_intermediate_strides(model, size):
    h, w = size
    shapes = {}
    handles = [
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape))
        for name in ("learning_to_downsample", "global_feature_extractor", "feature_fusion")
    ]
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, h, w))
    for handle in handles:
        handle.remove()
    s = lambda r: (math.ceil(h / r), math.ceil(w / r))  # noqa: E731
    assert shapes["learning_to_downsample"] == (1, 64, *s(8))
    assert shapes["global_feature_extractor"] == (1, 128, *s(32))
    assert shapes["feature_fusion"] == (1, 128, *s(8))  # the 1/32 branch was upsampled to the exact 1/8 size


def test_fusion_is_additive_with_dilated_depthwise_conv(model):
    ffm = model.feature_fusion
    dw = ffm.dwconv.conv[0]
    assert dw.groups == dw.in_channels == 128 and dw.kernel_size == (3, 3) and dw.dilation == (4, 4)
    assert ffm.conv_higher_res[0].in_channels == 64  # the 1/8 branch is projected, not concatenated
    # higher and lower branches of different sizes fuse (the seed's concatenating FFM fails here)
    ffm.eval()
    with torch.no_grad():
        out = ffm(torch.randn(1, 64, 9, 13), torch.randn(1, 128, 3, 4))
    assert out.shape == (1, 128, 9, 13) and (out >= 0).all()
    assert FastSCNN(fusion_dilation=1).feature_fusion.dwconv.conv[0].dilation == (1, 1)


def test_train_aux_outputs_and_backward(model):
    model.train()
    model.zero_grad()
    out = model(torch.randn(2, 3, 65, 97))
    assert set(out) == {"out", "aux"} and len(out["aux"]) == 1
    assert out["out"].shape == out["aux"][0].shape == (2, 5, 65, 97)
    (out["out"].mean() + out["aux"][0].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    model.zero_grad()
    model.eval()
    with torch.no_grad():
        assert isinstance(model(torch.randn(1, 3, 64, 64)), torch.Tensor)
    plain = FastSCNN(num_classes=5).train()  # aux=False by default
    assert isinstance(plain(torch.randn(2, 3, 64, 64)), torch.Tensor) and not hasattr(plain, "auxlayer")


def test_batch_size_one_train_step(model):
    model.train()
    pooled = [m for m in model.modules() if isinstance(m, PooledBatchNorm2d)]
    assert len(pooled) == 4  # the pyramid pooling branches
    before = pooled[0].running_mean.clone()  # the 1x1 bin: one value per channel at batch size 1
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(1, 3, 65, 97), torch.randint(0, 5, (1, 65, 97))
    out = model(x)
    loss = nn.functional.cross_entropy(out["out"], y) + 0.4 * nn.functional.cross_entropy(out["aux"][0], y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and torch.equal(before, pooled[0].running_mean)
    model.zero_grad()


@pytest.mark.parametrize("in_channels", [1, 4])
def test_in_channels(in_channels):
    net = create_model("fast_scnn", num_classes=2, in_channels=in_channels).eval()
    with torch.no_grad():
        assert net(torch.randn(1, in_channels, 65, 97)).shape == (1, 2, 65, 97)


def test_eval_is_deterministic(model):
    model.eval()
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_align_corners_option_and_validation():
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    a = FastSCNN(num_classes=2, align_corners=True).eval()
    b = FastSCNN(num_classes=2).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert a(x).shape == b(x).shape and not torch.allclose(a(x), b(x))
    with pytest.raises(ValueError, match="num_classes"):
        FastSCNN(num_classes=0)
    with pytest.raises(ValueError, match="block_channels"):
        FastSCNN(block_channels=(64, 96))
    with pytest.raises(ValueError, match="bins"):
        FastSCNN(bins=())
    with pytest.raises(ValueError, match="dropout"):
        FastSCNN(dropout=1.0)


def test_tramac_key_layout():
    keys = set(FastSCNN(aux=True).state_dict())
    expected = {
        "learning_to_downsample.conv.conv.0.weight",
        "learning_to_downsample.dsconv1.conv.4.running_var",
        "global_feature_extractor.bottleneck1.0.block.1.conv.0.weight",
        "global_feature_extractor.bottleneck3.2.block.3.weight",
        "global_feature_extractor.ppm.conv4.conv.1.weight",
        "global_feature_extractor.ppm.out.conv.0.weight",
        "feature_fusion.dwconv.conv.0.weight",
        "feature_fusion.conv_lower_res.0.bias",
        "feature_fusion.conv_higher_res.1.weight",
        "classifier.dsconv2.conv.3.weight",
        "classifier.conv.1.bias",
        "auxlayer.4.weight",
    }
    assert expected <= keys

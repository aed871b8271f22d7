"""U-Net++: smp parity, any input size, deep supervision and pruned inference."""

import pytest
import torch
import torch.nn as nn

import maskworks.models.semantic.unetpp  # noqa: F401  (registers "unetplusplus")
from maskworks import create_model
from maskworks.models.semantic.unetpp import UNetPlusPlus, UnetPlusPlusDecoder
from maskworks.testing import count_parameters, randomize_norms

SMALL = (32, 16, 16, 8, 8)


def _small(**kw) -> UNetPlusPlus:
    kw.setdefault("num_classes", 3)
    return create_model("unetplusplus", encoder="resnet18", decoder_channels=SMALL, **kw)


@pytest.fixture(scope="module")
def ds_model() -> UNetPlusPlus:
    """One small deep-supervised model shared by the tests that do not change its weights."""
    torch.manual_seed(0)
    return randomize_norms(_small(deep_supervision=True), seed=1)


def _paper_node(key: str, depth: int) -> tuple[int, int]:
    """smp key ``x_{d}_{l}`` -> the paper's ``(i, j)`` of ``X^{i,j}`` (see the module docstring)."""
    d, lv = (int(v) for v in key.split("_")[1:])
    return depth - 1 - lv, lv - d + 1


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34"])
def test_smp_parity_and_parameter_count(encoder):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    ref = randomize_norms(smp.UnetPlusPlus(encoder, encoder_weights=None, classes=3))
    ours = create_model("unetplusplus", encoder=encoder, num_classes=3).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert count_parameters(ours) == count_parameters(ref) == {"resnet18": 15_970_739, "resnet34": 26_078_899}[encoder]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_smp_parity_without_decoder_norm_and_default_count():
    smp = pytest.importorskip("segmentation_models_pytorch")
    ref = smp.UnetPlusPlus("resnet18", encoder_weights=None, classes=2, decoder_use_norm=False, in_channels=1).eval()
    ours = create_model("unetplusplus", encoder="resnet18", num_classes=2, decoder_batch_norm=False, in_channels=1)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x), atol=1e-4, rtol=1e-4)
    # default configuration (resnet34, 1 class); deep supervision adds only the aux heads
    ref = smp.UnetPlusPlus(encoder_weights=None)
    ds = create_model("unetplusplus", deep_supervision=True)
    aux = sum(p.numel() for n, p in ds.named_parameters() if n.startswith("aux_heads."))
    assert count_parameters(ds) - aux == count_parameters(ref) == 26_078_609
    result = ds.load_state_dict(ref.state_dict(), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys
    assert all(k.startswith("aux_heads.") for k in result.missing_keys)


def test_finest_nodes_mapping():
    # X^{0,j} = x_{K-j}_{K-1}; channels: encoder map 0 for j < K, decoder_channels[K-1] for j = K
    dec = UnetPlusPlusDecoder((64, 64, 128, 256, 512), (256, 128, 64, 32, 16))
    assert dec.depth == 4
    assert [dec.finest_key(4, j) for j in range(1, 5)] == ["x_3_3", "x_2_3", "x_1_3", "x_0_3"]
    assert [_paper_node(dec.finest_key(4, j), 4) for j in range(1, 5)] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert dec.finest_channels == (64, 64, 64, 32)
    # every nested node is one X^{i,j} with i + j <= K, each exactly once
    nested = sorted(_paper_node(k, 4) for k in dec.blocks if k != "x_0_4")
    assert nested == sorted((i, j) for i in range(4) for j in range(1, 5) if i + j <= 4)


@pytest.mark.parametrize("size", [(33, 47), (31, 17)])
def test_output_size_equals_input(ds_model, size):
    with torch.no_grad():
        assert ds_model.eval()(torch.randn(2, 3, *size)).shape == (2, 3, *size)


def test_padding_does_not_leak_into_output(ds_model):
    model = ds_model.eval()
    x = torch.randn(1, 3, 33, 47)
    padded = torch.nn.functional.pad(x, (0, 17, 0, 31))  # to 64x64, the size the model pads to
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded)[..., :33, :47])


def test_channel_bookkeeping_for_any_filters():
    model = create_model("unetplusplus", encoder="resnet18", decoder_channels=(4, 12, 6, 10, 2), deep_supervision=True)
    out = model.train()(torch.randn(2, 3, 33, 47))
    assert out["out"].shape == (2, 1, 33, 47) and [a.shape for a in out["aux"]] == [(2, 1, 33, 47)] * 3


@pytest.mark.parametrize("num_maps", [2, 3, 4])
def test_decoder_for_other_encoders(num_maps):
    # an encoder whose maps start at 1/4 (ConvNeXt / Swin style), with any number of maps
    enc = (6, 10, 14, 18)[:num_maps]
    dec = UnetPlusPlusDecoder(enc, (12, 10, 8, 6)[:num_maps])
    feats = [torch.randn(2, c, 64 // 4 // 2**i, 48 // 4 // 2**i) for i, c in enumerate(enc)]
    assert dec(feats, (64, 48)).shape == (2, (12, 10, 8, 6)[num_maps - 1], 64, 48)
    assert len(dec.forward_nested(feats)) == num_maps * (num_maps - 1) // 2


def test_deep_supervision_outputs(ds_model):
    with torch.no_grad():
        out = ds_model.train()(torch.randn(2, 3, 33, 47))
        assert set(out) == {"out", "aux"} and out["out"].shape == (2, 3, 33, 47)
        assert len(out["aux"]) == ds_model.depth - 1 == 3 and all(a.shape == (2, 3, 33, 47) for a in out["aux"])
        assert isinstance(ds_model.eval()(torch.randn(1, 3, 32, 32)), torch.Tensor)
        # without deep supervision training returns a plain tensor
        assert isinstance(_small().train()(torch.randn(2, 3, 32, 32)), torch.Tensor)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_pruned_inference_equals_aux_output(ds_model, bn_mode):
    model = ds_model.train()
    for m in model.modules():  # "eval": running statistics (inference numerics), still returning the aux outputs
        if isinstance(m, nn.BatchNorm2d):
            m.train(bn_mode == "train")
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        full = model(x)
        for depth in range(1, model.depth):
            torch.testing.assert_close(model(x, depth=depth), full["aux"][depth - 1], atol=0, rtol=0)
        torch.testing.assert_close(model(x, depth=model.depth), full["out"], atol=0, rtol=0)


def test_pruning_runs_only_the_needed_nodes():
    model = _small(deep_supervision=True).eval()
    ran: list[str] = []
    for key, block in model.decoder.blocks.items():
        block.register_forward_hook(lambda _m, _i, _o, key=key: ran.append(key))
    for i, head in enumerate(model.aux_heads):
        head.register_forward_hook(lambda _m, _i, _o, i=i: ran.append(f"aux{i + 1}"))
    x = torch.randn(1, 3, 32, 32)
    k = model.depth
    with torch.no_grad():
        model(x)
        assert len(ran) == k * (k + 1) // 2 + 1 and "x_0_4" in ran  # 10 nested blocks + final block
        for depth in range(1, k):
            ran.clear()
            model(x, depth=depth)
            nested = [key for key in ran if key.startswith("x_")]
            # exactly the nodes X^{i,j} with i + j <= L, then the head of X^{0,L}
            assert sorted(_paper_node(key, k) for key in nested) == sorted(
                (i, j) for i in range(depth) for j in range(1, depth + 1) if i + j <= depth
            )
            assert len(nested) == depth * (depth + 1) // 2 < k * (k + 1) // 2
            assert ran[-1] == f"aux{depth}"


def test_prune_sets_default_depth(ds_model):
    model = ds_model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        at2 = model(x, depth=2)
        full = model(x)
        try:
            assert model.prune(2) is model and model.inference_depth == 2
            torch.testing.assert_close(model(x), at2, atol=0, rtol=0)
            model.prune(None)
            torch.testing.assert_close(model(x), full, atol=0, rtol=0)
            model.prune(3)
            assert isinstance(model.train()(x), torch.Tensor)  # a pruned model returns one head in training too
        finally:
            model.prune(None).eval()


def test_depth_argument_errors():
    with pytest.raises(ValueError, match="needs the deep-supervision heads"):
        _small()(torch.randn(1, 3, 32, 32), depth=2)
    model = UNetPlusPlus(encoder="resnet18", decoder_channels=SMALL, deep_supervision=True)
    for bad in (0, 5, 1.5, True):
        with pytest.raises(ValueError, match="depth must be an int in 1..4"):
            model.prune(bad)
    with pytest.raises(ValueError, match="one entry per encoder map \\(5\\)"):
        UNetPlusPlus(encoder="resnet18", decoder_channels=(64, 32, 16))
    with pytest.raises(ValueError, match="registered backbone, got 'unetplusplus'"):
        UNetPlusPlus(encoder="unetplusplus")
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        UNetPlusPlus(encoder="resnet18", num_classes=0)


def test_batch_size_one_train_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = _small(deep_supervision=True).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(1, 3, 33, 47), torch.randint(0, 3, (1, 33, 47))
    out = model(x)
    loss = sum(nn.functional.cross_entropy(o, y) for o in [out["out"], *out["aux"]])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    assert torch.isfinite(loss)

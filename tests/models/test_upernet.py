"""UPerNet: HF UperNetForSemanticSegmentation parity (Swin-T and ConvNeXt-T backbones, logits and auxiliary logits),
key conversion, parameter count, any input size, gradients, aliases, encoder output norms."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

import maskworks.models.semantic.upernet  # noqa: F401  (registers "upernet" and its aliases)
from maskworks import create_model
from maskworks.convert.upernet import convert_hf_upernet, is_hf_upernet_state_dict
from maskworks.layers.norm import PooledBatchNorm2d
from maskworks.models.semantic.upernet import UPERNET_ALIASES, UPerNet
from maskworks.registry import model_entry
from maskworks.testing import count_parameters, randomize_norms

transformers = pytest.importorskip("transformers")

HF_UPERNET_SWIN_TINY_PARAMS = 59_943_398  # HF UperNet Swin-T, 150 classes, with the auxiliary head
HF_SWIN_UNUSED_FINAL_NORM = 2 * 768  # HF SwinBackbone keeps SwinModel's final `layernorm`, never used
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _hf_config(backbone_config, **kwargs):
    return transformers.UperNetConfig(
        backbone_config=backbone_config, num_labels=150, use_auxiliary_head=True, **kwargs
    )


def _hf_upernet(backbone_config, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.UperNetForSemanticSegmentation(_hf_config(backbone_config, **kwargs))
    return randomize_norms(model, layer_norm=True, perturb=0.02)


def _swin_tiny_config():
    return transformers.SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.0,
        out_features=STAGES,
    )  # fmt: skip


def _convnext_tiny_config():
    # lists: transformers 5.25's ConvNextBackbone fails on the config's default tuples (tuple + list)
    return transformers.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], out_features=STAGES)


# narrow heads for the parity runs (the 512-wide head at stride 4 dominates the CPU time); the layout is the same
SMALL_HEADS_HF = {"hidden_size": 64, "auxiliary_channels": 32}
SMALL_HEADS = {"channels": 64, "aux_channels": 32}


def _hf_logits(hf, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's logits and auxiliary logits (its forward computes the latter only for the loss)."""
    features = hf.backbone(x).feature_maps
    up = lambda t: F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
    return up(hf.decode_head(features)), up(hf.auxiliary_head(features))


def _load_hf(ours: UPerNet, hf) -> list[str]:
    converted, dropped = convert_hf_upernet(hf.state_dict())
    result = ours.load_state_dict(converted, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    return dropped


def _ours_with_aux_eval_norms(ours: UPerNet, x: torch.Tensor) -> dict:
    """Our forward in training mode (so the auxiliary logits come back) with the BatchNorms in eval mode (running
    statistics), i.e. the eval numerics when dropout is 0."""
    ours.train()
    for m in ours.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        return ours(x)
    finally:
        ours.eval()


@pytest.fixture(scope="module")
def swin_default():
    """``upernet_swin_tiny`` with its defaults (150 classes, 512-wide head, aux head)."""
    torch.manual_seed(0)
    return create_model("upernet_swin_tiny", num_classes=150).eval()


# --------------------------------------------------------------------------- HF parity
def test_param_count_swin_tiny(swin_default):
    with torch.device("meta"):
        hf = transformers.UperNetForSemanticSegmentation(_hf_config(_swin_tiny_config()))
    assert count_parameters(hf) == HF_UPERNET_SWIN_TINY_PARAMS
    # ours has no final encoder norm (build_encoder prunes it: only forward_features would use it)
    assert count_parameters(swin_default) + HF_SWIN_UNUSED_FINAL_NORM == HF_UPERNET_SWIN_TINY_PARAMS


def test_hf_parity_swin_tiny():
    hf = _hf_upernet(_swin_tiny_config(), **SMALL_HEADS_HF).eval()
    ours = create_model("upernet_swin_tiny", num_classes=150, dropout=0.0, **SMALL_HEADS)
    # the unused final norm of transformers 5's SwinBackbone is the only key left out
    assert _load_hf(ours, hf) == ["backbone.swin.layernorm.weight", "backbone.swin.layernorm.bias"]
    assert is_hf_upernet_state_dict(hf.state_dict()) and not is_hf_upernet_state_dict(ours.state_dict())
    # 256: no stage map (64, 32, 16, 8) is a multiple of the window 7 and the last is barely larger: HF's
    # SwinBackbone pads before the cyclic shift and never clips the window, as our encoder built for UPerNet does
    assert all(blk.pad_first for stage in ours.encoder.layers for blk in stage.blocks)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_aux = _hf_logits(hf, x)
        out = _ours_with_aux_eval_norms(ours, x)
    torch.testing.assert_close(out["out"], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["aux"][0], ref_aux, atol=1e-4, rtol=1e-4)


def test_hf_parity_convnext_tiny():
    hf = _hf_upernet(_convnext_tiny_config(), **SMALL_HEADS_HF).eval()
    ours = create_model("upernet_convnext_tiny", num_classes=150, dropout=0.0, **SMALL_HEADS).eval()
    assert count_parameters(ours) == count_parameters(hf)
    assert _load_hf(ours, hf) == []
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 64, 96, generator=g)
    with torch.no_grad():
        ref, ref_aux = _hf_logits(hf, x)
        torch.testing.assert_close(hf(x).logits, ref)  # _hf_logits is HF's forward
        torch.testing.assert_close(ours(x), ref, atol=1e-4, rtol=1e-4)  # eval: logits only
        torch.testing.assert_close(_ours_with_aux_eval_norms(ours, x)["aux"][0], ref_aux, atol=1e-4, rtol=1e-4)
    # training mode (batch statistics; HF's heads have no dropout, ours is built with dropout=0): main + aux logits
    ours.train(), hf.train()
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        ref, ref_aux = _hf_logits(hf, x)
        out = ours(x)
    assert set(out) == {"out", "aux"} and len(out["aux"]) == 1
    torch.testing.assert_close(out["out"], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["aux"][0], ref_aux, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- any size, gradients
def test_any_size_swin(swin_default):
    model = swin_default
    with torch.no_grad():
        for size in [(97, 131), (33, 33)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 150, *size)


def test_any_size_resnet_skips_stride2_map():
    model = create_model("upernet", encoder="resnet18", num_classes=4, channels=32, aux_channels=16).eval()
    assert model._feature_indices == (1, 2, 3, 4) and model._pad_multiple == 32
    assert model.decode_head.in_channels == (64, 128, 256, 512)
    assert model.auxiliary_head.convs[0].conv.in_channels == 256  # third of the four maps (stride 16)
    with torch.no_grad():
        for size in [(97, 131), (33, 33)]:
            assert model(torch.randn(2, 3, *size)).shape == (2, 4, *size)


def test_gradients_reach_every_parameter_batch1(swin_default):
    model = copy.deepcopy(swin_default).train()
    assert isinstance(model.decode_head.psp_modules[0][1].bn, PooledBatchNorm2d)  # the 1x1 bin trains at batch 1
    out = model(torch.randn(1, 3, 33, 47))
    assert out["out"].shape == out["aux"][0].shape == (1, 150, 33, 47)
    (out["out"].square().mean() + 0.4 * out["aux"][0].square().mean()).backward()
    no_grad = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.isfinite().all())
    ]
    assert no_grad == []


def test_outputs_by_mode_and_aux():
    model = create_model("upernet", encoder="resnet18", num_classes=2, channels=16, aux_channels=8)
    x = torch.randn(2, 3, 64, 64)
    assert isinstance(model.train()(x), dict)
    assert isinstance(model.eval()(x), torch.Tensor)
    model = create_model("upernet", encoder="resnet18", num_classes=2, channels=16, aux=False)
    assert model.auxiliary_head is None and isinstance(model.train()(x), torch.Tensor)


# --------------------------------------------------------------------------- encoder norms, aliases, arguments
def test_encoder_out_norms(swin_default):
    assert len(swin_default.encoder.stage_norms) == 4
    small = {"num_classes": 2, "channels": 16, "aux_channels": 8}
    assert len(create_model("upernet", encoder="convnextv2_atto", **small).encoder.stage_norms) == 4
    assert (
        create_model("upernet", encoder="convnextv2_atto", encoder_out_norms=False, **small).encoder.stage_norms is None
    )
    resnet = create_model("upernet", encoder="resnet18", **small)  # no out_norms option: built without
    assert getattr(resnet.encoder, "stage_norms", None) is None


def test_aliases():
    assert model_entry("upernet").fn is UPerNet
    assert UPerNet.__init__.__defaults__[0] == "swin_tiny_patch4_window7_224"
    # HF openmmlab/upernet-swin-base / -large: mmseg's window-12 Swin pretrained at 384
    assert UPERNET_ALIASES["upernet_swin_base"] == "swin_base_patch4_window12_384"
    for alias, encoder in UPERNET_ALIASES.items():
        assert model_entry(encoder).kind == "backbone"
        assert model_entry(alias).kind == "model"
        assert "encoder" not in inspect.signature(model_entry(alias).fn).parameters
    with pytest.raises(TypeError, match="encoder"):
        create_model("upernet_swin_tiny", encoder="resnet18")
    model = create_model("upernet_resnet50", num_classes=7, channels=16, aux=False)  # kwargs forwarded
    assert model.decode_head.conv_seg.out_channels == 7 and model.auxiliary_head is None
    assert model.decode_head.in_channels == (256, 512, 1024, 2048)


def test_bad_arguments():
    with pytest.raises(ValueError, match="pool_scales"):
        UPerNet("resnet18", pool_scales=())
    with pytest.raises(ValueError, match="dropout"):
        UPerNet("resnet18", dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        UPerNet("resnet18", num_classes=0)

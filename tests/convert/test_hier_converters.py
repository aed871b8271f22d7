"""torchvision and HF transformers Swin V1 / V2 and ConvNeXt V1 / V2 checkpoints -> maskworks backbones: stage-map
parity (full-size Swin-T / ConvNeXt-T for torchvision and HF V1, small configs for the V2 and ``*Backbone`` ones),
both HF key layouts, parameter counts, detection and routing by ``load_weights``, input-channel adaptation."""

import pytest
import torch
import torch.nn as nn

from maskworks import create_model
from maskworks.backbones.convnext import ConvNeXt
from maskworks.backbones.swin import SwinTransformer
from maskworks.backbones.swin_v2 import SwinTransformerV2
from maskworks.convert import load_weights
from maskworks.convert.convnext import (
    convert_hf_convnext,
    convert_torchvision_convnext,
    is_convnext_state_dict,
    is_hf_convnext_state_dict,
    is_torchvision_convnext_state_dict,
)
from maskworks.convert.load import _detect_source, _is_backbone_state_dict
from maskworks.convert.swin import (
    convert_hf_swin,
    convert_torchvision_swin,
    is_hf_swin_state_dict,
    is_swin_state_dict,
    is_torchvision_swin_state_dict,
)
from maskworks.testing import perturb_parameters

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
FOUR_STAGES = ["stage1", "stage2", "stage3", "stage4"]
# small configs: every map (64, 32, 16, 8 at 256) larger than the window, so HF's always_partition changes nothing
SWIN_SMALL = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4), "window_size": 4}
SWINV2_SMALL = {**SWIN_SMALL, "window_size": 8}
CONVNEXT_SMALL = {"depths": (2, 2, 2, 2), "dims": (16, 32, 64, 128)}


def _perturb(model: nn.Module) -> nn.Module:
    """Random offsets on every parameter (the references zero-init layer scales, GRNs, res-post-norms, heads)."""
    return perturb_parameters(model).eval()


def _images(size: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(1))


def _assert_maps(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    return max(float((a - b).abs().max()) for a, b in zip(ours, ref))


def _load(model: nn.Module, converted: dict) -> nn.Module:
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _n_params(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


def _hf_swin_config(cls, **kw):
    args = {
        "embed_dim": SWIN_SMALL["embed_dim"],
        "depths": list(SWIN_SMALL["depths"]),
        "num_heads": list(SWIN_SMALL["num_heads"]),
        "window_size": SWIN_SMALL["window_size"],
        "image_size": 256,
    }
    return cls(**{**args, **kw})


def _hf_convnext_config(cls, **kw):
    args = {"hidden_sizes": list(CONVNEXT_SMALL["dims"]), "depths": list(CONVNEXT_SMALL["depths"])}
    return cls(**{**args, **kw})


def _hub_layout(model: nn.Module, tmp_path) -> dict:
    """The keys a checkpoint on the hub has (``save_pretrained`` writes the names of transformers < 5)."""
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path)
    return load_file(str(tmp_path / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# full-size references, built once
# ---------------------------------------------------------------------------------------------------------------


def _fast_trunc_normal(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
    with torch.no_grad():
        return tensor.normal_(mean, std, generator=generator).clamp_(a, b)


@pytest.fixture(scope="module", autouse=True)
def fast_init():
    """``trunc_normal_`` (erfinv on CPU) takes most of the time of building a full-size model; the initial values
    do not matter here (every weight is loaded or perturbed), so a clamped normal stands in for it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.init, "trunc_normal_", _fast_trunc_normal)
        yield


@pytest.fixture(scope="module")
def tv_swin_t():
    torch.manual_seed(0)
    return _perturb(torchvision.models.swin_t())


@pytest.fixture(scope="module")
def tv_swin_v2_t():
    torch.manual_seed(0)
    return _perturb(torchvision.models.swin_v2_t())


@pytest.fixture(scope="module")
def tv_convnext_tiny():
    torch.manual_seed(0)
    return _perturb(torchvision.models.convnext_tiny())


@pytest.fixture(scope="module")
def hf_swin_t():
    torch.manual_seed(0)
    return _perturb(transformers.SwinModel(transformers.SwinConfig()))  # the defaults are Swin-T at 224


@pytest.fixture(scope="module")
def hf_convnext_t():
    torch.manual_seed(0)
    return _perturb(transformers.ConvNextModel(transformers.ConvNextConfig()))  # the defaults are ConvNeXt-T


# ---------------------------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------------------------


def _tv_swin_stages(ref: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the block stages ``features.1 / 3 / 5 / 7`` (NHWC) as NCHW maps."""
    maps = []
    for i, layer in enumerate(ref.features):
        x = layer(x)
        if i % 2 == 1:
            maps.append(x.permute(0, 3, 1, 2))
    return maps


def test_torchvision_swin_t_parity(tv_swin_t):
    converted, dropped = convert_torchvision_swin(tv_swin_t.state_dict())
    assert sorted(k for k in dropped if not k.endswith("relative_position_index")) == ["head.bias", "head.weight"]
    assert len(dropped) == 2 + 12  # one relative_position_index per block
    ours = _load(create_model("swin_tiny_patch4_window7_224"), converted)
    x = _images(224)
    with torch.no_grad():
        maps, expected = ours.forward_intermediates(x), _tv_swin_stages(tv_swin_t, x)
        _assert_maps(maps, expected)
        # the final norm too: torchvision's norm (before its pooling and head) == ours
        last = expected[-1].permute(0, 2, 3, 1)
        torch.testing.assert_close(ours.norm(last), tv_swin_t.norm(last), atol=ATOL, rtol=0)
    head = tv_swin_t.head.weight.numel() + tv_swin_t.head.bias.numel()
    assert _n_params(tv_swin_t) == 28_288_354
    assert _n_params(ours) == 28_288_354 - head


def test_torchvision_swin_v2_t_parity(tv_swin_v2_t):
    ref = tv_swin_v2_t
    converted, dropped = convert_torchvision_swin(ref.state_dict())
    assert {k.rsplit(".", 1)[-1] for k in dropped} == {
        "weight",
        "bias",
        "relative_position_index",
        "relative_coords_table",
    }
    # torchvision keeps a full [q; k; v] bias (the key third zeroed in its forward): ours learns q_bias / v_bias
    qkv_bias = ref.features[3][1].attn.qkv.bias
    torch.testing.assert_close(converted["layers.1.blocks.1.attn.q_bias"], qkv_bias[:192])
    torch.testing.assert_close(converted["layers.1.blocks.1.attn.v_bias"], qkv_bias[384:])
    ours = _load(create_model("swinv2_tiny_window8_256"), converted)
    x = _images(256)
    with torch.no_grad():
        _assert_maps(ours.forward_intermediates(x), _tv_swin_stages(ref, x))
    # the patch merging's channel order is the same: permuting its input channels would change the maps
    assert ours.layers[1].downsample.order == "v2"
    head = ref.head.weight.numel() + ref.head.bias.numel()
    key_bias = sum(block.attn.qkv.bias.numel() // 3 for stage in ref.features[1::2] for block in stage)
    assert _n_params(ours) == _n_params(ref) - head - key_bias  # 4416 key-bias parameters that stay zero


def test_torchvision_convnext_tiny_parity(tv_convnext_tiny):
    converted, dropped = convert_torchvision_convnext(tv_convnext_tiny.state_dict())
    assert sorted(dropped) == ["classifier.0.bias", "classifier.0.weight", "classifier.2.bias", "classifier.2.weight"]
    assert converted["stages.2.blocks.4.gamma"].shape == (384,)
    ours = _load(create_model("convnext_tiny"), converted)
    x = _images(64)
    with torch.no_grad():
        ref, maps = x, []
        for i, layer in enumerate(tv_convnext_tiny.features):
            ref = layer(ref)
            if i % 2 == 1:
                maps.append(ref)
        _assert_maps(ours.forward_intermediates(x), maps)
    assert _n_params(tv_convnext_tiny) == 28_589_128
    assert _n_params(ours) == 28_589_128 - _n_params(tv_convnext_tiny.classifier)  # its LayerNorm2d and Linear


# ---------------------------------------------------------------------------------------------------------------
# HF transformers: *Model
# ---------------------------------------------------------------------------------------------------------------


def test_hf_swin_model_parity(hf_swin_t):
    converted, dropped = convert_hf_swin(hf_swin_t.state_dict())
    assert dropped == []
    ours = _load(create_model("swin_tiny_patch4_window7_224"), converted)
    x = _images(224)
    with torch.no_grad():
        # by default SwinModel's reshaped hidden states are taken after each stage's downsampling (see
        # test_hf_hub_layout_and_classifier); the stage maps are the ones before it
        out = hf_swin_t(pixel_values=x, output_hidden_states=True, output_hidden_states_before_downsampling=True)
        maps = ours.forward_intermediates(x)
        _assert_maps(maps, list(out.reshaped_hidden_states[1:]))  # [0] is the patch embedding
        # last_hidden_state is after the final layernorm (= our norm)
        final = ours.norm(maps[-1].permute(0, 2, 3, 1)).flatten(1, 2)
        torch.testing.assert_close(final, out.last_hidden_state, atol=ATOL, rtol=0)
    assert _n_params(ours) == _n_params(hf_swin_t) == 28_288_354 - (768 * 1000 + 1000)


def test_hf_convnext_model_parity(hf_convnext_t, tv_convnext_tiny):
    converted, dropped = convert_hf_convnext(hf_convnext_t.state_dict())
    assert sorted(dropped) == ["layernorm.bias", "layernorm.weight"]  # the final norm: ours has none
    ours = _load(create_model("convnext_tiny"), converted)
    x = _images(64)
    with torch.no_grad():
        hidden = hf_convnext_t(pixel_values=x, output_hidden_states=True).hidden_states
        _assert_maps(ours.forward_intermediates(x), list(hidden[1:]))  # [0] is the stem
    assert _n_params(ours) == _n_params(hf_convnext_t) - 2 * 768 == _n_params(create_model("convnext_tiny"))
    assert _n_params(hf_convnext_t) == _n_params(tv_convnext_tiny) - (768 * 1000 + 1000)


def test_hf_swinv2_model_parity():
    torch.manual_seed(0)
    ref = _perturb(transformers.Swinv2Model(_hf_swin_config(transformers.Swinv2Config, window_size=8)))
    converted, dropped = convert_hf_swin(ref.state_dict())
    assert dropped == []
    assert converted["layers.1.downsample.reduction.weight"].shape == (32, 64)  # HF: encoder.layers.0.downsample
    ours = _load(SwinTransformerV2(**SWINV2_SMALL), converted)
    x = _images(256)
    with torch.no_grad():
        # Swinv2Model.forward ignores output_hidden_states_before_downsampling: run its encoder as Swinv2Backbone does
        embedded, dims = ref.embeddings(x)
        before = ref.encoder(embedded, dims, output_hidden_states=True, output_hidden_states_before_downsampling=True)
        maps = ours.forward_intermediates(x)
        _assert_maps(maps, list(before.reshaped_hidden_states[1:]))
        out = ref(pixel_values=x, output_hidden_states=True)  # after each downsampling: only the last map is ours
        torch.testing.assert_close(out.reshaped_hidden_states[-1], maps[-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(
            ours.forward_features(x).flatten(2).transpose(1, 2), out.last_hidden_state, atol=ATOL, rtol=0
        )
    assert _n_params(ours) == _n_params(ref)


def test_hf_convnextv2_model_parity():
    torch.manual_seed(0)
    ref = _perturb(transformers.ConvNextV2Model(_hf_convnext_config(transformers.ConvNextV2Config)))
    converted, dropped = convert_hf_convnext(ref.state_dict())
    assert sorted(dropped) == ["layernorm.bias", "layernorm.weight"]
    assert converted["stages.1.blocks.0.mlp.grn.weight"].shape == (128,)  # HF: (1, 1, 1, 128)
    x = _images(64)
    with torch.no_grad():
        expected = list(ref(pixel_values=x, output_hidden_states=True).hidden_states[1:])
    ours = _load(ConvNeXt(**CONVNEXT_SMALL, ls_init_value=None, use_grn=True), converted)
    with torch.no_grad():
        _assert_maps(ours.forward_intermediates(x), expected)
    # a 1x1-conv MLP target (our convnextv2_atto .. nano, as timm): the linear weights are reshaped for it
    conv = ConvNeXt(**CONVNEXT_SMALL, ls_init_value=None, use_grn=True, conv_mlp=True)
    result = load_weights(conv, ref.state_dict())
    assert conv.stages[0].blocks[0].mlp.fc1.weight.shape == (64, 16, 1, 1)
    assert sorted(result.unexpected_keys) == ["layernorm.bias", "layernorm.weight"]
    with torch.no_grad():
        _assert_maps(conv.eval().forward_intermediates(x), expected)


def test_hf_hub_layout_and_classifier(tmp_path):
    torch.manual_seed(0)
    ref = _perturb(transformers.SwinForImageClassification(_hf_swin_config(transformers.SwinConfig, num_labels=5)))
    hub = _hub_layout(ref, tmp_path)
    assert "swin.encoder.layers.0.blocks.0.attention.self.query.weight" in hub  # transformers 5: ...attention.q_proj
    x = _images(256)
    with torch.no_grad():
        out = ref.swin(pixel_values=x, output_hidden_states=True, output_hidden_states_before_downsampling=True)
        expected = list(out.reshaped_hidden_states[1:])
        default = ref.swin(pixel_values=x, output_hidden_states=True).reshaped_hidden_states
    for state_dict in (ref.state_dict(), hub):
        assert is_hf_swin_state_dict(state_dict)
        converted, dropped = convert_hf_swin(state_dict)
        assert sorted(dropped) == ["classifier.bias", "classifier.weight"]
        ours = _load(SwinTransformer(**SWIN_SMALL), converted)
        with torch.no_grad():
            maps = ours.forward_intermediates(x)
            _assert_maps(maps, expected)
            # SwinModel's default reshaped_hidden_states: after each stage's downsampling (HF encoder.layers.{i}
            # .downsample = our layers.{i+1}.downsample), the last one (no downsampling) the last stage map
            after = [
                ours.layers[i + 1].downsample(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for i, m in enumerate(maps[:3])
            ]
            _assert_maps([*after, maps[3]], list(default[1:]))
    # a hub checkpoint of older transformers also stores relative_position_index: dropped
    old = {**hub, "swin.encoder.layers.0.blocks.0.attention.self.relative_position_index": torch.zeros(64, 64)}
    assert "swin.encoder.layers.0.blocks.0.attention.self.relative_position_index" in convert_hf_swin(old)[1]
    # Swinv2 and ConvNextV2 keep their names in transformers 5: in-memory == hub
    v2 = transformers.Swinv2ForImageClassification(_hf_swin_config(transformers.Swinv2Config, num_labels=5))
    assert set(v2.state_dict()) == set(_hub_layout(v2, tmp_path / "v2"))
    converted, dropped = convert_hf_swin(v2.state_dict())
    SwinTransformerV2(**SWIN_SMALL).load_state_dict(converted, strict=True)
    assert sorted(dropped) == ["classifier.bias", "classifier.weight"]


# ---------------------------------------------------------------------------------------------------------------
# HF transformers: *Backbone (hidden_states_norms -> stage_norms of out_norms=True)
# ---------------------------------------------------------------------------------------------------------------


def test_hf_swin_backbone_parity(tmp_path):
    torch.manual_seed(0)
    ref = _perturb(transformers.SwinBackbone(_hf_swin_config(transformers.SwinConfig, out_features=FOUR_STAGES)))
    hub = _hub_layout(ref, tmp_path)
    assert "hidden_states_norms.stage1.weight" in hub and "embeddings.norm.weight" in hub  # hub: no swin. prefix
    x = _images(256)
    with torch.no_grad():
        expected = list(ref(pixel_values=x).feature_maps)
    for state_dict in (ref.state_dict(), hub):
        converted, dropped = convert_hf_swin(state_dict)
        assert dropped == []
        assert converted["stage_norms.3.weight"].shape == (128,)
        ours = _load(SwinTransformer(**SWIN_SMALL, out_norms=True), converted)
        with torch.no_grad():
            _assert_maps(ours.forward_intermediates(x), expected)
    assert _n_params(ours) == _n_params(ref)


def test_hf_swinv2_backbone_parity():
    # Swinv2Backbone has no hidden_states_norms: its maps are the plain stage outputs
    torch.manual_seed(0)
    config = _hf_swin_config(transformers.Swinv2Config, window_size=8, out_features=FOUR_STAGES)
    ref = _perturb(transformers.Swinv2Backbone(config))
    converted, dropped = convert_hf_swin(ref.state_dict())
    assert dropped == [] and not any(k.startswith("stage_norms.") for k in converted)
    ours = SwinTransformerV2(**SWINV2_SMALL).eval()
    result = ours.load_state_dict(converted, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["norm.weight", "norm.bias"]
    x = _images(256)
    with torch.no_grad():
        _assert_maps(ours.forward_intermediates(x), list(ref(pixel_values=x).feature_maps))


@pytest.mark.parametrize("v2", [False, True])
def test_hf_convnext_backbone_parity(v2):
    torch.manual_seed(0)
    cls = (
        (transformers.ConvNextV2Backbone, transformers.ConvNextV2Config)
        if v2
        else (
            transformers.ConvNextBackbone,
            transformers.ConvNextConfig,
        )
    )
    ref = _perturb(cls[0](_hf_convnext_config(cls[1], out_features=FOUR_STAGES)))
    converted, dropped = convert_hf_convnext(ref.state_dict())
    assert dropped == []
    extra = {"ls_init_value": None, "use_grn": True} if v2 else {}
    ours = _load(ConvNeXt(**CONVNEXT_SMALL, out_norms=True, **extra), converted)
    x = _images(64)
    with torch.no_grad():
        _assert_maps(ours.forward_intermediates(x), list(ref(pixel_values=x).feature_maps))
    assert _n_params(ours) == _n_params(ref)


# ---------------------------------------------------------------------------------------------------------------
# Detection and routing by load_weights
# ---------------------------------------------------------------------------------------------------------------


def test_detection(tv_swin_t, tv_convnext_tiny, hf_swin_t, hf_convnext_t):
    timm_swin = {**create_model("swin_tiny_patch4_window7_224").state_dict(), "head.fc.weight": torch.zeros(1)}
    timm_convnext = {**create_model("convnext_tiny").state_dict(), "head.fc.weight": torch.zeros(1)}
    cases = {
        "torchvision": [tv_swin_t.state_dict(), tv_convnext_tiny.state_dict()],
        "hf": [hf_swin_t.state_dict(), hf_convnext_t.state_dict()],
        "timm": [timm_swin, timm_convnext],
    }
    checks = [
        is_torchvision_swin_state_dict,
        is_torchvision_convnext_state_dict,
        is_hf_swin_state_dict,
        is_hf_convnext_state_dict,
        is_swin_state_dict,
        is_convnext_state_dict,
    ]
    for i, (source, state_dicts) in enumerate(cases.items()):
        for j, state_dict in enumerate(state_dicts):
            assert _detect_source(state_dict) == source
            assert _is_backbone_state_dict(state_dict)
            assert [check(state_dict) for check in checks] == [k == 2 * i + j for k in range(6)]
    tv_vit = torchvision.models.VisionTransformer(32, 16, 1, 2, 32, 64).state_dict()
    assert not any(check(tv_vit) for check in checks) and _detect_source(tv_vit) == "torchvision"
    with pytest.raises(ValueError, match="torchvision Swin"):
        convert_torchvision_swin(tv_convnext_tiny.state_dict())
    with pytest.raises(ValueError, match="HF ConvNext"):
        convert_hf_convnext(hf_swin_t.state_dict())


def test_load_weights_auto(tv_swin_t, tv_convnext_tiny, hf_swin_t, hf_convnext_t):
    cases = [
        (tv_swin_t, "swin_tiny_patch4_window7_224", "features.1.0.norm1.weight", "layers.0.blocks.0.norm1.weight"),
        (tv_convnext_tiny, "convnext_tiny", "features.0.0.weight", "stem.0.weight"),
        (hf_swin_t, "swin_tiny_patch4_window7_224", "embeddings.norm.weight", "patch_embed.norm.weight"),
        (hf_convnext_t, "convnext_tiny", "encoder.stages.2.layers.1.dwconv.weight", "stages.2.blocks.1.conv_dw.weight"),
    ]
    for ref, name, ref_key, our_key in cases:
        state_dict = ref.state_dict()
        model = create_model(name)
        result = load_weights(model, state_dict)
        assert result.missing_keys == []
        torch.testing.assert_close(model.state_dict()[our_key], state_dict[ref_key])
    # an out_norms model gets everything but its stage norms from a non-Backbone checkpoint
    result = load_weights(create_model("convnext_tiny", out_norms=True), hf_convnext_t.state_dict())
    assert sorted(result.missing_keys) == sorted(f"stage_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias"))


def test_unet_encoder_routing_and_in_channels(tv_convnext_tiny, hf_convnext_t, tv_swin_v2_t):
    timm = {**create_model("convnext_tiny").state_dict(), "head.fc.weight": torch.zeros(1000, 768)}
    for name, state_dict, stem_weight in [
        ("torchvision", tv_convnext_tiny.state_dict(), tv_convnext_tiny.features[0][0].weight),
        ("hf", hf_convnext_t.state_dict(), hf_convnext_t.embeddings.patch_embeddings.weight),
        ("timm", timm, timm["stem.0.weight"]),
    ]:
        unet = create_model("unet", encoder="convnext_tiny", num_classes=2, in_channels=1)
        result = load_weights(unet, state_dict)  # source="auto", a bare backbone -> unet.encoder
        assert not any(k.startswith("encoder.") for k in result.missing_keys), name
        torch.testing.assert_close(unet.encoder.stem[0].weight, stem_weight.sum(1, keepdim=True))
    gray = create_model("swinv2_tiny_window8_256", in_channels=1)
    tv = tv_swin_v2_t.state_dict()
    load_weights(gray, tv)
    torch.testing.assert_close(gray.patch_embed.proj.weight, tv["features.0.0.weight"].sum(1, keepdim=True))
    converted, _ = convert_hf_swin(transformers.SwinModel(_hf_swin_config(transformers.SwinConfig)).state_dict(), 4)
    assert converted["patch_embed.proj.weight"].shape == (16, 4, 4, 4)


def test_unexpected_keys_raise(tv_swin_t):
    sd = {**tv_swin_t.state_dict(), "features.1.0.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="extra"):
        convert_torchvision_swin(sd)
    hf = dict(transformers.SwinModel(_hf_swin_config(transformers.SwinConfig)).state_dict())
    del hf["encoder.layers.1.blocks.0.attention.k_proj.weight"]
    with pytest.raises(ValueError, match="layers.1.blocks.0"):
        convert_hf_swin(hf)
    absolute = transformers.SwinModel(_hf_swin_config(transformers.SwinConfig, use_absolute_embeddings=True))
    with pytest.raises(ValueError, match="position_embeddings"):
        convert_hf_swin(absolute.state_dict())

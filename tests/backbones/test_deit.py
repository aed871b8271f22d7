"""DeiT backbones: timm and HF transformers parity, parameter counts, token layout, heads, converters."""

import re

import pytest
import torch

from maskworks import create_model, list_models
from maskworks.backbones import deit  # noqa: F401  (registers the DeiT variants)
from maskworks.backbones.deit import VisionTransformerDistilled
from maskworks.backbones.vit import VisionTransformer
from maskworks.convert.deit import convert_hf_deit, convert_timm_deit, deit_kwargs_from_hf_config, is_hf_deit_state_dict
from maskworks.testing import perturb_parameters

timm = pytest.importorskip("timm")

DISTILLED = [
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_224",
    "deit_base_distilled_patch16_384",
]
PLAIN = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "deit_base_patch16_384"]


def _tiny(**kwargs) -> VisionTransformerDistilled:
    return create_model("deit_test_distilled_patch16", **{"num_classes": 10, **kwargs})


# ------------------------------------------------------------------------------------------------ registry / shapes
def test_registered_names():
    names = list_models("deit_*", kind="backbone")
    for name in [*DISTILLED, *PLAIN, "deit_test_distilled_patch16"]:
        assert name in names
        assert name == "deit_test_distilled_patch16" or name in timm.list_models(name)


@pytest.mark.parametrize("name", DISTILLED + PLAIN)
def test_keys_and_shapes_equal_timm(name):
    with torch.device("meta"):
        ours = create_model(name)
        ref = timm.create_model(name, pretrained=False)
    assert type(ours) is (VisionTransformerDistilled if "distilled" in name else VisionTransformer)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes


@pytest.mark.parametrize(
    "name, count",
    [
        ("deit_base_distilled_patch16_224", 87_338_192),
        ("deit_small_distilled_patch16_224", 22_436_432),
        ("deit_tiny_distilled_patch16_224", 5_910_800),
    ],
)
def test_parameter_count(name, count):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_token_layout_at_224():
    with torch.device("meta"):
        model = create_model("deit_base_distilled_patch16_224")
        model384 = create_model("deit_base_distilled_patch16_384")
    assert model.num_prefix_tokens == 2
    assert tuple(model.pos_embed.shape) == (1, 198, 768)  # [CLS][DIST] + 14 * 14 patches
    assert tuple(model.dist_token.shape) == (1, 1, 768)
    assert tuple(model384.pos_embed.shape) == (1, 2 + 24 * 24, 768)
    assert "dist_token" in model.no_weight_decay()


def test_train_returns_both_heads_eval_returns_mean():
    torch.manual_seed(0)
    model = perturb_parameters(_tiny())
    x = torch.randn(2, 3, 64, 64)

    model.train()
    assert model(x).shape == (2, 10)  # distilled training off: the average, as timm
    model.set_distilled_training(True)
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == out[1].shape == (2, 10)

    model.eval()
    logits = model(x)
    cls_logits, dist_logits = model.forward_heads(x)
    assert not torch.allclose(cls_logits, dist_logits)
    torch.testing.assert_close(logits, (cls_logits + dist_logits) / 2)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)


def test_forward_heads_uses_tokens_0_and_1():
    torch.manual_seed(0)
    model = perturb_parameters(_tiny()).eval()
    x = torch.randn(2, 3, 64, 64)
    tokens = model.forward_features(x)  # (B, 2 + 16, C)
    assert tokens.shape == (2, 18, 64)
    cls_logits, dist_logits = model.forward_heads(x)
    torch.testing.assert_close(cls_logits, model.head(tokens[:, 0]))
    torch.testing.assert_close(dist_logits, model.head_dist(tokens[:, 1]))


def test_forward_intermediates_drop_both_prefix_tokens():
    model = _tiny().eval()
    maps = model.forward_intermediates(torch.randn(2, 3, 64, 64), indices=2)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 4, 4)] * 2


def test_dynamic_img_size_and_backward():
    torch.manual_seed(0)
    model = _tiny(dynamic_img_size=True)
    model.set_distilled_training(True)
    cls_logits, dist_logits = model(torch.randn(2, 3, 96, 80))
    (cls_logits.sum() + dist_logits.sum()).backward()
    assert model.dist_token.grad is not None and model.head_dist.weight.grad is not None


def test_reset_classifier_and_validation():
    model = _tiny()
    model.reset_classifier(5)
    assert model.head.out_features == model.head_dist.out_features == 5
    head, head_dist = model.get_classifier()
    assert head is model.head and head_dist is model.head_dist
    model.reset_classifier(0)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 64)
    with pytest.raises(ValueError, match="global_pool"):
        _tiny(global_pool="avg")
    with pytest.raises(ValueError, match="reg_tokens"):
        _tiny(reg_tokens=4)


# ------------------------------------------------------------------------------------------------ timm parity
def test_timm_parity_tiny_distilled_224():
    torch.manual_seed(0)
    ref = perturb_parameters(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)).eval()
    ours = create_model("deit_tiny_distilled_patch16_224")
    converted, dropped = convert_timm_deit(ref.state_dict(), model=ours)
    assert dropped == []
    ours.load_state_dict(converted, strict=True)
    ours.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)

        # training mode with distilled training: both heads (no dropout in these configs)
        ref.train().set_distilled_training(True)
        ours.train().set_distilled_training(True)
        ref_cls, ref_dist = ref(x)
        our_cls, our_dist = ours(x)
    torch.testing.assert_close(our_cls, ref_cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_dist, ref_dist, atol=1e-5, rtol=0)


def test_timm_converter_wrapper_resample_and_plain_target():
    torch.manual_seed(0)
    ref = perturb_parameters(_tiny())
    sd = {"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}  # official DeiT .pth layout + DDP

    # same architecture at 32 px: pos_embed resampled to 2 x 2, prefix rows kept bit-exactly
    small = _tiny(img_size=32)
    converted, dropped = convert_timm_deit(sd, model=small)
    assert dropped == []
    small.load_state_dict(converted, strict=True)
    assert small.pos_embed.shape == (1, 2 + 4, 64)
    torch.testing.assert_close(small.pos_embed[:, :2], ref.pos_embed[:, :2], atol=0, rtol=0)

    # distilled checkpoint -> plain ViT of the same size: [DIST] row, dist_token and head_dist are dropped
    plain = create_model("vit_test_patch16", num_classes=10)
    converted, dropped = convert_timm_deit(sd, model=plain)
    assert set(dropped) == {"dist_token", "head_dist.weight", "head_dist.bias"}
    plain.load_state_dict(converted, strict=True)
    expected = torch.cat([ref.pos_embed[:, :1], ref.pos_embed[:, 2:]], dim=1)
    torch.testing.assert_close(plain.pos_embed, expected, atol=0, rtol=0)

    # another class count: both heads dropped
    converted, dropped = convert_timm_deit(sd, model=_tiny(num_classes=3))
    assert set(dropped) == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}


# ------------------------------------------------------------------------------------------------ HF parity
transformers = pytest.importorskip("transformers")


def _hf_teacher_model(layer_norm_eps: float):
    config = transformers.DeiTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=64,
        patch_size=16,
        num_labels=10,
        layer_norm_eps=layer_norm_eps,
    )
    torch.manual_seed(0)
    return perturb_parameters(transformers.DeiTForImageClassificationWithTeacher(config)).eval(), config


_V5_TO_V4 = [  # transformers 5 module names -> the hub (transformers 4) checkpoint names
    (r"^deit\.layers\.", "deit.encoder.layer."),
    (r"attention\.q_proj", "attention.attention.query"),
    (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"),
    (r"mlp\.fc2", "output.dense"),
]


def _as_hub_layout(state_dict):
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _V5_TO_V4:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


@pytest.mark.parametrize("layout", ["modules", "hub"])
def test_hf_parity_with_teacher(layout):
    hf, _ = _hf_teacher_model(layer_norm_eps=1e-6)
    sd = hf.state_dict()
    if layout == "hub":
        sd = _as_hub_layout(sd)
        assert "deit.encoder.layer.0.attention.attention.query.weight" in sd
    assert is_hf_deit_state_dict(sd)
    converted, dropped = convert_hf_deit(sd)
    assert dropped == []
    ours = _tiny().eval()
    ours.load_state_dict(converted, strict=True)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        cls_logits, dist_logits = ours.forward_heads(x)
        logits = ours(x)
    torch.testing.assert_close(cls_logits, ref.cls_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(dist_logits, ref.distillation_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)


def test_hf_default_eps_via_config_kwargs():
    hf, config = _hf_teacher_model(layer_norm_eps=1e-12)  # HF's default eps
    ours = VisionTransformerDistilled(**deit_kwargs_from_hf_config(config)).eval()
    ours.load_state_dict(convert_hf_deit(hf.state_dict())[0], strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, atol=1e-4, rtol=0)


def test_hf_converter_drops_unknown_keys_and_checks_qkv():
    hf, _ = _hf_teacher_model(layer_norm_eps=1e-6)
    sd = dict(hf.state_dict())
    sd["deit.embeddings.mask_token"] = torch.zeros(1, 1, 64)
    sd["deit.pooler.dense.weight"] = torch.zeros(64, 64)
    converted, dropped = convert_hf_deit(sd)
    assert sorted(dropped) == ["deit.embeddings.mask_token", "deit.pooler.dense.weight"]
    assert converted["blocks.0.attn.qkv.weight"].shape == (192, 64)
    torch.testing.assert_close(converted["blocks.1.attn.qkv.bias"][64:128], sd["deit.layers.1.attention.k_proj.bias"])
    del sd["deit.layers.0.attention.v_proj.weight"]
    with pytest.raises(ValueError, match="incomplete"):
        convert_hf_deit(sd)

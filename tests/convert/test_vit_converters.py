"""HF transformers and torchvision ViT checkpoints -> maskworks VisionTransformer: forward parity on small configs,
full vit_b_16 key / shape conversion, both HF key layouts, detection helpers, resampling and channel adaptation."""

import logging
from functools import partial

import pytest
import torch
import torch.nn as nn

from maskworks import create_model
from maskworks.backbones.vit import VisionTransformer
from maskworks.convert.vit_hf_tv import (
    convert_hf_vit,
    convert_torchvision_vit,
    is_hf_vit_state_dict,
    is_torchvision_vit_state_dict,
)
from maskworks.testing import perturb_parameters

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

SMALL = {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2}


def _perturb(model: nn.Module) -> nn.Module:
    """Random offsets on every parameter (the references zero-init heads and set LayerNorms to 1 / 0)."""
    return perturb_parameters(model).eval()


def _tv_small(**kw) -> nn.Module:
    torch.manual_seed(0)
    args = {"image_size": 64, "patch_size": 16, "num_layers": 2, "num_heads": 2, "hidden_dim": 64, "mlp_dim": 256}
    return _perturb(torchvision.models.VisionTransformer(**{**args, "num_classes": 10, **kw}))


def _hf_config(**kw):
    args = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 256,
        "image_size": 64,
        "patch_size": 16,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "num_labels": 10,
    }
    return transformers.ViTConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------------------------


def test_torchvision_small_parity(images):
    ref = _tv_small()
    converted, dropped = convert_torchvision_vit(ref.state_dict())
    ours = VisionTransformer(**SMALL, num_classes=10).eval()
    ours.load_state_dict(converted, strict=True)
    assert dropped == []
    with torch.no_grad():
        torch.testing.assert_close(ours(images), ref(images), atol=1e-4, rtol=1e-4)
        # encoder output (after encoder.ln) == forward_features
        tokens = ref._process_input(images)
        tokens = torch.cat([ref.class_token.expand(2, -1, -1), tokens], dim=1)  # (B, 1 + N, D)
        torch.testing.assert_close(ours.forward_features(images), ref.encoder(tokens), atol=1e-4, rtol=1e-4)


def test_torchvision_vit_b_16_full_conversion():
    ref = torchvision.models.vit_b_16(weights=None)
    nn.init.normal_(ref.heads.head.weight, std=0.02)  # torchvision starts the head at zero: make the logits informative
    converted, dropped = convert_torchvision_vit(ref.state_dict())
    ours = create_model("vit_base_patch16_224")
    ours.load_state_dict(converted, strict=True)  # keys and shapes
    assert dropped == []
    assert converted["blocks.11.attn.qkv.weight"].shape == (3 * 768, 768)
    torch.testing.assert_close(
        converted["blocks.3.attn.qkv.bias"], ref.encoder.layers.encoder_layer_3.self_attention.in_proj_bias
    )
    assert ours.blocks[0].norm1.eps == ref.encoder.layers.encoder_layer_0.ln_1.eps == 1e-6
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # the full model gives the same logits
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), atol=1e-4, rtol=1e-4)


def test_torchvision_pre_logits_head_is_dropped(caplog):
    ref = _tv_small(representation_size=32)
    with caplog.at_level(logging.WARNING, logger="maskworks.convert.vit_hf_tv"):
        converted, dropped = convert_torchvision_vit(ref.state_dict())
    assert "pre_logits" in caplog.text
    assert sorted(dropped) == [
        "heads.head.bias",
        "heads.head.weight",
        "heads.pre_logits.bias",
        "heads.pre_logits.weight",
    ]
    ours = VisionTransformer(**SMALL, num_classes=0).eval()
    ours.load_state_dict(converted, strict=True)


def test_torchvision_legacy_mlp_names(images):
    ref = _tv_small()
    legacy = {
        k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in ref.state_dict().items()
    }
    converted, _ = convert_torchvision_vit(legacy)
    ours = VisionTransformer(**SMALL, num_classes=10).eval()
    ours.load_state_dict(converted, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), ref(images), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# HF transformers
# ---------------------------------------------------------------------------------------------------------------


def test_hf_vit_model_parity(images):
    torch.manual_seed(0)
    ref = _perturb(transformers.ViTModel(_hf_config()))
    converted, dropped = convert_hf_vit(ref.state_dict())
    assert sorted(dropped) == ["pooler.dense.bias", "pooler.dense.weight"]
    ours = VisionTransformer(**SMALL, num_classes=0).eval()
    ours.load_state_dict(converted, strict=True)
    with torch.no_grad():
        hidden = ref(pixel_values=images).last_hidden_state  # after the final layernorm
        torch.testing.assert_close(ours.forward_features(images), hidden, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_hf_classification_parity_both_layouts(images, tmp_path, qkv_bias):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    ref = _perturb(transformers.ViTForImageClassification(_hf_config(qkv_bias=qkv_bias)))
    ref.save_pretrained(tmp_path)  # the hub layout: vit.encoder.layer.{i}.attention.attention.query ...
    hub = load_file(str(tmp_path / "model.safetensors"))
    assert "vit.encoder.layer.0.attention.attention.query.weight" in hub
    with torch.no_grad():
        expected = ref(pixel_values=images).logits
    for state_dict in (ref.state_dict(), hub):  # transformers >= 5 in-memory names, then the hub names
        converted, dropped = convert_hf_vit(state_dict)
        assert dropped == []
        ours = VisionTransformer(**SMALL, num_classes=10, qkv_bias=qkv_bias).eval()
        ours.load_state_dict(converted, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(ours(images), expected, atol=1e-4, rtol=1e-4)


def test_hf_unprefixed_and_wrapped_checkpoint(images):
    torch.manual_seed(0)
    ref = _perturb(transformers.ViTModel(_hf_config(), add_pooling_layer=False))
    wrapped = {"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}
    converted, dropped = convert_hf_vit(wrapped)
    assert dropped == []
    ours = VisionTransformer(**SMALL, num_classes=0).eval()
    ours.load_state_dict(converted, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# Detection, target adaptation, errors
# ---------------------------------------------------------------------------------------------------------------


def test_detection_helpers():
    tv = _tv_small().state_dict()
    hf = transformers.ViTForImageClassification(_hf_config()).state_dict()
    ours = VisionTransformer(**SMALL).state_dict()
    assert is_torchvision_vit_state_dict(tv) and not is_hf_vit_state_dict(tv)
    assert is_hf_vit_state_dict(hf) and not is_torchvision_vit_state_dict(hf)
    assert not is_hf_vit_state_dict(ours) and not is_torchvision_vit_state_dict(ours)
    mae = transformers.ViTMAEForPreTraining(
        transformers.ViTMAEConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=16,
            decoder_hidden_size=32,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=64,
        )
    ).state_dict()
    assert not is_hf_vit_state_dict(mae)  # an MAE checkpoint goes to maskworks.convert.mae
    simmim = transformers.ViTForMaskedImageModeling(_hf_config(encoder_stride=16)).state_dict()
    assert is_hf_vit_state_dict(simmim)
    converted, dropped = convert_hf_vit(simmim)
    VisionTransformer(**SMALL, num_classes=0).load_state_dict(converted, strict=True)
    assert "vit.embeddings.mask_token" in dropped and any(k.startswith("decoder.") for k in dropped)
    with pytest.raises(ValueError, match="HF ViT"):
        convert_hf_vit(tv)
    with pytest.raises(ValueError, match="torchvision"):
        convert_torchvision_vit(hf)


def test_convert_against_target_model():
    # another resolution (pos_embed resampled), 1 input channel (kernel summed), another class count (head dropped)
    ref = _tv_small()
    target = VisionTransformer(**{**SMALL, "img_size": 96}, in_channels=1, num_classes=3)
    converted, dropped = convert_torchvision_vit(ref.state_dict(), model=target)
    target.load_state_dict(converted, strict=False)
    assert converted["pos_embed"].shape == (1, 1 + 36, 64)
    torch.testing.assert_close(converted["pos_embed"][:, 0], ref.encoder.pos_embedding[:, 0])
    torch.testing.assert_close(converted["patch_embed.proj.weight"], ref.conv_proj.weight.sum(1, keepdim=True))
    assert sorted(dropped) == ["head.bias", "head.weight"]
    converted, _ = convert_hf_vit(transformers.ViTModel(_hf_config()).state_dict(), in_channels=4)
    assert converted["patch_embed.proj.weight"].shape == (64, 4, 16, 16)


def test_unexpected_keys_raise():
    sd = dict(_tv_small().state_dict())
    sd["encoder.layers.encoder_layer_0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra"):
        convert_torchvision_vit(sd)
    hf = dict(transformers.ViTModel(_hf_config()).state_dict())
    del hf["layers.1.attention.k_proj.weight"]
    with pytest.raises(ValueError, match="block 1"):
        convert_hf_vit(hf)


def test_hf_layer_norm_eps_target(images):
    # released google/vit-* configs use layer_norm_eps 1e-12: build the target with the same eps
    torch.manual_seed(0)
    ref = _perturb(transformers.ViTForImageClassification(_hf_config(layer_norm_eps=1e-12)))
    ours = VisionTransformer(**SMALL, num_classes=10, norm_layer=partial(nn.LayerNorm, eps=1e-12)).eval()
    ours.load_state_dict(convert_hf_vit(ref.state_dict())[0], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), ref(pixel_values=images).logits, atol=1e-5, rtol=1e-5)

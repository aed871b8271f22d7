"""load_weights: file formats, source detection, routing into the encoder, error messages."""

import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from maskworks import create_model
from maskworks.convert import adapt_input_conv, load_weights, read_state_dict


def _tiny_unet(**kw):
    return create_model("unet", encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8), **kw).eval()


def _perturbed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt", ".bin"])
def test_file_round_trip(tmp_path, suffix):
    src = _tiny_unet(num_classes=2)
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in _perturbed(src).items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    src.load_state_dict(sd)
    dst = _tiny_unet(num_classes=2)
    result = load_weights(dst, path, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_same_weights(src, dst)


def test_wrapped_checkpoint_with_module_prefix(tmp_path):
    src = _tiny_unet()
    sd = {f"module.{k}": v for k, v in _perturbed(src).items()}
    torch.save({"model": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ck.pth")
    dst = _tiny_unet()
    assert load_weights(dst, tmp_path / "ck.pth", source="maskworks", strict=True).missing_keys == []
    torch.testing.assert_close(dst.segmentation_head[0].weight, src.segmentation_head[0].weight + 1)
    assert set(read_state_dict({"state_dict": src.state_dict()})) == set(src.state_dict())


@pytest.mark.parametrize("source", ["auto", "torchvision"])
def test_torchvision_resnet_goes_into_the_encoder(tmp_path, source):
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    model = _tiny_unet()
    result = load_weights(model, tmp_path / "resnet18.pth", source=source)
    assert sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]
    assert result.missing_keys and all(k.startswith(("decoder.", "segmentation_head.")) for k in result.missing_keys)
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            torch.testing.assert_close(model.encoder.state_dict()[k], v, msg=k)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_weights(model, tmp_path / "resnet18.pth", source=source, strict=True)


def test_timm_resnet_into_backbone_and_unet():
    timm = pytest.importorskip("timm")
    sd = timm.create_model("resnet34", pretrained=False).state_dict()
    backbone = create_model("resnet34")
    result = load_weights(backbone, sd, source="timm", strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]
    unet = create_model("unet", encoder="resnet34", encoder_weights=None)
    load_weights(unet, sd, source="timm")
    torch.testing.assert_close(unet.encoder.layer4[2].conv2.weight, sd["layer4.2.conv2.weight"])


def test_encoder_weights_argument(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    save_file(ref.state_dict(), str(tmp_path / "r18.safetensors"))
    model = create_model("unet", encoder="resnet18", encoder_weights=tmp_path / "r18.safetensors")
    torch.testing.assert_close(model.encoder.conv1.weight, ref.conv1.weight)
    # a 3-channel first conv is adapted to a 1-channel encoder (summed over the input channels)
    gray = create_model("unet", encoder="resnet18", in_channels=1, encoder_weights=tmp_path / "r18.safetensors")
    torch.testing.assert_close(gray.encoder.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))


def test_adapt_input_conv():
    w = torch.randn(8, 3, 3, 3)
    for c in (1, 3, 6):  # exact for 1 and multiples of 3: same response to a constant image
        torch.testing.assert_close(adapt_input_conv(w, c).sum(1), w.sum(1))
    torch.testing.assert_close(adapt_input_conv(w, 4), torch.cat([w, w[:, :1]], 1) * 0.75)  # timm's rule
    assert adapt_input_conv(w, 2).shape == (8, 2, 3, 3)


def test_shape_mismatch_names_key_and_shapes():
    src = create_model("unet", encoder="resnet18", num_classes=3)
    dst = create_model("unet", encoder="resnet18", num_classes=5)
    with pytest.raises(ValueError, match=r"'segmentation_head.0.weight'.*\(3, 16, 3, 3\).*\(5, 16, 3, 3\)"):
        load_weights(dst, src.state_dict())


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere/weights.safetensors"):
        load_weights(_tiny_unet(), path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": torch.zeros(1), "x": _Payload()}, f, protocol=2)
    torch.save({"weight": torch.zeros(1), "obj": _Payload()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(ValueError, match="weights_only"):
            load_weights(_tiny_unet(), p)


def test_bad_source_and_non_tensor_values():
    with pytest.raises(ValueError, match="unknown source 'keras'"):
        load_weights(_tiny_unet(), {}, source="keras")
    with pytest.raises(ValueError, match="entry 'epoch' is a int"):
        load_weights(_tiny_unet(), {"conv1.weight": torch.zeros(1), "epoch": 3})


def test_torchvision_deeplabv3_checkpoint_loads_through_load_weights(tmp_path):
    from torchvision.models.segmentation import deeplabv3_resnet50

    ref = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4, aux_loss=True).eval()
    path = tmp_path / "tv_deeplab.pth"
    torch.save(ref.state_dict(), path)
    for aux in (True, False):
        ours = create_model("deeplabv3", encoder="resnet50", num_classes=4, aux=aux).eval()
        result = load_weights(ours, path)  # auto-detected as torchvision
        assert result.missing_keys == []
        dropped_aux = [k for k in result.unexpected_keys if k.startswith("aux_classifier.")]
        assert bool(dropped_aux) is (not aux)
        x = torch.randn(1, 3, 40, 56)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x)["out"], atol=1e-4, rtol=1e-4)


def test_torchvision_mobilenet_checkpoint_goes_into_the_encoder(tmp_path):
    from torchvision.models import mobilenet_v3_large

    ref = mobilenet_v3_large(weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save(ref.state_dict(), path)
    model = create_model("unet", encoder="mobilenet_v3_large", num_classes=2, in_channels=1)
    result = load_weights(model, path, source="torchvision")
    assert result.missing_keys and not any(k.startswith("encoder.") for k in result.missing_keys)
    assert result.unexpected_keys and all(k.startswith("classifier.") for k in result.unexpected_keys)
    expected = ref.features[3].block[0][0].weight
    torch.testing.assert_close(model.encoder.features[3].block[0][0].weight, expected)
    # the 3-channel stem is summed into the 1-channel input conv
    torch.testing.assert_close(model.encoder.features[0][0].weight, ref.features[0][0].weight.sum(1, keepdim=True))


def _tiny_vit(**kw):
    return create_model("vit_test_patch16", num_classes=10, **kw).eval()


def test_timm_vit_checkpoint_at_another_resolution_loads_with_resampling():
    import timm.models.vision_transformer as tvt

    torch.manual_seed(0)
    ref = tvt.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    ours = _tiny_vit()  # built at 64: a 4x4 grid where the checkpoint has 2x2
    result = load_weights(ours, ref.state_dict(), source="timm")
    assert result.missing_keys == [] and result.unexpected_keys == []
    expected = tvt.resample_abs_pos_embed(ref.pos_embed, (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(ours.pos_embed, expected)


def test_hf_vit_and_torchvision_vit_checkpoints_are_recognised():
    import torchvision
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    cfg = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=64,
        patch_size=16,
        num_labels=10,
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    hf = ViTForImageClassification(cfg).eval()
    ours = _tiny_vit()
    assert load_weights(ours, hf.state_dict()).missing_keys == []  # auto-detected as "hf"
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, atol=1e-4, rtol=1e-4)

    tv = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=256, num_classes=10
    ).eval()
    ours = _tiny_vit()
    assert load_weights(ours, tv.state_dict()).missing_keys == []  # auto-detected as "torchvision"
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=1e-4, rtol=1e-4)


def test_unknown_hf_checkpoint_is_refused():
    with pytest.raises(ValueError, match="not a supported Hugging Face checkpoint"):
        load_weights(_tiny_vit(), {"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)}, source="hf")

"""Swin UNETR: parity with MONAI's ``SwinUNETR`` through the converter (3-D windows of 7 with padding inside the
blocks and windows clipped to small maps, windows of 4 with shifts and masks on a non-cubic volume, SwinUNETR-V2
with ``mergingv2`` and a patch norm, 2-D), the shifted-window mask and relative position index against MONAI's,
parameter counts of the default models, any input size, training mode with every parameter used, gradient
checkpointing, the self-supervised encoder checkpoint layout and the registry name."""

from __future__ import annotations

import pytest
import torch

import maskworks.models.volumetric.swin_unetr  # noqa: F401  (registers "swin_unetr")
from maskworks import create_model
from maskworks.convert.monai_transformers import (
    convert_monai,
    convert_monai_swin_unetr,
    is_monai_swin_unetr_state_dict,
    is_monai_unetr_state_dict,
)
from maskworks.layers.window_nd import relative_position_index_nd, shifted_window_mask_nd
from maskworks.models.volumetric.swin_unetr import SwinUNETR
from maskworks.testing import perturb_parameters, randomize_norms

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# MONAI 1.6.1: sum(p.numel() for p in SwinUNETR(in_channels=1, out_channels=14[, feature_size=48]).parameters())
MONAI_SWIN_UNETR_PARAMS = 15_703_304
MONAI_SWIN_UNETR_F48_PARAMS = 62_187_296

TINY = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (3, 3, 3, 3)}


def _tiny(**kwargs) -> SwinUNETR:
    torch.manual_seed(0)
    return SwinUNETR(**{"in_channels": 1, "out_channels": 3, **TINY, **kwargs})


@pytest.mark.parametrize(
    ("shape", "options"),
    [
        # windows of 7 padded to 21 / 14 at 1/2, 1/4; clipped to the 4^3 and 2^3 maps (MONAI's bias lookup)
        ((32, 32, 32), {"window_size": 7, "norm_name": "batch"}),
        # windows of 4: shifted and masked at 1/2 .. 1/8, one axis still shifted at 1/16; V2 blocks
        (
            (32, 64, 32),
            {"window_size": 4, "use_v2": True, "downsample": "mergingv2", "patch_norm": True, "normalize": False},
        ),
        ((64, 96), {"window_size": 4, "spatial_dims": 2, "norm_name": ("instance", {"affine": True})}),
    ],
    ids=["3d-window7", "3d-window4-v2", "2d-window4"],
)
def test_swin_unetr_matches_monai(shape: tuple[int, ...], options: dict) -> None:
    monai_nets = pytest.importorskip("monai.networks.nets")
    kwargs = {"feature_size": 12, "depths": (2, 2, 2, 2), "num_heads": (3, 3, 3, 3), **options}
    torch.manual_seed(0)
    ref = monai_nets.SwinUNETR(2, 3, **kwargs)
    randomize_norms(ref, seed=1, group_norm=True, layer_norm=True, perturb=0.05)  # eval mode
    with torch.no_grad():  # strong position biases: a wrong lookup or mask shows far above the tolerance
        for name, p in ref.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.0)
    assert is_monai_swin_unetr_state_dict(ref.state_dict()) and not is_monai_unetr_state_dict(ref.state_dict())

    sd, dropped = convert_monai(ref.state_dict())
    assert dropped and all(k.endswith("attn.relative_position_index") for k in dropped)
    model = SwinUNETR(2, 3, **kwargs).eval()
    model.load_state_dict(sd, strict=True)

    x = torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = ref(x), model(x)
    assert actual.shape == (1, 3, *shape)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_window_mask_and_index_match_monai() -> None:
    swin = pytest.importorskip("monai.networks.nets.swin_unetr")
    for dims, window, shift in [((14, 7, 21), (7, 7, 7), (3, 0, 3)), ((8, 12), (4, 4), (2, 2))]:
        expected = swin.compute_mask(list(dims), window, shift, torch.device("cpu"))
        torch.testing.assert_close(shifted_window_mask_nd(dims, window, shift), expected, atol=0, rtol=0)
    attn = swin.WindowAttention(12, 3, (7, 5, 4))
    assert torch.equal(relative_position_index_nd((7, 5, 4)), attn.relative_position_index)


def test_swin_unetr_default_parameter_counts() -> None:
    with torch.device("meta"):
        default, wide = SwinUNETR(1, 14), SwinUNETR(1, 14, feature_size=48)
    assert sum(p.numel() for p in default.parameters()) == MONAI_SWIN_UNETR_PARAMS
    assert sum(p.numel() for p in wide.parameters()) == MONAI_SWIN_UNETR_F48_PARAMS


def test_swin_unetr_any_size_and_training() -> None:
    model = _tiny(feature_size=6, num_heads=(1, 2, 2, 2)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 33, 40, 47)).shape == (1, 3, 33, 40, 47)
    model.train()  # pads to 32^3: one voxel at 1/32, where instance norm needs more; padded along the last axis
    out = model(torch.randn(1, 1, 20, 9, 31))
    assert out.shape == (1, 3, 20, 9, 31)
    out.square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


def test_swin_unetr_checkpointing_matches() -> None:
    small = {"feature_size": 6, "num_heads": (1, 2, 2, 2), "window_size": 4}
    model, checkpointed = _tiny(**small), _tiny(**small, use_checkpoint=True)
    checkpointed.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 32, 32, 64)
    torch.testing.assert_close(checkpointed.train()(x), model.train()(x))


def test_self_supervised_encoder_checkpoint_converts() -> None:
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    ref = perturb_parameters(monai_nets.SwinUNETR(1, 2, **TINY))
    # the layout MONAI's SwinUNETR.load_from reads: module.patch_embed.*, module.layers{k}.0.* with mlp.fc1 / fc2
    ssl = {
        "module." + k[len("swinViT.") :].replace("mlp.linear", "mlp.fc"): v
        for k, v in ref.state_dict().items()
        if k.startswith("swinViT.")
    }
    ssl.update({"module.norm.weight": torch.ones(192), "module.rotation_head.weight": torch.zeros(4, 192)})
    assert is_monai_swin_unetr_state_dict({"state_dict": ssl}["state_dict"])
    sd, dropped = convert_monai_swin_unetr({"state_dict": ssl})
    assert "norm.weight" in dropped and "rotation_head.weight" in dropped
    model = _tiny(out_channels=2)
    encoder_keys = {k for k in model.state_dict() if k.startswith("swin.")}
    assert set(sd) == encoder_keys
    whole, _ = convert_monai_swin_unetr(ref.state_dict())
    assert all(torch.equal(sd[k], whole[k]) for k in encoder_keys)


def test_swin_unetr_registry_and_arguments() -> None:
    model = create_model("swin_unetr", num_classes=3, in_channels=1, **TINY)
    assert isinstance(model, SwinUNETR) and model.num_classes == 3 and model.out.out_channels == 3
    with pytest.raises(ValueError, match="differ"):
        SwinUNETR(1, 3, num_classes=4)
    with pytest.raises(ValueError, match="patch_size"):
        SwinUNETR(1, 3, patch_size=4)
    with pytest.raises(ValueError, match=r"num_heads\[1\]"):
        SwinUNETR(1, 3, feature_size=12, num_heads=(3, 5, 3, 3))
    with pytest.raises(ValueError, match="downsample"):
        SwinUNETR(1, 3, downsample="pool")
    with pytest.raises(ValueError, match="window_size"):
        SwinUNETR(1, 3, window_size=(7, 7))
    with pytest.raises(KeyError, match="unknown MONAI SwinUNETR key"):
        convert_monai_swin_unetr({"swinViT.patch_embed.proj.weight": torch.zeros(1), "head.weight": torch.zeros(1)})

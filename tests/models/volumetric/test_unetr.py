"""UNETR: parity with MONAI's ``UNETR`` through the converter (3-D with affine instance norm, 2-D with the
perceptron patch embedding and group norm), the parameter count of the default model, any input size (padding and
the resampled position table), training mode with every parameter used, gradient checkpointing, and the registry
name with the ``num_classes`` alias."""

from __future__ import annotations

import pytest
import torch

import maskworks.models.volumetric.unetr  # noqa: F401  (registers "unetr")
from maskworks import create_model
from maskworks.convert.monai_transformers import (
    convert_monai,
    convert_monai_unetr,
    is_monai_swin_unetr_state_dict,
    is_monai_unetr_state_dict,
)
from maskworks.models.volumetric.unetr import UNETR
from maskworks.testing import randomize_norms

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# MONAI 1.6.1: sum(p.numel() for p in UNETR(1, 14, img_size=(96, 96, 96)).parameters()), measured. It includes one
# ``norm_cross_attn`` LayerNorm per block (12 x 2 x 768) that a block without cross-attention never uses; ours has
# none.
MONAI_UNETR_PARAMS = 92_802_478
MONAI_UNUSED_CROSS_NORMS = 12 * 2 * 768

TINY = {"img_size": 32, "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}


def _tiny(**kwargs) -> UNETR:
    torch.manual_seed(0)
    return UNETR(**{"in_channels": 1, "out_channels": 3, **TINY, **kwargs})


@pytest.mark.parametrize(
    ("spatial_dims", "options"),
    [
        (3, {"norm_name": ("instance", {"affine": True})}),
        (2, {"proj_type": "perceptron", "norm_name": ("group", {"num_groups": 4}), "qkv_bias": True}),
    ],
    ids=["3d-instance", "2d-perceptron-group"],
)
def test_unetr_matches_monai(spatial_dims: int, options: dict) -> None:
    monai_nets = pytest.importorskip("monai.networks.nets")
    kwargs = {**TINY, "spatial_dims": spatial_dims, **options}
    torch.manual_seed(0)
    ref = monai_nets.UNETR(2, 3, **kwargs)
    randomize_norms(ref, seed=1, group_norm=True, layer_norm=True, perturb=0.05)  # eval mode
    assert is_monai_unetr_state_dict(ref.state_dict()) and not is_monai_swin_unetr_state_dict(ref.state_dict())

    sd, dropped = convert_monai({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}})
    assert sorted(dropped) == sorted(
        f"vit.blocks.{i}.norm_cross_attn.{p}" for i in range(12) for p in ("weight", "bias")
    )
    model = UNETR(2, 3, **kwargs).eval()
    model.load_state_dict(sd, strict=True)
    assert not is_monai_unetr_state_dict(model.state_dict())

    x = torch.randn(2, 2, *(32,) * spatial_dims, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = ref(x), model(x)
    assert actual.shape == (2, 3, *(32,) * spatial_dims)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_unetr_default_parameter_count() -> None:
    with torch.device("meta"):
        model = UNETR(1, 14, img_size=(96, 96, 96))
    assert sum(p.numel() for p in model.parameters()) == MONAI_UNETR_PARAMS - MONAI_UNUSED_CROSS_NORMS


def test_unetr_any_size_training_and_every_parameter_used() -> None:
    with torch.no_grad():  # padded to 48^3: a 3^3 token grid, the 2^3 position table resampled
        assert _tiny().eval()(torch.randn(1, 1, 33, 40, 47)).shape == (1, 3, 33, 40, 47)
    model = _tiny(img_size=16, feature_size=4).train()
    out = model(torch.randn(1, 1, 17, 9, 23))  # padded to 32 x 16 x 32: 2 x 1 x 2 tokens, the table has 1
    assert out.shape == (1, 3, 17, 9, 23)
    out.square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


def test_unetr_native_size_uses_the_table_as_is_and_checkpointing_matches() -> None:
    model = _tiny(dropout_rate=0.0)
    assert model.vit.position_embedding((2, 2, 2)) is model.vit.pos_embed
    assert model.vit.position_embedding((3, 2, 2)).shape == (1, 12, 48)
    checkpointed = _tiny(use_checkpoint=True)
    checkpointed.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 32, 32, 16)
    model.train(), checkpointed.train()
    torch.testing.assert_close(checkpointed(x), model(x))


def test_unetr_registry_and_arguments() -> None:
    model = create_model("unetr", num_classes=3, in_channels=1, **TINY)
    assert isinstance(model, UNETR) and model.num_classes == 3 and model.out.out_channels == 3
    assert UNETR(1, num_classes=2, **TINY).num_classes == 2
    with pytest.raises(ValueError, match="differ"):
        UNETR(1, 3, num_classes=4, **TINY)
    with pytest.raises(ValueError, match="out_channels"):
        UNETR(1, **TINY)
    with pytest.raises(ValueError, match="num_heads"):
        UNETR(1, 3, **{**TINY, "num_heads": 5})
    with pytest.raises(ValueError, match="proj_type"):
        UNETR(1, 3, proj_type="linear", **TINY)
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 2, 32, 32, 32))
    with pytest.raises(KeyError, match="unknown MONAI UNETR key"):
        convert_monai_unetr({"vit.patch_embedding.position_embeddings": torch.zeros(1), "head.weight": torch.zeros(1)})

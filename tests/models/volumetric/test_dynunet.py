"""DynUNet (MONAI parity, deep supervision, any size) and the 3D U-Net."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import maskworks
from maskworks.convert.dynunet import convert_monai_dynunet, is_monai_dynunet_state_dict
from maskworks.models.volumetric import DynUNet, UNet3D, nnunet_ds_weights
from maskworks.testing import perturb_parameters, randomize_norms

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]  # an anisotropic plan: no pooling along D at first


@pytest.mark.parametrize("res_block", [False, True])
def test_monai_dynunet_parity_with_anisotropic_strides_and_deep_supervision(res_block):
    monai = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    ref = monai.DynUNet(3, 2, 3, KERNELS, STRIDES, STRIDES[1:], filters=[8, 12, 16, 24], deep_supervision=True,
                        deep_supr_num=2, res_block=res_block, trans_bias=True)  # fmt: skip
    randomize_norms(ref)
    perturb_parameters(ref)
    sd, notes = convert_monai_dynunet(ref.state_dict())
    assert is_monai_dynunet_state_dict(ref.state_dict()) and notes
    ours = DynUNet(2, 3, KERNELS, STRIDES, STRIDES[1:], filters=[8, 12, 16, 24], deep_supervision=True,
                   deep_supr_num=2, res_block=res_block, trans_bias=True)  # fmt: skip
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 2, 8, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), atol=1e-4, rtol=0)
        stacked, out = ref.train()(x), ours.train()(x)
    torch.testing.assert_close(out["out"], stacked[:, 0], atol=1e-4, rtol=0)
    assert [a.shape[2:] for a in out["aux"]] == [(8, 8, 12), (4, 4, 6)]  # native resolutions, highest first
    for i, aux in enumerate(out["aux"]):  # MONAI upsamples them (nearest) to the output size
        torch.testing.assert_close(F.interpolate(aux, size=x.shape[2:]), stacked[:, i + 1], atol=1e-4, rtol=0)


def test_dynunet_pads_any_size_and_builds_from_a_plan(tmp_path):
    plan = {"kernel_size": KERNELS, "strides": STRIDES, "filters": [4, 8, 8, 8], "num_input_channels": 2,
            "num_classes": 4, "patch_size": [8, 16, 16]}  # fmt: skip
    model = maskworks.create_model("dynunet", plan=plan, in_channels=2, num_classes=4).eval()
    assert model.size_multiple == (4, 8, 8) and model.filters == [4, 8, 8, 8]
    assert model(torch.randn(1, 2, 5, 9, 13)).shape == (1, 4, 5, 9, 13)
    with pytest.raises(ValueError, match="upsample_kernel_size must equal strides"):
        DynUNet(1, 2, KERNELS, STRIDES, [[2, 2, 2]] * 3)
    with pytest.raises(ValueError, match="differ"):
        DynUNet(1, 2, KERNELS, STRIDES, num_classes=3)
    with pytest.raises(FileNotFoundError, match="maskworks plan"):
        DynUNet.from_plan(tmp_path / "missing.json")


def test_nnunet_deep_supervision_weights():
    assert nnunet_ds_weights(1) == [1.0]
    w = nnunet_ds_weights(4)  # 1, 1/2, 1/4 and the lowest dropped, normalised
    assert w == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0]) and sum(w) == pytest.approx(1.0)


def test_unet3d_paper_layout_and_odd_sizes():
    model = maskworks.create_model("unet3d", num_classes=3, in_channels=1)
    assert sum(p.numel() for p in model.parameters()) == 19_071_459
    assert [b[0].out_channels for b in model.encoder] == [32, 64, 128, 256]  # 32-64, 64-128, 128-256, 256-512
    small = UNet3D(2, 3, base_channels=4).eval()
    with torch.no_grad():
        assert small(torch.randn(1, 2, 9, 10, 11)).shape == (1, 3, 9, 10, 11)
    with pytest.raises(ValueError, match="expects \\(B, C, D, H, W\\)"):
        small(torch.randn(1, 2, 10, 11))

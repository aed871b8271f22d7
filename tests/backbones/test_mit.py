"""Mix Transformer (MiT) backbones: contract, shapes at any size, parity with HF ``SegformerModel`` and smp's
``mit_b*`` encoder (NVlabs layout), bare-checkpoint routing, and use as the encoder of other models."""

from __future__ import annotations

import pytest
import torch

from maskworks import create_model, load_weights
from maskworks.backbones.mit import MixTransformer
from maskworks.convert.load import _detect_source, _is_backbone_state_dict
from maskworks.convert.segformer import convert_nvlabs_mit, is_mit_state_dict, is_nvlabs_mit_state_dict
from maskworks.registry import model_entry

TINY = {"embed_dims": (16, 32, 48, 64), "depths": (1, 2, 1, 1), "num_heads": (1, 2, 3, 4)}


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name", [f"mit_b{i}" for i in range(6)])
def test_registered_backbones_contract(name):
    assert model_entry(name).kind == "backbone"
    with torch.device("meta"):
        model = create_model(name)
    dims = (32, 64, 160, 256) if name == "mit_b0" else (64, 128, 320, 512)
    assert [f["num_chs"] for f in model.feature_info] == list(dims)
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f["module"] for f in model.feature_info] == [f"stages.{i}" for i in range(4)]
    assert model.out_channels == (3, *dims)
    assert [s.blocks[0].attn.sr_ratio for s in model.stages] == [8, 4, 2, 1]
    assert model.stages[3].blocks[0].attn.sr is None
    assert [s.blocks[0].attn.num_heads for s in model.stages] == [1, 2, 5, 8]
    assert model.stages[0].patch_embed.proj.kernel_size == (7, 7) and model.stages[0].patch_embed.proj.padding == (3, 3)
    assert model.stages[1].patch_embed.proj.stride == (2, 2) and model.stages[1].patch_embed.proj.padding == (1, 1)
    fc1 = model.stages[0].blocks[0].mlp.fc1
    assert fc1.out_features == 4 * dims[0] and model.stages[0].blocks[0].mlp.dwconv.groups == 4 * dims[0]


@pytest.mark.parametrize(("size", "expected"), [((64, 64), [16, 8, 4, 2]), ((97, 131), None), ((5, 3), None)])
def test_any_size_ceil_maps(size, expected):
    model = MixTransformer(**TINY).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, *size))
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    for i, m in enumerate(maps):
        assert m.shape == (1, TINY["embed_dims"][i], h, w)
        assert torch.isfinite(m).all()
        h, w = -(-h // 2), -(-w // 2)
    if expected:
        assert [m.shape[-1] for m in maps] == expected


def test_drop_path_linear_and_fused_equals_explicit_attention():
    model = MixTransformer(**TINY, drop_path_rate=0.3)
    rates = [
        b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for s in model.stages for b in s.blocks
    ]
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])
    model.eval()
    _perturb(model)
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        fused = model(x)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        explicit = model(x)
    for a, b in zip(fused, explicit):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_matches_hf_segformer_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SegformerConfig(
        hidden_sizes=list(TINY["embed_dims"]), depths=list(TINY["depths"]), num_attention_heads=list(TINY["num_heads"])
    )
    hf = transformers.SegformerModel(cfg).eval()
    _perturb(hf)
    model = MixTransformer(**TINY).eval()
    assert load_weights(model, hf.state_dict(), source="hf", strict=True) == ([], [])
    for size in ((64, 64), (71, 99)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = hf(x, output_hidden_states=True).hidden_states
            ours = model.forward_intermediates(x)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_nvlabs_smp_layout_and_bare_checkpoints_route_into_encoder():
    smp = pytest.importorskip("segmentation_models_pytorch")
    ref = smp.Unet("mit_b0", encoder_weights=None, classes=2).encoder.eval()
    _perturb(ref, seed=2)
    nv = {k: v for k, v in ref.state_dict().items()}  # NVlabs keys: patch_embed1 / block1.0.attn.kv / norm1
    assert is_nvlabs_mit_state_dict(nv) and _is_backbone_state_dict(nv) and _detect_source(nv) == "timm"
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = ref(x)[2:]
    backbone = create_model("mit_b0", eps=1e-6).eval()  # smp's blocks use LayerNorm eps 1e-6
    load_weights(backbone, nv, strict=True)
    with torch.no_grad():
        for a, b in zip(backbone(x), expected):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    converted, dropped = convert_nvlabs_mit({**nv, "head.weight": torch.zeros(10, 256), "head.bias": torch.zeros(10)})
    assert sorted(dropped) == ["head.bias", "head.weight"] and is_mit_state_dict(converted)
    # a bare maskworks MiT and a NVlabs one load into unet.encoder
    ours = backbone.state_dict()
    assert is_mit_state_dict(ours) and _is_backbone_state_dict(ours)
    for sd in (ours, nv):
        unet = create_model("unet", encoder="mit_b0", num_classes=3)
        result = load_weights(unet, sd)
        assert result.missing_keys and not any(k.startswith("encoder.") for k in result.missing_keys)
        torch.testing.assert_close(
            unet.encoder.stages[2].blocks[0].attn.k.weight, backbone.stages[2].blocks[0].attn.k.weight
        )


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("unet", {}),
        ("fpn", {}),
        ("deeplabv3plus", {}),
        ("upernet", {"aux": False}),
    ],
)
def test_as_encoder_of_dense_models(name, kwargs):
    model = create_model(name, encoder="mit_b0", num_classes=3, **kwargs).eval()
    with torch.no_grad():
        for size in ((64, 64), (45, 67)):
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, 3, *size) and torch.isfinite(out).all()

"""TransUNet: parameter count of the official model, official checkpoint keys and shapes (converter coverage),
numerical invariants of the converted weights, the cascaded upsampler's skips for n_skip 0..3, any input size,
gradients, the ViT-only variant, sample independence and a short training run on synthetic shapes.

The official code (Beckschen/TransUNet) is not installable, so its checkpoint layout is written out below from its
module structure (``networks/vit_seg_modeling.py``: ``Embeddings`` / ``Encoder`` / ``DecoderCup`` /
``SegmentationHead``; ``networks/vit_seg_modeling_resnet_skip.py``: ``ResNetV2`` / ``PreActBottleneck``).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

import maskworks.models.semantic.transunet  # noqa: F401  (registers "transunet")
from maskworks import create_model
from maskworks.convert.transunet import convert_transunet_official, is_transunet_official_state_dict
from maskworks.models.semantic.transunet import TransUNet

# Beckschen/TransUNet VisionTransformer(CONFIGS["R50-ViT-B_16"], img_size=224) with n_classes=9 (the Synapse setting
# of its train.py: n_skip=3, patches.grid=(14, 14)), sum(p.numel() for p in net.parameters()), measured on the
# official code.
OFFICIAL_R50_VIT_B16_224_9CLS_PARAMS = 105_277_081

TINY = {"encoder": "vit_test_r50_s16", "decoder_channels": (32, 16, 16, 8), "head_channels": 32, "dropout": 0.0}


def _tiny(**kwargs) -> TransUNet:
    torch.manual_seed(0)
    return create_model("transunet", **{"num_classes": 3, **TINY, **kwargs})


def _bn(shapes: dict, prefix: str, c: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{name}"] = (c,)
    shapes[f"{prefix}.num_batches_tracked"] = ()


def official_shapes(
    num_classes: int = 9,
    n_skip: int = 3,
    layers: tuple[int, ...] = (3, 4, 9),
    width: int = 64,
    hidden: int = 768,
    depth: int = 12,
    mlp_dim: int = 3072,
    n_patches: int = 196,
    patch: int = 1,
    decoder: tuple[int, ...] = (256, 128, 64, 16),
    config_skips: tuple[int, ...] = (512, 256, 64, 16),
    head: int = 512,
    hybrid: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official module's ``state_dict()`` (R50-ViT-B_16 by default; ``layers`` / ``width`` /
    ``hidden`` ... describe a smaller one of the same structure)."""
    s: dict[str, tuple[int, ...]] = {}
    emb = "transformer.embeddings."
    if hybrid:  # ResNetV2(block_units=layers, width_factor): root conv + GN, body.block{b}.unit{u}
        r = emb + "hybrid_model."
        s[r + "root.conv.weight"] = (width, 3, 7, 7)
        s[r + "root.gn.weight"] = s[r + "root.gn.bias"] = (width,)
        cin = width
        for b, n in enumerate(layers, 1):
            cmid, cout = width * 2 ** (b - 1), width * 4 * 2 ** (b - 1)
            for u in range(1, n + 1):
                p = f"{r}body.block{b}.unit{u}."
                s[p + "conv1.weight"], s[p + "conv2.weight"] = (cmid, cin, 1, 1), (cmid, cmid, 3, 3)
                s[p + "conv3.weight"] = (cout, cmid, 1, 1)
                for g, c in (("gn1", cmid), ("gn2", cmid), ("gn3", cout)):
                    s[f"{p}{g}.weight"] = s[f"{p}{g}.bias"] = (c,)
                if u == 1:  # stride != 1 or cin != cout
                    s[p + "downsample.weight"] = (cout, cin, 1, 1)
                    s[p + "gn_proj.weight"] = s[p + "gn_proj.bias"] = (cout,)
                cin = cout
        embed_in = cin
    else:
        embed_in = 3
    s[emb + "patch_embeddings.weight"], s[emb + "patch_embeddings.bias"] = (hidden, embed_in, patch, patch), (hidden,)
    s[emb + "position_embeddings"] = (1, n_patches, hidden)
    for i in range(depth):
        p = f"transformer.encoder.layer.{i}."
        for norm in ("attention_norm", "ffn_norm"):
            s[f"{p}{norm}.weight"] = s[f"{p}{norm}.bias"] = (hidden,)
        s[p + "ffn.fc1.weight"], s[p + "ffn.fc1.bias"] = (mlp_dim, hidden), (mlp_dim,)
        s[p + "ffn.fc2.weight"], s[p + "ffn.fc2.bias"] = (hidden, mlp_dim), (hidden,)
        for lin in ("query", "key", "value", "out"):
            s[f"{p}attn.{lin}.weight"], s[f"{p}attn.{lin}.bias"] = (hidden, hidden), (hidden,)
    s["transformer.encoder.encoder_norm.weight"] = s["transformer.encoder.encoder_norm.bias"] = (hidden,)
    s["decoder.conv_more.0.weight"] = (head, hidden, 3, 3)
    _bn(s, "decoder.conv_more.1", head)
    # DecoderCup: skip_channels[3 - i] = 0 for i in range(4 - n_skip); all zero for n_skip = 0
    skips = [c if i < n_skip else 0 for i, c in enumerate(config_skips)]
    for i, (cin, cout, sk) in enumerate(zip((head, *decoder[:-1]), decoder, skips)):
        p = f"decoder.blocks.{i}."
        s[p + "conv1.0.weight"], s[p + "conv2.0.weight"] = (cout, cin + sk, 3, 3), (cout, cout, 3, 3)
        _bn(s, p + "conv1.1", cout)
        _bn(s, p + "conv2.1", cout)
    s["segmentation_head.0.weight"], s["segmentation_head.0.bias"] = (num_classes, decoder[-1], 3, 3), (num_classes,)
    return s


TINY_OFFICIAL = {  # the official structure at the size of TINY (vit_test_r50_s16 at 64 px)
    "num_classes": 3, "layers": (1, 1), "width": 32, "hidden": 64, "depth": 2, "mlp_dim": 256, "n_patches": 16,
    "patch": 2, "decoder": (32, 16, 16, 8), "config_skips": (256, 128, 32, 8), "head": 32,
}  # fmt: skip


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _random_official(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 1 and k.endswith("weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 10
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


# --------------------------------------------------------------------------------------- size, keys, conversion
@pytest.mark.parametrize("official_cnn", [False, True])
def test_parameter_count_equals_official(official_cnn):
    with torch.device("meta"):
        model = create_model("transunet", num_classes=9, official_cnn=official_cnn)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_R50_VIT_B16_224_9CLS_PARAMS
    assert model.skip_channels == (512, 256, 64, 0)
    official = official_shapes()  # the key list agrees with the measured count
    params = [k for k in official if not k.split(".")[-1].startswith(("running_", "num_batches"))]
    assert sum(math.prod(official[k]) for k in params) == OFFICIAL_R50_VIT_B16_224_9CLS_PARAMS


@pytest.mark.parametrize("n_skip", [3, 2, 1, 0])
def test_converter_uses_every_official_key_with_equal_shapes(n_skip):
    official = official_shapes(n_skip=n_skip)
    sd = {k: torch.empty(shape, device="meta") for k, shape in official.items()}
    assert is_transunet_official_state_dict(sd)
    converted = convert_transunet_official(sd)
    # 3 separate q / k / v weights and biases per layer fuse into one qkv weight and bias: every key is used once
    assert len(converted) == len(official) - 2 * 2 * 12
    assert sum(v.numel() for v in converted.values()) == sum(v.numel() for v in sd.values())
    with torch.device("meta"):
        model = create_model("transunet", num_classes=9, n_skip=n_skip, official_cnn=True)
    assert _shapes(converted) == _shapes(model.state_dict())


def test_converter_rejects_unknown_keys():
    sd = {k: torch.empty(s, device="meta") for k, s in official_shapes(**TINY_OFFICIAL).items()}
    sd["transformer.embeddings.extra.weight"] = torch.empty(1, device="meta")
    with pytest.raises(KeyError, match="extra"):
        convert_transunet_official(sd)


def test_vit_only_official_keys_convert():
    official = official_shapes(**{**TINY_OFFICIAL, "hybrid": False, "patch": 16}, n_skip=0)
    converted = convert_transunet_official({k: torch.empty(s) for k, s in official.items()})
    model = _tiny(encoder="vit_test_patch16", n_skip=0)
    assert model.encoder.embed_dim == 64 and len(model.encoder.blocks) == 2
    assert _shapes(converted) == _shapes(model.state_dict())


def test_converted_weights_compute_the_official_ops():
    """Load a random official-layout state dict and check, op by op, what the official modules compute: separate
    q / k / v / out attention, weight standardisation with eps 1e-5 and symmetric padding, per-channel GroupNorm
    on the projection shortcut, final encoder LayerNorm and a 3x3 segmentation head."""
    official = _random_official(official_shapes(**TINY_OFFICIAL))
    model = _tiny(official_cnn=True).eval()
    model.load_state_dict(convert_transunet_official(official), strict=True)
    torch.manual_seed(1)

    # attention: softmax(q k^T / sqrt(d)) v per head, then `out`
    p, heads, dim = "transformer.encoder.layer.0.attn.", 2, 64
    h = torch.randn(2, 5, dim)
    q, k, v = (F.linear(h, official[f"{p}{n}.weight"], official[f"{p}{n}.bias"]) for n in ("query", "key", "value"))
    split = lambda t: t.reshape(2, 5, heads, dim // heads).transpose(1, 2)  # noqa: E731
    ctx = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads), -1) @ split(v)
    ref = F.linear(ctx.transpose(1, 2).reshape(2, 5, dim), official[p + "out.weight"], official[p + "out.bias"])
    torch.testing.assert_close(model.encoder.blocks[0].attn(h), ref, atol=1e-5, rtol=1e-5)

    # root conv: (w - mean) / sqrt(var + 1e-5), 7x7 / 2, padding 3
    x = torch.randn(2, 3, 20, 20)
    w = official["transformer.embeddings.hybrid_model.root.conv.weight"]
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
    ref = F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), stride=2, padding=3)
    stem = model.encoder.patch_embed.backbone.stem
    torch.testing.assert_close(stem.conv(x), ref, atol=1e-5, rtol=1e-5)
    assert stem.norm.eps == 1e-6

    # projection shortcut norm: GroupNorm(cout, cout) with the default eps
    z = torch.randn(2, 256, 3, 3)
    q = "transformer.embeddings.hybrid_model.body.block2.unit1.gn_proj."
    ref = F.group_norm(z, 256, official[q + "weight"], official[q + "bias"], eps=1e-5)
    norm = model.encoder.patch_embed.backbone.stages[1].blocks[0].downsample.norm
    torch.testing.assert_close(norm(z), ref)

    # head: the official segmentation_head.0 (3x3 conv, padding 1) on the last decoder map
    y = torch.randn(2, 8, 6, 6)
    ref = F.conv2d(y, official["segmentation_head.0.weight"], official["segmentation_head.0.bias"], padding=1)
    torch.testing.assert_close(model.segmentation_head(y), ref)

    # encoder output: the last block's tokens through encoder_norm (LayerNorm eps 1e-6) feed conv_more
    captured = {}
    model.encoder.blocks[-1].register_forward_hook(lambda m, a, o: captured.setdefault("block", o))
    model.decoder.conv_more.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    n = "transformer.encoder.encoder_norm."
    ref = F.layer_norm(captured["block"], (64,), official[n + "weight"], official[n + "bias"], eps=1e-6)
    torch.testing.assert_close(captured["x"], ref.transpose(1, 2).reshape(1, 64, 4, 4))


def test_ws_eps_and_default_cnn():
    default = _tiny()
    backbone = default.encoder.patch_embed.backbone
    assert backbone.stem.conv.eps == 1e-8 and backbone.stem.norm.eps == 1e-5  # timm's hybrid
    assert _tiny(ws_eps=1e-5).encoder.patch_embed.backbone.stem.conv.eps == 1e-5
    official = _tiny(official_cnn=True).encoder.patch_embed.backbone
    assert official.stem.conv.eps == 1e-5 and official.stem.conv.padding == (3, 3) and not official.stem.conv.same_pad
    assert official.stages[0].blocks[0].downsample.norm.num_groups == 128
    with pytest.raises(ValueError, match="hybrid"):
        _tiny(encoder="vit_test_patch16", n_skip=0, official_cnn=True)


# --------------------------------------------------------------------------------------------- decoder (CUP)
def _record_cup(model: TransUNet) -> list[tuple]:
    calls = []

    def hook(block, args):
        x, skip = args
        calls.append((tuple(x.shape), None if skip is None else tuple(skip.shape)))

    for block in model.decoder.blocks:
        block.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("official_cnn", [False, True])
@pytest.mark.parametrize("n_skip", [3, 2, 1, 0])
def test_cup_upsamples_four_times_with_skips_at_eighth_quarter_half(n_skip, official_cnn):
    model = _tiny(n_skip=n_skip, official_cnn=official_cnn).eval()
    skip_ch = (256, 128, 32)  # vit_test_r50_s16: stage 2 @ 1/8, stage 1 @ 1/4, stem @ 1/2
    assert model.skip_channels == tuple(skip_ch[i] if i < n_skip else 0 for i in range(4))
    calls = _record_cup(model)
    outs = []
    for block in model.decoder.blocks:
        block.register_forward_hook(lambda m, a, o: outs.append(tuple(o.shape)))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 3, 64, 96)
    assert [c[0] for c in calls] == [(2, 32, 4, 6), (2, 32, 8, 12), (2, 16, 16, 24), (2, 16, 32, 48)]
    assert outs == [(2, 32, 8, 12), (2, 16, 16, 24), (2, 16, 32, 48), (2, 8, 64, 96)]
    for i, (_, skip) in enumerate(calls):
        if i < n_skip:
            h, w = 64 // 2 ** (3 - i), 96 // 2 ** (3 - i)
            if official_cnn and i == 1:  # unpadded stem pool: the 1/4 map is one pixel short, zero-padded
                h, w = h - 1, w - 1
            assert skip == (2, skip_ch[i], h, w), (i, skip)
        else:
            assert skip is None


def test_official_quarter_skip_is_zero_padded_bottom_right():
    model = _tiny(n_skip=2, official_cnn=True).eval()
    seen = []
    model.decoder.blocks[1].conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    skip = seen[0][:, 32:]  # (1, 128, 16, 16): upsampled map (32 ch) then the skip
    assert skip[..., -1, :].abs().max() == 0 and skip[..., :, -1].abs().max() == 0
    assert skip[..., :-1, :-1].abs().amax(dim=(-1, -2)).gt(0).any()


def test_n_skip_out_of_range():
    with pytest.raises(ValueError, match="n_skip"):
        _tiny(n_skip=4)
    with pytest.raises(ValueError, match="n_skip"):
        _tiny(encoder="vit_test_patch16", n_skip=1)


# ----------------------------------------------------------------------------------------- model behaviour
@pytest.mark.parametrize("official_cnn", [False, True])
def test_any_input_size(official_cnn):
    model = _tiny(official_cnn=official_cnn).eval()
    tokens = []
    model.decoder.conv_more.register_forward_pre_hook(lambda m, a: tokens.append(tuple(a[0].shape[-2:])))
    with torch.no_grad():
        for size, grid in (((97, 131), (7, 9)), ((33, 33), (3, 3)), ((16, 16), (1, 1))):
            out = model(torch.randn(2, 3, *size))
            assert out.shape == (2, 3, *size) and torch.isfinite(out).all()
            assert tokens[-1] == grid  # ceil(H / 16) x ceil(W / 16) tokens: the position table is resampled


def test_samples_are_independent():
    model = _tiny().eval()
    x = torch.randn(3, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), model(x)[:1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs", [{}, {"official_cnn": True, "n_skip": 1}, {"encoder": "vit_test_patch16", "n_skip": 0}]
)
def test_gradients_reach_every_trainable_parameter(kwargs):
    model = _tiny(**kwargs).train()
    x, y = torch.randn(2, 3, 40, 56), torch.randint(0, 3, (2, 40, 56))
    F.cross_entropy(model(x), y).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing


def test_vit_only_variant():
    model = _tiny(encoder="vit_test_patch16", n_skip=0).eval()
    assert not model.hybrid and model.skip_channels == (0, 0, 0, 0)
    assert model.encoder.cls_token is None and model.encoder.pos_embed.shape == (1, 16, 64)
    calls = _record_cup(model)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 97, 131))
    assert out.shape == (2, 3, 97, 131)
    assert all(skip is None for _, skip in calls) and len(calls) == 4


def test_default_dropout_as_official():
    model = create_model("transunet", **{k: v for k, v in TINY.items() if k != "dropout"})
    block = model.encoder.blocks[0]
    assert model.encoder.pos_drop.p == 0.1 and block.mlp.drop1.p == 0.1 and block.mlp.drop2.p == 0.1
    assert block.attn.proj_drop.p == 0.0


def test_img_size_sets_the_position_table():
    model = _tiny(img_size=96)
    assert model.encoder.pos_embed.shape == (1, 36, 64)


def test_learns_synthetic_shapes():
    from maskworks.data import SyntheticShapes, build_transforms
    from maskworks.metrics import ConfusionMatrix

    def stack(split, n):
        ds = SyntheticShapes(
            num_samples=n, image_size=32, num_classes=2, split=split, transform=build_transforms(train=False),
            return_instances=False,
        )  # fmt: skip
        samples = [ds[i] for i in range(n)]
        return torch.stack([s["image"] for s in samples]), torch.stack([s["mask"] for s in samples]).long()

    t0 = time.perf_counter()
    x, y = stack("train", 256)
    xv, yv = stack("val", 64)
    model = _tiny(num_classes=2)
    steps, lr = 150, 1e-2
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is as fast, and far faster on a busy machine
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (16,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    cm = ConfusionMatrix(2)
    model.eval()
    with torch.no_grad():
        cm.update(model(xv).argmax(1), yv)
    miou = cm.compute()["miou"]
    print(f"transunet tiny: val mIoU {miou:.3f} after {steps} steps in {time.perf_counter() - t0:.1f} s")
    assert miou >= 0.7, (miou, time.perf_counter() - t0)


def test_encoder_weights_from_a_class_token_checkpoint(tmp_path):
    """A timm-style hybrid checkpoint (class token, head) loads into the class-token-free encoder, dropping the
    class token's position row as the official ``load_from`` does."""
    torch.manual_seed(3)
    source = create_model("vit_test_r50_s16", num_classes=10)
    path = tmp_path / "hybrid.pth"
    torch.save(source.state_dict(), path)
    model = _tiny(encoder_weights=str(path))
    torch.testing.assert_close(model.encoder.pos_embed, source.pos_embed[:, 1:])
    ours, theirs = model.encoder.state_dict(), source.state_dict()
    for key in ("blocks.1.attn.qkv.weight", "patch_embed.backbone.stem.conv.weight", "norm.weight"):
        torch.testing.assert_close(ours[key], theirs[key])


def test_load_weights_detects_official_checkpoints():
    """An official-code state dict is recognised by load_weights (source "official") and fills the whole model."""
    from maskworks.convert import load_weights
    from maskworks.convert.load import _detect_source

    official = _random_official(official_shapes(**TINY_OFFICIAL))
    assert _detect_source(official) == "official"
    model = _tiny(official_cnn=True).eval()
    result = load_weights(model, official)
    assert result.missing_keys == [] and result.unexpected_keys == []
    expected = _tiny(official_cnn=True).eval()
    expected.load_state_dict(convert_transunet_official(official), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x))

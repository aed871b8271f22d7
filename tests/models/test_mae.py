"""Masked autoencoder (MAE): masking invariants, patchify, loss, sin-cos tables, parameter count, HF parity and the
conversion of the encoder into a VisionTransformer."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import maskworks.backbones.vit  # noqa: F401  (registers vit_test_patch8)
from maskworks.convert.mae import convert_hf_vitmae, is_hf_vitmae_state_dict
from maskworks.models.mae import (
    MaskedAutoencoderViT,
    mae_encoder_state_dict,
    num_visible_patches,
    random_masking,
    vit_from_mae,
)
from maskworks.registry import create_model, list_models


def tiny(**kwargs) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return create_model("mae_vit_test_patch8", **kwargs)


# --------------------------------------------------------------------------------------------------- masking
def test_random_masking_invariants_against_a_loop():
    torch.manual_seed(0)
    b, n, d = 4, 196, 8
    x = torch.randn(b, n, d)
    noise = torch.rand(b, n)
    x_masked, mask, ids_restore = random_masking(x, 0.75, noise)
    assert x_masked.shape == (b, 49, d)
    assert mask.shape == (b, n) and mask.dtype == torch.float32
    assert torch.equal(mask.sum(1), torch.full((b,), 147.0))
    for i in range(b):
        assert sorted(ids_restore[i].tolist()) == list(range(n))  # a permutation
        keep = sorted(range(n), key=lambda j: noise[i, j].item())[:49]  # brute force: the 49 smallest noises
        assert torch.equal(x_masked[i], x[i, keep])
        assert {j for j in range(n) if mask[i, j] == 0} == set(keep)
    # appending fillers and gathering with ids_restore puts every kept token back at its own index
    filler = torch.full((b, n - 49, d), float("nan"))
    restored = torch.gather(torch.cat([x_masked, filler], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    visible = mask == 0
    assert torch.equal(restored[visible], x[visible])
    assert torch.isnan(restored[~visible]).all()


@pytest.mark.parametrize(("n", "ratio"), [(196, 0.75), (16, 0.75), (256, 0.75), (10, 0.9), (10, 0.7), (50, 0.6)])
def test_masking_keeps_round_n_times_one_minus_ratio(n, ratio):
    x = torch.randn(2, n, 4)
    x_masked, mask, _ = random_masking(x, ratio)
    expected = round(n * (1 - ratio))  # all cases are whole numbers; int() would give 0 for (10, 0.9)
    assert x_masked.shape[1] == expected == num_visible_patches(n, ratio)
    assert (mask.sum(1) == n - expected).all()


def test_masking_rejects_bad_arguments():
    x = torch.randn(2, 16, 4)
    for ratio in (1.0, -0.1, 0.99):
        with pytest.raises(ValueError, match="mask_ratio"):
            random_masking(x, ratio)
    with pytest.raises(ValueError, match="noise"):
        random_masking(x, 0.5, torch.rand(2, 15))


def test_masking_ratio_zero_with_sorted_noise_keeps_the_order():
    x = torch.randn(2, 16, 4)
    x_masked, mask, ids_restore = random_masking(x, 0.0, torch.arange(16.0).expand(2, -1))
    assert torch.equal(x_masked, x) and not mask.any()
    assert torch.equal(ids_restore, torch.arange(16).expand(2, -1))


# --------------------------------------------------------------------------------------------------- patches
def test_patchify_unpatchify_round_trip_and_einsum_order():
    model = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(model.unpatchify(patches), imgs)
    # MAE's reference implementation
    x = imgs.reshape(2, 3, 4, 8, 4, 8)
    ref = torch.einsum("nchpwq->nhwpqc", x).reshape(2, 16, 8 * 8 * 3)
    assert torch.equal(patches, ref)
    # non-square images whose sides are multiples of p
    wide = torch.randn(1, 3, 16, 40)
    p = model.patchify(wide)
    assert p.shape == (1, 2 * 5, 192)
    assert torch.equal(model.unpatchify(p, grid_size=(2, 5)), wide)
    assert torch.equal(p[0, 1], wide[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))  # patch (0, 1): rows, cols, C


def test_patchify_errors():
    model = tiny()
    with pytest.raises(ValueError, match="divisible by patch_size 8"):
        model.patchify(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="channels"):
        model.patchify(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="grid"):
        model.unpatchify(torch.randn(1, 10, 192))


# --------------------------------------------------------------------------------------------------- loss
def test_loss_counts_only_masked_patches():
    model = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)
        pred = model.forward_decoder(latent, ids_restore)
        loss = model.forward_loss(imgs, pred, mask)
        visible = (mask == 0).unsqueeze(-1)
        changed_visible = model.forward_loss(imgs, torch.where(visible, pred + 5.0, pred), mask)
        changed_masked = model.forward_loss(imgs, torch.where(visible, pred, pred + 5.0), mask)
    assert torch.equal(loss, changed_visible)
    assert not torch.allclose(loss, changed_masked)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_by_hand(norm_pix_loss):
    model = tiny(norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pred = torch.randn(2, 16, 192, dtype=torch.float64)
    mask = (torch.rand(2, 16) < 0.75).double()
    mask[0, 0] = 1
    total, count = 0.0, 0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                patch = imgs[b, :, i * 8 : (i + 1) * 8, j * 8 : (j + 1) * 8].permute(1, 2, 0).reshape(-1)  # p, p, C
                if norm_pix_loss:
                    mean = patch.sum() / 192
                    var = ((patch - mean) ** 2).sum() / 191  # unbiased
                    patch = (patch - mean) / torch.sqrt(var + 1e-6)
                if mask[b, i * 4 + j]:
                    total += ((pred[b, i * 4 + j] - patch) ** 2).mean().item()
                    count += 1
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(total / count, rel=1e-12)


def test_nothing_masked_gives_zero_loss_not_nan():
    model = tiny()
    loss, pred, mask = model(torch.randn(2, 3, 32, 32), mask_ratio=0.0)
    assert loss.item() == 0.0 and not mask.any() and pred.shape == (2, 16, 192)


# --------------------------------------------------------------------------------------------------- sin-cos
def _mae_reference_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """Transcription of facebookresearch/mae util/pos_embed.py::get_2d_sincos_pos_embed(cls_token=True)."""

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64)
        omega /= d / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_tables_are_fixed_and_equal_mae_formula():
    model = tiny(img_size=48)  # 6 x 6 grid
    ref = torch.from_numpy(_mae_reference_sincos(32, 6)).float()
    assert torch.equal(model.pos_embed[0], ref)
    assert torch.equal(model.decoder_pos_embed[0], ref)  # decoder width is 32 too
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(32))  # class-token row
    loss, _, _ = model(torch.randn(2, 3, 48, 48))
    loss.backward()
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # every trainable parameter (tokens included) gets a gradient
    from maskworks.layers.vit_layers import get_2d_sincos_pos_embed

    np.testing.assert_array_equal(get_2d_sincos_pos_embed(768, 14, cls_token=True), _mae_reference_sincos(768, 14))


def test_init_follows_mae():
    model = tiny()
    w = model.patch_embed.proj.weight.view(32, -1)
    assert w.abs().max() <= (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier on the flattened kernel
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.abs().max() <= (6 / sum(qkv.weight.shape)) ** 0.5 and not qkv.bias.any()
    assert not model.decoder_pred.bias.any()
    assert model.cls_token.abs().max() > 0 and model.mask_token.abs().max() > 0


# --------------------------------------------------------------------------------------------------- sizes
def _official_base_shapes() -> dict[str, tuple[int, ...]]:
    """Transcribed from models_mae.py::mae_vit_base_patch16_dec512d8b (timm 0.3.2 Block, qkv_bias=True)."""
    shapes = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 197, 768),
        "patch_embed.proj.weight": (768, 3, 16, 16),
        "patch_embed.proj.bias": (768,),
        "norm.weight": (768,),
        "norm.bias": (768,),
        "mask_token": (1, 1, 512),
        "decoder_embed.weight": (512, 768),
        "decoder_embed.bias": (512,),
        "decoder_pos_embed": (1, 197, 512),
        "decoder_norm.weight": (512,),
        "decoder_norm.bias": (512,),
        "decoder_pred.weight": (768, 512),
        "decoder_pred.bias": (768,),
    }
    for prefix, depth, d in (("blocks", 12, 768), ("decoder_blocks", 8, 512)):
        for i in range(depth):
            b = f"{prefix}.{i}."
            shapes.update(
                {
                    b + "norm1.weight": (d,),
                    b + "norm1.bias": (d,),
                    b + "attn.qkv.weight": (3 * d, d),
                    b + "attn.qkv.bias": (3 * d,),
                    b + "attn.proj.weight": (d, d),
                    b + "attn.proj.bias": (d,),
                    b + "norm2.weight": (d,),
                    b + "norm2.bias": (d,),
                    b + "mlp.fc1.weight": (4 * d, d),
                    b + "mlp.fc1.bias": (4 * d,),
                    b + "mlp.fc2.weight": (d, 4 * d),
                    b + "mlp.fc2.bias": (d,),
                }
            )
    return shapes


def test_base_parameter_count_matches_the_official_model():
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16", norm_pix_loss=True)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = _official_base_shapes()
    assert ours == official
    total = sum(int(np.prod(s)) for s in official.values())
    assert total == 111_907_840 == sum(p.numel() for p in model.parameters())
    encoder = sum(int(np.prod(s)) for k, s in official.items() if not k.startswith(("decoder", "mask_token")))
    assert encoder == 85_798_656 and total - encoder == 26_109_184


def test_registered_variants():
    assert list_models("mae_*") == [
        "mae_vit_base_patch16",
        "mae_vit_huge_patch14",
        "mae_vit_large_patch16",
        "mae_vit_test_patch8",
    ]
    with torch.device("meta"):
        large = create_model("mae_vit_large_patch16")
        huge = create_model("mae_vit_huge_patch14")
    assert (len(large.blocks), large.embed_dim, large.blocks[0].attn.num_heads) == (24, 1024, 16)
    assert (len(huge.blocks), huge.embed_dim, huge.patch_size, huge.num_patches) == (32, 1280, 14, 256)
    for m in (large, huge):
        assert (len(m.decoder_blocks), m.decoder_embed.out_features, m.decoder_blocks[0].attn.num_heads) == (8, 512, 16)
        assert m.norm.eps == 1e-6 and m.decoder_pred.out_features == m.patch_size**2 * 3


def test_encoder_macs_scale_with_visible_patches():
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny(img_size=64).eval()  # 64 patches
    x = torch.randn(1, 3, 64, 64)

    def flops(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    patch_embed = flops(lambda: model.patch_embed(x))  # the same for every ratio
    masked = flops(lambda: model.forward_encoder(x, 0.75)) - patch_embed
    full = flops(lambda: model.forward_encoder(x, 0.0)) - patch_embed
    # the blocks see 1 + 16 of 1 + 64 tokens: linear layers scale by 17 / 65, attention by (17 / 65)^2
    assert 0.2 < masked / full <= 17 / 65


# --------------------------------------------------------------------------------------------------- HF parity
HF_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=256,
    image_size=32,
    patch_size=8,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=128,
    mask_ratio=0.75,
    layer_norm_eps=1e-6,
    qkv_bias=True,
)


def _hf_model(norm_pix_loss: bool):
    transformers = pytest.importorskip("transformers")
    from transformers.models.vit_mae import modeling_vit_mae as hf

    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**HF_CONFIG, norm_pix_loss=norm_pix_loss))
    # transformers 5.x leaves both fixed tables and the mask token at zero after a random init; set them as HF's
    # own initialize_weights() means to (sin-cos, h / w halves rotated to the layout of the released checkpoints)
    with torch.no_grad():
        for param in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
            table = hf.build_2d_sinusoidal_position_embedding(4, 4, param.shape[-1], cls_token=True)
            half = table.shape[-1] // 2
            param.copy_(torch.cat([table[..., half:], table[..., :half]], dim=-1).unsqueeze(0))
        model.decoder.mask_token.normal_(std=0.02)
    return model.eval()


def _ours_for_hf(norm_pix_loss: bool) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        mlp_ratio=4.0,
        norm_eps=1e-6,
        norm_pix_loss=norm_pix_loss,
    ).eval()


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_hf_vitmae_parity(norm_pix_loss):
    hf = _hf_model(norm_pix_loss)
    ours = _ours_for_hf(norm_pix_loss)
    # HF's sin-cos tables equal ours (the MAE layout), before any copying
    assert torch.allclose(hf.vit.embeddings.position_embeddings, ours.pos_embed, atol=1e-6)
    assert torch.allclose(hf.decoder.decoder_pos_embed, ours.decoder_pos_embed, atol=1e-6)
    converted, dropped = convert_hf_vitmae(hf.state_dict())
    assert dropped == []
    ours.load_state_dict(converted, strict=True)

    torch.manual_seed(1)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        ref = hf(pixel_values=imgs, noise=noise)
        latent, mask, ids_restore = ours.forward_encoder(imgs, 0.75, noise)
        pred = ours.forward_decoder(latent, ids_restore)
        loss = ours.forward_loss(imgs, pred, mask)
        loss2, pred2, mask2 = ours(imgs, mask_ratio=0.75, noise=noise)
        hf_latent = hf.vit(pixel_values=imgs, noise=noise).last_hidden_state
    assert torch.equal(mask, ref.mask) and torch.equal(ids_restore, ref.ids_restore)
    torch.testing.assert_close(latent, hf_latent, atol=1e-5, rtol=0)
    torch.testing.assert_close(pred, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=0)
    assert torch.equal(loss2, loss) and torch.equal(pred2, pred) and torch.equal(mask2, mask)


_LEGACY = [
    (r"^vit\.layers\.", "vit.encoder.layer."),
    (r"attention\.q_proj", "attention.attention.query"),
    (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"),
    (r"mlp\.fc2", "output.dense"),
]


def test_hf_legacy_hub_layout_converts_the_same():
    hf_state = _hf_model(True).state_dict()
    legacy = {}
    for key, value in hf_state.items():
        for pattern, repl in _LEGACY:
            key = re.sub(pattern, repl, key)
        legacy[key] = value
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    assert "decoder.decoder_layers.0.intermediate.dense.weight" in legacy
    a, _ = convert_hf_vitmae(hf_state)
    b, dropped = convert_hf_vitmae({"module." + k: v for k, v in legacy.items()})
    assert dropped == [] and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hf_converter_encoder_only_and_errors():
    hf = _hf_model(False)
    encoder_only = {k[len("vit.") :]: v for k, v in hf.state_dict().items() if k.startswith("vit.")}  # ViTMAEModel
    assert is_hf_vitmae_state_dict(encoder_only)
    converted, _ = convert_hf_vitmae({**encoder_only, "pooler.dense.weight": torch.zeros(1)})
    result = _ours_for_hf(False).load_state_dict(converted, strict=False)
    assert result.unexpected_keys == [] and all(k.startswith(("decoder", "mask_token")) for k in result.missing_keys)
    with pytest.raises(ValueError, match="not an HF ViTMAE"):
        convert_hf_vitmae({"blocks.0.attn.qkv.weight": torch.zeros(3, 1)})
    broken = {k: v for k, v in hf.state_dict().items() if "layers.1.attention.k_proj.weight" not in k}
    with pytest.raises(ValueError, match=r"blocks\.1.*only \['q', 'v'\]"):
        convert_hf_vitmae(broken)
    one_channel, _ = convert_hf_vitmae(hf.state_dict(), in_channels=1)
    assert one_channel["patch_embed.proj.weight"].shape == (64, 1, 8, 8)


# --------------------------------------------------------------------------------------------------- encoder
def test_encoder_loads_into_vit_with_the_same_features():
    mae = tiny().eval()
    state, dropped = mae_encoder_state_dict({"model": mae.state_dict()})
    assert dropped == sorted(k for k in mae.state_dict() if k.startswith(("decoder_", "mask_token")))
    vit = create_model("vit_test_patch8", num_classes=0).eval()
    vit.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        latent, mask, _ = mae.forward_encoder(x, 0.0, noise=torch.arange(16.0).expand(2, -1))  # order preserved
        features = vit.forward_features(x)
    assert not mask.any()
    torch.testing.assert_close(features, latent, atol=1e-5, rtol=0)


def test_encoder_becomes_an_avg_pool_classifier():
    mae = tiny().eval()
    state, dropped = mae_encoder_state_dict(mae.state_dict(), drop_norm=True)
    assert {"norm.weight", "norm.bias"} <= set(dropped)
    clf = create_model("vit_test_patch8", num_classes=5, global_pool="avg")
    result = clf.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert result.unexpected_keys == []
    x = torch.randn(2, 3, 32, 32)
    assert clf(x).shape == (2, 5)
    assert torch.equal(clf.blocks[1].mlp.fc2.weight, mae.blocks[1].mlp.fc2.weight)
    # the same through vit_from_mae
    built = vit_from_mae(mae, num_classes=5, global_pool="avg").eval()
    assert torch.equal(built.patch_embed.proj.weight, mae.patch_embed.proj.weight)
    # its tokens are the MAE encoder's before the final norm (which fine-tuning replaces by fc_norm after pooling)
    captured = []
    handle = mae.norm.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    with torch.no_grad():
        tokens = built.forward_features(x)
        mae.forward_encoder(x, 0.0, noise=torch.arange(16.0).expand(2, -1))
    handle.remove()
    torch.testing.assert_close(tokens, captured[0], atol=1e-5, rtol=0)
    assert built(x).shape == (2, 5)
    with pytest.raises(ValueError, match="MAE checkpoint"):
        mae_encoder_state_dict({"foo": torch.zeros(1)})

"""Helpers for parity tests against reference implementations.

A freshly built network has BatchNorm weights 1, biases 0, running mean 0 and variance 1 (and LayerNorm /
GroupNorm 1 / 0), so a port that forgets a norm layer, swaps two of them or loads their statistics into the
wrong place gives the same outputs as the reference: a parity check can pass by accident. These helpers give the
layers non-trivial values from a seeded generator before the reference's state dict is copied, so that every
parameter and statistic has to land in the right place for the outputs to match.

:func:`kill_in_epoch` serves the resume tests: it SIGKILLs a ``maskworks train`` process once a given epoch began.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "BATCH_NORMS",
    "TINY_MASK2FORMER",
    "TINY_MASK_RCNN",
    "TINY_SAM",
    "TINY_SEMANTIC",
    "count_parameters",
    "kill_in_epoch",
    "perturb_parameters",
    "randomize_norms",
    "rectangle_instances",
    "semantic_models_to_test",
]

BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Mask2Former options for test-sized runs: a narrow decoder, few queries and layers, few sampled points.
TINY_MASK2FORMER: dict[str, int] = {
    "encoder": "resnet18",
    "hidden_dim": 64,
    "mask_dim": 64,
    "num_heads": 4,
    "num_queries": 12,
    "enc_layers": 1,
    "enc_ffn_dim": 128,
    "dec_layers": 3,
    "dec_ffn_dim": 128,
    "num_points": 256,
}

# Mask R-CNN options for test-sized runs: 64-96 px inputs, few proposals and RoIs, 14x14 masks (the mask head costs
# ~0.5 GMAC per RoI at full size)
# A SAM small enough for unit tests (about 0.25 M parameters, milliseconds a prompt): 256-pixel input, a 16 x 16
# token grid with 5 x 5 windows (so the windows pad), one global block, a 32-wide prompt encoder and decoder. The
# same keywords build the matching Hugging Face ``SamConfig`` and official ``segment_anything`` modules in tests.
TINY_SAM: dict = {
    "image_size": 256,
    "encoder_embed_dim": 64,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": (1,),
    "window_size": 5,
    "prompt_embed_dim": 32,
    "mask_in_chans": 16,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}

TINY_MASK_RCNN: dict[str, int] = {
    "min_size": 64,
    "max_size": 96,
    "mask_resolution": 7,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 16,
    "box_detections_per_img": 8,
}


def rectangle_instances(
    num_classes: int = 3,
    size: tuple[int, int] = (64, 80),
    instances: int = 2,
    channels: int = 3,
    box_size: tuple[int, int] = (24, 30),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A test image (standard normal noise) with ``instances`` filled rectangles of ``box_size = (width, height)``
    at staggered positions (the ``i``-th at ``x = 4 + 20 i``, ``y = 6 + 12 i``), and its instance target: ``boxes``
    xyxy float32, random ``labels`` in ``1..num_classes-1``, ``masks (N, H, W)`` uint8."""
    h, w = size
    bw, bh = box_size
    image = torch.randn(channels, h, w)
    boxes, masks = [], []
    for i in range(instances):
        x1, y1 = 4 + 20 * i, 6 + 12 * i
        m = torch.zeros(h, w, dtype=torch.uint8)
        m[y1 : y1 + bh, x1 : x1 + bw] = 1
        boxes.append([float(x1), float(y1), float(x1 + bw), float(y1 + bh)])
        masks.append(m)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.randint(1, num_classes, (instances,), dtype=torch.int64),
        "masks": torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8),
    }
    return image, target


@torch.no_grad()
def _perturb(model: nn.Module, generator: torch.Generator, scale: float) -> None:
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=generator) * scale)


@torch.no_grad()
def perturb_parameters(model: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Add ``N(0, scale^2)`` noise to every parameter, in ``model.parameters()`` order.

    Moves weights off their initialisation (LayerNorms at 1 / 0, zero-initialised biases and heads), so that a
    mix-up between parameters of the same shape shows in the outputs.

    Args:
        model: the module, changed in place.
        seed: seed of the generator that draws the noise.
        scale: standard deviation of the noise.

    Returns:
        ``model`` itself, in the mode it was in.
    """
    _perturb(model, torch.Generator().manual_seed(seed), scale)
    return model


@torch.no_grad()
def randomize_norms(
    model: nn.Module,
    seed: int = 0,
    *,
    group_norm: bool = False,
    layer_norm: bool = False,
    perturb: float = 0.0,
) -> nn.Module:
    """Give the norm layers of ``model`` non-trivial affine parameters and running statistics.

    Visits ``model.modules()`` in order. Every BatchNorm (1d / 2d / 3d, subclasses included) gets weight
    ``U(0.5, 1.5)``, bias ``N(0, 0.1^2)``, running mean ``N(0, 0.1^2)`` and running variance ``U(0.5, 1.5)``,
    drawn in that order from one generator seeded with ``seed``; GroupNorm / LayerNorm layers, when asked for,
    get weight and bias the same way, in module order among the BatchNorms. Layers without affine parameters keep
    none (their running statistics are still drawn).

    Args:
        model: the module, changed in place.
        seed: seed of the generator.
        group_norm: randomise the weight and bias of ``nn.GroupNorm`` layers too.
        layer_norm: randomise the weight and bias of ``nn.LayerNorm`` layers too.
        perturb: when positive, first add ``N(0, perturb^2)`` noise to every parameter (see
            :func:`perturb_parameters`), from the same generator.

    Returns:
        ``model`` itself, in eval mode (the running statistics are used).
    """
    g = torch.Generator().manual_seed(seed)
    if perturb > 0:
        _perturb(model, g, perturb)
    affine_types = BATCH_NORMS + ((nn.GroupNorm,) if group_norm else ()) + ((nn.LayerNorm,) if layer_norm else ())
    for m in model.modules():
        if not isinstance(m, affine_types):
            continue
        if m.weight is not None:
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
        if m.bias is not None:
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
        if isinstance(m, BATCH_NORMS):
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    return model.eval()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# Tiny constructor arguments of every registered semantic model: the real modules at test size (shared by the zoo-wide
# tests: shapes, gradients, BatchNorm folding, ...). Every semantic model must appear here or be a size variant of
# one that does (see semantic_models_to_test).
TINY_SEMANTIC: dict[str, dict] = {
    "unet": {"encoder": "resnet18", "decoder_channels": (32, 16, 16, 8, 8)},
    "unet_vanilla": {"features": (8, 16, 32, 64)},
    "unetplusplus": {"encoder": "resnet18", "decoder_channels": (32, 16, 16, 8, 8), "deep_supervision": True},
    "attention_unet": {"encoder": "mobilenet_v2", "decoder_channels": (32, 16, 16, 8, 8)},
    "deeplabv3": {"encoder": "resnet18", "aux": True, "decoder_channels": 32},
    "deeplabv3plus": {"encoder": "mobilenet_v3_small", "decoder_channels": 32},
    "deeplabv3plus_mobilenet_v3_large": {"decoder_channels": 32},
    "lraspp_mobilenet_v3_large": {"inter_channels": 16},
    "fpn": {"encoder": "resnet18", "decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},
    "pspnet": {"encoder": "resnet18", "psp_out_channels": 32, "aux": True},
    "bisenetv1": {"encoder": "resnet18", "aux": True},
    "bisenetv2": {"aux": True, "head_channels": 64},
    "fast_scnn": {"aux": True},
    "upernet": {"encoder": "resnet18", "channels": 32, "aux_channels": 16},
    "setr_naive": {"encoder": "vit_test_patch16", "img_size": 64, "channels": 16},
    "setr_pup": {"encoder": "vit_test_patch16", "img_size": 64, "channels": 16},
    "setr_mla": {"encoder": "vit_test_patch16", "img_size": 64, "mla_channels": 16, "mla_head_channels": 8},
    "segformer_b0": {"decoder_channels": 32, "drop_path_rate": 0.0},
    "transunet": {"encoder": "vit_test_r50_s16", "decoder_channels": (32, 16, 16, 8), "head_channels": 32},
}


def _size_variant(name: str) -> bool:
    """``upernet_swin_tiny``, ``upernet_convnext_base``, ... (``upernet`` with a fixed full-size encoder) and
    ``segformer_b1`` .. ``b5`` (``segformer_b0``'s architecture at other sizes): covered by their family's tests."""
    return name.startswith("upernet_") or (name.startswith("segformer_b") and name != "segformer_b0")


def semantic_models_to_test() -> list[str]:
    """The registered semantic models the zoo-wide tests run, in registry order: all but the size variants and the
    models that serve several tasks (Mask2Former's family: set prediction with its own loss, tested on its own)."""
    from maskworks.registry import list_models, model_entry

    return [
        n
        for n in list_models(kind="model")
        if model_entry(n).task == "semantic" and not model_entry(n).tasks and not _size_variant(n)
    ]


def kill_in_epoch(
    command: Sequence[str],
    run_dir: str | Path,
    epoch: int = 2,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> None:
    """Start ``command`` (a ``maskworks train ... --run-dir run_dir`` command line) and SIGKILL it as soon as its
    ``steps.jsonl`` logs a step of ``epoch`` (1-based), as a crash or an out-of-memory kill would.

    Raises:
        AssertionError: the run ended before it could be killed, or ``epoch`` did not begin within ``timeout`` s.
    """
    steps = Path(run_dir) / "steps.jsonl"
    proc = subprocess.Popen(
        list(command), env=None if env is None else dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    try:
        while True:
            if steps.exists() and any(json.loads(x)["epoch"] == epoch for x in steps.read_text().splitlines() if x):
                break
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, f"epoch {epoch} did not begin within {timeout} s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()

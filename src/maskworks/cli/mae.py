"""``maskworks pretrain-mae``: masked-autoencoder pre-training on a folder of unlabelled images (He et al., "Masked
Autoencoders Are Scalable Vision Learners", CVPR 2022), with the recipe of ``facebookresearch/mae``
``main_pretrain.py``:

* augmentation ``RandomResizedCrop(img_size, scale=(0.2, 1.0), bicubic)`` + horizontal flip, ImageNet mean / std;
* AdamW with betas (0.9, 0.95), weight decay 0.05 except biases, norms and the class / mask tokens;
  ``lr = blr * batch_size / 256`` with ``blr = 1.5e-4`` unless ``--lr`` is given;
* per-iteration learning rate: linear warm-up over ``--warmup-epochs``, then half-cosine to ``--min-lr``;
* bf16 autocast on GPUs that support it (fp16 with a gradient scaler otherwise), full precision on the CPU.

After every epoch the run folder gets, each written atomically: ``mae.safetensors`` + ``mae.json`` (the whole
model, :func:`maskworks.checkpoint.load_model` rebuilds it), ``encoder.safetensors`` + ``encoder.json`` (the encoder
as a :class:`~maskworks.backbones.vit.VisionTransformer` without head, ready for fine-tuning or as a segmentation
backbone), ``last.pt`` (training state for ``--resume``), a row in ``history.jsonl`` and ``recon_epoch{N}.png``
(columns: original, masked input, reconstruction, reconstruction with the visible patches pasted back; the same
images and masks every epoch). Every epoch reseeds the shuffling, the augmentation and the masking from
``(seed, epoch)``, so a resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import DataLoader, Dataset

from maskworks.checkpoint import atomic_torch_save, atomic_write_bytes, load_training_state, save_model
from maskworks.cli.config import ConfigError
from maskworks.data.io import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, read_image
from maskworks.models.mae import MAE_ENCODER_NAMES, MaskedAutoencoderViT, mae_encoder_state_dict, num_visible_patches

__all__ = ["add_parser", "run", "find_images", "mae_learning_rate"]

log = logging.getLogger("maskworks")

CHECKPOINT = "last.pt"
HISTORY = "history.jsonl"
NUM_PREVIEW = 4


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``pretrain-mae`` subcommand (``func=run``) to ``subparsers``."""
    p = subparsers.add_parser(
        "pretrain-mae",
        help="pre-train a ViT encoder as a masked autoencoder on a folder of images",
        description="Masked-autoencoder pre-training (MAE recipe) on every png / jpg / tif / bmp / webp image under "
        "--images (recursively, no labels). Writes mae.safetensors, encoder.safetensors (load it into a ViT "
        "classifier or segmentation backbone), history.jsonl and a reconstruction grid per epoch into --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  maskworks pretrain-mae --images photos/ --epochs 400 --batch-size 256 --out runs/mae\n"
        "  maskworks pretrain-mae --images photos/ --model mae_vit_large_patch16 --resume --out runs/mae\n",
    )
    p.add_argument("--images", required=True, help="folder of training images (searched recursively)")
    p.add_argument("--model", default="mae_vit_base_patch16", choices=sorted(MAE_ENCODER_NAMES), help="MAE variant")
    p.add_argument("--img-size", type=int, default=None, help="training crop size (default: the model's, 224)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed (default 0.75)")
    p.add_argument("--epochs", type=int, default=400, help="epochs (default 400, as main_pretrain.py)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: blr * batch / 256)")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base learning rate per 256 images (default 1.5e-4)")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--warmup-epochs", type=float, default=40, help="linear warm-up epochs (default 40)")
    p.add_argument(
        "--norm-pix-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="normalise every target patch by its mean / std (default on; --no-norm-pix-loss for raw pixels)",
    )
    p.add_argument("--out", default="runs/mae", help="run folder (default runs/mae)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=("auto", "off"), default="auto", help="mixed precision on GPUs (default auto)")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help=f"continue from <out>/{CHECKPOINT}")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out folder that already holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _resume_settings(args, lr: float, batch_size: int) -> dict[str, Any]:
    """Settings a resumed run must keep (the restored optimizer, schedule and sampling depend on them)."""
    return {
        "lr": float(lr),
        "min_lr": float(args.min_lr),
        "weight_decay": float(args.weight_decay),
        "warmup_epochs": float(args.warmup_epochs),
        "mask_ratio": float(args.mask_ratio),
        "batch_size": int(batch_size),
        "norm_pix_loss": bool(args.norm_pix_loss),
        "seed": int(args.seed),
    }


# --------------------------------------------------------------------------------------------------------- data
def find_images(folder: str | Path) -> list[Path]:
    """Sorted image files under ``folder`` (recursive; extensions of :data:`maskworks.data.io.IMAGE_EXTENSIONS`).

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a directory.
        ValueError: it holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images folder {folder} does not exist or is not a directory")
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images found under --images folder {folder}; expected files ending in {IMAGE_EXTENSIONS}")
    return files


def _normalize(img: torch.Tensor) -> torch.Tensor:
    """uint8 ``(3, H, W)`` -> float, ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img.float() / 255.0 - mean) / std


class _Images(Dataset):
    """RGB images, MAE's training augmentation (or a resize + centre crop for the preview)."""

    def __init__(self, files: list[Path], img_size: int, train: bool = True) -> None:
        from torchvision.transforms import InterpolationMode, v2

        self.files = files
        bicubic = InterpolationMode.BICUBIC
        if train:
            self.transform = v2.Compose(
                [
                    v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=bicubic, antialias=True),
                    v2.RandomHorizontalFlip(),
                ]
            )
        else:
            self.transform = v2.Compose(
                [v2.Resize(img_size, interpolation=bicubic, antialias=True), v2.CenterCrop(img_size)]
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        img = torch.from_numpy(read_image(self.files[index], channels=3).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        return _normalize(self.transform(img.contiguous()))


# -------------------------------------------------------------------------------------------------- optimisation
def mae_learning_rate(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """MAE's ``util/lr_sched.py``: linear warm-up to ``lr``, then half-cosine to ``min_lr``.

    Args:
        epoch: fractional epoch (``epoch + step / steps_per_epoch``).
        lr: peak learning rate.
        min_lr: final learning rate.
        warmup_epochs: warm-up length in epochs.
        epochs: total epochs.
    """
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def _param_groups(model: MaskedAutoencoderViT, weight_decay: float) -> list[dict]:
    """Decay for weight matrices; none for biases, norms (1-D) and the class / mask tokens."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the fixed sin-cos tables
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    if amp == "off" or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------------------------------------------- outputs
def _encoder_recipe(model_name: str, model: MaskedAutoencoderViT, meta: dict) -> dict:
    kwargs = {k: v for k, v in model.encoder_kwargs().items() if k != "norm_layer"}
    return {"model": MAE_ENCODER_NAMES[model_name], "kwargs": {**kwargs, "num_classes": 0}, "meta": meta}


def _save_outputs(out: Path, model_name: str, model: MaskedAutoencoderViT, meta: dict) -> None:
    save_model(model, out / "mae", meta=meta)
    encoder, _ = mae_encoder_state_dict(model.state_dict())
    encoder = {k: v.detach().contiguous().cpu() for k, v in encoder.items()}
    vit_name = MAE_ENCODER_NAMES[model_name]
    atomic_write_bytes(
        out / "encoder.safetensors", safetensors_bytes(encoder, metadata={"format": "pt", "model": vit_name})
    )
    recipe = _encoder_recipe(model_name, model, {**meta, "source": "mae.safetensors"})
    atomic_write_bytes(out / "encoder.json", json.dumps(recipe, indent=2).encode())


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """Normalised ``(3, H, W)`` -> uint8 ``(H, W, 3)``."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = (x.float().cpu() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (H, W, 3)


@torch.no_grad()
def _reconstruction_grid(
    model: MaskedAutoencoderViT, images: torch.Tensor, noise: torch.Tensor, mask_ratio: float
) -> bytes:
    """PNG bytes: one row per image, columns original / masked / reconstruction / reconstruction + visible."""
    from PIL import Image, ImageDraw

    was_training = model.training
    model.eval()
    _, pred, mask = model(images, mask_ratio=mask_ratio, noise=noise)
    model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:  # back from normalised patch space with the target's own statistics
        target = model.patchify(images.float())  # (B, N, p * p * 3)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)  # (B, 3, H, W)
    removed = model.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # (B, 3, H, W), 1 = removed
    masked = images * (1 - removed)  # removed patches show the dataset mean (0 after normalisation)
    pasted = images * (1 - removed) + recon * removed

    size = images.shape[-1]
    tile = max(size, 96)
    pad, header = 4, 16
    columns = ("original", "masked", "reconstruction", "recon + visible")
    width = pad + len(columns) * (tile + pad)
    height = header + pad + images.shape[0] * (tile + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(columns):
        draw.text((pad + j * (tile + pad), 2), title, fill=(0, 0, 0))
    for i in range(images.shape[0]):
        for j, img in enumerate((images[i], masked[i], recon[i], pasted[i])):
            im = Image.fromarray(_to_uint8(img)).resize((tile, tile), Image.NEAREST)
            canvas.paste(im, (pad + j * (tile + pad), header + pad + i * (tile + pad)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------------- run
def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


def run(args: argparse.Namespace) -> int:
    """Pre-train an MAE on ``args.images`` (see the module docstring); returns 0."""
    from tqdm.auto import tqdm

    from maskworks.engine.trainer import EpochSeededDataset, TrainingDiverged, resolve_device, seed_everything
    from maskworks.registry import create_model

    if args.model not in MAE_ENCODER_NAMES:
        raise ValueError(f"--model must be one of {sorted(MAE_ENCODER_NAMES)}, got {args.model!r}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_epochs < 0:
        raise ValueError(f"--warmup-epochs must be >= 0, got {args.warmup_epochs}")
    files = find_images(args.images)
    from maskworks.cli.commands import prepare_out_dir

    out = prepare_out_dir(args.out)
    earlier = [name for name in (CHECKPOINT, HISTORY) if (out / name).exists()]
    if earlier and not args.resume and not args.overwrite:
        raise ConfigError(
            f"--out {out} already holds a run ({', '.join(earlier)}); continue it with --resume, start a new one "
            "with another --out, or replace it with --overwrite"
        )
    device = resolve_device(args.device)
    seed_everything(args.seed)

    kwargs: dict[str, Any] = {"norm_pix_loss": bool(args.norm_pix_loss)}
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    model = create_model(args.model, **kwargs)
    img_size = model.img_size[0]
    num_visible_patches(model.num_patches, args.mask_ratio)  # validates --mask-ratio
    model.to(device)

    batch_size = args.batch_size
    if batch_size > len(files):
        log.warning("--batch-size %d > %d images: using batches of %d", batch_size, len(files), len(files))
        batch_size = len(files)
    lr = args.lr if args.lr is not None else args.blr * batch_size / 256
    optimizer = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    amp_dtype = _amp_dtype(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, history = 0, []
    ckpt_path = out / CHECKPOINT
    if args.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"cannot resume: no checkpoint at {ckpt_path}")
        state = load_training_state(ckpt_path, map_location=device)
        if state.get("model_name") != args.model or list(state.get("img_size", ())) != list(model.img_size):
            raise ValueError(
                f"{ckpt_path} is a {state.get('model_name')} at {tuple(state.get('img_size', ()))}, but --model "
                f"{args.model} at "
                f"{tuple(model.img_size)} was asked for"
            )
        saved = state.get("settings", {})
        changed = {
            k: (saved[k], v) for k, v in _resume_settings(args, lr, batch_size).items() if k in saved and saved[k] != v
        }
        if changed:
            listed = "; ".join(f"--{k.replace('_', '-')}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(
                f"cannot resume {ckpt_path} with changed settings ({listed}); the restored optimizer and schedule "
                "would not follow them. Drop them, or start a new run with another --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        log.info("resumed from %s after epoch %d", ckpt_path, start_epoch)
    atomic_write_bytes(out / HISTORY, "".join(json.dumps(r) + "\n" for r in history).encode())
    if start_epoch >= args.epochs:
        log.info("nothing to do: %d of %d epochs already done in %s", start_epoch, args.epochs, out)
        return 0

    train_set = EpochSeededDataset(_Images(files, img_size, train=True), seed=args.seed)
    loader_gen = torch.Generator()
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        generator=loader_gen,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    preview_set = _Images(files[:NUM_PREVIEW], img_size, train=False)
    preview = torch.stack([preview_set[i] for i in range(len(preview_set))]).to(device)  # (k, 3, S, S)
    preview_noise = torch.rand(len(preview_set), model.num_patches, generator=torch.Generator().manual_seed(args.seed))
    meta = {
        "mask_ratio": args.mask_ratio,
        "norm_pix_loss": bool(args.norm_pix_loss),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "in_channels": 3,
        "images": str(args.images),
    }
    steps = len(loader)
    log.info(
        "MAE pre-training %s on %d images (%d steps / epoch), lr %.3g, mask ratio %.2f, device %s",
        args.model,
        len(files),
        steps,
        lr,
        args.mask_ratio,
        device,
    )

    model.train()
    for epoch in range(start_epoch, args.epochs):
        train_set.set_epoch(epoch)
        loader_gen.manual_seed(_epoch_seed(args.seed, epoch))
        torch.manual_seed(_epoch_seed(args.seed, epoch) + 1)  # masking noise
        t0, total, count = time.time(), 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress, dynamic_ncols=True)
        for step, images in enumerate(bar):
            step_lr = mae_learning_rate(epoch + step / steps, lr, args.min_lr, args.warmup_epochs, args.epochs)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, _, _ = model(images, mask_ratio=args.mask_ratio)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss is {value} at epoch {epoch + 1} step {step + 1}; the checkpoint of the last completed "
                    f"epoch in {out} is untouched (try a lower --lr / --blr)"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total, count = total + value * images.shape[0], count + images.shape[0]
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{step_lr:.2e}")
        seconds = time.time() - t0
        row = {
            "epoch": epoch + 1,
            "loss": total / max(count, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(seconds, 3),
            "images_per_s": round(count / max(seconds, 1e-9), 2),
        }
        history.append(row)
        epoch_meta = {**meta, "epoch": epoch + 1, "loss": row["loss"]}
        _save_outputs(out, args.model, model, epoch_meta)
        atomic_write_bytes(
            out / f"recon_epoch{epoch + 1:03d}.png",
            _reconstruction_grid(model, preview, preview_noise, args.mask_ratio),
        )
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch + 1,
            "history": history,
            "model_name": args.model,
            "img_size": list(model.img_size),
            "settings": _resume_settings(args, lr, batch_size),
        }
        atomic_torch_save(state, ckpt_path)
        with open(out / HISTORY, "a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("epoch %d/%d: loss %.4f (%.1f s)", epoch + 1, args.epochs, row["loss"], seconds)
    log.info("MAE encoder written to %s", out / "encoder.safetensors")
    return 0

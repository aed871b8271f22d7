"""Mask2Former throughput: maskworks against Hugging Face transformers on the same weights, interleaved in one run.

    python benchmarks/mask2former.py                          # R50 and Swin-T, 384x384, eval + train, CPU, 2 threads
    python benchmarks/mask2former.py --models swin_t --batch 1 --repeats 3
    python benchmarks/mask2former.py --device cuda --amp      # GPU, bf16 autocast

Ours is loaded with HF's state dict (``load_weights(source="hf")``), so both compute the same function (the parity
test checks every decoder layer to 1e-4). Eval: the raw set prediction (ours ``forward_raw``, HF's forward: class and
mask logits of the last layer and the auxiliary ones). Training: both models' own set losses (Hungarian matching,
12,544 importance-sampled points per matched pair, no-object weight 0.1, every decoder layer) on the same targets (six
segments per image), then backward and an SGD step. Median of ``--repeats`` interleaved rounds; ratio ours / HF in
throughput (>= 1.0: at least as fast).
"""

from __future__ import annotations

import argparse
import json

import torch

from maskworks import create_model, load_weights
from maskworks.bench import add_throughput_args, compare, count_macs, setup_throughput_run, write_rows

_ENCODERS = {"r50": "resnet50", "swin_t": "swin_tiny_patch4_window7_224"}


def hf_mask2former(name: str, num_classes: int):
    import transformers

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if name == "r50":
        backbone = transformers.ResNetConfig(out_features=stages)
    else:
        backbone = transformers.SwinConfig(
            embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=stages
        )
    config = transformers.Mask2FormerConfig(backbone_config=backbone, num_labels=num_classes)
    return transformers.Mask2FormerForUniversalSegmentation(config)


def _targets(batch: int, size: int, num_classes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    labels, masks = [], []
    for _ in range(batch):
        m = torch.zeros(6, size, size)
        for j in range(6):
            y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            m[j, y0 : y0 + size // 3, x0 : x0 + size // 3] = 1
        labels.append(torch.randint(0, num_classes, (6,), generator=g).to(device))
        masks.append(m.to(device))
    return labels, masks


def _fns(ours, hf, x, labels, masks, train: bool, amp: bool) -> dict:
    cast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)
    if not train:

        def ours_eval():
            with torch.no_grad(), cast:
                return ours.forward_raw(x)

        def hf_eval():
            with torch.no_grad(), cast:
                return hf(pixel_values=x, output_auxiliary_logits=True)

        return {"ours": ours_eval, "hf": hf_eval}
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-6)
    opt_hf = torch.optim.SGD(hf.parameters(), lr=1e-6)
    targets = [{"labels": lab, "masks": m.bool()} for lab, m in zip(labels, masks)]

    def ours_step():
        with cast:
            loss = sum(ours(x, targets).values())
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def hf_step():
        with cast:
            loss = hf(pixel_values=x, mask_labels=masks, class_labels=labels).loss
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()

    return {"ours": ours_step, "hf": hf_step}


def measure(name: str, args, device: torch.device, limit: float) -> list[dict]:
    torch.manual_seed(0)
    hf = hf_mask2former(name, args.num_classes)
    ours = create_model("mask2former", encoder=_ENCODERS[name], num_classes=args.num_classes)
    load_weights(ours, hf.state_dict(), source="hf")
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels, masks = _targets(args.batch, args.size, args.num_classes, device)
    ours.eval()
    macs = count_macs(_Raw(ours), x[:1].cpu()) * args.batch
    rows = []
    for train in (False, True):
        ours.to(device).train(train)
        hf.to(device).train(train)
        result = compare(_fns(ours, hf, x, labels, masks, train, args.amp), warmup=2, repeats=args.repeats,
                         device=device)  # fmt: skip
        ours_t, hf_t = result.timings["ours"].median, result.timings["hf"].median
        flops = 2 * macs * (3 if train else 1)
        rows.append(
            {
                "model": f"mask2former_{name}",
                "mode": "train" if train else "eval",
                "batch": args.batch,
                "input": [args.size, args.size],
                "ours_img_s": args.batch / ours_t,
                "hf_img_s": args.batch / hf_t,
                "throughput_ratio": hf_t / ours_t,
                "ours_iqr_s": result.timings["ours"].iqr,
                "hf_iqr_s": result.timings["hf"].iqr,
                "ours_gflops": flops / ours_t / 1e9,
                "fraction_of_matmul": flops / ours_t / 1e9 / limit,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


class _Raw(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model.forward_raw(x)
        return out["pred_masks"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["r50", "swin_t"], choices=sorted(_ENCODERS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--num-classes", type=int, default=133)
    add_throughput_args(p)
    args = p.parse_args()
    device, limit = setup_throughput_run(args)
    print(f"machine limit: matmul {limit:.1f} GFLOP/s on {device} ({'bf16' if args.amp else 'fp32'})", flush=True)
    rows = [row for name in args.models for row in measure(name, args, device, limit)]
    print("| model | mode | ours img/s | HF img/s | ours / HF | ours GFLOP/s | fraction of matmul |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['mode']} | {r['ours_img_s']:.2f} | {r['hf_img_s']:.2f} | "
            f"{r['throughput_ratio']:.3f} | {r['ours_gflops']:.1f} | {r['fraction_of_matmul']:.2f} |"
        )
    write_rows(args, device, limit, rows)


if __name__ == "__main__":
    main()

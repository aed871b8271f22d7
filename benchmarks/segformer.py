"""SegFormer throughput: maskworks against Hugging Face transformers on the same weights, interleaved in one run.

    python benchmarks/segformer.py                              # B0 and B2, 512x512, eval + train, CPU, 2 threads
    python benchmarks/segformer.py --models segformer_b0 --batch 4 --repeats 3
    python benchmarks/segformer.py --device cuda --amp          # GPU, bf16 autocast

Ours is loaded with HF's state dict (``load_weights(source="hf")``), so both compute the same function. HF returns
logits at 1/4 resolution; ours returns them at the input size, so HF's eval is timed with the same bilinear upsampling
(what its users must add). Training: HF through its ``labels`` argument (it upsamples the logits to the labels and
takes cross-entropy, ignore index 255), ours with the same loss; then backward and an SGD step. Median of
``--repeats`` interleaved rounds; ratio ours / HF in throughput (>= 1.0: at least as fast); achieved GFLOP/s (MACs by
``torch.utils.flop_counter``, training counted as 3x the forward) as a fraction of the best 2048x2048 matmul.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from maskworks import create_model, load_weights
from maskworks.bench import add_throughput_args, compare, count_macs, setup_throughput_run, write_rows

# HF configs of the paper's sizes (transformers' SegformerConfig defaults are B0)
_SIZES = {
    "segformer_b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "segformer_b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "segformer_b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "segformer_b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "segformer_b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "segformer_b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}


def hf_segformer(name: str, num_classes: int):
    import transformers

    config = transformers.SegformerConfig(num_labels=num_classes, **_SIZES[name])
    return transformers.SegformerForSemanticSegmentation(config)


def _fns(ours, hf, x: torch.Tensor, y: torch.Tensor, train: bool, amp: bool) -> dict:
    cast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)
    if not train:

        def ours_eval():
            with torch.no_grad(), cast:
                return ours(x)

        def hf_eval():
            with torch.no_grad(), cast:
                logits = hf(pixel_values=x).logits
                return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

        return {"ours": ours_eval, "hf": hf_eval}
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-6)
    opt_hf = torch.optim.SGD(hf.parameters(), lr=1e-6)

    def ours_step():
        with cast:
            loss = F.cross_entropy(ours(x).float(), y, ignore_index=255)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def hf_step():
        with cast:
            loss = hf(pixel_values=x, labels=y).loss
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()

    return {"ours": ours_step, "hf": hf_step}


def measure(name: str, args, device: torch.device, limit: float) -> list[dict]:
    torch.manual_seed(0)
    hf = hf_segformer(name, args.num_classes)
    ours = create_model(name, num_classes=args.num_classes)
    load_weights(ours, hf.state_dict(), source="hf")
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch, args.size, args.size), device=device)
    macs = count_macs(ours, x[:1].cpu()) * args.batch
    rows = []
    for train in (False, True):
        ours.to(device).train(train)
        hf.to(device).train(train)
        result = compare(_fns(ours, hf, x, y, train, args.amp), warmup=2, repeats=args.repeats, device=device)
        ours_t, hf_t = result.timings["ours"].median, result.timings["hf"].median
        flops = 2 * macs * (3 if train else 1)
        rows.append(
            {
                "model": name,
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["segformer_b0", "segformer_b2"], choices=sorted(_SIZES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=150)
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

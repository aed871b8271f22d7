"""Vision Transformer throughput: maskworks against timm on the same weights, measured interleaved in one run.

    python benchmarks/vit.py                                  # CPU: S/16 and B/16 at 224 and 384, eval + train
    python benchmarks/vit.py --models vit_small_patch16_224 --batch 4 --repeats 3
    python benchmarks/vit.py --device cuda --amp --batch 64   # GPU, bf16 autocast

For each model, ours is built from timm's state dict (identical keys), so both compute the same function. Eval:
images per second of a no-grad forward. Train: images per second of forward + cross-entropy + backward + SGD step.
Both sides run in the same process, alternately (ours, timm, timm, ours, ...); the median of ``--repeats`` rounds
is reported with the ratio ours / timm in throughput (>= 1.0: at least as fast). The machine limit is the best
GFLOP/s of a 2048x2048 matrix product on the same device (fp32, or bf16 with ``--amp``); each model's achieved GFLOP/s (MACs counted by
``torch.utils.flop_counter``, training counted as 3x the forward) is reported as a fraction of it.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from maskworks import create_model
from maskworks.bench import add_throughput_args, compare, count_macs, setup_throughput_run, write_rows

DEFAULT_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "vit_small_patch16_384", "vit_base_patch16_384")


def step_fn(model, x, y, train: bool, amp: bool):
    device_type = x.device.type
    if not train:

        def infer():
            with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
                return model(x)

        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def train_step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return train_step


def measure(name: str, batch: int, device: torch.device, amp: bool, repeats: int, limit: float) -> list[dict]:
    import timm

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False)
    ours = create_model(name)
    ours.load_state_dict(ref.state_dict())
    size = ref.default_cfg["input_size"][1:]
    x = torch.randn(batch, 3, *size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    macs = count_macs(ours, x[:1].cpu()) * batch
    rows = []
    for train in (False, True):
        fns = {}
        for label, model in (("ours", ours), ("timm", ref)):
            fns[label] = step_fn(model.to(device).train(train), x, y, train, amp)
        result = compare(fns, warmup=2, repeats=repeats, device=device)
        ours_t, timm_t = result.timings["ours"].median, result.timings["timm"].median
        flops = 2 * macs * (3 if train else 1)
        rows.append(
            {
                "model": name,
                "mode": "train" if train else "eval",
                "batch": batch,
                "input": list(size),
                "ours_img_s": batch / ours_t,
                "timm_img_s": batch / timm_t,
                "throughput_ratio": timm_t / ours_t,
                "ours_gflops": flops / ours_t / 1e9,
                "fraction_of_matmul": flops / ours_t / 1e9 / limit,
                "ours_peak_mib": result.timings["ours"].peak_mib,
                "timm_peak_mib": result.timings["timm"].peak_mib,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--batch", type=int, default=8)
    add_throughput_args(p)
    args = p.parse_args()
    device, limit = setup_throughput_run(args)
    print(f"machine limit: matmul {limit:.1f} GFLOP/s on {device} ({'bf16' if args.amp else 'fp32'})", flush=True)
    rows = []
    for name in args.models:
        rows += measure(name, args.batch, device, args.amp, args.repeats, limit)
    print(f"\nbatch {args.batch}, {device}, {'bf16 autocast' if args.amp else 'fp32'}, {args.threads} threads")
    print("| model | mode | ours img/s | timm img/s | ours / timm | ours GFLOP/s | fraction of matmul |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['mode']} | {r['ours_img_s']:.2f} | {r['timm_img_s']:.2f} | "
            f"{r['throughput_ratio']:.3f} | {r['ours_gflops']:.1f} | {r['fraction_of_matmul']:.2f} |"
        )
    write_rows(args, device, limit, rows)


if __name__ == "__main__":
    main()

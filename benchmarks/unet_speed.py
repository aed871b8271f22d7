"""Training and inference throughput of ``unet`` against ``segmentation_models_pytorch.Unet``.

Both models are built with random weights from the same state dict (the keys are identical), and
are measured alternately in one process so they share the machine's noise. Reports images per
second for a training step (forward + backward + SGD) and for inference, in fp32 and (on GPU)
bf16 autocast, with the ratio maskworks / smp (> 1 means maskworks is faster).

    python benchmarks/unet_speed.py                      # CPU: 256x256, batch 4
    python benchmarks/unet_speed.py --size 512 --batch 16 --amp   # GPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from maskworks import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, x, y, train: bool, amp: bool, steps: int, warmup: int = 3) -> float:
    device = x.device
    opt = torch.optim.SGD(model.parameters(), lr=1e-4) if train else None
    model.train(train)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        if train:
            with ctx:
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), ctx:
                model(x)
    _sync(device)
    return x.shape[0] * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", nargs="+", default=["resnet18", "resnet34"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best of each is kept")
    p.add_argument("--amp", action="store_true", help="also measure bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    import segmentation_models_pytorch as smp

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    rows = []
    for enc in args.encoder:
        torch.manual_seed(0)
        ours = create_model("unet", encoder=enc, num_classes=args.classes)
        peer = smp.Unet(enc, encoder_weights=None, classes=args.classes)
        peer.load_state_dict(ours.state_dict())
        ours, peer = ours.to(device, memory_format=fmt), peer.to(device, memory_format=fmt)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=fmt)
        y = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
        for amp in [False, True] if args.amp else [False]:
            for train in (True, False):
                best = {"maskworks": 0.0, "smp": 0.0}
                for _ in range(args.repeats):
                    best["maskworks"] = max(best["maskworks"], measure(ours, x, y, train, amp, args.steps))
                    best["smp"] = max(best["smp"], measure(peer, x, y, train, amp, args.steps))
                row = {
                    "encoder": enc,
                    "mode": "train" if train else "infer",
                    "dtype": "bf16" if amp else "fp32",
                    "size": args.size,
                    "batch": args.batch,
                    "device": torch.cuda.get_device_name()
                    if device.type == "cuda"
                    else f"cpu x{torch.get_num_threads()}",
                    "maskworks_img_s": round(best["maskworks"], 2),
                    "smp_img_s": round(best["smp"], 2),
                    "ratio": round(best["maskworks"] / best["smp"], 3),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""Hierarchical backbones and UPerNet: maskworks against timm and Hugging Face on the same weights, in one run.

    python benchmarks/hierarchical.py                          # every section, CPU, 2 threads
    python benchmarks/hierarchical.py --sections backbones --batch 4 --repeats 3
    python benchmarks/hierarchical.py --device cuda --amp       # GPU, bf16 autocast

Sections:

* ``backbones``: Swin-T (224), Swin V2-T (window 8, 256) and ConvNeXt-T (224) against timm. Ours is loaded with
  timm's weights (the same function); both run ``forward_features`` (eval: images / s of a no-grad forward; train:
  forward + mean-square loss + backward + SGD step), interleaved (ours, timm, timm, ours, ...), median of
  ``--repeats`` rounds; ratio ours / timm in throughput (>= 1.0: at least as fast). The achieved GFLOP/s (MACs by
  ``torch.utils.flop_counter``; training counted as 3x the forward) is given as a fraction of the machine limit,
  the best GFLOP/s of a 2048x2048 matrix product.
* ``upernet``: ``upernet_swin_tiny`` (150 classes) against HF ``UperNetForSemanticSegmentation`` with HF's weights
  loaded into ours: eval at 512x512 (batch 1), training steps at 256x256 (batch 2; both compute cross-entropy on
  the logits + 0.4 x the auxiliary head's, HF through its ``labels`` argument).
* ``q40``: Swin-T vs ConvNeXt-T vs ResNet-50 backbones at 512x512, batch 1, eval: latency, parameters, GMACs.
* ``q33``: measured MACs of Swin-T and ViT-B/16 at 224, 448 and 896 (``maskworks complexity --models``).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from maskworks import create_model, load_weights
from maskworks.bench import add_throughput_args, compare, count_macs, setup_throughput_run, write_rows
from maskworks.explain.complexity import model_macs, model_scaling, model_scaling_table

BACKBONES = (("swin_tiny_patch4_window7_224", 224), ("swinv2_tiny_window8_256", 256), ("convnext_tiny", 224))
SECTIONS = ("backbones", "upernet", "q40", "q33")


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def _features_step(forward, params, x: torch.Tensor, train: bool, amp: bool):
    if not train:

        def infer():
            with torch.no_grad(), _autocast(x.device, amp):
                return forward(x)

        return infer
    opt = torch.optim.SGD(params, lr=1e-6)

    def train_step():
        with _autocast(x.device, amp):
            loss = forward(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return train_step


def _pair_row(section, model, train, batch, size, peer, peer_key, result, macs, limit) -> dict:
    """One ours-vs-peer row from a :func:`compare` result (``ours`` and ``peer_key`` timings)."""
    ours_t, peer_t = result.timings["ours"].median, result.timings[peer_key].median
    flops = 2 * macs * (3 if train else 1)
    row = {
        "section": section,
        "model": model,
        "mode": "train" if train else "eval",
        "batch": batch,
        "input": [size, size],
        "ours_img_s": batch / ours_t,
        "peer_img_s": batch / peer_t,
        "peer": peer,
        "throughput_ratio": peer_t / ours_t,
        "ours_iqr_s": result.timings["ours"].iqr,
        "peer_iqr_s": result.timings[peer_key].iqr,
        "ours_gflops": flops / ours_t / 1e9,
        "fraction_of_matmul": flops / ours_t / 1e9 / limit,
        "ours_peak_mib": result.timings["ours"].peak_mib,
        "peer_peak_mib": result.timings[peer_key].peak_mib,
    }
    print(json.dumps(row), flush=True)
    return row


def backbones(args, device: torch.device, limit: float) -> list[dict]:
    import timm

    rows = []
    for name, size in BACKBONES:
        torch.manual_seed(0)
        ref = timm.create_model(name, pretrained=False, num_classes=0)
        ours = create_model(name)
        load_weights(ours, ref.state_dict(), source="timm", strict=False)
        x = torch.randn(args.batch, 3, size, size, device=device)
        macs = count_macs(ours, x[:1].cpu()) * args.batch
        for train in (False, True):
            fns = {}
            for label, model in (("ours", ours), ("timm", ref)):
                model.to(device).train(train)
                fns[label] = _features_step(model.forward_features, model.parameters(), x, train, args.amp)
            result = compare(fns, warmup=2, repeats=args.repeats, device=device)
            rows.append(_pair_row("backbones", name, train, args.batch, size, "timm", "timm", result, macs, limit))
    return rows


def _hf_upernet_swin_tiny():
    import transformers

    backbone = transformers.SwinConfig(
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = transformers.UperNetConfig(backbone_config=backbone, num_labels=150)
    return transformers.UperNetForSemanticSegmentation(config)


def _upernet_fns(ours, hf, x: torch.Tensor, y: torch.Tensor, train: bool, amp: bool) -> dict:
    """Eval (logits) or training-step callables of ours and HF's UPerNet on the same batch."""
    if not train:

        def ours_eval():
            with torch.no_grad(), _autocast(x.device, amp):
                return ours(x)

        def hf_eval():
            with torch.no_grad(), _autocast(x.device, amp):
                return hf(pixel_values=x).logits

        return {"ours": ours_eval, "hf": hf_eval}
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-6)
    opt_hf = torch.optim.SGD(hf.parameters(), lr=1e-6)

    def ours_step():
        with _autocast(x.device, amp):
            out = ours(x)
            loss = F.cross_entropy(out["out"].float(), y, ignore_index=255)
            loss = loss + 0.4 * F.cross_entropy(out["aux"][0].float(), y, ignore_index=255)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def hf_step():
        with _autocast(x.device, amp):
            loss = hf(pixel_values=x, labels=y).loss  # + 0.4 x the auxiliary head's (HF's default weight)
        opt_hf.zero_grad(set_to_none=True)
        loss.backward()
        opt_hf.step()

    return {"ours": ours_step, "hf": hf_step}


def upernet(args, device: torch.device, limit: float) -> list[dict]:
    torch.manual_seed(0)
    hf = _hf_upernet_swin_tiny()
    ours = create_model("upernet_swin_tiny", num_classes=150)
    load_weights(ours, hf.state_dict(), source="hf")
    rows = []
    for train, size, batch in ((False, 512, 1), (True, 256, 2)):
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 150, (batch, size, size), device=device)
        macs = count_macs(ours.eval(), x[:1].cpu()) * batch
        ours.to(device).train(train)
        hf.to(device).train(train)
        fns = _upernet_fns(ours, hf, x, y, train, args.amp)
        result = compare(fns, warmup=1, repeats=args.repeats, device=device)
        rows.append(
            _pair_row("upernet", "upernet_swin_tiny", train, batch, size, "hf transformers", "hf", result, macs, limit)
        )
    return rows


def q40(args, device: torch.device, limit: float) -> list[dict]:
    names = ("swin_tiny_patch4_window7_224", "convnext_tiny", "resnet50")
    x = torch.randn(1, 3, 512, 512, device=device)
    models = {n: create_model(n).eval().to(device) for n in names}

    def runner(model):
        def run():
            with torch.no_grad(), _autocast(device, args.amp):
                return model.forward_intermediates(x)

        return run

    result = compare({n: runner(m) for n, m in models.items()}, warmup=2, repeats=args.repeats, device=device)
    rows = []
    for n, m in models.items():
        macs = model_macs(n, 512)["macs"]
        t = result.timings[n].median
        rows.append(
            {
                "section": "q40",
                "model": n,
                "input": [512, 512],
                "params": sum(p.numel() for p in m.parameters()),
                "gmacs": macs / 1e9,
                "latency_ms": 1e3 * t,
                "iqr_ms": 1e3 * result.timings[n].iqr,
                "fraction_of_matmul": 2 * macs / t / 1e9 / limit,
                "peak_mib": result.timings[n].peak_mib,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def q33(args, device: torch.device, limit: float) -> list[dict]:
    rows = model_scaling(("swin_tiny_patch4_window7_224", "vit_base_patch16_224"), (224, 448, 896))
    print(model_scaling_table(rows), flush=True)
    return [{"section": "q33", **r} for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--batch", type=int, default=8, help="batch of the backbones section (default 8)")
    add_throughput_args(p)
    args = p.parse_args()
    device, limit = setup_throughput_run(args)
    print(f"machine limit: matmul {limit:.1f} GFLOP/s on {device} ({'bf16' if args.amp else 'fp32'})", flush=True)
    sections = {"backbones": backbones, "upernet": upernet, "q40": q40, "q33": q33}
    rows = []
    for name in args.sections:
        rows += sections[name](args, device, limit)
    write_rows(args, device, limit, rows)


if __name__ == "__main__":
    main()
